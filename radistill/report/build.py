"""``radistill report RUN``: one self-contained HTML page (images embedded) plus the PNGs beside it.

Sections: headline numbers, the retrieval heads (heatmap, kept heads with their G&A labels), the evaluation
table with coverage and KV retrieval by dictionary size, fidelity to the teacher (KL, top-1 and confident
agreement, local vs long-range, greedy agreement), training curves per stage, cache memory per sequence
against context length, and the settings used. A part of the run that is missing is reported as "not run".
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt

from radistill.eval.coverage import GROUPS, EvalReport, by_group, format_value
from radistill.report import html, plots
from radistill.report.inputs import RunInputs, RunLayout, StudentRun, discover
from radistill.report.memory import memory_curves, memory_table
from radistill.report.paths import run_name, shown_path, without_absolute_paths
from radistill.utils.io import write_text_atomic

GROUP_TITLES = {"knowledge": "knowledge-focused", "retrieval": "retrieval-heavy", None: "other"}
MAX_ATTENTION_MAPS = 4
MAX_HEAD_ROWS = 12  # kept heads listed in the table (best-ranked first); the heatmap shows them all


def _figure(fig, path: Path, alt: str) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return html.image(path, alt)


def _is_fidelity(name: str) -> bool:
    return name.startswith("fidelity")


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def _teacher_values(inputs: RunInputs) -> dict[str, float]:
    values = {t.name: t.value for t in inputs.teacher_eval.tasks} if inputs.teacher_eval else {}
    for student in inputs.students:
        for task in student.eval.tasks if student.eval else []:
            if task.teacher_value is not None:
                values.setdefault(task.name, task.teacher_value)
    return values


def _compared(student: StudentRun, teacher: dict[str, float]) -> EvalReport | None:
    """The student's report with teacher values from wherever the run has them."""
    if student.eval is None:
        return None
    for task in student.eval.tasks:
        if task.teacher_value is None:
            task.teacher_value = teacher.get(task.name)
    return student.eval


def headline(inputs: RunInputs, reports: dict[str, EvalReport]) -> list[str]:
    teacher = _teacher_values(inputs)
    lines = []
    for student in inputs.students:
        report = reports.get(student.name)
        if report is None:
            lines.append(f"{student.name}: not evaluated yet.")
            continue
        parts = [f"{student.name} ({len(student.kept_heads)} attention heads kept)"]
        for name, label in (("kv_ret", "KV retrieval"), ("kv_ret_gen", "KV retrieval by generation"),
                            ("ppl", "perplexity")):
            task = report.task(name)
            if task is not None:
                parts.append(f"{label} {format_value(task.value, task.metric)}"
                             + (f" (teacher {format_value(teacher[name], task.metric)})" if name in teacher else ""))
        fidelity = [(name, label) for name, label in (("fidelity", "KL"), ("fidelity_top1", "top-1"),
                                                      ("fidelity_confident", "confident")) if report.task(name)]
        if fidelity:
            parts.append("fidelity to the teacher: " + ", ".join(
                f"{label} {format_value(report.task(name).value, report.task(name).metric)}"
                + ("%" if report.task(name).metric == "agreement" else "") for name, label in fidelity))
        coverage = report.coverage
        parts += [f"{GROUP_TITLES[g]} coverage {_percent(coverage[g])}" for g in GROUPS if coverage[g] is not None]
        lines.append(", ".join(parts) + ".")
    return [f'<div class="headline">{"<br>".join(map(html.escape, lines))}</div>'] if lines else []


