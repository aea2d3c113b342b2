"""What a report is made of, read from disk: any part may be missing, and then it is ``None`` (shown as "not run").

Two directory layouts are understood:

* a pipeline run (``radistill run`` / ``radistill demo``), laid out as :class:`RunLayout` says:
  the recipe, one scan, any number of students, each with its distillation run and its ``eval.json``;
* a single distillation ``RUN`` directory (``radistill distill --out RUN``): ``metrics.jsonl``, ``recipe.json``,
  ``stage*/`` checkpoints and, if evaluated there, ``eval.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from radistill.eval.coverage import EvalReport
from radistill.utils.errors import RadistillError

STAGE_DIRS = ("stage3", "stage2", "stage1")  # latest first


@dataclass(frozen=True)
class RunLayout:
    """Where ``radistill run`` puts each step's output under its ``out`` directory."""

    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.json"

    @property
    def scan_dir(self) -> Path:
        return self.root / "scan"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def teacher_eval(self) -> Path:
        return self.root / "eval" / "teacher.json"

    def student_dir(self, name: str) -> Path:
        return self.root / "students" / name

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    def student_eval(self, name: str) -> Path:
        return self.root / "eval" / f"{name}.json"

    def is_pipeline(self) -> bool:
        return self.recipe.exists() and (self.root / "students").is_dir()


def read_json(path: Path) -> dict | None:
    """A JSON file's contents, or None if it is absent or unreadable (a report never fails on one file)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_metrics(path: Path) -> list[dict]:
    """Rows of a ``metrics.jsonl``; a torn last line (a run killed mid-write) is skipped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def read_eval(path: Path) -> EvalReport | None:
    try:
        return EvalReport.load(path) if path.exists() else None
    except RadistillError:
        return None


def final_checkpoint(run_dir: Path | None) -> Path | None:
    """The latest stage checkpoint of a distillation run that holds a ``config.json``."""
    if run_dir is None:
        return None
    return next((run_dir / s for s in STAGE_DIRS if (run_dir / s / "config.json").exists()), None)


@dataclass
class StudentRun:
    name: str
    checkpoint: Path | None = None  # the final student: last distillation stage, else the built one
    selection: dict | None = None  # the build's selection.json
    config: dict | None = None  # the checkpoint's config.json
    metrics: list[dict] = field(default_factory=list)
    eval: EvalReport | None = None

    @property
    def kept_heads(self) -> list[tuple[int, int]]:
        heads = (self.config or {}).get("kept_heads") or []
        return [(layer, head) for layer, row in enumerate(heads) for head in row]


@dataclass
class RunInputs:
    root: Path
    recipe: dict | None = None
    scan: dict | None = None
    scan_dir: Path | None = None
    analysis: dict | None = None
    teacher_config: dict | None = None
    teacher_eval: EvalReport | None = None
    students: list[StudentRun] = field(default_factory=list)


def _student(name: str, student_dir: Path | None, run_dir: Path | None, eval_path: Path | None) -> StudentRun:
    final = final_checkpoint(run_dir) or student_dir
    selection = next((read_json(d / "selection.json") for d in (final, student_dir) if d and (d / "selection.json")
                      .exists()), None)
    return StudentRun(
        name=name,
        checkpoint=final if final and (final / "config.json").exists() else None,
        selection=selection,
        config=read_json(final / "config.json") if final else None,
        metrics=read_metrics(run_dir / "metrics.jsonl") if run_dir else [],
        eval=read_eval(eval_path) if eval_path else None,
    )


def _scan_dir_of(students: list[StudentRun]) -> Path | None:
    """The scan a student was built from, as its selection.json names it (``scan``: path of scan.json)."""
    for student in students:
        scan = (student.selection or {}).get("scan")
        if isinstance(scan, str) and Path(scan).exists():
            return Path(scan).parent if Path(scan).is_file() else Path(scan)
    return None


def discover(root: str | Path) -> RunInputs:
    """Read everything a report can show from a pipeline run directory or a distillation RUN directory."""
    root = Path(root)
    if not root.is_dir():
        raise RadistillError(f"{root} is not a directory: pass the --out directory of `radistill run`, "
                             "`radistill demo` or `radistill distill`")
    layout = RunLayout(root)
    if layout.is_pipeline():
        recipe = read_json(layout.recipe)
        names = [s["name"] for s in (recipe or {}).get("students", [])]
        students = [_student(n, layout.student_dir(n), layout.run_dir(n), layout.student_eval(n)) for n in names]
        scan_dir = layout.scan_dir
        teacher_eval = read_eval(layout.teacher_eval)
    else:
        recipe = read_json(root / "recipe.json")
        students = [_student(root.name, None, root, root / "eval.json")]
        scan_dir = _scan_dir_of(students)
        teacher_eval = None
    teacher_config = None
    if recipe and isinstance(recipe.get("teacher"), str):
        teacher_config = read_json(Path(recipe["teacher"]) / "config.json")
    return RunInputs(
        root=root,
        recipe=recipe,
        scan=read_json(scan_dir / "scan.json") if scan_dir else None,
        scan_dir=scan_dir,
        analysis=read_json(scan_dir / "analysis.json") if scan_dir else None,
        teacher_config=teacher_config,
        teacher_eval=teacher_eval,
        students=students,
    )
