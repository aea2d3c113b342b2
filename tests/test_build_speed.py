"""The build's fast paths against their plain references: one-pass calibration equals the two-pass one it replaced
(to float rounding: the attention distances are now computed from the teacher's own q/k projections, without the
first key's column), the attention distance equals the renormalised attention probabilities, a teacher pass stops
after its last hooked layer, and benchmarks/build_time.py runs (--quick)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import radistill  # noqa: F401
from radistill.hybrid.build import convert, student_config
from radistill.hybrid.calibrate import calibrate, calibration_batches, half_life_for_distance, teacher_pass
from radistill.models.attention import _rotated_qk, attention_probs, mean_log_distance, rotated_heads
from radistill.models.presets import random_model, tiny_config
from radistill.hybrid.normalizer import ChannelMoments
from radistill.models.access import hidden_input
from radistill.utils.errors import RadistillError
from test_build import byte_tokenizer, teacher  # noqa: F401  (teacher: a module fixture)

HEAD_CHUNK = 4
ROOT = Path(__file__).resolve().parents[1]


# ---- the reference: two teacher passes, the mixers run inside the second (as calibration first did) -------------

def _attention_distances(teacher, blocks, batches, group_size: int) -> dict[int, torch.Tensor]:
    """{layer: [recurrent heads]} the typical attention distance of each replaced teacher head (module docstring)."""
    from radistill.models.attention import attention_probs

    sums = {i: torch.zeros(len(b.recurrent_heads), dtype=torch.float64) for i, b in blocks.items()}
    counts = {i: 0 for i in blocks}

    def attn_hook(i):
        def hook(module, args, kwargs, mask):
            hidden, heads = hidden_input(args, kwargs), list(blocks[i].recurrent_heads)
            seq = hidden.shape[1]
            distance = (torch.arange(seq)[:, None] - torch.arange(1, seq)[None, :]).clamp_min(0).to(hidden.device)
            queries = mask.bool().clone()
            queries[:, 0] = False  # its only key is the first one, which is left out
            start = 0
            for probs in attention_probs(module, hidden, kwargs["position_embeddings"], heads, group_size,
                                         HEAD_CHUNK):  # [B, chunk, T, T]
                rest = probs[..., 1:]
                rest = rest / rest.sum(-1, keepdim=True).clamp_min(1e-12)
                log_distance = (rest * torch.log1p(distance.float())).sum(-1)  # [B, chunk, T]
                chunk = log_distance.shape[1]
                sums[i][start : start + chunk] += log_distance.transpose(1, 2)[queries].double().sum(0).cpu()
                start += chunk
            counts[i] += int(queries.sum())

        return hook

    teacher_pass(teacher, batches, {i: {"attn": attn_hook(i)} for i in blocks})
    if any(c == 0 for c in counts.values()):
        raise RadistillError("calibration text too short: no query position beyond the first token")
    return {i: torch.expm1(sums[i] / counts[i]) for i in blocks}


def _normaliser_statistics(teacher, blocks, batches, head_dim: int) -> int:
    """Fill every recurrent block's normaliser from the fresh mixer's and the replaced heads' output moments."""
    moments = {i: (ChannelMoments(len(b.recurrent_heads), head_dim), ChannelMoments(len(b.recurrent_heads), head_dim))
               for i, b in blocks.items()}

    def attn_hook(i):
        def hook(module, args, kwargs, mask):  # the teacher attention's normed input -> the student mixer's output
            y, _ = blocks[i].recurrent(hidden_input(args, kwargs), attention_mask=mask)  # [B, T, r, hd]
            moments[i][0].add(y, mask)

        return hook

    def o_proj_hook(i):
        def hook(module, args, mask):  # the o_proj input [B, T, H*hd] -> the replaced heads' slices
            heads = args[0].view(*args[0].shape[:-1], -1, head_dim)[:, :, blocks[i].recurrent_heads]
            moments[i][1].add(heads, mask)

        return hook

    tokens = teacher_pass(teacher, batches, {i: {"attn": attn_hook(i), "o_proj": o_proj_hook(i)} for i in blocks})
    for i, (student_moments, teacher_moments) in moments.items():
        blocks[i].normalizer.calibrate(student_moments, teacher_moments)
    return tokens


