"""Attention sinks in the window mixer: each query also sees its document's first ``sink`` real tokens.

Checked against a mask written from the definition, the banded path against the blockwise one (outputs and
gradients), decode and chunked prefill against the full forward (the sink slots, the ring and their overlap),
generate, the one-graph decode step, and the memory accounting."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import radistill  # noqa: F401  (Auto-class registration)
from radistill.hybrid.mixers import WindowAttention, WindowRecurrent
from radistill.models.presets import tiny_config
from test_hybrid import (assert_generate_is_the_uncached_greedy_continuation, assert_pieces_equal_the_full_forward,
                         make_teacher, state_bytes_match_the_accounting)
from test_window_banded import inputs, outputs_and_gradients
from test_window_mixer import assert_decode_step_is_one_graph, window_student


def rope_for(length, batch, positions=None):
    rope = LlamaRotaryEmbedding(tiny_config("llama", hidden_size=32, num_attention_heads=4, head_dim=8))
    positions = torch.arange(length)[None].expand(batch, -1) if positions is None else positions
    cos, sin = rope(torch.zeros(1, dtype=torch.float64), positions)
    return cos.double(), sin.double()


def definition_mask(mask, reset, window, sink):
    """[B, T, T] bool from the rule itself, one query and key at a time: the key is real, at or before the query, in
    its document, and among the query's last ``window`` real tokens or its document's first ``sink``."""
    B, T = mask.shape
    allowed = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        document = reset[b].long().cumsum(0)
        for t in range(T):
            if not mask[b, t]:
                continue
            mine = [s for s in range(t + 1) if mask[b, s] and document[s] == document[t]]
            for s in mine[-window:] + mine[:sink]:
                allowed[b, t, s] = True
    return allowed


@pytest.mark.parametrize(("window", "sink", "kv_groups", "pad", "resets"), [
    (4, 2, None, [0, 0], []),
    (3, 1, [0, 0, 1, 1], [0, 5], []),  # GQA, left padding
    (1, 3, [0, 1, 1, 0], [2, 0], []),  # window 1; query heads not adjacent to their KV head
    (5, 2, [0, 0, 1, 1], [0, 0], [7, 9, 30]),  # packed documents, one shorter than the sink
    (40, 4, None, [0, 3], []),  # a window longer than the text: the sinks add nothing
])
def test_forward_follows_the_definition(window, sink, kv_groups, pad, resets):
    torch.manual_seed(0)
    mixer = WindowAttention(32, 4, 8, window=window, sink=sink, kv_groups=kv_groups).double()
    B, T = 2, 37
    u = torch.randn(B, T, 32, dtype=torch.float64)
    mask = (torch.arange(T)[None] >= torch.tensor(pad)[:, None]).long()
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, resets] = True
    pe = rope_for(T, B)
    with torch.no_grad():
        y, _ = mixer(u, mask, position_embeddings=pe, reset=reset if resets else None)
        q, k, v = mixer._qkv(u, pe)
    index = torch.tensor(mixer.kv_groups)
    scores = q @ k.index_select(1, index).transpose(-1, -2) / 8**0.5
    scores = scores.masked_fill(~definition_mask(mask, reset, window, sink)[:, None], float("-inf"))
    want = (torch.softmax(scores, -1).nan_to_num(0.0) @ v.index_select(1, index)).transpose(1, 2)
    torch.testing.assert_close(y, want * mask[:, :, None, None], rtol=1e-5, atol=1e-6)
    # and the mixing matrix reads the same rule
    M = mixer.mixing_matrix(u, mask, position_embeddings=pe, reset=reset if resets else None)
    torch.testing.assert_close((M @ v.index_select(1, index)).transpose(1, 2), y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("window", "sink", "length", "past", "pad", "budget"), [
    (16, 4, 100, 0, [0, 0], 1 << 28),
    (3, 2, 37, 0, [0, 5], 1),  # left padding; one chunk per group
    (5, 3, 40, 8, [3, 0], 1 << 28),  # a past (sink slots and ring) before the new tokens
    (2, 5, 64, 0, [64, 10], 1 << 28),  # a row all padding
])
def test_banded_equals_blockwise_with_sinks(window, sink, length, past, pad, budget):
    mixer = WindowAttention(32, 4, 8, window=window, sink=sink, kv_groups=[0, 0, 1, 1], block_size=7).double()
    q, keys, values, valid = inputs(2, 4, 2, length, past, 8, pad)
    y_ref, g_ref = outputs_and_gradients(mixer._blockwise, q, keys, values, valid, past, None)
    y, g = outputs_and_gradients(lambda *a: mixer._banded(*a, budget=budget), q, keys, values, valid, past, None)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_banded_equals_blockwise_with_documents():
    mixer = WindowAttention(32, 4, 8, window=6, sink=2, kv_groups=[0, 0, 1, 1]).double()
    q, keys, values, valid = inputs(2, 4, 2, 90, 0, 8, [0, 0], seed=3)
    reset = torch.zeros(2, 90, dtype=torch.bool)
    reset[0, [30, 31, 70]] = True  # a one-token document
    reset[1, [1, 50]] = True
    documents = mixer._documents(reset, 0)
    y_ref, g_ref = outputs_and_gradients(mixer._blockwise, q, keys, values, valid, 0, documents)
    y, g = outputs_and_gradients(mixer._banded, q, keys, values, valid, 0, documents)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# pieces: one-token steps while the sinks are still inside the ring, then after they leave it; chunks of several
# tokens across that moment; a prefill longer than window + sink
@pytest.mark.parametrize("pieces", [[1] * 14, [3, 1, 1, 1, 1, 1, 1, 1, 1, 2, 1], [2, 5, 4, 3], [10, 1, 1, 2]])
def test_decode_and_chunks_equal_the_full_forward(pieces):
    torch.manual_seed(1)
    mixer = WindowAttention(32, 4, 8, window=3, sink=2, kv_groups=[0, 0, 1, 1]).double()
    T = sum(pieces)
    u = torch.randn(2, T, 32, dtype=torch.float64)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :2] = 0  # left padding in one row
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cos, sin = rope_for(T, 2, positions)
    with torch.no_grad():
        full, _ = mixer(u, mask, position_embeddings=(cos, sin))
        state, out, at = mixer.empty_state(2, "cpu", torch.float64), [], 0
        for n in pieces:
            y, state = mixer(u[:, at : at + n], mask[:, : at + n], state=state,
                             position_embeddings=(cos[:, at : at + n], sin[:, at : at + n]))
            out.append(y)
            at += n
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-5, atol=1e-6)
    assert state["seen"].tolist() == [T, T - 2]


def sink_student(teacher, mixer="window"):
    settings = {"window": 3, "sink": 2}
    if mixer == "window_recurrent":
        settings.update(state_size=8, chunk_size=4)
    student = window_student(teacher, [[0], [], [2], []], window=None, mixer=mixer, settings=settings)
    if mixer == "window_recurrent":  # open the gates, so that the recurrence's state is used too
        with torch.no_grad():
            for layer in student.model.layers:
                layer.self_attn.recurrent.gate.fill_(0.05)
    return student


@pytest.mark.parametrize("mixer", ["window", "window_recurrent"])
@pytest.mark.parametrize("chunks", [[9, 1, 1, 1, 1, 1], [2, 1, 1, 1, 1, 3, 1, 2, 1, 1]])
def test_student_pieces_equal_the_full_forward(mixer, chunks):
    assert_pieces_equal_the_full_forward(sink_student(make_teacher(), mixer), chunks)


def test_generate_matches_the_uncached_greedy_continuation():
    assert_generate_is_the_uncached_greedy_continuation(sink_student(make_teacher()), 4, 9)


def test_decode_step_traces_as_one_graph():
    """The sink slots are written in place at a device-side index, as the ring is (a 3-token prefill: the steps
    write the sinks, then wrap the ring past them)."""
    assert_decode_step_is_one_graph(sink_student(make_teacher()), prefill=3)


def test_state_bytes_count_the_sinks():
    plain = WindowAttention.state_bytes(4, 128, 2, window=16, kv_heads=2)["window"]
    sinks = WindowAttention.state_bytes(4, 128, 2, window=16, sink=4, kv_heads=2)["window"]
    assert sinks - plain == 2 * 2 * 4 * 128 * 2 + 8  # K and V of 4 tokens per KV head, and the document's count
    both = WindowRecurrent.state_bytes(4, 128, 2, window=16, sink=4, kv_heads=2, state_size=8)
    assert both["window"] == sinks
    state_bytes_match_the_accounting(sink_student(make_teacher()))


def test_no_sink_keeps_the_state_and_bad_sink_is_refused():
    assert set(WindowAttention(32, 4, 8).empty_state(1, "cpu", torch.float32)) == {"k", "v", "valid", "next"}
    with pytest.raises(Exception, match="sink >= 0"):
        WindowAttention(32, 4, 8, sink=-1)


def test_cli_build_with_sinks(tmp_path):
    import json

    from typer.testing import CliRunner

    from test_build import saved_teacher_and_cli

    app, _, scan = saved_teacher_and_cli(tmp_path)
    common = [str(tmp_path / "teacher"), "--scan", scan, "--keep", "2", "--device", "cpu", "--dtype", "fp32"]
    result = CliRunner().invoke(app, ["build", *common, "--mixer", "window", "--window", "4", "--sink", "2",
                                      "--out", str(tmp_path / "window")])
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "window" / "config.json").read_text())["mixer_settings"]
    assert (settings["window"], settings["sink"]) == (4, 2)
    result = CliRunner().invoke(app, ["build", *common, "--mixer", "discrete_mamba2", "--window-heads", "2",
                                      "--sink", "3", "--out", str(tmp_path / "mixed")])
    assert result.exit_code == 0, result.output
    (group,) = json.loads((tmp_path / "mixed" / "config.json").read_text())["head_mixers"]
    assert (group["settings"]["window"], group["settings"]["sink"]) == (16, 3)
    result = CliRunner().invoke(app, ["build", *common, "--mixer", "discrete_mamba2", "--sink", "2",
                                      "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "has none" in str(result.exception or result.output)
    assert not (tmp_path / "bad").exists()
