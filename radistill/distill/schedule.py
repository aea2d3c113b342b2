"""A stage's steps and their learning rates, as pure functions of the recipe and the step, so resuming needs
nothing but the step count."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from radistill.distill.recipe import StageConfig


@dataclass(frozen=True)
class StagePlan:
    """How stage ``stage``'s token budget becomes optimizer steps: each layer block in turn makes a whole pass over
    the stage's tokens, ``per_block`` steps of ``tokens_per_step`` tokens; steps count over the whole stage (block b's
    follow block b-1's). Stage 3 is one block of every layer."""

    stage: int
    blocks: list[list[int]]
    data_shards: int  # processes that split each global batch: 1 in stages 1/2 (they split layers), all in stage 3
    tokens_per_step: int
    per_block: int

    @classmethod
    def make(cls, stage: int, cfg: StageConfig, blocks: list[list[int]], world: int) -> StagePlan:
        """``max(1, tokens // tokens_per_step)`` steps per block (rounded down to whole steps, at least one)."""
        data_shards = 1 if stage in (1, 2) else world
        tokens_per_step = cfg.seq_len * cfg.batch_size * cfg.grad_accum * data_shards
        return cls(stage, blocks, data_shards, tokens_per_step, max(1, cfg.tokens // tokens_per_step))

    @property
    def layerwise(self) -> bool:
        """Stages 1/2: each block's layers are trained against the teacher's, split over the processes."""
        return self.stage in (1, 2)

    @property
    def total(self) -> int:
        return self.per_block * len(self.blocks)

    def describe(self, cfg: StageConfig) -> str:
        """One line saying what the stage runs, e.g. ``stage 3: 100 steps of 8,192 tokens (4 x 512 x 2 accum x 2
        ranks)``."""
        blocks = self.blocks
        passes = f"{len(blocks)} blocks of <= {len(blocks[0])} layers, each " if len(blocks) > 1 else ""
        return (f"stage {self.stage}: {passes}{self.per_block:,} steps of {self.tokens_per_step:,} tokens "
                f"({cfg.batch_size} x {cfg.seq_len} x {cfg.grad_accum} accum x {self.data_shards} ranks)")

    def span(self, index: int) -> tuple[int, int]:
        """Block ``index``'s steps: [first, end) over the stage."""
        return index * self.per_block, (index + 1) * self.per_block


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every param group's lr set to ``lr``."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # torchao keeps lr as a tensor (no recompile when it moves)
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


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
