"""What a teacher's attention heads attend to: their causal softmax probabilities, for only the heads asked for.

Used by MOHAWK stage 1 (the targets of the student's mixing matrices) and by the build's calibration (each replaced
head's attention distance sets its recurrent head's initial decay).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()  # a target: never differentiated (also holds for the lazily run generator body)
def attention_probs(attn: nn.Module, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor], heads: list[int],
                    group_size: int, head_chunk: int | None = None,
                    documents: Tensor | None = None) -> Iterator[Tensor]:
    """Causal softmax attention probabilities of some query heads of a Llama-like attention module, in chunks.

    hidden: [batch, seq, hidden] (the attention's input, i.e. the layer's normed input);
    position_embeddings: RoPE (cos, sin), each [batch, seq, head_dim]; heads: query-head ids;
    group_size: query heads per KV head (GQA); documents: [batch, seq] which packed document each token is in
    (``radistill.models.packing.document_ids``; a query attends only inside its own) or None.
    Yields [batch, chunk, seq, seq] fp32 for consecutive chunks of ``head_chunk`` heads (all at once when None), so
    only one chunk's ``seq²`` matrices exist at a time.
    Only the named heads' q/k rows are projected, so the cost scales with ``len(heads)``.
    """
    q, k = _rotated_qk(attn, hidden, position_embeddings, heads, group_size)
    seq = hidden.shape[1]
    future = torch.ones(seq, seq, dtype=torch.bool, device=hidden.device).triu(1)
    if documents is not None:  # [batch, 1, seq, seq]: masked where key and query are in different documents
        future = future | (documents[:, None, :, None] != documents[:, None, None, :])
    step = head_chunk or len(heads)
    for start in range(0, len(heads), step):
        scores = (q[:, start : start + step].float() @ k[:, start : start + step].float().transpose(-1, -2))
        yield (scores * attn.scaling).masked_fill(future, float("-inf")).softmax(dim=-1)


@torch.no_grad()
def mean_log_distance(q: Tensor, k: Tensor, scaling: float, head_chunk: int | None = None,
                      query_block: int = 64) -> Tensor:
    """Per query t >= 1: E[log(1 + t - s)] over keys s = 1..t under causal softmax attention with the first key
    left out (a first-token attention sink says nothing about how far a head reads).

    q, k: [batch, heads, seq, head_dim] (RoPE applied; k: each query head's key, as :func:`rotated_heads` gives
    them); scaling: the logits' scale -> [batch, heads, seq] fp32; the first query (no key left) is 0. Only
    ``head_chunk`` heads' [batch, chunk, seq, seq - 1] scores exist at a time (all heads when None).

    The same value as renormalising :func:`attention_probs`' rows over keys 1..t (a softmax over a subset of the
    keys is the full softmax renormalised over it), computed without the first key's column and in fewer passes
    over the scores: one ``baddbmm`` for scale, product and causal mask, one softmax, one weighted sum
    (tests/test_build_speed.py compares the two). Queries go in blocks of ``query_block``, each against the keys up
    to its last query only, so the all-masked upper triangle is mostly never computed."""
    batch, count, seq, head_dim = q.shape
    out = torch.zeros(batch, count, seq, dtype=torch.float32, device=q.device)
    if seq < 2:
        return out
    offset = torch.arange(seq, device=q.device)[:, None] - torch.arange(1, seq, device=q.device)[None, :]
    log_distance = torch.log1p(offset.clamp_min(0).float())  # [seq, seq - 1]: log(1 + t - s) for s = 1..seq-1
    bias = torch.zeros(seq, seq - 1, device=q.device).masked_fill(offset < 0, float("-inf"))
    bias[0] = 0.0  # the first query has no key left: a finite row (its value is set to 0 below), not a NaN
    step = head_chunk or count
    for start in range(0, count, step):
        q_part, k_part = q[:, start : start + step].float(), k[:, start : start + step, 1:].float()
        chunk = q_part.shape[1]
        q_part, k_part = q_part.reshape(-1, seq, head_dim), k_part.reshape(-1, seq - 1, head_dim)
        for first in range(0, seq, query_block):
            last = min(seq, first + query_block)  # queries first..last-1 see keys 1..last-1 at most
            keys = max(1, last - 1)
            scores = torch.baddbmm(bias[first:last, :keys], q_part[:, first:last],
                                   k_part[:, :keys].transpose(1, 2), alpha=scaling)
            probs = scores.softmax(dim=-1)  # [batch * chunk, queries, keys]
            weighted = (probs * log_distance[first:last, :keys]).sum(-1)
            out[:, start : start + chunk, first:last] = weighted.view(batch, chunk, last - first)
    out[:, :, 0] = 0.0
    return out


def rotated_heads(attn: nn.Module, q_states: Tensor, k_states: Tensor, position_embeddings: tuple[Tensor, Tensor],
                  heads: list[int], group_size: int) -> tuple[Tensor, Tensor]:
    """From a Llama-like attention module's q/k projections [batch, seq, heads * head_dim] (every head's, as
    ``q_proj`` / ``k_proj`` output them): q of the query heads ``heads`` and k of each one's KV head, both
    [batch, len(heads), seq, head_dim], qk-norm and RoPE applied as the module applies them."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim, device = attn.head_dim, q_states.device
    q = q_states.view(*q_states.shape[:2], -1, head_dim).index_select(2, torch.tensor(heads, device=device))
    distinct = sorted({h // group_size for h in heads})  # RoPE once per KV head, then repeated per query head
    inverse = torch.tensor([distinct.index(h // group_size) for h in heads], device=device)
    k = k_states.view(*k_states.shape[:2], -1, head_dim).index_select(2, torch.tensor(distinct, device=device))
    if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm on q and k before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q, k.index_select(1, inverse)


def _rotated_qk(attn: nn.Module, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor], heads: list[int],
                group_size: int) -> tuple[Tensor, Tensor]:
    """q, k [batch, len(heads), seq, head_dim] of the query heads ``heads`` (k: each one's KV head), qk-norm and
    RoPE applied as the module applies them; only those heads' rows are projected."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim = attn.head_dim
    index = torch.tensor(heads, device=hidden.device)
    q = _head_projection(attn.q_proj, hidden, index, head_dim)
    k = _head_projection(attn.k_proj, hidden, index // group_size, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm on q and k before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = position_embeddings
    return apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


def _head_projection(linear: nn.Linear, hidden: Tensor, heads: Tensor, head_dim: int) -> Tensor:
    """[batch, seq, len(heads), head_dim]: the rows of ``linear`` that belong to ``heads``."""
    rows = (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)
    bias = None if linear.bias is None else linear.bias[rows]
    out = F.linear(hidden, linear.weight[rows], bias)
    return out.view(*hidden.shape[:2], len(heads), head_dim)


__all__ = ["attention_probs", "mean_log_distance", "rotated_heads"]
