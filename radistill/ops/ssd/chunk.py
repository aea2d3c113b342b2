"""The chunked parallel scan in plain PyTorch: training and prefill on any device, forward and backward by autograd.

The sequence is cut into chunks of `chunk_size` tokens. Inside a chunk the recurrence is a small masked,
decayed "attention" product (quadratic in the chunk, matmul-friendly); across chunks only the [N, P] states are
passed, through a [chunks+1, chunks+1] decay matrix (so no Python loop over time: torch.compile sees one graph).
Every exponent is a sum of log-decays <= 0, so no exp of a large positive number appears anywhere.

Precision: the log-decays and everything derived from them, and the states passed between chunks, are float32
(float64 for float64 inputs);
the three matmuls that carry x, b and c run in the inputs' dtype (bf16 on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from radistill.ops.ssd.naive import segsum, wide


def ssd_chunk(
    x: Tensor, log_a: Tensor, b: Tensor, c: Tensor, initial_state: Tensor | None = None, chunk_size: int = 64
) -> tuple[Tensor, Tensor]:
    """h_t = exp(log_a_t) h_{t-1} + b_t x_tᵀ, y_t = c_tᵀ h_t, chunk by chunk.

    x [B, T, H, P], log_a [B, T, H] (<= 0), b/c [B, T, H, N], initial_state [B, H, N, P] or None
    -> (y [B, T, H, P] in x's dtype, final_state [B, H, N, P] float32/64). Any T >= 1 (chunk_size need not divide it).
    """
    B, T, H, P = x.shape
    N, dt, acc, L = b.shape[-1], x.dtype, wide(x.dtype), chunk_size
    pad = -T % L  # zero tail: x = b = 0 and log_a = 0 leave the state untouched; its outputs are cut off below
    if pad:
        x, b, c = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, b, c))
        log_a = F.pad(log_a, (0, 0, 0, pad))
    nc = (T + pad) // L
    x, b, c = (t.reshape(B, nc, L, H, t.shape[-1]) for t in (x, b, c))
    la = log_a.to(acc).reshape(B, nc, L, H).permute(0, 3, 1, 2)  # [B, H, nc, L]

    # 1. within each chunk: y_t += sum_{s<=t in chunk} exp(sum_{r=s+1..t} log_a_r) (c_t · b_s) x_s
    decay = torch.exp(segsum(la))  # [B, H, nc, L, L], exact zeros above the diagonal
    scores = torch.einsum("bclhn,bcshn->bhcls", c, b) * decay.to(dt)
    y = torch.einsum("bhcls,bcshp->bclhp", scores, x)

    # 2. each chunk's own state at its end: sum_s exp(sum_{r=s+1..L-1} log_a_r) b_s x_sᵀ (= decay's last row)
    b_to_end = b * decay[..., -1, :].permute(0, 2, 3, 1).unsqueeze(-1).to(dt)  # [B, nc, L, H, N]
    states = torch.einsum("bclhn,bclhp->bchnp", b_to_end, x).to(acc)

    # 3. states entering each chunk: state z = sum_{c<=z} exp(log-decay of chunks c..z-1) own_state[c], where
    #    own_state[0] is the initial state and own_state[c>0] is chunk c-1's own state
    h0 = initial_state.to(acc) if initial_state is not None else states.new_zeros(B, H, N, P)
    own = torch.cat([h0.unsqueeze(1), states], dim=1)  # [B, nc+1, H, N, P]
    chunk_decay = torch.exp(segsum(F.pad(la.sum(-1), (1, 0))))  # [B, H, nc+1, nc+1]
    passed = torch.einsum("bhzc,bchnp->bzhnp", chunk_decay, own)
    entering, final = passed[:, :-1], passed[:, -1]

    # 4. the entering state, decayed from the chunk's start to t: y_t += exp(sum_{r<=t} log_a_r) c_tᵀ h_in
    c_from_start = c * torch.exp(torch.cumsum(la, -1)).permute(0, 2, 3, 1).unsqueeze(-1).to(dt)
    y = y + torch.einsum("bclhn,bchnp->bclhp", c_from_start, entering.to(dt))
    return y.reshape(B, nc * L, H, P)[:, :T], final