def heads_section(inputs: RunInputs, out: Path) -> str:
    if inputs.scan is None:
        return html.section("Retrieval heads", html.missing("head scan", "Run `radistill scan TEACHER --out DIR`."))
    scan = inputs.scan
    widest = max(inputs.students, key=lambda s: len(s.kept_heads), default=None)
    kept = widest.kept_heads if widest else []
    title = f"{Path(scan['model']).name}: {scan['metric']} drop when a head is ablated"
    parts = [_figure(plots.head_heatmap(scan, kept, title), out / "heads.png", "head heatmap"),
             html.para(f"Red boxes: the heads {widest.name} keeps as attention (numbers: scan rank)." if kept else
                       "No student keeps any attention head.", "note")]
    labels = {(h["layer"], h["head"]): h for h in (inputs.analysis or {}).get("heads", [])}
    rank = {(h["layer"], h["head"]): (i + 1, h) for i, h in enumerate(scan["heads"])}
    rows = []
    for layer, head in sorted(kept, key=lambda lh: rank.get(lh, (1e9,))[0])[:MAX_HEAD_ROWS]:
        position, scored = rank.get((layer, head), (None, {}))
        g_a = labels.get((layer, head), {})
        rows.append([f"{layer}.{head}", str(position or "—"), str(scored.get("kv_head", "—")),
                     f"{scored.get('accuracy_drop', 0):.3f}", f"{scored.get('logprob_drop', 0):.3f}",
                     g_a.get("label", "not analysed"),
                     f"{g_a['aggregate_mass']:.2f}" if "aggregate_mass" in g_a else "—",
                     f"{g_a['gather_mass']:.2f}" if "gather_mass" in g_a else "—"])
    if rows:
        parts.append(html.table(["head (L.H)", "scan rank", "KV head", "accuracy drop", "log-prob drop", "G&A label",
                                 "aggregate mass", "gather mass"], rows))
    if len(kept) > MAX_HEAD_ROWS:
        parts.append(html.para(f"… and {len(kept) - MAX_HEAD_ROWS} more kept heads (all outlined above).", "note"))
    if inputs.analysis is None:
        parts.append(html.missing("G&A analysis", "Run `radistill analyze` on the scan to label the heads."))
    else:
        maps = [inputs.scan_dir / h["image"] for h in inputs.analysis.get("heads", [])[:MAX_ATTENTION_MAPS]
                if (inputs.scan_dir / h.get("image", "")).is_file()]
        if maps:
            parts.append(html.para("Attention maps of the top heads on one probe prompt:", "note"))
            parts.append('<div class="images">' + "".join(html.image(p, p.stem) for p in maps) + "</div>")
    return html.section("Retrieval heads", *parts)


def eval_section(inputs: RunInputs, reports: dict[str, EvalReport], out: Path) -> str:
    if not reports and inputs.teacher_eval is None:
        return html.section("Evaluation", html.missing("evaluation", "Run `radistill eval STUDENT --teacher TEACHER`."))
    teacher = _teacher_values(inputs)
    template = next(iter(reports.values()), inputs.teacher_eval)
    header = ["task", "metric", "teacher"] + [f"{n} (÷ teacher)" for n in reports]
    rows: list = []
    for group, tasks in by_group([t for t in template.tasks if not _is_fidelity(t.name)]):
        rows.append(("group", [GROUP_TITLES[group]]))
        for task in tasks:
            cells = [task.name, task.metric, format_value(teacher.get(task.name), task.metric)]
            for report in reports.values():
                mine = report.task(task.name)
                cells.append("—" if mine is None else f"{format_value(mine.value, mine.metric)} ({_percent(mine.ratio)})")
            rows.append(cells)
        if group is not None:
            rows.append(("coverage", [f"coverage ({GROUP_TITLES[group]})", "", ""]
                         + [_percent(r.coverage[group]) for r in reports.values()]))
    parts = [html.table(header, rows, left=2),
             html.para("Accuracies in %; perplexity lower is better (its ratio is teacher ÷ student). Coverage: "
                       "mean of student ÷ teacher over a group's tasks (arXiv 2602.11374, Table 1).", "note")]
    curves = {}
    for name, report in (({"teacher": inputs.teacher_eval} if inputs.teacher_eval else {}) | reports).items():
        sizes = {scoring: {int(t.name.split("@")[1]): t.value for t in report.tasks if t.name.startswith(prefix + "@")}
                 for scoring, prefix in (("loglik", "kv_ret"), ("generation", "kv_ret_gen"))}
        if any(sizes.values()):
            curves[name] = sizes
    if curves:
        parts.append(_figure(plots.kv_by_size(curves), out / "kv_retrieval.png", "KV retrieval by dictionary size"))
    return html.section("Evaluation", *parts)


FIDELITY_TEXTS = {"heldout": "held-out text", "generated": "teacher's own samples"}


