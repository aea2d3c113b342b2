"""What a run writes for others to read, each published by rename so that a reader never sees half of it.

:func:`save_checkpoint` writes one resumable checkpoint across the processes (``checkpoint.py`` has the layout and
the file formats): rank 0 the student and ``trainer.json``, every rank its own RNG and optimizer state, then rank 0
publishes it. :func:`export_stage` writes ``RUN/stageN/``, the student after stage N as a loadable HF checkpoint.
Every process calls both; the barriers keep them in step.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from torch import nn

from radistill.distill import checkpoint as ckpt
from radistill.distill.parallel import barrier
from radistill.finetune.lora import adapter_parameters, merged_copy
from radistill.scan.distributed import rank, world_size
from radistill.utils.console import is_main_process


def save_checkpoint(ckpt_root: Path, student: nn.Module, trainer_state: dict, rank_state: Callable[[], dict],
                    keep: int) -> None:
    """Publish checkpoint ``stage{S}-step{N}`` of ``student`` under ``ckpt_root``, keeping the newest ``keep``.

    ``trainer_state``: what ``trainer.json`` holds (``stage``, ``step``, ``tokens``, ``world_size`` among it; rank 0's
    is written); ``rank_state``: makes this process's ``{"rng": ..., "optimizer": ...}``; called on every rank once
    rank 0 has written the student (gathering a sharded optimizer state is a collective).
    """
    stage, step = trainer_state["stage"], trainer_state["step"]
    name = ckpt.checkpoint_name(stage, step)
    partial = ckpt.partial_dir(ckpt_root, name)
    if is_main_process():
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        ckpt.save_model(student.state_dict(), partial)
        ckpt.save_trainer(trainer_state, partial)
    barrier()  # the folder exists before any rank writes into it
    ckpt.save_rank(rank_state(), partial, rank())
    barrier()  # every rank's file is on disk before the manifest hashes them
    if is_main_process():
        meta = dict(stage=stage, step=step, tokens=trainer_state["tokens"], world_size=world_size())
        ckpt.publish(ckpt_root, name, meta, keep)
    barrier()


def export_stage(run_dir: Path, stage: int, student: nn.Module, tokenizer, export_files: tuple[Path, ...]) -> None:
    """``RUN/stageN/``: ``student`` as a loadable HF checkpoint (LoRA adapters merged), the tokenizer and
    ``export_files`` beside it, replacing an older export of the stage only once the new one is whole."""
    if is_main_process():
        final = run_dir / f"stage{stage}"
        partial = run_dir / f".stage{stage}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        # adapters merged, so that every stageN/ is a plain radistill checkpoint
        exported = merged_copy(student) if adapter_parameters(student) else student
        exported.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        for extra in export_files:
            shutil.copy2(extra, partial / Path(extra).name)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    barrier()
