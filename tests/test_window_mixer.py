"""The window mixer and per-head mixer groups: exactness vs the teacher, cache == full forward, memory, configs."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import radistill  # noqa: F401  (Auto-class registration)
from radistill.hybrid import HybridCache, HybridConfig, HybridForCausalLM
from radistill.hybrid.build import convert, student_config
from radistill.hybrid.mixers import MixerBank, WindowAttention
from radistill.models.presets import tiny_config
from radistill.utils.errors import RadistillError
from test_hybrid import (assert_generate_is_the_uncached_greedy_continuation, assert_pieces_equal_the_full_forward,
                         left_padded, make_teacher, state_bytes_match_the_accounting)

MAMBA = {"state_size": 8, "chunk_size": 4}


def window_student(teacher, kept, window, head_mixers=None, mixer="window", settings=None):
    settings = {"window": window} if settings is None else settings
    return convert(teacher, student_config(teacher, kept, mixer, settings, head_mixers=head_mixers)).eval()


@pytest.mark.parametrize(("model_type", "overrides"),
                         [("llama", {}), ("qwen2", {}), ("qwen3", {}), ("llama", {"num_key_value_heads": 4})])
def test_a_window_longer_than_the_text_is_the_teacher(model_type, overrides):
    """Every head windowed, window >= length: the student is the teacher (Q/K/V, RoPE, bias, qk-norm, GQA copied)."""
    teacher = make_teacher(model_type, num_hidden_layers=2, **overrides)
    student = window_student(teacher, [[], [1]], window=64)
    ids, mask, positions = left_padded()
    with torch.no_grad():
        expected = teacher(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert (got - expected)[mask.bool()].abs().max() <= 1e-5


def test_window_heads_equal_a_sliding_window_teacher():
    """Window W on every head == the same weights run as Mistral with sliding_window W (its own mask code)."""
    teacher = make_teacher("mistral", num_hidden_layers=2, sliding_window=4)
    student = window_student(teacher, [[], []], window=4)
    ids = torch.randint(1, 256, (2, 13))
    with torch.no_grad():
        expected = teacher(input_ids=ids).logits
        got = student(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-5
    llama = make_teacher("llama", num_hidden_layers=2)
    with torch.no_grad():  # and a window shorter than the text is not the full-attention teacher
        assert (window_student(llama, [[], []], window=4)(input_ids=ids).logits - llama(input_ids=ids).logits
                ).abs().max() > 1e-2


def mixed_student(teacher):
    """Layer 0: kept {0}, window {1, 3}, DiscreteMamba2 {2}; layer 1: window {0, 1, 2, 3}; layer 2: kept {2},
    mamba rest; layer 3: window {2} (a bank of two mixers in layers 0 and 3)."""
    head_mixers = [{"mixer": "window", "settings": {"window": 3}, "heads": [[1, 3], [0, 1, 2, 3], [], [2]]}]
    student = window_student(teacher, [[0], [], [2], []], window=None, head_mixers=head_mixers,
                             mixer="discrete_mamba2", settings=MAMBA)
    with torch.no_grad():  # a trained-like discrete_mamba2 (its init alone is too tame to catch state bugs)
        generator = torch.Generator().manual_seed(3)
        for name, param in student.named_parameters():
            if ".recurrent." in name and "groups.1" in name or name.endswith("recurrent.D"):
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return student


def test_mixed_groups_layout():
    student = mixed_student(make_teacher())
    mixers = [layer.self_attn for layer in student.model.layers]
    assert isinstance(mixers[0].recurrent, MixerBank) and mixers[0].recurrent_heads == [1, 3, 2]
    assert isinstance(mixers[1].recurrent, WindowAttention) and mixers[1].attention is None
    assert mixers[3].recurrent_heads == [2, 0, 1, 3]
    # GQA: window heads {1, 3} read KV heads 0 and 1; heads {0..3} share 2 KV heads
    assert mixers[0].recurrent.groups[0].num_kv_heads == 2 and mixers[1].recurrent.num_kv_heads == 2


# the last: chunks of several tokens after single steps have wrapped the ring (window 3)
@pytest.mark.parametrize("chunks", [[9, 1, 1, 1, 1, 1], [4, 3, 7], [2, 1, 1, 1, 1, 3, 1, 2, 1, 1]])
def test_decode_and_chunked_prefill_equal_the_full_forward(chunks):
    student = mixed_student(make_teacher())
    assert_pieces_equal_the_full_forward(student, chunks)


def test_generate_matches_the_uncached_greedy_continuation():
    assert_generate_is_the_uncached_greedy_continuation(mixed_student(make_teacher()), 6, 8)


def test_cache_state_is_constant_and_matches_the_memory_accounting():
    student = mixed_student(make_teacher())
    sizes = state_bytes_match_the_accounting(student)
    assert sizes[20]["kv"] < sizes[60]["kv"]  # the one kept head's KV grows ...
    assert sizes[20]["total"] - sizes[20]["kv"] == sizes[60]["total"] - sizes[60]["kv"]  # ... the window's does not


def test_state_bytes_of_a_window():
    # W = 16, head_dim 128, bf16: K and V of 16 tokens = 8 KiB per KV head (plus a 16-slot mask, an int64 position)
    one = WindowAttention.state_bytes(1, 128, 2, window=16)["window"]
    assert one - 16 * 2 - 8 == 8 * 1024
    # GQA: 4 query heads reading 2 KV heads hold two KV heads' rings, not four
    assert WindowAttention.state_bytes(4, 128, 2, window=16, kv_heads=2)["window"] == 2 * 8 * 1024 + 32 + 8


def test_mixing_matrix_is_the_forward():
    torch.manual_seed(0)
    mixer = WindowAttention(32, 4, 8, window=3, kv_groups=[0, 0, 1, 1], block_size=2).double()
    rope = LlamaRotaryEmbedding(tiny_config("llama", hidden_size=32, num_attention_heads=4, head_dim=8))
    u = torch.randn(2, 7, 32, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    pe = tuple(t.double() for t in rope(u, positions))
    y, _ = mixer(u, mask, position_embeddings=pe)
    M = mixer.mixing_matrix(u, mask, position_embeddings=pe)  # [B, H, T, T]
    v = mixer.v_proj(u).view(2, 7, 2, 8).repeat_interleave(2, dim=2).transpose(1, 2)  # [B, H, T, P]
    assert torch.allclose((M @ v).transpose(1, 2), y, atol=1e-12)
    band = torch.ones(7, 7).tril() - torch.ones(7, 7).tril(-3)  # query t sees t-2..t
    assert torch.equal(M[0] != 0, (band.bool()).expand(4, 7, 7))
    assert torch.allclose(M[1, :, 2:].sum(-1), torch.ones(4, 5, dtype=torch.float64))
    assert (M[1, :, :2] == 0).all() and (M[1, :, :, :2] == 0).all()


def test_blocks_do_not_change_outputs_or_gradients():
    torch.manual_seed(0)
    base = WindowAttention(32, 4, 8, window=5, block_size=1000)
    blocked = WindowAttention(32, 4, 8, window=5, block_size=3)
    blocked.load_state_dict(base.state_dict())
    rope = LlamaRotaryEmbedding(tiny_config("llama", hidden_size=32, num_attention_heads=4, head_dim=8))
    u = torch.randn(2, 11, 32)
    pe = rope(u, torch.arange(11)[None])
    grads = []
    for mixer in (base, blocked):
        y, _ = mixer(u, position_embeddings=pe)
        y.square().sum().backward()
        grads.append((y.detach(), [p.grad.clone() for p in mixer.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[0][1], grads[1][1]))
    assert all(g.abs().sum() > 0 for g in grads[0][1])  # every parameter trains


def test_save_load_round_trip_keeps_groups(tmp_path):
    student = mixed_student(make_teacher())
    student.save_pretrained(tmp_path)
    loaded = HybridForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.head_mixers == student.config.head_mixers
    ids = torch.randint(1, 256, (2, 10))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-6)


def test_old_configs_mean_all_other_heads_and_bad_groups_are_refused():
    old = HybridConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, kept_heads=[[1], []])
    assert old.head_mixers is None and old.mixer_groups(0) == [("discrete_mamba2", {}, [0, 2, 3])]
    assert old.mixer_groups(1) == [("discrete_mamba2", {}, [0, 1, 2, 3])]
    with pytest.raises(RadistillError, match="layer 0"):
        HybridConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, kept_heads=[[1]],
                     head_mixers=[{"mixer": "window", "settings": {}, "heads": [[1, 2]]}])
    with pytest.raises(RadistillError, match="head_mixers\\[0\\]"):
        HybridConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                     head_mixers=[{"mixer": "window", "settings": {}, "heads": [[1]]}])


def test_a_window_student_calibrates_without_touching_window_heads():
    from radistill.hybrid.calibrate import calibrate

    teacher = make_teacher()
    student = mixed_student(teacher)
    batches = [{"input_ids": torch.randint(1, 256, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}]
    record = calibrate(student, teacher, batches)
    norm = student.model.layers[0].self_attn.normalizer  # heads [1, 3] window, [2] mamba
    assert torch.equal(norm.student_std[:2], torch.ones(2, 16)) and not torch.equal(norm.student_std[2], torch.ones(16))
    assert len(record.half_life_tokens[0]) == 1 and record.half_life_tokens[1] == []


def test_cli_build_with_window_heads(tmp_path):
    import json

    from typer.testing import CliRunner

    from radistill.hybrid.build import load_selection
    from test_build import saved_teacher_and_cli

    app, teacher, scan = saved_teacher_and_cli(tmp_path)  # the scan ranks (2, 1), (0, 3), (0, 0), (1, 2), ...
    common = ["--scan", scan, "--keep", "2", "--device", "cpu", "--dtype", "fp32"]
    result = CliRunner().invoke(app, ["build", str(tmp_path / "teacher"), *common, "--window-heads", "2",
                                      "--mixer", "discrete_mamba2", "--window", "8", "--state-size", "4",
                                      "--out", str(tmp_path / "mixed")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())
    assert config["kept_heads"] == [[3], [], [1]] and config["mixer"] == "discrete_mamba2"
    (group,) = config["head_mixers"]
    assert group["mixer"] == "window" and group["settings"]["window"] == 8 and group["heads"] == [[0], [2], []]
    assert load_selection(tmp_path / "mixed")["layers"][0]["mixers"] == {"window": [0], "discrete_mamba2": [1, 2]}

    result = CliRunner().invoke(app, ["build", str(tmp_path / "teacher"), *common, "--mixer", "window",
                                      "--window", "4", "--out", str(tmp_path / "window")])
    assert result.exit_code == 0, result.output
    student = HybridForCausalLM.from_pretrained(tmp_path / "window").eval()
    assert student.config.mixer_settings["window"] == 4
    norm = student.model.layers[0].self_attn.normalizer  # training-free: identity normaliser
    assert torch.equal(norm.teacher_std, torch.ones_like(norm.teacher_std))
    ids = torch.randint(1, 256, (1, 4))  # within the window the student is the teacher
    with torch.no_grad():
        assert (student(input_ids=ids).logits - teacher(input_ids=ids).logits).abs().max() <= 1e-4

    result = CliRunner().invoke(app, ["build", str(tmp_path / "teacher"), *common, "--mixer", "discrete_mamba2",
                                      "--window", "4", "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "--mixer window or --window-heads" in str(result.exception or result.output)


def test_stage1_sees_the_window_as_the_teacher_attention(tmp_path):
    """MOHAWK stage 1 on window heads: a window covering the whole sequence is the teacher's attention (loss ~0);
    a short one is not."""
    from radistill.distill.data import PackedStream
    from radistill.distill.stages import make_objective
    from distill_helpers import char_tokenizer, tiny_recipe, tiny_teacher, write_corpus

    write_corpus(tmp_path / "corpus.txt")
    teacher = tiny_teacher()
    recipe = tiny_recipe(tmp_path / "corpus.txt", stages=(1,))
    probe = PackedStream(recipe.data, char_tokenizer(), 16, seed=99).next_batch(4)
    losses = {}
    for window in (16, 3):
        student = window_student(teacher, [[1], []], window=window)
        objective = make_objective(1, student, teacher, recipe.stage(1), [0, 1])
        losses[window] = float(objective.step(probe, scale=0.0)) / objective.unit_count
    assert losses[16] < 1e-6 < 1e-3 < losses[3], losses


def test_memory_plans_a_window_student_with_gqa_shared_rings():
    from radistill.hybrid.memory import memory_rows

    rows = memory_rows("nanbeige4.1-3b", [2048], keep=13, mixer="window", window=16)
    (planned,) = [r for r in rows if r.model.startswith("student")]  # no "paper accounting" row for a window
    # 32 layers x (4 KV heads x K and V of 16 + 4 tokens (window + the build's default sinks) x 128 dims in bf16 +
    # each layer's 16-slot mask, ring position and document count)
    assert planned.ssm_bytes == 32 * (4 * 2 * (16 + 4) * 128 * 2 + 16 * 2 + 8 + 8) and planned.conv_bytes == 0
    assert planned.kv_bytes == 13 * 2 * 128 * 2 * 2048
    with pytest.raises(RadistillError, match="--mixer window"):
        memory_rows("nanbeige4.1-3b", [2048], keep=13, window=16)
    # --sink 0: a plain window, 4 tokens' K/V and the document count fewer per KV head and layer
    (plain,) = [r for r in memory_rows("nanbeige4.1-3b", [2048], keep=13, mixer="window", window=16, sink=0)
                if r.model.startswith("student")]
    assert planned.ssm_bytes - plain.ssm_bytes == 32 * (4 * 2 * 4 * 128 * 2 + 8)
    with pytest.raises(RadistillError, match="--sink"):
        memory_rows("nanbeige4.1-3b", [2048], keep=13, mixer="discrete_mamba2", sink=2)


def test_window_decode_step_traces_as_one_graph():
    """A window student's static decode step under torch.compile(fullgraph=True), as the DM2 one
    (tests/test_generate.py): no host read (.item()), no data-dependent shape, the ring written in place at a
    device-side position; steps past the window's length (the ring wraps), left padding in one row, each equal to
    the eager step, and the last to the full forward."""
    assert_decode_step_is_one_graph(mixed_student(make_teacher()), prefill=7)


def assert_decode_step_is_one_graph(student, prefill: int) -> None:
    """Decode steps 12 - ``prefill`` of a left-padded batch of two through ``torch.compile(fullgraph=True)`` after an
    eager prefill: each equal to the eager step, the last to the full forward, and no graph holds a host read or a
    shape decided by data."""
    import copy

    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :2] = 0
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    step = torch.compile(student, backend=recording, fullgraph=True)
    with torch.no_grad():
        cache = HybridCache(student.config, max_length=16)
        student(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], cache=cache, use_cache=True)
        reference = copy.deepcopy(cache)
        for t in range(prefill, 12):
            want = student(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=reference,
                           use_cache=True).logits
            got = step(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache,
                       use_cache=True).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        full = student(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)
    assert int(cache.get_seq_length()) == 12 and graphs
    for code in graphs:  # what a CUDA graph cannot hold: a host read and the shapes it would decide
        for op in (".item()", "_local_scalar_dense", "sym_max", "sym_min", "_assert_scalar", "nonzero"):
            assert op not in code, op
        assert "scatter_" in code  # the ring is written in place


def test_window_student_compiled_static_generate_matches_the_growing_cache():
    from test_generate import assert_compiled_static_generate_equals_growing

    assert_compiled_static_generate_equals_growing(mixed_student(make_teacher()))


@pytest.mark.parametrize("kv_groups", [[0, 0, 1, 1], [0, 1, 1, 2], [0, 1, 2, 3], [0, 1, 0, 1]])
def test_window_decode_step_widens_kv_per_head_like_the_index(kv_groups):
    """The decode step's view-only widening of K/V per query head equals index_select by kv_groups (the last case,
    KV heads not adjacent, takes index_select itself); decode == the full forward either way."""
    torch.manual_seed(0)
    mixer = WindowAttention(32, 4, 8, window=3, kv_groups=kv_groups).double()
    kv = torch.randn(2, len(set(kv_groups)), 3, 8, dtype=torch.float64)
    assert torch.equal(mixer._per_head(kv), kv.index_select(1, torch.tensor(kv_groups)))
    u = torch.randn(2, 7, 32, dtype=torch.float64)
    rope = LlamaRotaryEmbedding(tiny_config("llama", hidden_size=32, num_attention_heads=4, head_dim=8))
    cos, sin = rope(u, torch.arange(7)[None].expand(2, -1))
    with torch.no_grad():
        full, _ = mixer(u, position_embeddings=(cos.double(), sin.double()))
        state = mixer.empty_state(2, "cpu", torch.float64)
        steps = [mixer(u[:, t : t + 1], state=state, position_embeddings=(cos[:, t : t + 1].double(),
                                                                          sin[:, t : t + 1].double()))[0]
                 for t in range(7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-6)  # scores are fp32 on both paths


@pytest.mark.parametrize("kv_groups, grouped", [([0, 0, 1, 1], True), ([0, 1, 2, 3], True), ([0, 0, 0, 1], False),
                                                ([0, 1, 0, 1], False)])
@pytest.mark.parametrize("sink", [0, 2])
def test_decode_steps_equal_the_full_forward_grouped_or_widened(kv_groups, grouped, sink):
    """The decode step reads K/V once per KV head when every KV head serves as many adjacent query heads (the query
    heads grouped as a view), and widens K/V per query head otherwise; both give the full forward's outputs."""
    torch.manual_seed(0)
    mixer = WindowAttention(32, 4, 8, window=3, sink=sink, kv_groups=kv_groups).double()
    assert bool(mixer._group_size) == grouped
    rope = LlamaRotaryEmbedding(tiny_config("llama", hidden_size=32, num_attention_heads=4, head_dim=8))
    u = torch.randn(2, 9, 32, dtype=torch.float64)
    pe = tuple(t.double() for t in rope(u, torch.arange(9)[None]))
    full, _ = mixer(u, position_embeddings=pe)
    state = mixer.empty_state(2, "cpu", torch.float64)
    steps = [mixer(u[:, t : t + 1], state=state, position_embeddings=tuple(x[:, t : t + 1] for x in pe))[0]
             for t in range(9)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-12)


