"""Where a run starts: the run folder's checks, and what ``--resume`` reads back from a checkpoint.

A new run goes only into a folder that holds no run (:func:`check_fresh`). ``--resume`` takes the newest intact
checkpoint (:func:`find_checkpoint`), which must come from the same recipe and number of processes
(:func:`check_same_run`) and, in a stage trained in layer blocks, the same blocks (:func:`check_blocks`); with no
checkpoint it starts over only where that loses nothing (:func:`check_restartable`). Where several processes run,
rank 0 looks at the files and the others learn its verdict, so that every rank raises the same error.

The RNG states a checkpoint keeps per process are read and written here too (:func:`rng_state`,
:func:`set_rng_state`): a resumed run continues at the exact step, data position and random state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from radistill.distill import checkpoint as ckpt
from radistill.distill.parallel import broadcast_object
from radistill.distill.recipe import DistillRecipe
from radistill.scan.distributed import world_size
from radistill.utils.console import console, is_main_process
from radistill.utils.errors import RadistillError


@dataclass
class Position:
    """Where a resumed run continues: ``step`` optimizer steps of ``stage`` are done."""

    stage: int
    step: int  # counted over the whole stage: block b's steps follow block b-1's
    tokens: int
    data: dict
    checkpoint: Path
    blocks: list[list[int]] | None  # the stage's layer blocks as the checkpoint recorded them (None: not recorded)


def check_fresh(run_dir: Path) -> None:
    """A new run goes only into a folder that holds no run: starting over would truncate one run's metrics,
    replace its recipe and exports and mix the two."""
    # rank 0 looks, before it writes recipe.json; the others must not look after it did
    found = broadcast_object(ckpt.run_artifacts(run_dir) if is_main_process() else None)
    if found:
        raise RadistillError(
            f"{run_dir} already holds a distillation run ({', '.join(found)}): pass --resume to continue "
            "it, or choose a new --out"
        )


def find_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint ``--resume`` continues from (None: there is none), its note printed (e.g. that
    ``latest.json`` was damaged and an older one is taken); a corrupted one raises :class:`ckpt.CheckpointError`."""
    # rank 0 finds and hashes the checkpoint; the others learn the verdict (and raise the same error) from it
    verdict: tuple[str | None, str | None, str | None] = (None, None, None)
    if is_main_process():
        try:
            found, note = ckpt.resumable(ckpt_root)
            verdict = (str(found) if found else None, note, None)
        except ckpt.CheckpointError as exc:
            verdict = (None, None, str(exc))
    found, note, error = broadcast_object(verdict)
    if error is not None:
        raise ckpt.CheckpointError(error)
    if note is not None and found is not None and is_main_process():
        console.print(f"[yellow]{note}[/]")
    return Path(found) if found is not None else None


def check_restartable(run_dir: Path, recipe: DistillRecipe) -> None:
    """--resume with no checkpoint starts from the beginning, which is only right for a run that never got past
    its first checkpoint with the same recipe: not for a folder holding stage exports (its checkpoints were
    deleted) or another recipe's run."""
    exports = sorted(p.name for p in run_dir.glob("stage*") if p.is_dir())
    if exports:
        raise RadistillError(
            f"{run_dir} holds exported stages ({', '.join(exports)}) but no checkpoint to resume from: "
            "choose a new --out"
        )
    saved = run_dir / "recipe.json"
    if saved.exists():
        try:
            same = DistillRecipe.load(saved).to_dict() == recipe.to_dict()
        except (RadistillError, ValueError, KeyError, TypeError):
            same = False
        if not same:
            raise RadistillError(
                f"{saved} is not this run's recipe (or is unreadable) and there is no checkpoint: resume with "
                "the same settings, or choose a new --out"
            )


def check_same_run(state: dict, checkpoint: Path, run_dir: Path, recipe: DistillRecipe) -> None:
    """The checkpoint's ``trainer.json`` ``state`` was written by this many processes under this recipe."""
    if state["world_size"] != world_size():
        raise RadistillError(
            f"{checkpoint} was written by {state['world_size']} processes; resume it with the same number "
            f"(this run has {world_size()})"
        )
    # a recipe saved before a setting existed reads as that setting's default
    if DistillRecipe.from_dict(state["recipe"]).to_dict() != recipe.to_dict():
        raise RadistillError(
            f"the recipe differs from the one {run_dir} was started with ({run_dir / 'recipe.json'}): "
            "resume without changing settings, or start a new --out"
        )


def check_blocks(position: Position, stage: int, blocks: list[list[int]]) -> None:
    """A stage resumed mid-way trains the layer blocks its checkpoint recorded (another student would cut others)."""
    if position.blocks is not None and position.blocks != blocks:
        raise RadistillError(
            f"{position.checkpoint} trained stage {stage} in layer blocks {position.blocks}, this run makes "
            f"{blocks}: resume with the student the run was started with"
        )


def rng_state() -> dict:
    """This process's RNG states (Python, numpy, torch CPU, and every CUDA device's where there is one)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
