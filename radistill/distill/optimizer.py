"""A layer block's optimizer: AdamW (or 8-bit AdamW) over exactly what the objective trains, and its state read back
from a checkpoint on resume."""

from __future__ import annotations

from pathlib import Path

import torch

from radistill.distill import checkpoint as ckpt
from radistill.distill.parallel import load_optimizer_state
from radistill.distill.recipe import StageConfig
from radistill.distill.stages import Objective
from radistill.scan.distributed import rank
from radistill.utils.optim import make_adamw, require_eight_bit


def make_optimizer(objective: Objective, cfg: StageConfig, on_cuda: bool) -> torch.optim.Optimizer:
    """AdamW (or 8-bit AdamW) over the objective's parameters, which alone are left requiring grad."""
    objective.student.requires_grad_(False)
    params = list({id(p): p for unit in objective.units.values() for p in unit}.values())
    for p in params:
        p.requires_grad_(True)
    # no weight decay on gains and biases (1-D), as usual for Transformers
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    library = eight_bit_library(objective.stage) if cfg.optimizer == "adamw8bit" else None
    return make_adamw(groups, cfg.lr, betas=cfg.betas, kind=cfg.optimizer, on_cuda=on_cuda, library=library,
                      what=f"stage {objective.stage}")


def load_optimizer(objective: Objective, optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    """This rank's optimizer state from ``checkpoint`` (rank 0's where this rank saved none: stage 3)."""
    own = ckpt.load_rank(checkpoint, rank())["optimizer"]
    state = own if own is not None else ckpt.load_rank(checkpoint, 0)["optimizer"]
    load_optimizer_state(objective.student, optimizer, state)


def eight_bit_library(stage: int) -> str:
    """The library 8-bit AdamW comes from (the one the memory plan names: torchao, else bitsandbytes)."""
    from radistill.memplan.plan import eight_bit_optimizer

    return require_eight_bit(eight_bit_optimizer(), f"stage {stage}")
