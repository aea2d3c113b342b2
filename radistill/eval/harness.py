"""Any lm-evaluation-harness task, on the model object already in memory (teacher, hybrid student or any HF LM).

The model is handed to lm-eval's ``HFLM`` as an object, so a hybrid student needs no registration with lm-eval and
is evaluated exactly as loaded. Task YAMLs in ``include_path`` work offline (their data from local JSON files).
"""

from __future__ import annotations

import logging
import os

from radistill.eval.coverage import TaskResult
from radistill.utils.errors import RadistillError

# The metric the literature reports per task (length-normalised accuracy where the choices' lengths differ a lot);
# other tasks use the first of GENERIC_METRICS they report.
PREFERRED_METRIC = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
GENERIC_METRICS = ("acc", "exact_match", "contains", "f1", "acc_norm", "word_perplexity", "perplexity")


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise RadistillError("lm-eval tasks need lm-evaluation-harness: pip install 'radistill[eval]'") from exc
    return lm_eval, HFLM, TaskManager


def pick_metric(task: str, metrics: dict) -> tuple[str, float]:
    """``(metric, value)`` from lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}``."""
    values = {}
    for key, value in metrics.items():
        name = key.split(",")[0]
        if isinstance(value, (int, float)) and not name.endswith("_stderr") and name not in values:
            values[name] = float(value)
    for name in (PREFERRED_METRIC.get(task), *GENERIC_METRICS):
        if name in values:
            return name, values[name]
    if values:
        return next(iter(values.items()))
    raise RadistillError(f"lm-eval reported no numeric metric for task '{task}'")


def lm_eval_tasks(
    model,
    tokenizer,
    tasks: dict[str, str | None],
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    raw: dict | None = None,
) -> list[TaskResult]:
    """Run lm-eval ``tasks`` (name -> group or None) on ``model``; one :class:`TaskResult` per task. ``raw``, when
    given, receives lm-eval's own results (every metric with its stderr, task versions, configs; no samples)."""
    lm_eval, HFLM, TaskManager = _lm_eval()
    logging.getLogger("lm-eval").setLevel(logging.ERROR)  # its per-request chatter drowns our progress
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [name for name in tasks if not manager.match_tasks([name])]
    if unknown:
        hint = f" (looked in {include_path} too)" if include_path else "; for a local task YAML pass --include-path DIR"
        raise RadistillError(f"lm-eval does not know task(s) {', '.join(unknown)}{hint}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    try:
        output = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            log_samples=False, bootstrap_iters=0, verbosity="ERROR",
        )
    except (ConnectionError, OSError) as exc:
        raise RadistillError(f"lm-eval could not load the data of {', '.join(tasks)} ({exc}): these tasks need "
                             "their datasets reachable (HF hub or a local cache); offline, use local task YAMLs "
                             "with --include-path") from exc
    if raw is not None:
        raw.update({k: v for k, v in output.items() if k != "samples"})
    results = []
    for name, group in tasks.items():
        metrics = output["results"].get(name)
        if metrics is None:
            raise RadistillError(f"lm-eval returned no results for task '{name}'")
        metric, value = pick_metric(name, metrics)
        higher = output.get("higher_is_better", {}).get(name, {}).get(metric, True)
        samples = output.get("n-samples", {}).get(name, {}).get("effective")
        results.append(TaskResult(name, metric, value, group=group, higher_is_better=bool(higher), samples=samples))
    return results
