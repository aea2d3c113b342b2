"""`radistill run RECIPE` (scan → build → distill → eval → report from one file) and `radistill demo`.

Each step writes into the run directory (:class:`radistill.report.inputs.RunLayout`) and is skipped when its
output is there, valid, and was made from the same inputs: the scan of the same weights with the same probe; a
student built from that scan with the same heads and mixer; a distillation whose last stage is exported and whose
recipe matches; an ``eval.json`` of the same weights and settings. Steps record what they were made from in
``steps.json``, so a changed recipe redoes exactly the steps it affects.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import typer

from radistill.distill.recipe import DistillRecipe, read_recipe_file, with_recommended
from radistill.eval.coverage import EvalReport
from radistill.report.inputs import RunLayout, final_checkpoint, read_json
from radistill.utils.console import console
from radistill.utils.errors import RadistillError
from radistill.utils.io import write_json_atomic
from radistill.utils.typed import check_fields, coerce

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@dataclass
class ScanSettings:
    pairs: int = 20
    samples: int = 64
    seed: int = 0
    metric: str = "logprob"
    ablation: str = "zero"
    batch_size: int | None = None
    gpu_memory: str | None = None  # e.g. "24GiB": plan rows per forward and prompts per chunk first
    analyze_top: int = 8  # heads whose attention is drawn and labelled gather/aggregate (0: no analysis)


@dataclass
class StudentSpec:
    """One student: the scan's top ``keep`` heads, or ``heads`` named by hand (``"8.3,0.6"``)."""

    name: str
    keep: int | None = None
    heads: str | None = None

    def __post_init__(self):
        if (self.keep is None) == (self.heads is None):
            raise RadistillError(f"student '{self.name}': give exactly one of keep (top K of the scan) or heads")


@dataclass
class Recipe:
    """Everything `radistill run` does. Relative paths are relative to the recipe file."""

    teacher: str
    out: str = "radistill-run"
    data: str = ""  # training text for distillation (a file or an HF dataset id)
    students: list[StudentSpec] = field(default_factory=lambda: [StudentSpec("top10", keep=10)])
    mixer: str = "window_recurrent"  # keeps the most of the teacher (docs/distill.md); the paper's: discrete_mamba2
    state_size: int | None = None  # None: the mixer's default
    window: int | None = None  # tokens a window head sees (mixer window or window_recurrent); None: its default
    scan: ScanSettings = field(default_factory=ScanSettings)
    distill: dict = field(default_factory=dict)  # a partial DistillRecipe (radistill/distill/recipe.py)
    eval: dict = field(default_factory=dict)  # EvalConfig fields (radistill/eval/runner.py)
    device: str = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's default)

    def __post_init__(self):
        names = [s.name for s in self.students]
        if not names or len(set(names)) != len(names):
            raise RadistillError(f"a recipe needs students with distinct names (got {names})")
        try:  # validate now, not after the scan
            self.distill_recipe()
        except RadistillError as exc:
            raise RadistillError(f"distill: {exc}") from exc
        self.eval_config()

    def distill_recipe(self) -> DistillRecipe:
        recipe = DistillRecipe.from_dict(self.distill)
        if self.data:
            recipe.data.source = self.data
        return with_recommended(recipe, self.distill)

    def eval_config(self) -> "EvalConfig":
        from radistill.eval.runner import EvalConfig  # imports torch: not at `radistill --help` time

        return EvalConfig.from_dict(self.eval)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, base: Path | None = None) -> "Recipe":
        data = dict(data)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise RadistillError(f"unknown recipe key(s) {', '.join(sorted(unknown))}; "
                                 f"valid keys: {', '.join(cls.__dataclass_fields__)}")
        if "teacher" not in data:
            raise RadistillError("the recipe names no teacher: add `teacher: HF_ID_OR_DIRECTORY`")
        data = check_fields(cls, data, "")
        try:
            scan = coerce(data.get("scan", {}), dict, "scan")
            data["scan"] = ScanSettings(**check_fields(ScanSettings, scan, "scan"))
            students = data.get("students", [{"name": "top10", "keep": 10}])
            data["students"] = [StudentSpec(**check_fields(StudentSpec, coerce(s, dict, f"students.{i}"),
                                                           f"students.{i}")) for i, s in enumerate(students)]
        except TypeError as exc:
            raise RadistillError(f"recipe: {exc}") from exc
        recipe = cls(**data)
        if base is not None:
            recipe.resolve_paths(base)
        return recipe

    def resolve_paths(self, base: Path) -> None:
        """Paths written relative to the recipe file; names that are not local paths (hub ids) stay as they are."""
        def local(value: str | None) -> str | None:
            if not value or Path(value).is_absolute():
                return value
            candidate = base / value
            return str(candidate) if candidate.exists() or value == self.out else value

        self.teacher, self.data, self.out = local(self.teacher), local(self.data), str(base / self.out)
        for key in ("text", "include_path"):
            if self.eval.get(key):
                self.eval[key] = local(self.eval[key])

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: dict | None = None) -> "Recipe":
        path = Path(path)
        data = deep_merge(read_recipe_file(path), overrides or {})
        return cls.from_dict(data, base=path.resolve().parent)


