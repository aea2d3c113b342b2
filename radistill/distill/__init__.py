"""Distillation: the MOHAWK stages on a hybrid student, resumable, on one GPU or many.

``recipe.py`` (settings), ``data.py`` (documents -> packed, resumable token stream), ``losses.py`` (the three
losses as tensor functions), ``stages.py`` (objectives: forward + backward of one micro-batch), ``trainer.py``
(the loop: stages, layer blocks, optimizer steps), around it ``schedule.py`` (steps per stage, lr),
``optimizer.py``, ``placement.py`` (what is on the device when), ``guard.py`` (NaN guard), ``metrics.py``
(``metrics.jsonl``, progress), ``resume.py`` (run-folder checks, what a resume reads), ``publish.py`` (checkpoints
and ``RUN/stageN/`` exports, written by rename) over ``checkpoint.py`` (the files), ``parallel.py`` (several
processes), ``teacher_logits.py`` (stage 3's teacher top-k, precomputed to disk), ``run.py`` and ``cli.py``
(`radistill distill`). See docs/distill.md.
"""

from radistill.utils.lazy import lazy_exports

# imported on first use, so that importing this package (as `radistill --help` does) does not import torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "radistill.distill.recipe": ("DataConfig", "DistillRecipe", "LossConfig", "StageConfig"),
    "radistill.distill.run": ("run_distill",),
    "radistill.distill.trainer": ("NonFiniteLossError", "StageResult", "Trainer"),
})

__all__ = ["DataConfig", "DistillRecipe", "LossConfig", "NonFiniteLossError", "StageConfig", "StageResult", "Trainer",
           "run_distill"]