def fidelity_section(reports: dict[str, EvalReport]) -> str:
    """Per student: KL, top-1 and confident agreement by text and split (local / long-range), and greedy agreement."""
    details = {name: task.details for name, r in reports.items()
               if (task := r.task("fidelity") or r.task("fidelity_gen_kl")) is not None and task.details}
    if not details:
        return html.section("Fidelity", html.missing("fidelity", "Add `fidelity` to the eval tasks (needs the "
                                                     "teacher and --text)."))
    rows: list = []
    for name, result in details.items():
        rows.append(("group", [name]))
        for kind, splits in result["texts"].items():
            for split, stats in splits.items():
                rows.append([FIDELITY_TEXTS.get(kind, kind), split, f"{stats['positions']:,}",
                             format_value(stats["kl"], "kl"), format_value(stats["top1"], "agreement"),
                             format_value(stats["confident"], "agreement"), f"{stats['confident_positions']:,}"])
        greedy = result["greedy"]
        if greedy["tokens"]:
            rows.append(["greedy continuation", "", f"{len(greedy['tokens'])} prompts", "",
                         f"mean {greedy['mean']:.1f}, median {greedy['median']:.0f} of {greedy['of']} tokens", "", ""])
    long_range = next(iter(details.values()))["config"]["long_range"]
    return html.section(
        "Fidelity",
        html.table(["text", "positions at", "scored", "KL (nats/token)", "top-1 agreement %", "confident agreement %",
                    "confident positions"], rows, left=2),
        html.para("Student vs teacher next-token distributions: KL(teacher || student), top-1 agreement, and agreement "
                  "where the teacher is confident (p >= 0.9: memorised facts, in-context copies). Local / long: the "
                  f"teacher's attention-weighted mean distance at the position, averaged over its heads, is < / >= "
                  f"{long_range} tokens. Greedy continuation: tokens of the teacher's greedy continuation the student "
                  "reproduces before its first different argmax (docs/eval.md).", "note"),
    )


def training_section(inputs: RunInputs, out: Path) -> str:
    metrics = {s.name: s.metrics for s in inputs.students if any("loss" in row for row in s.metrics)}
    if not metrics:
        return html.section("Training", html.missing("distillation", "Run `radistill distill STUDENT --out RUN`."))
    rows = []
    for name, rows_of in metrics.items():
        for stage in sorted({r["stage"] for r in rows_of if "loss" in r}):
            stage_rows = [r for r in rows_of if r.get("stage") == stage and "loss" in r]
            last = stage_rows[-1]
            speed = [r["tokens_per_s"] for r in stage_rows if r.get("tokens_per_s")]
            rows.append([name, str(stage), str(last.get("step", "—")), f"{last.get('tokens', 0):,}",
                         f"{stage_rows[0]['loss']:.4g}", f"{last['loss']:.4g}",
                         f"{sum(speed) / len(speed):,.0f}" if speed else "—"])
    return html.section(
        "Training",
        _figure(plots.training_curves(metrics), out / "training.png", "training curves"),
        html.table(["student", "stage", "steps", "tokens", "first loss", "last loss", "tokens/s"], rows),
    )


def memory_section(inputs: RunInputs, out: Path) -> str:
    curves = memory_curves({s.name: s.checkpoint for s in inputs.students if s.checkpoint is not None})
    if curves is None:
        return html.section("Memory", html.missing("memory accounting", "It needs a built student: run "
                                                   "`radistill build`."))
    return html.section(
        "Memory",
        _figure(plots.memory_curves(curves), out / "memory.png", "cache memory per sequence"),
        memory_table(curves),
    )


def settings_section(inputs: RunInputs) -> str:
    if inputs.recipe is None:
        return html.section("Settings", html.missing("recipe", "No recipe.json in this run directory."))
    recipe = without_absolute_paths(inputs.recipe, inputs.root)
    return html.section("Settings", html.pre(json.dumps(recipe, indent=2, ensure_ascii=False)))


def build_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write ``index.html`` and its PNGs for the run at ``run`` (default: ``RUN/report/``); returns the page."""
    inputs = discover(run)
    out = Path(out) if out is not None else RunLayout(inputs.root).report_dir
    out.mkdir(parents=True, exist_ok=True)
    teacher = _teacher_values(inputs)
    reports = {s.name: r for s in inputs.students if (r := _compared(s, teacher)) is not None}
    teacher_model = (inputs.recipe or {}).get("teacher") or (inputs.scan or {}).get("model")
    teacher_name = shown_path(teacher_model, inputs.root) if teacher_model else "the teacher"
    body = [
        html.para(f"Run directory: {run_name(inputs.root)} · teacher: {teacher_name}", "note"),
        *headline(inputs, reports),
        heads_section(inputs, out),
        eval_section(inputs, reports, out),
        fidelity_section(reports),
        training_section(inputs, out),
        memory_section(inputs, out),
        settings_section(inputs),
    ]
    page = out / "index.html"
    write_text_atomic(page, html.page(f"radistill report: {run_name(inputs.root)}", body))
    return page