def deep_merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied, nested mappings merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(model: str) -> dict:
    """A cheap stand-in for a teacher's weights: for a local directory, its files' names, sizes and times (new
    weights at the same path redo the scan); for a hub id, the id."""
    path = Path(model)
    if not path.is_dir():
        return {"id": model}
    return {"path": str(path.resolve()),
            "files": sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())}


class Pipeline:
    """The steps of one recipe; ``run()`` does those whose output is missing, invalid or made from other inputs."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.layout = RunLayout(Path(recipe.out))
        self.stamps_path = self.layout.root / "steps.json"
        self.stamps: dict = read_json(self.stamps_path) or {}
        self.timings: dict[str, float] = {}

    # --- bookkeeping --------------------------------------------------------------------------------------
    def _fresh(self, step: str, inputs, output_valid: bool) -> bool:
        if output_valid and self.stamps.get(step) == _digest(inputs):
            console.log(f"[dim]{step}: up to date, skipped[/]")
            return True
        return False

    def _stamp(self, step: str, inputs) -> None:
        self.stamps[step] = _digest(inputs)
        write_json_atomic(self.stamps_path, self.stamps)

    def _timed(self, step: str, function, *args):
        start = time.perf_counter()
        result = function(*args)
        self.timings[step] = self.timings.get(step, 0.0) + time.perf_counter() - start
        return result

    # --- steps --------------------------------------------------------------------------------------------
    def scan(self) -> str:
        """Scan the teacher's heads (and label the top ones); returns the stamp of the scan's inputs."""
        from radistill.scan.run import run_scan

        settings = self.recipe.scan
        # the plan groups rows differently, not the scores: a new budget does not redo the scan
        inputs = {"teacher": model_identity(self.recipe.teacher),
                  **{k: v for k, v in asdict(settings).items() if k != "gpu_memory"}}
        scan_json = self.layout.scan_dir / "scan.json"
        valid = scan_json.exists() and (self.layout.scan_dir / "analysis.json").exists() == bool(settings.analyze_top)
        if not self._fresh("scan", inputs, valid):
            console.rule("scan")
            result = run_scan(self.recipe.teacher, self.layout.scan_dir, pairs=settings.pairs, samples=settings.samples,
                              metric=settings.metric, ablation=settings.ablation, seed=settings.seed,
                              device=self.recipe.device, batch_size=settings.batch_size,
                              gpu_memory=settings.gpu_memory, overwrite=True)  # stale: _fresh said so
            if settings.analyze_top:
                self._analyze(result)
            self._stamp("scan", inputs)
        return self.stamps["scan"]

    def _analyze(self, result) -> None:
        from radistill.models.access import load_model
        from radistill.scan.analyze import analyze

        model, tokenizer = load_model(self.recipe.teacher, device=self.recipe.device, attn_implementation="sdpa")
        analyze(model, tokenizer, result, self.layout.scan_dir, top=self.recipe.scan.analyze_top,
                scan_path=str(self.layout.scan_dir / "scan.json"))

    def build(self, student: StudentSpec, scan: str) -> None:
        from radistill.hybrid.build import build_student

        out = self.layout.student_dir(student.name)
        inputs = {"scan": scan, **asdict(student), "mixer": self.recipe.mixer,
                  "state_size": self.recipe.state_size, "calibration_data": self.recipe.data or None}
        if self.recipe.window is not None:  # only then: earlier runs' stamps stay valid
            inputs["window"] = self.recipe.window
        if self._fresh(f"build/{student.name}", inputs, (out / "config.json").exists()):
            return
        console.rule(f"build {student.name}")
        build_student(self.recipe.teacher, out, scan=self.layout.scan_dir / "scan.json", keep=student.keep,
                      heads=student.heads, mixer=self.recipe.mixer, state_size=self.recipe.state_size,
                      window=self.recipe.window, calibration_data=self.recipe.data or None,
                      device=self.recipe.device, overwrite=True)
        self._stamp(f"build/{student.name}", inputs)

    def distill(self, student: StudentSpec) -> None:
        from radistill.distill.run import run_distill

        run_dir = self.layout.run_dir(student.name)
        recipe = self.recipe.distill_recipe()
        last = recipe.enabled_stages()[-1] if recipe.enabled_stages() else None
        inputs = {"student": self.stamps.get(f"build/{student.name}"), "recipe": recipe.to_dict()}
        done = last is not None and (run_dir / f"stage{last}" / "config.json").exists()
        if self._fresh(f"distill/{student.name}", inputs, done):
            return
        console.rule(f"distill {student.name}")
        same_run = self.stamps.get(f"distill/{student.name}/started") == _digest(inputs)
        if run_dir.exists() and not same_run:
            shutil.rmtree(run_dir)  # made from another student or recipe: start over
        self.stamps[f"distill/{student.name}/started"] = _digest(inputs)
        write_json_atomic(self.stamps_path, self.stamps)
        run_distill(self.layout.student_dir(student.name), self.recipe.teacher, recipe, run_dir,
                    device=self.recipe.device, resume=same_run and run_dir.exists())
        self._stamp(f"distill/{student.name}", inputs)

    def evaluate(self, student: StudentSpec | None) -> None:
        """Evaluate the teacher (``None``) or a student's final checkpoint; ``eval.json`` is reused when the
        weights and settings are unchanged."""
        from radistill.eval.runner import evaluate_path

        config = self.recipe.eval_config()
        if student is None:
            model, cache = self.recipe.teacher, self.layout.teacher_eval
        else:
            model = final_checkpoint(self.layout.run_dir(student.name)) or self.layout.student_dir(student.name)
            cache = self.layout.student_eval(student.name)
        console.rule(f"eval {student.name if student else 'teacher'}")
        # a student's fidelity is measured against the teacher (the teacher's own evaluation skips that task)
        report = evaluate_path(model, config, cache, device=self.recipe.device,
                               teacher=self.recipe.teacher if student is not None else None)
        if student is not None and self.layout.teacher_eval.exists():
            compared = report.with_teacher(EvalReport.load(self.layout.teacher_eval))
            if compared.to_dict() != report.to_dict():
                compared.save(cache)

    def run(self) -> Path:
        """All steps in order; returns the report page."""
        from radistill.distill.data import check_source
        from radistill.report.build import build_report

        distill = self.recipe.distill_recipe()
        if distill.enabled_stages():  # a bad data file fails now, not after the scan and the builds
            check_source(distill.data)
        if self.recipe.threads:
            import torch

            torch.set_num_threads(self.recipe.threads)
        self.layout.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.layout.recipe, self.recipe.to_dict())
        scan = self._timed("scan", self.scan)
        for student in self.recipe.students:
            self._timed("build", self.build, student, scan)
        for student in self.recipe.students:
            self._timed("distill", self.distill, student)
        self._timed("eval", self.evaluate, None)
        for student in self.recipe.students:
            self._timed("eval", self.evaluate, student)
        page = self._timed("report", build_report, self.layout.root)
        console.log("time per step: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items()))
        console.print(self.summary())
        return page

    def summary(self):
        """Per model: KV retrieval, perplexity and, for students, fidelity to the teacher (KL, top-1 and confident
        agreement on held-out text); a dash where the recipe's eval does not run a task."""
        from rich.table import Table

        columns = (("kv_ret", "KV", "%"), ("kv_ret_gen", "KV gen", "%"), ("ppl", "ppl", "f"),
                   ("fidelity", "KL", "kl"), ("fidelity_top1", "top-1", "%"),
                   ("fidelity_confident", "confident", "%"), ("fidelity_greedy", "greedy", "f"))
        table = Table(title="students vs teacher (KL: nats/token; top-1, confident: agreement with the teacher, %)")
        for title in ("model", *(c[1] for c in columns)):
            table.add_column(title, justify="left" if title == "model" else "right")
        models = [("teacher", self.layout.teacher_eval)] + [(s.name, self.layout.student_eval(s.name))
                                                             for s in self.recipe.students]
        for name, path in models:
            report = EvalReport.load(path) if path.exists() else None
            cells = []
            for task, _, style in columns:
                result = report.task(task) if report is not None else None
                value = None if result is None else result.value
                cells.append("—" if value is None else f"{100 * value:.1f}" if style == "%" else
                             f"{value:.3f}" if style == "kl" else f"{value:.2f}")
            table.add_row(name, *cells)
        return table


