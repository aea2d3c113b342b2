"""The window mixer's banded path (all queries at once, chunked band of keys) against its blockwise reference:
outputs and gradients, over window sizes, GQA, left padding, packed documents, a ring of past tokens and chunk
groups; inputs with padding between real tokens take the reference path."""

from __future__ import annotations

import pytest
import torch

from radistill.hybrid.mixers import WindowAttention


def inputs(batch, heads, kv_heads, length, past, dim, pad, seed=0):
    """q [B, H, T, P]; keys/values [B, G, past + T, P] (leaves, for gradients); valid [B, past + T] with ``pad[b]``
    padding positions first in row b."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(batch, kv_heads, past + length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    values = torch.randn(batch, kv_heads, past + length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    valid = torch.arange(past + length)[None, :] >= torch.tensor(pad)[:, None]
    return q, keys, values, valid


# both paths compute the scores in fp32 (as the mixer does for any input dtype), in matmuls of other shapes: equal
# to fp32 rounding
def outputs_and_gradients(fn, q, keys, values, valid, past, documents):
    y = fn(q, keys, values, valid, past, documents)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    grads = torch.autograd.grad((y * weight).sum(), (q, keys, values))
    return y, grads


@pytest.mark.parametrize(("window", "kv_groups", "length", "past", "pad"), [
    (16, None, 100, 0, [0, 0]),  # T not a multiple of the chunk
    (3, [0, 0, 1, 1], 37, 0, [0, 5]),  # GQA, a left-padded row
    (1, [0, 1, 1, 0], 20, 0, [2, 0]),  # window 1: each token itself; query heads not adjacent to their KV head
    (20, [0, 0, 1, 1], 50, 20, [12, 0]),  # a ring of W past slots, its empty slots first
    (5, None, 64, 0, [64, 10]),  # a row that is all padding: zeros
])
def test_banded_equals_blockwise(window, kv_groups, length, past, pad):
    mixer = WindowAttention(32, 4, 8, window=window, kv_groups=kv_groups, block_size=7).double()
    q, keys, values, valid = inputs(2, 4, mixer.num_kv_heads, length, past, 8, pad)
    y_ref, g_ref = outputs_and_gradients(mixer._blockwise, q, keys, values, valid, past, None)
    y, g = outputs_and_gradients(mixer._banded, q, keys, values, valid, past, None)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("budget", [1 << 28, 1])  # one group of chunks; one chunk per group
def test_banded_documents_and_chunk_groups(budget):
    """Packed documents (a window never reaches back across a start) and the chunk groups' seams."""
    mixer = WindowAttention(32, 4, 8, window=6, kv_groups=[0, 0, 1, 1]).double()
    q, keys, values, valid = inputs(2, 4, 2, 90, 0, 8, [0, 0], seed=3)
    reset = torch.zeros(2, 90, dtype=torch.bool)
    reset[0, [30, 33, 70]] = True
    reset[1, [1, 50]] = True
    documents = mixer._documents(reset, 0)
    y_ref, g_ref = outputs_and_gradients(mixer._blockwise, q, keys, values, valid, 0, documents)
    y, g = outputs_and_gradients(lambda *a: mixer._banded(*a, budget=budget), q, keys, values, valid, 0, documents)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_inner_padding_takes_the_reference_path(monkeypatch):
    """Padding between real tokens stretches a window past the band: forward must not use the banded path."""
    mixer = WindowAttention(32, 4, 8, window=4).double().eval()
    hidden = torch.randn(2, 24, 32, dtype=torch.float64)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 10:14] = 0
    cos, sin = torch.ones(1, 24, 8, dtype=torch.float64), torch.zeros(1, 24, 8, dtype=torch.float64)
    used = []
    for name in ("_banded", "_blockwise"):
        original = getattr(mixer, name)
        monkeypatch.setattr(mixer, name, lambda *a, _o=original, _n=name, **k: used.append(_n) or _o(*a, **k))
    mixer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
    assert used == ["_blockwise"]
    mask[1, 10:14] = 1
    mask[1, :3] = 0  # left padding only
    mixer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
    assert used == ["_blockwise", "_banded"]


