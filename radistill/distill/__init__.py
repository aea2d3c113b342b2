"""Distillation (issue 4): the MOHAWK stages on a hybrid student, resumable, on one GPU or many.

``recipe.py`` (settings), ``data.py`` (documents -> packed, resumable token stream), ``losses.py`` (the three
losses as tensor functions), ``stages.py`` (objectives: forward + backward of one micro-batch), ``trainer.py``
(the loop, checkpoints, NaN guard, DDP), ``teacher_logits.py`` (stage 3's teacher top-k, precomputed to disk),
``checkpoint.py``, ``schedule.py``, ``parallel.py``, ``run.py`` and ``cli.py`` (`radistill distill`). See
docs/distill.md.
"""

from radistill.distill.recipe import DataConfig, DistillRecipe, LossConfig, StageConfig
from radistill.distill.run import run_distill
from radistill.distill.trainer import NonFiniteLossError, StageResult, Trainer

__all__ = ["DataConfig", "DistillRecipe", "LossConfig", "NonFiniteLossError", "StageConfig", "StageResult", "Trainer",
           "run_distill"]
