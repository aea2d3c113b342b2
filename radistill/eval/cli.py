"""``radistill eval MODEL [--teacher TEACHER] --tasks kv,ppl,...``: results JSON and a table with coverage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from radistill.eval.coverage import EvalReport, by_group, format_value
from radistill.utils.console import console
from radistill.utils.errors import RadistillError

if TYPE_CHECKING:
    from radistill.eval.fidelity import FidelityConfig

GROUP_TITLES = {"knowledge": "knowledge-focused", "retrieval": "retrieval-heavy", None: "other"}


def parse_fidelity(text: str | None) -> FidelityConfig:
    """``--fidelity windows=8,samples=4,seed=1`` -> a :class:`FidelityConfig` (other fields at their defaults)."""
    from radistill.eval.fidelity import FidelityConfig

    if not text:
        return FidelityConfig()
    fields = FidelityConfig.__dataclass_fields__
    values: dict = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise RadistillError(f"--fidelity takes KEY=VALUE pairs separated by commas, KEY one of "
                                 f"{', '.join(fields)} (got '{part}')")
        kind = float if fields[key].type in ("float", float) else int
        try:
            values[key] = kind(raw)
        except ValueError as exc:
            raise RadistillError(f"--fidelity {key} takes a number (got '{raw}')") from exc
    return FidelityConfig(**values)


def results_table(report: EvalReport) -> Table:
    """Tasks by group (accuracies in %), with student ÷ teacher per task and each group's coverage."""
    has_teacher = report.teacher is not None
    table = Table(title=f"{report.model}" + (f"  vs teacher {report.teacher}" if has_teacher else ""))
    for column in ("task", "metric", "model", *(("teacher", "student ÷ teacher") if has_teacher else ())):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    coverage = report.coverage
    for group, tasks in by_group(report.tasks):
        table.add_section()
        table.add_row(f"[bold]{GROUP_TITLES[group]}[/]")
        for task in tasks:
            row = [task.name, task.metric, format_value(task.value, task.metric)]
            if has_teacher:
                row += [format_value(task.teacher_value, task.metric), format_value(task.ratio)]
            table.add_row(*row)
        if has_teacher and group is not None:
            table.add_row(f"[bold]coverage ({group})[/]", "", "", "", f"[bold]{format_value(coverage[group])}[/]")
    return table


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise RadistillError(f"{option} takes integers separated by commas, e.g. 5,10,20,40 (got '{text}')") from exc


def eval_command(
    model: str = typer.Argument(..., help="HF id or directory: teacher, hybrid student or any causal LM."),
    teacher: str = typer.Option(None, "--teacher", help="Also evaluate this model, for coverage = model ÷ teacher."),
    tasks: str = typer.Option("kv", "--tasks", help="Comma-separated: kv, ppl, fidelity, PATH.jsonl, lm-eval task "
                              "names; NAME@knowledge or NAME@retrieval sets a task's group."),
    out: Path = typer.Option(None, "--out", help="Write the results to this file (default: eval.json in the model's "
                             "directory; eval-ID.json here for a hub id); lm-eval's own results go beside it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing results file."),
    kv_pairs: str = typer.Option("5,10,20,40", "--kv-pairs", help="Dictionary sizes for 'kv' (1-100)."),
    kv_samples: int = typer.Option(64, "--kv-samples", help="Prompts per dictionary size."),
    kv_seed: int = typer.Option(1234, "--kv-seed"),
    no_generate: bool = typer.Option(False, "--no-generate", help="'kv' by log-likelihood only."),
    text: Path = typer.Option(None, "--text", help="Text file for 'ppl' and 'fidelity' (.txt, .txt.xz, .txt.gz)."),
    fidelity: str = typer.Option(None, "--fidelity", help="'fidelity' settings as KEY=VALUE,...: windows, window, "
                                 "samples, prompt, generate, temperature, greedy_prompts, greedy_tokens, confident, "
                                 "long_range, seed, text_tokens (docs/eval.md)."),
    seq_len: int = typer.Option(None, "--seq-len", help="Perplexity window (default: the model's context)."),
    stride: int = typer.Option(None, "--stride", help="Sliding window: new tokens scored per window "
                               "(default: --seq-len - 1, i.e. packed windows)."),
    ppl_tokens: int = typer.Option(65536, "--ppl-tokens", help="Tokens of --text to score."),
    include_path: Path = typer.Option(None, "--include-path", help="Directory of local lm-eval task YAMLs."),
    limit: float = typer.Option(None, "--limit", help="lm-eval: items per task (or a fraction < 1)."),
    num_fewshot: int = typer.Option(None, "--num-fewshot"),
    eval_batch: int = typer.Option(16, "--eval-batch", help="Prompts per forward (a quarter of it for ppl windows)."),
    old_batch_size: int = typer.Option(None, "--batch-size", hidden=True),
    gpu_memory: str = typer.Option(None, "--gpu-memory", help="Plan each task's batch for this GPU memory (e.g. "
                                   "24GiB) and use it; stops before loading the weights if a task cannot fit."),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
) -> None:
    """Evaluate a model (and its teacher): KV retrieval, perplexity, your JSONL tasks, any lm-eval task."""
    from radistill.eval.kv import KVEvalConfig
    from radistill.eval.runner import EvalConfig, default_eval_path, evaluate, harness_path
    from radistill.utils.cli_options import renamed

    eval_batch = renamed(eval_batch, old_batch_size, "--batch-size", "--eval-batch", default=16)

    config = EvalConfig(
        tasks=tuple(t for t in tasks.split(",") if t.strip()),
        kv=KVEvalConfig(_ints(kv_pairs, "--kv-pairs"), kv_samples, kv_seed, not no_generate),
        text=str(text) if text else None, seq_len=seq_len, stride=stride, ppl_tokens=ppl_tokens,
        include_path=str(include_path) if include_path else None, limit=limit, num_fewshot=num_fewshot,
        batch_size=eval_batch, gpu_memory=gpu_memory, fidelity=parse_fidelity(fidelity),
    )
    if out is None:
        out = default_eval_path(model)
    elif out.is_dir():
        out = out / "eval.json"
    report = evaluate(model, config, teacher=teacher, out=out, device=device, dtype=dtype, overwrite=overwrite)
    console.print(results_table(report))
    ran_harness = any(spec.kind == "lm_eval" for spec in config.specs())
    extra = f" and lm-eval's results to {harness_path(out)}" if ran_harness else ""
    console.print(f"wrote {out}{extra}")