@torch.no_grad()
def two_pass_calibrate(student, teacher, batches, half_lives="attention"):
    blocks = {i: layer.self_attn for i, layer in enumerate(student.model.layers)
              if layer.self_attn.recurrent is not None}
    if half_lives == "attention":
        group = student.config.num_attention_heads // student.config.num_key_value_heads
        distances = _attention_distances(teacher, blocks, batches, group)
        for i, block in blocks.items():
            block.recurrent.set_half_lives(half_life_for_distance(distances[i]))
    return _normaliser_statistics(teacher, blocks, batches, student.config.head_dim)


def normaliser_state(student) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in student.state_dict().items() if ".normalizer." in k or "in_proj.bias" in k}


@pytest.mark.parametrize("half_lives,packed", [("attention", False), ("fixed", False), ("attention", True)])
def test_one_pass_calibration_equals_the_two_pass_reference(teacher, half_lives, packed):  # noqa: F811
    tokenizer = byte_tokenizer()
    config = student_config(teacher, [[0], [], [2, 3]], "discrete_mamba2", {"state_size": 8})
    batches = calibration_batches(tokenizer)  # padded rows of different lengths
    if packed:  # no padding at all, as packed calibration text has (the mixers then run without a mask)
        ids = torch.randint(3, 250, (3, 40), generator=torch.Generator().manual_seed(0))
        batches = [{"input_ids": part, "attention_mask": torch.ones_like(part)} for part in ids.split(2)]
    fast, slow = convert(teacher, config), convert(teacher, config)
    record = calibrate(fast, teacher, batches, half_lives=half_lives)
    tokens = two_pass_calibrate(slow, teacher, batches, half_lives=half_lives)
    assert record.tokens == tokens
    want = normaliser_state(slow)
    got = normaliser_state(fast)
    assert want.keys() == got.keys() and len(want) > 0
    for key in want:  # float rounding only: a 1e-5 relative change of the distances fails this
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
    assert fast.model.layers[0].self_attn.recurrent.backend == "auto"  # put back after calibration


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])  # qwen3: qk-norm before RoPE
def test_mean_log_distance_equals_the_renormalised_attention_probabilities(model_type):
    model = random_model(tiny_config(model_type), seed=1).eval()
    attn = model.model.layers[1].self_attn
    heads, group = [3, 0, 1], model.config.num_attention_heads // model.config.num_key_value_heads
    hidden = torch.randn(2, 37, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    rope = model.model.rotary_emb(hidden, torch.arange(37)[None].expand(2, -1))
    with torch.no_grad():
        q, k = rotated_heads(attn, attn.q_proj(hidden), attn.k_proj(hidden), rope, heads, group)
        want_q, want_k = _rotated_qk(attn, hidden, rope, heads, group)  # only the heads' rows projected
        torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-6)
        got = mean_log_distance(q, k, attn.scaling, head_chunk=2, query_block=8)  # [B, heads, T]
        whole = mean_log_distance(q, k, attn.scaling, query_block=37)  # one block: every key column computed
        torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6)
        (probs,) = attention_probs(attn, hidden, rope, heads, group)  # [B, heads, T, T], first key included
    rest = probs[..., 1:] / probs[..., 1:].sum(-1, keepdim=True)
    distance = (torch.arange(37)[:, None] - torch.arange(1, 37)[None, :]).clamp_min(0)
    want = (rest * torch.log1p(distance.float())).sum(-1)
    torch.testing.assert_close(got[..., 1:], want[..., 1:], rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 3, 37) and (got[..., 0] == 0).all() and got[..., 2:].gt(0).all()


