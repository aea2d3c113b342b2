"""The scalar-decay recurrence of the recurrent heads, one set of inputs, several implementations.

    h_t = exp(log_a_t) h_{t-1} + b_t x_tᵀ,   y_t = c_tᵀ h_t     (layout [batch, seq, heads, dim])

naive.py: the oracles (materialised matrix `ssd_matrix`/`ssd_naive`, step loop `ssd_recurrent`, one token
`ssd_step`); chunk.py: the chunked scan in plain PyTorch; fla.py: flash-linear-attention's kernels. `ssd()` picks one.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import Tensor

from radistill.ops.ssd.chunk import ssd_chunk
from radistill.ops.ssd.fla import chunk_backward_ok, fla_installed, ssd_fla
from radistill.ops.ssd.naive import segsum, ssd_matrix, ssd_naive, ssd_recurrent, ssd_step
from radistill.utils.errors import RadistillError

__all__ = ["BACKENDS", "segsum", "ssd", "ssd_chunk", "ssd_fla", "ssd_matrix", "ssd_naive", "ssd_recurrent", "ssd_step"]

BACKENDS = ("auto", "torch", "fla")
# With backend "auto", calls of fewer tokens than this take the plain-PyTorch chunked scan instead of fla's kernels
# (default 0: never). fla's chunk kernels cost ~0.5 ms of host time per call (Python launch path, several Triton
# launches), so a short eager prefill can be bound by the host; whether the torch path wins is measured by
# benchmarks/generate.py, not assumed, which is why the default leaves fla's path alone.
TORCH_BELOW_ENV = "RADISTILL_SSD_TORCH_BELOW"
logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def compiled_ssd_chunk():
    """ssd_chunk under torch.compile (built on first use; on CUDA only: on CPU it would need a C++ toolchain).

    dynamic=True: one graph for every batch, length, head count and state size. With the default (static first,
    then a recompile each time another dimension turns out to vary) a run that meets layers with different numbers
    of recurrent heads, then a student of another state size, compiles three times (tens of seconds each on H100)."""
    return torch.compile(ssd_chunk, dynamic=True)


@torch.compiler.assume_constant_result
def plan(backend: str, device: torch.device, needs_grad: bool) -> str:
    """Which implementation ``ssd`` runs for ``backend`` (one of BACKENDS): "fla" (fla's chunked kernel),
    "fla-recurrent" (fla's fused-recurrent kernel) or "torch" (the chunked PyTorch scan); raises for a backend this
    call cannot have.

    Called once per trace inside a compiled layer and its answer baked in (``assume_constant_result``): its cached
    checks and its log line would otherwise break the layer's graph, three times per ``ssd`` call (measured on the
    H100: dynamo resumed the graph after each)."""
    if backend == "torch":
        return "torch"
    if device.type != "cuda":
        if backend == "fla":
            raise RadistillError("backend 'fla' runs on CUDA tensors only: move the model to a GPU or use backend "
                                 "'torch'")
        return "torch"
    if not fla_installed():
        if backend == "fla":
            raise RadistillError("backend 'fla' needs flash-linear-attention: pip install 'radistill[gpu]', "
                                 "or use backend 'torch'")
        _log_once("flash-linear-attention is not installed: the recurrent heads use the compiled PyTorch "
                  "chunked scan (pip install 'radistill[gpu]' for fla's kernels)")
        return "torch"
    if not needs_grad or chunk_backward_ok(device):
        return "fla"
    if backend == "fla":
        return "fla-recurrent"
    _log_once("fla's chunked backward is unreliable on Hopper with Triton < 3.7.1 (fla #640): with "
              "gradients, the recurrent heads use the compiled PyTorch chunked scan; fla serves the rest")
    return "torch"


@torch.compiler.assume_constant_result
def torch_below() -> int:
    """The ``RADISTILL_SSD_TORCH_BELOW`` threshold in tokens (0 when unset), read at each eager dispatch (so a
    benchmark can switch it between calls) and baked in as a constant inside a compiled region."""
    raw = os.environ.get(TORCH_BELOW_ENV, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise RadistillError(f"{TORCH_BELOW_ENV}={raw!r} is not a token count: set it to an integer >= 0 or unset it")
    return value


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logger.warning(message)


def ssd(
    x: Tensor, log_a: Tensor, b: Tensor, c: Tensor, initial_state: Tensor | None = None,
    backend: str = "auto", chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """x [B, T, H, P], log_a [B, T, H] (<= 0), b/c [B, T, H, N], initial_state [B, H, N, P] or None
    -> (y [B, T, H, P] in x's dtype, final_state [B, H, N, P] float32).

    backend "torch": the chunked PyTorch scan (compiled on CUDA). "fla": fla's chunked kernel; where its backward
    is unreliable (Hopper, Triton < 3.7.1) and gradients are needed, fla's fused-recurrent kernel instead.
    "auto": fla's chunked kernel on CUDA when installed and usable for this call, else the compiled PyTorch scan
    (faster than fla's fused-recurrent backward), with one logged warning per reason per process.
    A single token (T = 1) always takes the step form. With "auto", a call of fewer than
    ``RADISTILL_SSD_TORCH_BELOW`` tokens (env, default 0 = never) takes the PyTorch scan (:data:`TORCH_BELOW_ENV`).
    """
    if backend not in BACKENDS:
        raise RadistillError(f"unknown ssd backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if x.shape[1] == 1:
        B, _, H, P = x.shape
        h = initial_state if initial_state is not None else x.new_zeros(B, H, b.shape[-1], P)
        y, final = ssd_step(x[:, 0], log_a[:, 0], b[:, 0], c[:, 0], h)
        return y.unsqueeze(1), final
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, log_a, b, c, initial_state)
    )
    how = plan(backend, x.device, needs_grad)
    if how == "fla" and backend == "auto":
        below = torch_below()
        if below and x.shape[1] < below:  # unset: no comparison, so no shape guard in compiled code
            how = "torch"
    if how != "torch":
        return ssd_fla(x, log_a, b, c, initial_state, recurrent=how == "fla-recurrent")
    # inside a compiled region the plain scan joins the caller's graph; a nested compiled function would not
    chunk = compiled_ssd_chunk() if x.is_cuda and not torch.compiler.is_compiling() else ssd_chunk
    return chunk(x, log_a, b, c, initial_state, chunk_size)
