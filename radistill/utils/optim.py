"""The optimizers every training loop here uses: AdamW, or AdamW with blockwise 8-bit moments."""

from __future__ import annotations

import importlib.util

import torch

from radistill.utils.errors import RadistillError

OPTIMIZERS = ("adamw", "adamw8bit")


def eight_bit_library() -> str | None:
    """The 8-bit AdamW library that imports here (torchao, then bitsandbytes), or None."""
    for module in ("torchao", "bitsandbytes"):
        if importlib.util.find_spec(module) is not None:
            return module
    return None


def require_eight_bit(library: str | None, what: str) -> str:
    """``library`` (from :func:`eight_bit_library`), or a clear error naming ``what`` asked for 8-bit AdamW."""
    if library is None:
        raise RadistillError(f"{what}: optimizer adamw8bit needs torchao or bitsandbytes: pip install torchao (or "
                             "bitsandbytes), or set the optimizer to adamw")
    return library


def make_adamw(params: list, lr: float, *, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
               kind: str = "adamw", on_cuda: bool | None = None, library: str | None = None,
               what: str = "optimizer") -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or, with ``kind="adamw8bit"``, torchao's or else bitsandbytes' 8-bit AdamW (tensors under
    4096 values keep fp32 moments in both). ``params``: parameters or param groups; ``on_cuda`` defaults to whether
    every parameter is on CUDA; ``library``: the 8-bit library (default :func:`eight_bit_library`); ``what`` names the
    setting in errors.

    torchao compiles its per-parameter update with ``torch.compile``. Off CUDA it runs the same update eagerly:
    compiling costs seconds per parameter shape and needs a C++ toolchain, more than a CPU run ever wins back.
    """
    if on_cuda is None:
        flat = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
        on_cuda = bool(flat) and all(p.is_cuda for p in flat)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=on_cuda or None)
    if kind != "adamw8bit":
        raise RadistillError(f"{what}: unknown optimizer {kind!r}: use {' or '.join(OPTIMIZERS)}")
    library = require_eight_bit(library or eight_bit_library(), what)
    if library == "bitsandbytes":
        from bitsandbytes.optim import AdamW8bit

        return AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    from torchao.optim import AdamW8bit

    if on_cuda:
        return AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)

    class EagerAdamW8bit(AdamW8bit):
        def step(self, closure=None):
            with torch.compiler.set_stance("force_eager"):
                return super().step(closure)

    return EagerAdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)


__all__ = ["OPTIMIZERS", "eight_bit_library", "make_adamw", "require_eight_bit"]
