"""flash-linear-attention's Triton kernels for the same recurrence (optional extra `radistill[gpu]`, CUDA only).

fla's "simple GLA" is S_t = exp(g_t) S_{t-1} + k_t v_tᵀ, o_t = scale · q_tᵀ S_t: ours with q = c, k = b, v = x,
g = log_a, scale = 1, and fla's state layout [B, H, K, V] is ours, [B, H, N, P].
fla is imported inside the functions only: `import fla` registers its own model types with transformers
(it overrides `mamba2`), which must not happen on `import radistill`.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_KEY_DIM = 16  # Triton's tl.dot needs >= 16 along each dim: a smaller N is zero-padded (which changes nothing)


@functools.lru_cache(maxsize=None)
def fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


@functools.lru_cache(maxsize=None)
def chunk_backward_ok(device: torch.device) -> bool:
    """False where fla's chunked backward gives wrong gradients: Hopper with 3.4.0 <= Triton < 3.7.1 (fla #640;
    fla itself raises there). Detected from the installed Triton and the device, never assumed."""
    import triton
    from packaging.version import Version

    triton_version = Version(triton.__version__.split("+")[0])
    hopper = torch.cuda.get_device_capability(device)[0] == 9
    return not (hopper and Version("3.4.0") <= triton_version < Version("3.7.1"))


def ssd_fla(
    x: Tensor, log_a: Tensor, b: Tensor, c: Tensor, initial_state: Tensor | None = None, recurrent: bool = False
) -> tuple[Tensor, Tensor]:
    """fla's chunked kernel (or, with recurrent=True, its fused step-loop kernel, whose backward works everywhere).

    x [B, T, H, P], log_a [B, T, H], b/c [B, T, H, N], initial_state [B, H, N, P] or None
    -> (y [B, T, H, P] in x's dtype, final_state [B, H, N, P] float32).
    """
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

    N = b.shape[-1]
    pad = max(0, MIN_KEY_DIM - N)
    if pad:
        b, c = F.pad(b, (0, pad)), F.pad(c, (0, pad))
        if initial_state is not None:
            initial_state = F.pad(initial_state, (0, 0, 0, pad))
    kernel = fused_recurrent_simple_gla if recurrent else chunk_simple_gla
    y, final = kernel(
        q=c, k=b, v=x, g=log_a.float(), scale=1.0,
        initial_state=None if initial_state is None else initial_state.float(), output_final_state=True,
    )
    return y.to(x.dtype), final[:, :, :N].float()
