"""`radistill eval` as a function: task specs (radistill/eval/tasks.py) -> evaluators -> an :class:`EvalReport`
(``eval.json``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from radistill.eval.choice import jsonl_task
from radistill.eval.coverage import EvalReport, TaskResult
from radistill.eval.fidelity import FidelityConfig, fidelity_task
from radistill.eval.harness import lm_eval_tasks
from radistill.eval.kv import KVEvalConfig, kv_retrieval
from radistill.eval.perplexity import PerplexityConfig, perplexity
from radistill.eval.tasks import TaskSpec, parse_task, task_batch_size  # noqa: F401  (TaskSpec: re-exported)
from radistill.utils.console import console
from radistill.utils.errors import RadistillError
from radistill.utils.io import refuse_existing, write_text_atomic


@dataclass(frozen=True)
class EvalConfig:
    """Everything that decides an evaluation's numbers (stored in ``eval.json`` as ``settings``)."""

    tasks: tuple[str, ...] = ("kv",)
    kv: KVEvalConfig = field(default_factory=KVEvalConfig)
    text: str | None = None  # for "ppl"
    seq_len: int | None = None  # perplexity window; None: the model's context
    stride: int | None = None
    ppl_tokens: int = 65536
    include_path: str | None = None  # local lm-eval task YAMLs
    limit: float | None = None  # lm-eval: items per task (or a fraction)
    num_fewshot: int | None = None
    batch_size: int = 16
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)  # for "fidelity"
    # e.g. "24GiB": plan each task's batch for this GPU memory first (radistill.memplan.eval); it changes how rows
    # are grouped, not the numbers, so it is left out of ``settings`` and a cached eval.json stays valid
    gpu_memory: str | None = None

    def specs(self) -> list[TaskSpec]:
        specs = [parse_task(t) for t in self.tasks]
        for kind in ("ppl", "fidelity"):
            if any(s.kind == kind for s in specs) and not self.text:
                raise RadistillError(f"task '{kind}' needs a text file: pass --text FILE (.txt, .txt.xz or .txt.gz)")
        return specs

    def to_dict(self) -> dict:
        settings = {**asdict(self), "tasks": list(self.tasks), "kv": self.kv.to_dict()}
        del settings["gpu_memory"]
        if "fidelity" in self.tasks:
            settings["fidelity"] = self.fidelity.to_dict()
        else:  # without the task its settings change nothing: earlier eval.json files stay valid caches
            del settings["fidelity"]
        return settings

    @classmethod
    def from_dict(cls, data: dict) -> "EvalConfig":
        data = dict(data)
        kv = dict(data.pop("kv", {}))
        fidelity = dict(data.pop("fidelity", {}))
        for where, fields, known in (("eval", data, cls.__dataclass_fields__),
                                     ("eval.kv", kv, KVEvalConfig.__dataclass_fields__),
                                     ("eval.fidelity", fidelity, FidelityConfig.__dataclass_fields__)):
            unknown = set(fields) - set(known)
            if unknown:
                raise RadistillError(f"unknown {where} setting(s) {', '.join(sorted(unknown))}; "
                                     f"known: {', '.join(known)}")
        kv = KVEvalConfig(**{**kv, "pairs": tuple(kv.get("pairs", KVEvalConfig.pairs))})
        return cls(**{**data, "tasks": tuple(data.get("tasks", cls.tasks)), "kv": kv,
                      "fidelity": FidelityConfig(**fidelity)})