suite_app = typer.Typer(help="Write capability suites (JSONL multiple choice) for `radistill eval --tasks PATH.jsonl`.",
                        no_args_is_help=True)


def _refuse_overwrite(out: Path, overwrite: bool) -> None:
    from radistill.utils.io import refuse_existing

    refuse_existing([out], overwrite)
    if out.suffix != ".jsonl":
        raise RadistillError(f"--out {out}: a suite is a .jsonl file (the eval task is named after it)")


@suite_app.command("facts")
def facts_command(
    teacher: str = typer.Argument(..., help="HF id or directory of the model whose facts are mined."),
    out: Path = typer.Option(..., "--out", help="The suite (.jsonl); PATH.meta.json beside it says how it was made."),
    items: int = typer.Option(200, "--items"),
    documents: int = typer.Option(256, "--documents", help="Teacher samples to mine."),
    tokens: int = typer.Option(160, "--tokens", help="Sampled tokens per document."),
    confident: float = typer.Option(0.9, "--confident", help="Teacher probability of the answer word, at least."),
    choices: int = typer.Option(4, "--choices"),
    text: Path = typer.Option(None, "--text", help="Start samples from prompts of this text (default: from the "
                              "beginning-of-text token)."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
) -> None:
    """Facts the teacher recalls with confidence, mined from its own samples (works for any causal LM)."""
    import random

    from radistill.eval.fidelity import random_windows, text_ids
    from radistill.eval.suites import FactsConfig, facts_suite, write_suite
    from radistill.models.access import load_model

    _refuse_overwrite(out, overwrite)
    config = FactsConfig(items=items, choices=choices, documents=documents, tokens=tokens, confident=confident,
                         seed=seed)
    model, tokenizer = load_model(teacher, device=device, dtype=dtype)
    prompts = None
    if text is not None:
        ids = text_ids(tokenizer, str(text), 65536)
        prompts = random_windows(ids, documents, 16, random.Random(seed)).tolist()
    suite, summary = facts_suite(model, tokenizer, config, prompts)
    write_suite(out, suite, {"kind": "facts", "teacher": teacher, "text": str(text) if text else None, **summary})
    console.print(f"{len(suite)} items ({summary['mined']} confident facts in {summary['documents']} samples): {out}")


@suite_app.command("records")
def records_command(
    out: Path = typer.Option(..., "--out", help="The suite (.jsonl); PATH.meta.json beside it says how it was made."),
    items: int = typer.Option(200, "--items"),
    min_records: int = typer.Option(3, "--min-records"),
    max_records: int = typer.Option(8, "--max-records"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Record lookups in teacher-19m's record format (``Name: X; Job: Y; Phone: Z`` lines, then the phone of one)."""
    from dataclasses import asdict

    from radistill.eval.suites import RecordsConfig, records_suite, write_suite

    _refuse_overwrite(out, overwrite)
    config = RecordsConfig(items, min_records, max_records, seed)
    suite = records_suite(config)
    write_suite(out, suite, {"kind": "records", "config": asdict(config)})
    console.print(f"{len(suite)} items: {out}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.add_typer(suite_app, name="suite")
