"""The NaN guard: a step whose loss or gradient norm is not finite stops the run before its update is applied."""

from __future__ import annotations

import math
from pathlib import Path

from radistill.distill import checkpoint as ckpt
from radistill.utils.errors import RadistillError


class NonFiniteLossError(RadistillError):
    """The loss or gradient norm became NaN/inf; training stopped before the bad update."""


def require_finite(loss: float, grad_norm: float, stage: int, step: int, ckpt_root: Path) -> None:
    """Raise :class:`NonFiniteLossError` for a NaN/inf ``loss`` or ``grad_norm`` of ``step`` (0-based) of ``stage``,
    naming the checkpoint under ``ckpt_root`` that ``--resume`` would continue from and what to change first."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    try:
        last = ckpt.latest(ckpt_root)
    except ckpt.CheckpointError:  # --resume finds the newest intact one itself
        last = ckpt.checkpoints(ckpt_root)[-1] if ckpt.checkpoints(ckpt_root) else None
    raise NonFiniteLossError(
        f"stage {stage}, step {step + 1}: the loss is {loss} (gradient norm {grad_norm}); stopped before "
        f"applying it. The last good checkpoint is {last or 'none (nothing was saved yet)'}: lower the "
        f"learning rate (--lr-stage{stage}) or the clip, then --resume"
    )