@pytest.mark.parametrize("sink", [0, 4])
@pytest.mark.parametrize(("window", "kv_groups", "length"), [
    (16, None, 100),  # one KV head per query head; T not a multiple of the chunk
    (3, [0, 0, 1, 1], 37),  # GQA, adjacent and equally many: queries read their KV head's band without a copy
    (1, [0, 1, 1, 0], 20),  # window 1; query heads not adjacent to their KV head: K/V widened by the index
    (20, [0, 0, 0, 1], 50),  # KV heads with unequal numbers of query heads; a chunk (20) wider than 16
    (5, [0, 0, 1, 1], 2),  # fewer tokens than the window and than the sinks
])
@pytest.mark.parametrize("budget", [1 << 28, 1])  # one group of chunks; one chunk per group (the mask's seams)
def test_plain_band_equals_blockwise(window, kv_groups, length, sink, budget):
    """Every token real, no past, no documents (a first prefill, an uncached forward): the plain band (unfolded
    K/V, one fixed mask per shape) gives the reference's outputs and gradients."""
    mixer = WindowAttention(32, 4, 8, window=window, sink=sink, kv_groups=kv_groups, block_size=7).double()
    q, keys, values, valid = inputs(2, 4, mixer.num_kv_heads, length, 0, 8, [0, 0])
    y_ref, g_ref = outputs_and_gradients(mixer._blockwise, q, keys, values, valid, 0, None)
    y, g = outputs_and_gradients(lambda q, k, v, *_: mixer._plain_band(q, k, v, budget=budget), q, keys, values,
                                 valid, 0, None)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_forward_takes_the_plain_band_only_without_state_mask_or_documents(monkeypatch):
    mixer = WindowAttention(32, 4, 8, window=4, sink=2, kv_groups=[0, 0, 1, 1]).double().eval()
    hidden = torch.randn(2, 24, 32, dtype=torch.float64)
    cos, sin = torch.ones(1, 24, 8, dtype=torch.float64), torch.zeros(1, 24, 8, dtype=torch.float64)
    used = []
    for name in ("_plain_band", "_banded"):
        original = getattr(mixer, name)
        monkeypatch.setattr(mixer, name, lambda *a, _o=original, _n=name, **k: used.append(_n) or _o(*a, **k))
    plain, _ = mixer(hidden, position_embeddings=(cos, sin))
    general, _ = mixer(hidden, attention_mask=torch.ones(2, 24), position_embeddings=(cos, sin))
    reset = torch.zeros(2, 24, dtype=torch.bool)
    mixer(hidden, position_embeddings=(cos, sin), reset=reset)
    assert used == ["_plain_band", "_banded", "_banded"]
    torch.testing.assert_close(plain, general, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_groups", [[0, 0, 1, 1], [0, 1, 1, 0]])
def test_what_inference_mode_cached_serves_a_later_training_forward(kv_groups):
    """The plain band's masks and the KV-group index are made once and kept; made first under inference mode (a
    served or evaluated model), they must still serve a forward that autograd records: an inference tensor cannot
    be saved for backward."""
    mixer = WindowAttention(32, 4, 8, window=4, sink=2, kv_groups=kv_groups)
    hidden = torch.randn(2, 40, 32)
    rope = torch.ones(1, 40, 8), torch.zeros(1, 40, 8)
    with torch.inference_mode():
        mixer(hidden, position_embeddings=rope)
        mixer(hidden, attention_mask=torch.ones(2, 40), position_embeddings=rope)
    for mask in (None, torch.ones(2, 40)):
        leaf = hidden.clone().requires_grad_()
        mixer(leaf, attention_mask=mask, position_embeddings=rope)[0].sum().backward()
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0
