"""The window_recurrent mixer: built, it is the window student bit for bit; cache == full forward with an open gate;
packed documents reset; gradients reach the gate, then the recurrence; memory; calibration; the build option."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import radistill  # noqa: F401  (Auto-class registration)
from radistill.hybrid import HybridForCausalLM, output_cache
from radistill.hybrid.build import convert, student_config
from radistill.hybrid.calibrate import calibrate
from radistill.hybrid.memory import memory_rows
from radistill.hybrid.mixers import DiscreteMamba2, MixerBank, WindowAttention, WindowRecurrent, get_mixer
from radistill.models.presets import tiny_config
from radistill.utils.errors import RadistillError
from test_hybrid import (assert_pieces_equal_the_full_forward, left_padded, make_teacher,
                         state_bytes_match_the_accounting)

SETTINGS = {"window": 3, "state_size": 8, "chunk_size": 4}
KEPT = [[0], [], [2], []]  # tiny presets: 4 query heads in 2 KV groups, head_dim 16, 4 layers here


def build(teacher, mixer="window_recurrent", settings=SETTINGS, kept=KEPT, head_mixers=None):
    return convert(teacher, student_config(teacher, kept, mixer, settings, head_mixers=head_mixers)).eval()


def text(seed=0, batch=2, length=16):
    ids = torch.randint(1, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids, "attention_mask": torch.ones(batch, length, dtype=torch.long)}]


def mixers_of(student):
    return [layer.self_attn.recurrent for layer in student.model.layers if layer.self_attn.recurrent is not None]


@torch.no_grad()
def opened(student, seed=0):
    """Gates open (random, nonzero) and the recurrence moved off its init, as after some training."""
    generator = torch.Generator().manual_seed(seed)
    for mixer in mixers_of(student):
        mixer.gate.copy_((torch.rand(mixer.gate.shape, generator=generator) + 0.5) / mixer.gate_scale)
        for param in mixer.recurrence.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return student


def rope(length, positions=None, dtype=torch.float64):
    embedding = LlamaRotaryEmbedding(tiny_config("llama", hidden_size=32, num_attention_heads=4, head_dim=8))
    positions = torch.arange(length)[None] if positions is None else positions
    return tuple(t.to(dtype) for t in embedding(torch.zeros(1, length, 32), positions))


def small_mixer(gate=0.7, seed=0):
    """A random 4-head mixer (2 KV heads), float64, its gate open and its normaliser not the identity."""
    torch.manual_seed(seed)
    mixer = WindowRecurrent(32, 4, 8, window=3, state_size=4, chunk_size=4, block_size=2,
                            kv_groups=[0, 0, 1, 1]).double()
    with torch.no_grad():
        mixer.gate.fill_(gate / mixer.gate_scale)
        for param in mixer.recurrence.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        mixer.normalizer.student_std.uniform_(0.5, 2.0)
        mixer.normalizer.teacher_std.uniform_(0.5, 2.0)
        mixer.normalizer.student_mean.normal_()
    return mixer


def test_registered_with_the_parts_flags_and_settings():
    assert get_mixer("window_recurrent") is WindowRecurrent
    assert WindowRecurrent.needs_positions and WindowRecurrent.supports_reset and WindowRecurrent.shares_kv
    assert WindowRecurrent.has_half_lives and not WindowRecurrent.calibrate_normalizer
    mixer = WindowRecurrent(32, 4, 8, window=5, state_size=4, kv_groups=[0, 0, 1, 1])
    assert mixer.settings["window"] == 5 and mixer.settings["state_size"] == 4 and "kv_groups" not in mixer.settings
    assert torch.equal(mixer.gates(), torch.zeros(4)) and mixer.normalized_heads() == [False] * 4
    assert mixer.settings["gate_scale"] == 16.0
    with pytest.raises(RadistillError, match="gate_scale"):
        WindowRecurrent(32, 4, 8, gate_scale=0.0)
    with pytest.raises(RadistillError, match="window >= 1"):
        WindowRecurrent(32, 4, 8, window=0)
    with pytest.raises(RadistillError, match="state_size"):
        WindowRecurrent(32, 4, 8, state_size=0)


def test_from_attention_builds_each_part_as_its_own_from_attention():
    """The window part is WindowAttention.from_attention's, the recurrence DiscreteMamba2.from_attention's, and the
    forward is window + gate * normaliser(recurrence) of those two."""
    torch.manual_seed(0)
    H, P, D = 4, 8, 32
    q, k, v = (torch.randn(H, P, D, dtype=torch.float64) for _ in range(3))
    k[1], v[1], k[3], v[3] = k[0], v[0], k[2], v[2]  # GQA: heads {0, 1} and {2, 3} share K/V rows
    settings = dict(window=3, state_size=4, chunk_size=4)
    mixer = WindowRecurrent.from_attention(D, q, k, v, kv_groups=[0, 0, 1, 1], **settings)
    window = WindowAttention.from_attention(D, q, k, v, kv_groups=[0, 0, 1, 1], window=3)
    recurrence = DiscreteMamba2.from_attention(D, q, k, v, state_size=4, chunk_size=4)
    with torch.no_grad():
        mixer.gate.copy_(torch.tensor([0.0, 0.5, -1.0, 2.0], dtype=torch.float64) / mixer.gate_scale)
        mixer.normalizer.student_std.uniform_(0.5, 2.0)
    u = torch.randn(2, 9, D, dtype=torch.float64)
    pe = rope(9)
    y, _ = mixer(u, position_embeddings=pe)
    gates = torch.tensor([0.0, 0.5, -1.0, 2.0], dtype=torch.float64)[:, None]
    expected = window(u, position_embeddings=pe)[0] + gates * mixer.normalizer(recurrence(u)[0])
    assert torch.allclose(y, expected, atol=1e-12)
    with pytest.raises(RadistillError, match="does not take the settings"):
        WindowRecurrent.from_attention(D, q, k, v, kv_groups=[0, 0, 1, 1], slots=4)


def test_the_built_student_is_the_window_student_bit_for_bit():
    """Gate 0: calibrated (half-lives set, the recurrence's normaliser fitted) and all, the student's logits are the
    plain window student's exactly, full forward and cached decode alike."""
    teacher = make_teacher()
    student, window = build(teacher), build(teacher, "window", {"window": 3})
    record = calibrate(student, teacher, text())
    assert [len(h) for h in record.half_life_tokens] == [3, 4, 3, 4]  # the recurrences' decays were set
    mixer = student.model.layers[1].self_attn.recurrent
    assert not torch.equal(mixer.normalizer.student_std, torch.ones_like(mixer.normalizer.student_std))
    assert torch.equal(mixer.normalizer.teacher_mean, torch.zeros_like(mixer.normalizer.teacher_mean))  # centred
    layer_norm = student.model.layers[1].self_attn.normalizer
    assert torch.equal(layer_norm.teacher_std, torch.ones_like(layer_norm.teacher_std))  # the layer's: identity
    ids, mask, positions = left_padded()
    with torch.no_grad():
        got = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert torch.equal(got, window(input_ids=ids, attention_mask=mask, position_ids=positions).logits)
        steps = [student(input_ids=ids[:, :9], attention_mask=mask[:, :9], position_ids=positions[:, :9],
                         use_cache=True)]
        cache = output_cache(steps[0])
        for t in range(9, 12):
            steps.append(student(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                                 position_ids=positions[:, t : t + 1], cache=cache, use_cache=True))
        decoded = torch.cat([s.logits for s in steps], 1)
        assert (decoded - got)[mask.bool()].abs().max() <= 1e-4
        with torch.no_grad():  # and the recurrence does count once the gate opens
            opened(student)
        assert (student(input_ids=ids, attention_mask=mask, position_ids=positions).logits - got).abs().max() > 1e-3


@pytest.mark.parametrize("chunks", [[9, 1, 1, 1, 1, 1], [4, 3, 7]])
def test_decode_and_chunked_prefill_equal_the_full_forward(chunks):
    teacher = make_teacher()
    student = opened(build(teacher))
    calibrate(student, teacher, text())
    assert_pieces_equal_the_full_forward(student, chunks)


def test_packed_documents_restart_both_parts():
    """Two documents packed with a reset at the second's start give each document's own outputs, and the state left
    continues the second document as if it had been alone."""
    mixer = small_mixer()
    u = torch.randn(1, 11, 32, dtype=torch.float64)
    reset = torch.zeros(1, 11, dtype=torch.bool)
    reset[0, 5] = True
    positions = torch.cat([torch.arange(5), torch.arange(6)])[None]
    packed_state = mixer.empty_state(1, "cpu", torch.float64)
    packed, _ = mixer(u, state=packed_state, position_embeddings=rope(11, positions), reset=reset)
    first, _ = mixer(u[:, :5], position_embeddings=rope(5))
    alone_state = mixer.empty_state(1, "cpu", torch.float64)
    second, _ = mixer(u[:, 5:], state=alone_state, position_embeddings=rope(6))
    assert torch.allclose(packed, torch.cat([first, second], 1), atol=1e-10)
    step = torch.randn(1, 1, 32, dtype=torch.float64)
    pe = rope(1, torch.tensor([[6]]))
    after_packed, _ = mixer(step, state=packed_state, position_embeddings=pe)
    after_alone, _ = mixer(step, state=alone_state, position_embeddings=pe)
    assert torch.allclose(after_packed, after_alone, atol=1e-10)
    whole, _ = mixer(u, position_embeddings=rope(11))  # without the reset the second document sees the first
    assert (whole[:, 5:] - second).abs().max() > 1e-3


def test_left_padding_changes_neither_outputs_nor_state():
    mixer = small_mixer()
    u = torch.randn(1, 7, 32, dtype=torch.float64)
    padded = torch.cat([torch.randn(1, 3, 32, dtype=torch.float64), u], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    state, padded_state = (mixer.empty_state(1, "cpu", torch.float64) for _ in range(2))
    y, _ = mixer(u, state=state, position_embeddings=rope(7))
    y_padded, _ = mixer(padded, mask, state=padded_state, position_embeddings=rope(10, positions))
    assert torch.allclose(y_padded[:, 3:], y, atol=1e-10)
    assert set(state) == {"window.k", "window.v", "window.valid", "window.next", "recurrence.conv", "recurrence.ssm"}
    assert all(torch.allclose(state[k], padded_state[k], atol=1e-10) for k in state)


def test_gradients_reach_the_gate_first_then_the_recurrence():
    u = torch.randn(2, 9, 32, dtype=torch.float64)
    pe = rope(9)
    closed = small_mixer(gate=0.0)
    closed(u, position_embeddings=pe)[0].square().sum().backward()
    assert closed.gate.grad.abs().min() > 0  # the gate learns from the recurrence's output ...
    assert all(p.grad.abs().max() == 0 for p in closed.recurrence.parameters())  # ... which gets nothing yet
    assert all(p.grad.abs().max() > 0 for p in closed.window.parameters())
    open_ = small_mixer(gate=0.3)
    open_(u, position_embeddings=pe)[0].square().sum().backward()
    assert all(p.grad.abs().max() > 0 for p in open_.parameters())  # every parameter trains once it is open

    from radistill.distill.stages import layer_parameters  # trainable: recurrent takes gate and recurrence

    student = build(make_teacher())
    trained = {id(p) for p in layer_parameters(student.model.layers[1], "recurrent")}
    mixer = student.model.layers[1].self_attn.recurrent
    assert id(mixer.gate) in trained and all(id(p) in trained for p in mixer.recurrence.parameters())


def test_mixing_matrix_is_the_window_plus_the_gated_recurrence():
    mixer = small_mixer(gate=0.0)
    u = torch.randn(2, 7, 32, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    pe = rope(7, (mask.cumsum(-1) - 1).clamp_min(0))
    matrix = mixer.mixing_matrix(u, mask, position_embeddings=pe)
    y, _ = mixer(u, mask, position_embeddings=pe)
    v = mixer.window.v_proj(u).view(2, 7, 2, 8).repeat_interleave(2, dim=2).transpose(1, 2)
    real = mask.bool()
    assert torch.allclose((matrix @ v).transpose(1, 2)[real], y[real], atol=1e-12)  # gate 0: the window's
    with torch.no_grad():
        mixer.gate.fill_(0.5 / mixer.gate_scale)
    opened_matrix = mixer.mixing_matrix(u, mask, position_embeddings=pe)
    assert torch.allclose(opened_matrix - matrix, 0.5 * mixer.recurrence.mixing_matrix(u, mask), atol=1e-12)


def test_cache_bytes_are_both_parts_and_match_the_accounting():
    student = build(make_teacher())
    sizes = state_bytes_match_the_accounting(student)
    assert sizes[20]["total"] - sizes[20]["kv"] == sizes[60]["total"] - sizes[60]["kv"]
    # one layer's 3 heads reading 2 KV heads: the window's rings + the recurrence's per-head states
    parts = WindowRecurrent.state_bytes(3, 16, 2, window=3, kv_heads=2, state_size=8)
    assert parts == {"window": WindowAttention.state_bytes(3, 16, 2, window=3, kv_heads=2)["window"],
                     **DiscreteMamba2.state_bytes(3, 16, 2, state_size=8)}
    rows = memory_rows("nanbeige4.1-3b", [2048], keep=13, mixer="window_recurrent", window=16, state_size=8)
    (planned,) = [r for r in rows if r.model.startswith("student")]
    # 627 recurrent heads over 32 layers (>= 4 per layer): each layer's 4 KV rings (with the build's 4 default
    # sinks) + every head's SSM state
    ring = 4 * 2 * (16 + 4) * 128 * 2 + 16 * 2 + 8 + 8  # + the ring position and the document count (int64)
    assert planned.ssm_bytes == 32 * ring + 627 * 8 * 128 * 2 and planned.conv_bytes == 627 * (128 + 16) * 3 * 2


def test_calibration_fits_each_bank_group_on_its_own_heads():
    """Heads 2 and 3 of layer 0 are window_recurrent either alone with head 1 or in a bank next to a window head 1:
    their recurrence's normaliser comes out the same (the teacher moments are sliced to the group's heads)."""
    teacher = make_teacher()
    alone = build(teacher, kept=[[0], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]])
    bank = build(teacher, kept=[[0], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]],
                 head_mixers=[{"mixer": "window", "settings": {"window": 3}, "heads": [[1], [], [], []]}])
    for student in (alone, bank):
        calibrate(student, teacher, text())
    group = bank.model.layers[0].self_attn.recurrent
    assert isinstance(group, MixerBank) and isinstance(group.groups[1], WindowRecurrent)
    expected, got = alone.model.layers[0].self_attn.recurrent.normalizer, group.groups[1].normalizer
    for name in ("student_mean", "student_std", "teacher_std"):
        assert torch.allclose(getattr(got, name), getattr(expected, name)[1:], atol=1e-5), name


def test_cli_build_and_memory(tmp_path):
    import json

    from typer.testing import CliRunner

    from test_build import saved_teacher_and_cli

    app, teacher, scan = saved_teacher_and_cli(tmp_path)
    common = ["build", str(tmp_path / "teacher"), "--scan", scan, "--keep", "2", "--device", "cpu", "--dtype", "fp32",
              "--window", "4"]
    for mixer in ("window_recurrent", "window"):
        extra = ["--state-size", "4"] if mixer == "window_recurrent" else []
        result = CliRunner().invoke(app, [*common, *extra, "--mixer", mixer, "--out", str(tmp_path / mixer)])
        assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "window_recurrent" / "config.json").read_text())
    assert config["mixer"] == "window_recurrent"
    assert config["mixer_settings"]["window"] == 4 and config["mixer_settings"]["state_size"] == 4
    students = [HybridForCausalLM.from_pretrained(tmp_path / name).eval() for name in ("window_recurrent", "window")]
    ids = torch.randint(1, 256, (2, 11))
    with torch.no_grad():
        assert torch.equal(students[0](input_ids=ids).logits, students[1](input_ids=ids).logits)
    result = CliRunner().invoke(app, ["memory", str(tmp_path / "window_recurrent"), "--lengths", "16", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert rows[1]["ssm_bytes"] > 0 and rows[1]["conv_bytes"] > 0
    result = CliRunner().invoke(app, [*common, "--mixer", "discrete_mamba2", "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "window_recurrent" in str(result.exception or result.output)


def test_recalibration_refits_the_recurrence_normaliser_only():
    from radistill.hybrid.calibrate import recalibrate_normalizers

    teacher = make_teacher()
    student = build(teacher)
    calibrate(student, teacher, text())
    mixer = student.model.layers[1].self_attn.recurrent
    before = mixer.normalizer.student_std.clone()
    opened(student)  # training moved the recurrence: its output spread is no longer the calibrated one
    assert recalibrate_normalizers(student, teacher, text()) == 32
    assert not torch.allclose(mixer.normalizer.student_std, before)
    layer_norm = student.model.layers[1].self_attn.normalizer
    assert torch.equal(layer_norm.student_std, torch.ones_like(layer_norm.student_std))


def test_save_load_keeps_gates_and_the_recurrence_normaliser(tmp_path):
    teacher = make_teacher()
    student = opened(build(teacher))
    calibrate(student, teacher, text())
    student.save_pretrained(tmp_path)
    loaded = HybridForCausalLM.from_pretrained(tmp_path).eval()
    mixer, again = student.model.layers[1].self_attn.recurrent, loaded.model.layers[1].self_attn.recurrent
    assert torch.equal(mixer.normalizer.student_std, again.normalizer.student_std)
    assert torch.equal(mixer.gates(), again.gates()) and bool((again.gates() != 0).all())
    ids = torch.randint(1, 256, (2, 10))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-6)


def test_compiled_static_generate_matches_the_eager_growing_cache():
    """The default mixer through generate(): the static HybridCache with the decode step under torch.compile
    (fullgraph) gives the eager growing cache's greedy tokens, left padding included, with an open gate (so both
    parts contribute)."""
    from test_generate import assert_compiled_static_generate_equals_growing

    assert_compiled_static_generate_equals_growing(opened(build(make_teacher())))