def results_table(root: Path):
    """The run's results as one rich table: the teacher, then each student, with its kept heads, the KV heads it
    caches, each evaluated task's score (summary tasks only: ``kv_ret``, not ``kv_ret@N``; accuracies in %) and
    its retrieval coverage (student ÷ teacher). None when nothing was evaluated."""
    from rich.table import Table

    from radistill.eval.coverage import format_value
    from radistill.report.inputs import discover

    inputs = discover(root)
    reports = [("teacher", inputs.teacher_eval, None)] + [(s.name, s.eval, s) for s in inputs.students]
    reports = [(name, report, student) for name, report, student in reports if report is not None]
    if not reports:
        return None
    tasks: list[tuple[str, str]] = []
    for _, report, _ in reports:
        tasks += [(t.name, t.metric) for t in report.tasks if "@" not in t.name and (t.name, t.metric) not in tasks]
    teacher = inputs.teacher_config or {}
    heads = teacher.get("num_hidden_layers", 0) * teacher.get("num_attention_heads", 0)
    kv_total = teacher.get("num_hidden_layers", 0) * (teacher.get("num_key_value_heads")
                                                       or teacher.get("num_attention_heads", 0))
    table = Table(title=f"results ({inputs.root}; accuracies in %, coverage = student ÷ teacher on retrieval)")
    for column in ("model", "kept heads", "KV heads", *(n for n, _ in tasks), "coverage"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for name, report, student in reports:
        if student is None:
            kept, cached = f"all {heads}" if heads else "all", f"{kv_total}" if kv_total else "all"
        else:
            selection = student.selection or {}
            kept = str(len(student.kept_heads)) if student.config else str(selection.get("keep", "?"))
            cached = str((selection.get("kv_heads_cached") or {}).get("total", "?"))
        values = [format_value(report.task(n).value if report.task(n) else None, m) for n, m in tasks]
        coverage = report.coverage.get("retrieval") if student is not None else None
        table.add_row(name, kept, cached, *values, "—" if coverage is None else f"{100 * coverage:.1f}%")
    return table


def _print_results(root: Path) -> None:
    table = results_table(root)
    if table is not None:
        console.print(table)


def run_command(
    recipe: Path = typer.Argument(..., help="Recipe file (YAML/JSON): teacher, scan, students, data, distill, eval."),
    out: Path = typer.Option(None, "--out", help="Run directory (overrides the recipe's `out`)."),
) -> None:
    """Run scan → build → distill → eval → report from one recipe, skipping steps whose output is up to date."""
    from radistill.utils.console import quiet_transformers

    quiet_transformers()
    overrides = {"out": str(out.resolve())} if out is not None else {}
    pipeline = Pipeline(Recipe.load(recipe, overrides))
    page = pipeline.run()
    _print_results(pipeline.layout.root)
    console.print(f"[bold green]report:[/] {page}")


def demo_command(
    out: Path = typer.Option(Path("radistill-demo"), "--out", help="Run directory."),
    quick: bool = typer.Option(False, "--quick", help="The CI variant: same steps, tiny budgets (~1-2 minutes)."),
    teacher: str = typer.Option(None, "--teacher", help="Another teacher than the bundled examples/teacher-19m."),
    data: str = typer.Option(None, "--data", help="Other training text than the bundled prose slice."),
) -> None:
    """The whole method on a bundled 19M-parameter model, on a CPU in minutes: a student keeping the scan's top heads
    retrieves, one keeping none does not. Prints where the report is."""
    recipe_file = EXAMPLES / "demo.yaml"
    if not recipe_file.exists():
        raise RadistillError(f"{recipe_file} is missing (the demo ships in the repository's examples/): run the demo "
                             "from a clone of radistill, or `radistill run RECIPE` with your own recipe")
    overrides: dict = {"out": str(out.resolve())}
    if quick:
        overrides = deep_merge(read_recipe_file(EXAMPLES / "demo-quick.yaml"), overrides)
    if teacher:
        overrides["teacher"] = str(Path(teacher).resolve()) if Path(teacher).exists() else teacher
    if data:
        overrides["data"] = str(Path(data).resolve()) if Path(data).exists() else data
    from radistill.utils.console import quiet_transformers

    quiet_transformers()
    start = time.perf_counter()
    pipeline = Pipeline(Recipe.load(recipe_file, overrides))
    page = pipeline.run()
    _print_results(pipeline.layout.root)
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s")
    console.print(f"[bold green]report:[/] {page}")


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
    app.command("demo")(demo_command)