@pytest.mark.parametrize("sink", [0, 2])
@pytest.mark.parametrize("length", [3, 9])
def test_a_first_prefill_into_a_fresh_state_equals_the_general_path(sink, length):
    """fresh=True (the cache made the state for this call) skips laying out the empty ring and sinks: the outputs,
    every state tensor and the decode steps after it equal the general path's; shorter than max(W, S) tokens or
    with a padding mask it takes the general path."""
    torch.manual_seed(0)
    mixer = WindowAttention(32, 4, 8, window=3, sink=sink, kv_groups=[0, 0, 1, 1]).double()
    rope = LlamaRotaryEmbedding(tiny_config("llama", hidden_size=32, num_attention_heads=4, head_dim=8))
    u = torch.randn(2, length + 2, 32, dtype=torch.float64)
    pe = tuple(t.double() for t in rope(u, torch.arange(length + 2)[None]))
    first = (u[:, :length], tuple(x[:, :length] for x in pe))
    calls = []
    original = mixer._first_prefill
    mixer._first_prefill = lambda *a: calls.append(1) or original(*a)
    runs = []
    for fresh in (True, False):
        state = mixer.empty_state(2, "cpu", torch.float64)
        y, _ = mixer(first[0], state=state, position_embeddings=first[1], fresh=fresh)
        steps = [mixer(u[:, t : t + 1], state=state, position_embeddings=tuple(x[:, t : t + 1] for x in pe))[0]
                 for t in range(length, length + 2)]
        runs.append((y, {k: v.clone() for k, v in state.items()}, torch.cat(steps, 1)))
    assert len(calls) == (1 if length >= max(3, sink) else 0)
    (y_fast, state_fast, steps_fast), (y_general, state_general, steps_general) = runs
    # the fast path's plain band and the general band both take fp32 scores, in matmuls of other shapes
    torch.testing.assert_close(y_fast, y_general, rtol=1e-5, atol=1e-6)
    assert state_fast.keys() == state_general.keys()
    for name in state_fast:
        torch.testing.assert_close(state_fast[name], state_general[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(steps_fast, steps_general, rtol=0, atol=1e-12)
    state = mixer.empty_state(2, "cpu", torch.float64)
    mixer(first[0], attention_mask=torch.ones(2, length), state=state, position_embeddings=first[1], fresh=True)
    assert len(calls) == (1 if length >= max(3, sink) else 0)  # a mask: the general path


def test_the_hybrid_hands_fresh_only_to_the_call_that_made_the_state():
    """Through the model: the first prefill into a new cache takes the window's fresh path in every window layer, a
    second chunk into the same cache does not, and the pieces equal the full forward."""
    torch.manual_seed(0)
    teacher = make_teacher("llama", num_key_value_heads=2)
    student = window_student(teacher, [[0], [], [1], []], 4, mixer="window_recurrent",
                             settings={"window": 4, "sink": 2, **MAMBA})
    calls = []
    for layer in student.model.layers:
        mixer = layer.self_attn.recurrent.window
        mixer._first_prefill = (lambda original: lambda *a: calls.append(1) or original(*a))(mixer._first_prefill)
    ids = torch.randint(1, student.config.vocab_size, (1, 14))
    with torch.no_grad():
        full = student(ids, use_cache=False).logits
        assert not calls  # no cache, no state: nothing to be fresh
        cache = HybridCache(student.config)
        first = student(ids[:, :8], past_key_values=cache, use_cache=True).logits
        assert len(calls) == len(student.model.layers)
        second = student(ids[:, 8:], past_key_values=cache, use_cache=True).logits
    assert len(calls) == len(student.model.layers)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-4, atol=1e-5)