def test_teacher_pass_stops_after_its_last_hooked_layer(teacher):  # noqa: F811
    reached = []
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: reached.append(i))
               for i, layer in enumerate(teacher.model.layers)]
    seen = []
    try:
        ids = torch.randint(3, 200, (2, 9))
        tokens = teacher_pass(teacher, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
                              {0: {"o_proj": lambda m, a, mask: seen.append(0)},
                               1: {"q_proj": lambda m, a, out, mask: seen.append(out.shape)}})
    finally:
        for handle in handles:
            handle.remove()
    width = teacher.config.num_attention_heads * teacher.config.head_dim
    assert tokens == 18 and reached == [0, 1] and seen == [0, (2, 9, width)]
    assert len(teacher.model.layers) > 2
    # a wrapper that must see every forward end (accelerate's hooks; FSDP likewise): the whole forward runs
    teacher.model.layers[1]._hf_hook = object()
    reached.clear()
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: reached.append(i))
               for i, layer in enumerate(teacher.model.layers)]
    try:
        teacher_pass(teacher, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
                     {0: {"o_proj": lambda m, a, mask: None}})
    finally:
        del teacher.model.layers[1]._hf_hook
        for handle in handles:
            handle.remove()
    assert reached == list(range(len(teacher.model.layers)))


def test_channel_moments_of_an_unpadded_batch_match_and_leave_the_input_alone():
    y = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    before = y.clone()
    plain, full, padded = ChannelMoments(3, 4), ChannelMoments(3, 4), ChannelMoments(3, 4)
    plain.add(y)
    full.add(y, torch.ones(2, 5, dtype=torch.long))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    padded.add(y, mask)
    assert torch.equal(y, before)  # squared in place only when it is a copy
    rows = y.reshape(-1, 3, 4)
    for moments in (plain, full):
        assert moments.count == 10 and torch.equal(moments.sum, rows.sum(0))
        assert torch.equal(moments.sum_sq, (rows * rows).sum(0))
    kept = y[mask.bool()]
    assert padded.count == 8 and torch.allclose(padded.sum_sq, (kept * kept).sum(0), rtol=0, atol=1e-12)

def test_calibration_runs_the_mixers_on_the_plain_scan(teacher, monkeypatch):  # noqa: F811
    """Calibration-sized work is not worth a compile or fla's kernel tuning: the mixers see backend "torch" (on
    CUDA, ssd() would otherwise compile its scan or call fla) under the force_eager stance, and get theirs back."""
    import radistill.hybrid.calibrate as calibration

    student = convert(teacher, student_config(teacher, [[0], [], [2, 3]], "discrete_mamba2", {"state_size": 8}))
    seen = []
    stances = []
    real_stance = torch.compiler.set_stance

    def spy_stance(stance, *args, **kwargs):
        stances.append(stance)
        return real_stance(stance, *args, **kwargs)

    monkeypatch.setattr(calibration.torch.compiler, "set_stance", spy_stance)
    for layer in student.model.layers:
        mixer = layer.self_attn.recurrent
        if mixer is not None:
            real = mixer.forward
            monkeypatch.setattr(mixer, "forward", lambda *a, m=mixer, f=real, **k: (seen.append(m.backend), f(*a, **k))[1])
    calibrate(student, teacher, calibration_batches(byte_tokenizer()))
    assert seen and set(seen) == {"torch"} and set(stances) == {"force_eager"}
    assert {layer.self_attn.recurrent.backend for layer in student.model.layers
            if layer.self_attn.recurrent is not None} == {"auto"}


def test_calibration_on_too_short_text_is_refused(teacher):  # noqa: F811
    student = convert(teacher, student_config(teacher, [[0], [], [2, 3]], "discrete_mamba2", {"state_size": 8}))
    ids = torch.tensor([[5]])
    with pytest.raises(RadistillError, match="too short"):
        calibrate(student, teacher, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])


def test_build_time_benchmark_quick(tmp_path):
    out = tmp_path / "build_time.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "build_time.py"), "--quick", "--device", "cpu",
                           "--threads", "1", "--work", str(tmp_path / "work"), "--out", str(out),
                           "--baseline", str(ROOT), "--baseline-label", "itself"],  # the before/after mode
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["case"] == "built-in text" and row["cli_s"] is None and row["baseline_build_s"] > 0
    assert result["baseline"] == "itself" and "baseline_build s" in result["table"]
    assert all(row[k] > 0 for k in ("build_s", "load_s", "convert_s", "calibrate_s", "save_s"))
    assert result["torch"] == torch.__version__ and "build s" in result["table"]
    assert (tmp_path / "work" / "student" / "README.md").exists()


def test_one_thread_restores_the_thread_count_even_on_error():
    from radistill.utils.threads import one_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError):
            with one_thread():
                assert torch.get_num_threads() == 1
                raise ValueError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
