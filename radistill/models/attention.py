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
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim = attn.head_dim
    index = torch.tensor(heads, device=hidden.device)
    q = _head_projection(attn.q_proj, hidden, index, head_dim)
    k = _head_projection(attn.k_proj, hidden, index // group_size, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm on q and k before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [batch, heads, seq, head_dim]
    seq = hidden.shape[1]
    future = torch.ones(seq, seq, dtype=torch.bool, device=hidden.device).triu(1)
    if documents is not None:  # [batch, 1, seq, seq]: masked where key and query are in different documents
        future = future | (documents[:, None, :, None] != documents[:, None, None, :])
    step = head_chunk or len(heads)
    for start in range(0, len(heads), step):
        scores = (q[:, start : start + step].float() @ k[:, start : start + step].float().transpose(-1, -2))
        yield (scores * attn.scaling).masked_fill(future, float("-inf")).softmax(dim=-1)


def _head_projection(linear: nn.Linear, hidden: Tensor, heads: Tensor, head_dim: int) -> Tensor:
    """[batch, seq, len(heads), head_dim]: the rows of ``linear`` that belong to ``heads``."""
    rows = (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)
    bias = None if linear.bias is None else linear.bias[rows]
    out = F.linear(hidden, linear.weight[rows], bias)
    return out.view(*hidden.shape[:2], len(heads), head_dim)


__all__ = ["attention_probs"]