def evaluate_model(model, tokenizer, config: EvalConfig, batches: dict[str, int] | None = None,
                   harness_output: dict | None = None, teacher=None) -> list[TaskResult]:
    """Run every task of ``config`` on a loaded model; KV first, lm-eval tasks together in one harness call.

    ``batches``: rows per forward by task name (a memory plan's, :func:`fit_eval`); others use ``task_batch_size``.
    ``harness_output``: receives lm-eval's own results JSON when lm-eval tasks ran.
    ``teacher``: for ``fidelity``, the model to compare with: ``(model, tokenizer)`` or a path (loaded like the
    model, only when the task runs). Without one ``fidelity`` is skipped (the teacher's own evaluation).
    """
    results: list[TaskResult] = []
    harness: dict[str, str | None] = {}
    for spec in config.specs():
        if spec.kind == "lm_eval":
            harness[spec.name] = spec.group
            continue
        console.log(f"eval: {spec.name}")
        batch = (batches or {}).get(spec.name, task_batch_size(spec, config.batch_size))
        if spec.kind == "kv":
            results += kv_retrieval(model, tokenizer, config.kv, batch)
        elif spec.kind == "ppl":
            ppl = PerplexityConfig(config.text, config.seq_len, config.stride, config.ppl_tokens)
            results.append(perplexity(model, tokenizer, ppl, batch))
        elif spec.kind == "fidelity":
            if teacher is None:
                console.log("eval: fidelity skipped (no teacher to compare with)")
                continue
            if not isinstance(teacher, tuple):
                from radistill.models.access import load_model

                teacher = load_model(teacher, dtype=model.dtype, device=str(next(model.parameters()).device))
            results += fidelity_task(*teacher, model, tokenizer, config.text, config.fidelity, batch)
        else:
            results.append(jsonl_task(model, tokenizer, spec.path, spec.group, batch))
    if harness:
        console.log(f"eval: lm-eval {', '.join(harness)}")
        results += lm_eval_tasks(model, tokenizer, harness, config.include_path, config.limit, config.num_fewshot,
                                 config.batch_size, config.seq_len, raw=harness_output)
    return results


def evaluate_path(
    model_path: str | os.PathLike,
    config: EvalConfig,
    cache: str | os.PathLike | None = None,
    device: str | None = "auto",
    dtype: str | None = "auto",
    batches: dict[str, int] | None = None,
    harness_output: dict | None = None,
    teacher: str | os.PathLike | None = None,
) -> EvalReport:
    """Load and evaluate one model. If ``cache`` is an ``eval.json`` of the same weights and settings, reuse it;
    otherwise write the new report there. ``batches``: the model's plan (:func:`fit_eval`) when made beforehand;
    with ``config.gpu_memory`` and no plan it is planned here. ``harness_output``: as :func:`evaluate_model`.
    ``teacher``: compared with for ``fidelity``."""
    from radistill.models.access import load_model, weights_fingerprint

    if batches is None and config.gpu_memory is not None:
        batches = fit_eval(model_path, config, device, dtype)
    model, tokenizer = load_model(model_path, dtype=dtype, device=device)
    fingerprint = weights_fingerprint(model)
    if cache is not None and Path(cache).exists():
        try:
            cached = EvalReport.load(cache)
        except RadistillError:  # unreadable: evaluate again and overwrite it
            cached = None
        if cached is not None and cached.fingerprint == fingerprint and cached.settings == config.to_dict():
            console.log(f"eval: {model_path} unchanged since {cache}; reusing it")
            return cached
    report = EvalReport(str(model_path), fingerprint,
                        evaluate_model(model, tokenizer, config, batches, harness_output, teacher), config.to_dict())
    if cache is not None:
        report.save(cache)
    return report


