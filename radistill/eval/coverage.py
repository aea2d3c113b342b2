"""Task results, the paper's two task groups, and coverage = student ÷ teacher (the contents of ``eval.json``).

The paper (arXiv 2602.11374, Table 1) splits tasks into *knowledge-focused* ones, which a student keeps even with no
attention heads, and *retrieval-heavy* ones, which need the Gather-and-Aggregate heads. A group's coverage is the
mean over its tasks of student value ÷ teacher value, for tasks where higher is better.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from radistill.utils.errors import RadistillError
from radistill.utils.io import write_json_atomic

KNOWLEDGE = "knowledge"
RETRIEVAL = "retrieval"
GROUPS = (KNOWLEDGE, RETRIEVAL)

# lm-eval task names (and our built-in KV-Ret) -> the paper's group. Anything else has no group unless the user
# names one (``task@group``).
DEFAULT_GROUPS = {
    "arc_easy": KNOWLEDGE,
    "arc_challenge": KNOWLEDGE,
    "piqa": KNOWLEDGE,
    "winogrande": KNOWLEDGE,
    "openbookqa": KNOWLEDGE,
    "hellaswag": KNOWLEDGE,
    "kv_ret": RETRIEVAL,
    "swde": RETRIEVAL,
    "mmlu": RETRIEVAL,
    "gsm8k": RETRIEVAL,
}


def check_group(group: str | None, where: str) -> str | None:
    if group not in (None, *GROUPS):
        raise RadistillError(f"{where}: unknown group '{group}'; use '{KNOWLEDGE}' or '{RETRIEVAL}'")
    return group


def format_value(value: float | None, metric: str = "") -> str:
    """A task's number as tables show it: accuracies and agreements in %, perplexity and KL (nats per token) and token
    counts as they are; "—" for none."""
    if value is None:
        return "—"
    if metric == "kl":
        return f"{value:.3f}"
    if metric == "tokens":
        return f"{value:.1f}"
    return f"{value:.2f}" if "perplexity" in metric else f"{100 * value:.1f}"


@dataclass
class TaskResult:
    """One number for one task, with what it means: ``value`` in ``metric`` (e.g. acc 0.93, perplexity 21.4)."""

    name: str
    metric: str
    value: float
    group: str | None = None
    higher_is_better: bool = True
    samples: int | None = None
    teacher_value: float | None = None
    details: dict | None = None  # a task's full result where one number is not enough (fidelity: per split, samples)

    @property
    def ratio(self) -> float | None:
        """Student ÷ teacher (teacher ÷ student where lower is better), or None without a usable teacher value."""
        if self.teacher_value is None:
            return None
        top, bottom = (self.value, self.teacher_value) if self.higher_is_better else (self.teacher_value, self.value)
        return top / bottom if bottom else None

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["name"]
        for optional in ("teacher_value", "details"):
            if data[optional] is None:
                del data[optional]
        return data

    @classmethod
    def from_dict(cls, name: str, data: dict) -> "TaskResult":
        return cls(name=name, **data)


def by_group(tasks: list[TaskResult]) -> list[tuple[str | None, list[TaskResult]]]:
    """Tasks in table order: knowledge-focused, retrieval-heavy, then ungrouped; each in their given order."""
    order = [*GROUPS, None]
    return [(g, [t for t in tasks if t.group == g]) for g in order if any(t.group == g for t in tasks)]


def coverage(tasks: list[TaskResult]) -> dict[str, float | None]:
    """Per group, the mean of student ÷ teacher over its tasks that have a teacher value (None if none do)."""
    result: dict[str, float | None] = {}
    for group in GROUPS:
        ratios = [t.ratio for t in tasks if t.group == group and t.higher_is_better and t.ratio is not None]
        result[group] = sum(ratios) / len(ratios) if ratios else None
    return result


@dataclass
class EvalReport:
    """The contents of ``eval.json``: a model's task results, beside its teacher's where one was evaluated."""

    model: str
    fingerprint: str
    tasks: list[TaskResult]
    settings: dict = field(default_factory=dict)
    teacher: str | None = None
    teacher_fingerprint: str | None = None

    @property
    def coverage(self) -> dict[str, float | None]:
        return coverage(self.tasks)

    def task(self, name: str) -> TaskResult | None:
        return next((t for t in self.tasks if t.name == name), None)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "fingerprint": self.fingerprint,
            "teacher": self.teacher,
            "teacher_fingerprint": self.teacher_fingerprint,
            "settings": self.settings,
            "tasks": {t.name: t.to_dict() for t in self.tasks},
            "coverage": self.coverage,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "EvalReport":
        return cls(
            model=data["model"],
            fingerprint=data["fingerprint"],
            tasks=[TaskResult.from_dict(name, row) for name, row in data["tasks"].items()],
            settings=data.get("settings", {}),
            teacher=data.get("teacher"),
            teacher_fingerprint=data.get("teacher_fingerprint"),
        )

    def with_teacher(self, teacher: "EvalReport") -> "EvalReport":
        """This report with each task's ``teacher_value`` filled in from ``teacher`` (same task names)."""
        tasks = []
        for task in self.tasks:
            reference = teacher.task(task.name)
            value = reference.value if reference is not None and reference.metric == task.metric else None
            tasks.append(TaskResult(**{**asdict(task), "teacher_value": value}))
        return EvalReport(self.model, self.fingerprint, tasks, self.settings, teacher.model, teacher.fingerprint)

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvalReport":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise RadistillError(f"{path} does not exist: run `radistill eval MODEL --out {path}` first") from exc
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RadistillError(f"{path} is not an eval.json written by `radistill eval` ({exc}); delete it and "
                                 "evaluate again") from exc
