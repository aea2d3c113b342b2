"""``radistill eval MODEL [--teacher TEACHER] --tasks kv,ppl,...``: results JSON and a table with coverage."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from radistill.eval.coverage import EvalReport, by_group
from radistill.utils.console import console
from radistill.utils.errors import RadistillError

GROUP_TITLES = {"knowledge": "knowledge-focused", "retrieval": "retrieval-heavy", None: "other"}


def _number(value: float | None, metric: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if "perplexity" in metric else f"{100 * value:.1f}"


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
            row = [task.name, task.metric, _number(task.value, task.metric)]
            if has_teacher:
                row += [_number(task.teacher_value, task.metric), _number(task.ratio)]
            table.add_row(*row)
        if has_teacher and group is not None:
            table.add_row(f"[bold]coverage ({group})[/]", "", "", "", f"[bold]{_number(coverage[group])}[/]")
    return table


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise RadistillError(f"{option} takes integers separated by commas, e.g. 5,10,20,40 (got '{text}')") from exc


def eval_command(
    model: str = typer.Argument(..., help="HF id or directory: teacher, hybrid student or any causal LM."),
    teacher: str = typer.Option(None, "--teacher", help="Also evaluate this model, for coverage = model ÷ teacher."),
    tasks: str = typer.Option("kv", "--tasks", help="Comma-separated: kv, ppl, PATH.jsonl, lm-eval task names; "
                              "NAME@knowledge or NAME@retrieval sets a task's group."),
    out: Path = typer.Option(None, "--out", help="Write the results to this file (default: eval.json in the model's "
                             "directory; eval-ID.json here for a hub id); lm-eval's own results go beside it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing results file."),
    kv_pairs: str = typer.Option("5,10,20,40", "--kv-pairs", help="Dictionary sizes for 'kv' (1-100)."),
    kv_samples: int = typer.Option(64, "--kv-samples", help="Prompts per dictionary size."),
    kv_seed: int = typer.Option(1234, "--kv-seed"),
    no_generate: bool = typer.Option(False, "--no-generate", help="'kv' by log-likelihood only."),
    text: Path = typer.Option(None, "--text", help="Text file for 'ppl' (.txt, .txt.xz, .txt.gz)."),
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
        batch_size=eval_batch, gpu_memory=gpu_memory,
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


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
