"""Task specs of ``radistill eval`` and the batch each task runs at: shared by the runner (radistill/eval/runner.py)
and the eval's memory plan (radistill/memplan/eval.py), which must not import each other.

A task spec is one of
  ``kv``              KV retrieval at ``EvalConfig.kv.pairs`` (log-likelihood and greedy generation)
  ``ppl``             perplexity on ``EvalConfig.text``
  ``fidelity``        the student's next-token distributions against its teacher's on ``EvalConfig.text`` and on the
                      teacher's own samples (:mod:`radistill.eval.fidelity`; needs a teacher)
  ``PATH.jsonl``      the user's multiple-choice items, named after the file
  ``NAME``            an lm-eval task (``arc_easy``, ``hellaswag``, ``mmlu``, a local YAML's task, ...)
and any of the last two may end in ``@knowledge`` or ``@retrieval`` to put it in one of the paper's groups
(lm-eval's paper tasks are grouped already).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from radistill.eval.coverage import DEFAULT_GROUPS, check_group
from radistill.utils.errors import RadistillError


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # "kv" | "ppl" | "fidelity" | "jsonl" | "lm_eval"
    name: str
    group: str | None = None
    path: str | None = None


def parse_task(spec: str) -> TaskSpec:
    name, _, group = spec.strip().partition("@")
    group = check_group(group or None, f"task '{spec}'")
    if name in ("kv", "ppl", "fidelity"):
        if group:
            raise RadistillError(f"task '{spec}': the built-in task '{name}' has a fixed group; drop '@{group}'")
        return TaskSpec(name, name)
    if name.endswith(".jsonl"):
        return TaskSpec("jsonl", Path(name).stem, group, name)
    if not name:
        raise RadistillError(f"empty task name in '{spec}': --tasks takes names separated by commas")
    return TaskSpec("lm_eval", name, group or DEFAULT_GROUPS.get(name))


def task_batch_size(spec: TaskSpec, batch_size: int) -> int:
    """Rows per forward of a task at ``--batch-size``: perplexity windows are the model's context long, a quarter."""
    return max(1, batch_size // 4) if spec.kind in ("ppl", "fidelity") else batch_size


__all__ = ["TaskSpec", "parse_task", "task_batch_size"]
