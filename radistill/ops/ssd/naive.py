"""The oracles: the scalar-decay recurrence written the two obvious ways, slow and simple.

    h_t = exp(log_a_t) h_{t-1} + b_t x_tᵀ        h: [N, P] per (batch, head)
    y_t = c_tᵀ h_t                               y: [P]

Unrolled, y_t = sum_{s<=t} M[t, s] x_s + c_tᵀ exp(sum_{r<=t} log_a_r) h_0 with the mixing matrix
M[t, s] = exp(sum_{r=s+1..t} log_a_r) (c_t · b_s). Both forms compute in float32 (float64 for float64 inputs) and
return outputs in x's dtype and the final state in that wide dtype; the fast paths (chunk.py, fla.py) are tested
against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def wide(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of `dtype`: float32, or float64 for float64 (used for all log-decays).
    torch.promote_types(dtype, torch.float32) for every real dtype, without dispatching an operator per call."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segsum(log_a: Tensor) -> Tensor:
    """[..., T] -> [..., T, T]: S[t, s] = sum_{r=s+1..t} log_a_r for s <= t, -inf above the diagonal.

    Summed from a masked copy rather than as cumsum[t] - cumsum[s]: the difference of two large cumulative sums
    loses the small segments' precision (cumsums reach -1e4 over long sequences), the masked sum does not.
    """
    T = log_a.shape[-1]
    rows = log_a.unsqueeze(-1).expand(*log_a.shape, T)  # rows[r, s] = log_a_r
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=log_a.device), diagonal=-1)
    out = torch.cumsum(rows.masked_fill(~below, 0.0), dim=-2)
    return out.masked_fill(~torch.tril(torch.ones_like(below)), float("-inf"))


def ssd_matrix(log_a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """The materialised mixing matrix, M[t, s] = exp(sum_{r=s+1..t} log_a_r) (c_t · b_s) for s <= t, else 0.

    log_a [B, T, H] (<= 0), b/c [B, T, H, N] -> M [B, H, T, T] in b's dtype.
    """
    acc = wide(b.dtype)
    decay = torch.exp(segsum(log_a.to(acc).transpose(1, 2)))  # [B, H, T, T]
    scores = torch.einsum("bthn,bshn->bhts", c.to(acc), b.to(acc))
    return (decay * scores).to(b.dtype)


def ssd_naive(
    x: Tensor, log_a: Tensor, b: Tensor, c: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The recurrence as one matrix product (plus the initial state's decayed contribution).

    x [B, T, H, P], log_a [B, T, H], b/c [B, T, H, N], initial_state [B, H, N, P] or None
    -> (y [B, T, H, P] in x's dtype, final_state [B, H, N, P] float32/64).
    """
    acc = wide(x.dtype)
    xf, bf, cf, la = x.to(acc), b.to(acc), c.to(acc), log_a.to(acc)
    y = torch.einsum("bhts,bshp->bthp", ssd_matrix(la, bf, cf), xf)
    # decay from step s (exclusive) to the end, exp(sum_{r>s} log_a_r): a shifted reverse cumsum, no differences
    cum = torch.cumsum(la, dim=1)
    to_end = torch.exp(F.pad(torch.flip(torch.cumsum(torch.flip(la[:, 1:], [1]), dim=1), [1]), (0, 0, 0, 1)))
    final = torch.einsum("bthn,bth,bthp->bhnp", bf, to_end, xf)
    if initial_state is not None:
        h0 = initial_state.to(acc)
        y = y + torch.einsum("bthn,bth,bhnp->bthp", cf, torch.exp(cum), h0)
        final = final + torch.exp(cum[:, -1])[..., None, None] * h0
    return y.to(x.dtype), final


def ssd_step(x: Tensor, log_a: Tensor, b: Tensor, c: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of the recurrence (decoding).

    x [B, H, P], log_a [B, H], b/c [B, H, N], state [B, H, N, P]
    -> (y [B, H, P] in x's dtype, new state [B, H, N, P] float32/64). The input state is not modified.
    """
    acc = wide(x.dtype)
    decay = torch.exp(log_a.to(acc)).view(*log_a.shape, 1, 1)
    # h = decay * state + b xᵀ in one fused multiply-add, and y = cᵀ h as a product and a sum over N: the same
    # kernels as an einsum's batched matmul, without its chain of permutes and views (a decode step is host-bound)
    h = torch.addcmul(decay * state.to(acc), b.to(acc).unsqueeze(-1), x.to(acc).unsqueeze(-2))
    y = (c.to(acc).unsqueeze(-1) * h).sum(-2)
    return y.to(x.dtype), h


def ssd_recurrent(
    x: Tensor, log_a: Tensor, b: Tensor, c: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The recurrence as a loop of ssd_step over time: same signature and result as ssd_naive."""
    B, T, H, P = x.shape
    h = x.new_zeros(B, H, b.shape[-1], P) if initial_state is None else initial_state
    ys = []
    for t in range(T):
        y_t, h = ssd_step(x[:, t], log_a[:, t], b[:, t], c[:, t], h)
        ys.append(y_t)
    return torch.stack(ys, dim=1), h