def fit_eval(model_path: str | os.PathLike, config: EvalConfig, device: str | None = "auto",
             dtype: str | None = "auto") -> dict[str, int]:
    """Plan ``config``'s tasks on ``model_path`` for ``config.gpu_memory`` from its config and tokenizer (printed),
    raise before loading the weights if a task cannot fit, and return each planned task's batch."""
    from radistill.memplan.cli import print_plan
    from radistill.memplan.eval import describe_eval, eval_advice, eval_batches, plan_eval
    from radistill.memplan.scan import load_config_and_tokenizer, model_dtype, require_step_fit
    from radistill.models.access import resolve_device

    device = resolve_device(device)
    model_config, tokenizer = load_config_and_tokenizer(model_path)
    plan = plan_eval(model_config, tokenizer, config, config.gpu_memory, dtype=model_dtype(dtype, device),
                     name=str(model_path))
    print_plan(plan, describe_eval)
    unplanned = [spec.name for spec in config.specs() if spec.kind in ("lm_eval", "fidelity")]
    if unplanned:
        console.print(f"[yellow]not planned:[/] {', '.join(unplanned)} (lm-eval: the requests' lengths are known only "
                      f"once lm-eval has loaded them; fidelity: two models at once); batch {config.batch_size}")
    require_step_fit(plan, eval_advice(plan, config), describe_eval)
    return eval_batches(plan)


def evaluate(
    model_path: str | os.PathLike,
    config: EvalConfig,
    teacher: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    teacher_cache: str | os.PathLike | None = None,
    device: str | None = "auto",
    dtype: str | None = "auto",
    overwrite: bool = False,
) -> EvalReport:
    """Evaluate a model (and its teacher, for coverage) on ``config.tasks``; write ``out`` (``eval.json``) and,
    when lm-eval tasks ran, lm-eval's own results beside it (:func:`harness_path`).

    An ``out`` (or its lm-eval file) that exists is refused before anything is loaded, unless ``overwrite``. With
    ``config.gpu_memory`` both models are planned before either is loaded, so a teacher that cannot fit stops the
    evaluation before any compute."""
    if teacher is None and any(spec.kind == "fidelity" for spec in config.specs()):
        raise RadistillError("task 'fidelity' compares the model with its teacher: pass --teacher TEACHER")
    if out is not None:
        runs_harness = any(spec.kind == "lm_eval" for spec in config.specs())
        refuse_existing([out, *([harness_path(out)] if runs_harness else [])], overwrite)
    models = [model_path] + ([teacher] if teacher is not None else [])
    plans = [fit_eval(m, config, device, dtype) if config.gpu_memory is not None else None for m in models]
    harness: dict[str, dict] = {"model": {}, "teacher": {}}
    report = evaluate_path(model_path, config, None, device, dtype, plans[0], harness["model"],
                           str(teacher) if teacher else None)
    if teacher is not None:
        report = report.with_teacher(evaluate_path(teacher, config, teacher_cache, device, dtype, plans[1],
                                                   harness["teacher"]))
    if out is not None:
        report.save(out)
        if any(harness.values()):
            write_harness_output(harness_path(out), {"model": str(model_path), "teacher": teacher and str(teacher),
                                                     "lm_eval": {k: v for k, v in harness.items() if v}})
        else:  # one left from the results just replaced (--overwrite) would describe another evaluation
            harness_path(out).unlink(missing_ok=True)
    return report


def default_eval_path(model_path: str | os.PathLike) -> Path:
    """Where ``radistill eval`` writes without ``--out``: ``eval.json`` inside a local model directory; for a hub
    id, ``eval-<id>.json`` in the current directory (a hub model has no folder of ours)."""
    if Path(model_path).is_dir():
        return Path(model_path) / "eval.json"
    return Path(f"eval-{str(model_path).replace('/', '--')}.json")


def harness_path(out: str | os.PathLike) -> Path:
    """lm-eval's own results beside ``out``: ``eval.json`` -> ``eval.lm-eval.json``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.lm-eval.json")


def write_harness_output(path: Path, output: dict) -> None:
    """lm-eval's results as lm-eval writes them (its own encoder for what JSON lacks, e.g. numpy numbers)."""
    try:
        from lm_eval.utils import handle_non_serializable
    except ImportError:  # the output came from lm-eval, but stay writable without it (tests feed their own)
        handle_non_serializable = str
    write_text_atomic(path, json.dumps(output, indent=2, default=handle_non_serializable) + "\n")
