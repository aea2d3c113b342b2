"""Learning-rate schedules as pure functions of the step, so resuming needs nothing but the step count."""

from __future__ import annotations

import math

from radistill.distill.recipe import StageConfig


def lr_multiplier(step: int, total: int, cfg: StageConfig) -> float:
    """The factor on ``cfg.lr`` for optimizer step ``step`` (0-based) of ``total``.

    Linear warmup over the first ``warmup`` fraction of the steps, then
    ``cosine``: half a cosine down to ``min_lr_ratio``;
    ``wsd`` (warmup-stable-decay, the authors' code): flat, then linear down to ``min_lr_ratio`` over the last
    ``decay`` fraction;
    ``constant``: flat.
    """
    warmup = round(cfg.warmup * total)
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup - 1)  # the last step sits at the floor
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.schedule == "wsd":
        decay = round(cfg.decay * total)
        into_decay = step - (total - decay)
        if decay == 0 or into_decay < 0:
            return 1.0
        return 1.0 - (1 - floor) * (into_decay + 1) / decay
    return 1.0
