"""How faithful are students to their teacher, beyond KV retrieval? One row per model:

    python benchmarks/fidelity.py --teacher examples/teacher-19m --students runs/top16/stage3 runs/top8/stage3
    python benchmarks/fidelity.py --quick                                   # CPU smoke run (a tiny student)
    python benchmarks/fidelity.py --merge a.json b.json --out merged.json   # one table from several runs

For the teacher and each student folder (a built student or a distilled stage directory): KV retrieval by
dictionary size (``radistill.eval.kv``, log-likelihood and greedy generation), held-out perplexity, the fidelity
report against the teacher (``radistill.eval.fidelity``: KL, top-1 and confident agreement, split local /
long-range, on held-out text and on the teacher's own samples; greedy-continuation agreement) and the capability
suites (JSONL multiple-choice files, default ``examples/suites/teacher-19m/*.jsonl`` for teacher-19m).

Each row also says what the student is: kept attention heads, recurrent state size, distillation tokens and a
summary of its recipe (``recipe.json`` in the folder or its parent, i.e. the ``radistill distill --out RUN`` of a
``RUN/stageN`` folder). Writes ``benchmarks/results/fidelity.json`` and ``.md`` (``fidelity-quick.*`` with --quick)
with the device, library versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from radistill.eval.fidelity import FidelityConfig, table_summary  # noqa: E402
from radistill.eval.kv import KVEvalConfig  # noqa: E402
from radistill.eval.runner import EvalConfig, evaluate_model  # noqa: E402
from radistill.models.access import load_model, resolve_device  # noqa: E402
from radistill.utils.console import console  # noqa: E402
from radistill.utils.errors import RadistillError  # noqa: E402
from radistill.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

EXAMPLES = ROOT / "examples"
TEACHER = EXAMPLES / "teacher-19m"
HELDOUT = EXAMPLES / "data" / "prose-heldout.txt.xz"
SUITES = EXAMPLES / "suites" / "teacher-19m"
RESULTS = ROOT / "benchmarks" / "results"
PAIRS = (5, 10, 20, 40)


def settings(quick: bool, suites: list[Path], text: Path) -> EvalConfig:
    if quick:
        kv = KVEvalConfig(pairs=(5, 20), samples=8, seed=1234)
        fid = FidelityConfig(windows=2, window=64, samples=1, prompt=16, generate=32, greedy_prompts=2,
                             greedy_tokens=16)
        ppl_tokens = 1024
    else:
        kv = KVEvalConfig(pairs=PAIRS, samples=64, seed=1234)
        fid = FidelityConfig()
        ppl_tokens = 16384
    tasks = ("kv", "ppl", "fidelity", *(str(s) for s in suites))
    return EvalConfig(tasks=tasks, kv=kv, text=str(text), seq_len=512, ppl_tokens=ppl_tokens, fidelity=fid,
                      batch_size=4 if quick else 16)


def read_recipe(folder: Path) -> dict | None:
    for candidate in (folder / "recipe.json", folder.parent / "recipe.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def recipe_summary(recipe: dict | None) -> tuple[int | None, str]:
    """(distillation tokens, one line) from a resolved ``recipe.json``; (None, "untrained") without one."""
    if recipe is None:
        return None, "untrained (no recipe.json)"
    parts, tokens = [], 0
    for stage, values in sorted((recipe.get("stages") or {}).items()):
        if not values.get("enabled", True):
            continue
        tokens += int(values.get("tokens", 0))
        parts.append(f"stage {stage}: {int(values.get('tokens', 0)):,} tok, lr {values.get('lr')}, "
                     f"{values.get('trainable', 'default')}")
    return tokens, "; ".join(parts) or "no stage enabled"


def describe(folder: Path | None, model) -> dict:
    """Kept heads, state size and training of a model folder (the teacher: all heads, no state)."""
    config = model.config
    kept = getattr(config, "kept_heads", None)
    if kept is None:
        total = config.num_hidden_layers * config.num_attention_heads
        return {"kept_heads": total, "heads": "all", "mixer": None, "window": None, "state_size": None,
                "tokens": None, "recipe": "teacher"}
    tokens, summary = recipe_summary(read_recipe(folder)) if folder is not None else (None, "")
    settings = getattr(config, "mixer_settings", None) or {}
    return {"kept_heads": sum(len(h) for h in kept),
            "heads": ",".join(f"{layer}.{head}" for layer, heads in enumerate(kept) for head in heads),
            "mixer": getattr(config, "mixer", None), "window": settings.get("window"),
            "state_size": settings.get("state_size"), "tokens": tokens, "recipe": summary}


def row_of(name: str, folder: Path | None, model, results) -> dict:
    tasks = {t.name: t for t in results}
    row = {"name": name, "path": str(folder) if folder else None, **describe(folder, model)}
    row["kv"] = {str(p): tasks[f"kv_ret@{p}"].value for p in PAIRS if f"kv_ret@{p}" in tasks}
    row["kv_gen"] = {str(p): tasks[f"kv_ret_gen@{p}"].value for p in PAIRS if f"kv_ret_gen@{p}" in tasks}
    row["ppl"] = tasks["ppl"].value if "ppl" in tasks else None
    if "fidelity" in tasks:
        row["fidelity"] = table_summary(tasks["fidelity"].details)
    row["suites"] = {t.name: t.value for t in results if t.metric == "acc" and not t.name.startswith("kv_ret")}
    return row


def free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def quick_student(teacher_path: Path, out: Path) -> Path:
    """A student of ``teacher_path`` keeping four heads named by hand (no scan: the smoke run checks plumbing)."""
    from radistill.hybrid.build import build_student

    build_student(teacher_path, out, heads="0.0,3.1,5.2,7.3", state_size=8, device="cpu", overwrite=True)
    return out


def run(args, write=None) -> dict:
    """Evaluate the teacher and ``args.students``; ``write(result)`` after each row (the partial result so far)."""
    device = resolve_device(args.device)
    suites = [Path(s) for s in args.suites] if args.suites is not None else sorted(SUITES.glob("*.jsonl"))
    config = settings(args.quick, suites, Path(args.text))
    teacher_path = Path(args.teacher)
    teacher, tokenizer = load_model(teacher_path, device=device, dtype=args.dtype)
    start = time.perf_counter()
    import transformers

    name = torch.cuda.get_device_name() if device.startswith("cuda") else \
        f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    rows: list[dict] = []

    def result() -> dict:
        return {"teacher": _label(teacher_path), "rows": rows, "settings": config.to_dict(),
                "device": name, "dtype": str(teacher.dtype).removeprefix("torch."),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "quick": args.quick, "wall_seconds": round(time.perf_counter() - start, 1)}

    console.rule(f"teacher {teacher_path}")
    rows.append(row_of("teacher", teacher_path, teacher, evaluate_model(teacher, tokenizer, config)))
    if write is not None:
        write(result())
    students = [Path(s) for s in args.students]
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick and not students:
            students = [quick_student(teacher_path, Path(tmp) / "quick4")]
        for folder in students:
            console.rule(f"student {folder}")
            model, student_tokenizer = load_model(folder, device=device, dtype=args.dtype)
            results = evaluate_model(model, student_tokenizer, config, teacher=(teacher, tokenizer))
            rows.append(row_of(folder.name if folder.name not in ("stage2", "stage3") else
                               f"{folder.parent.name}/{folder.name}", folder, model, results))
            free(model)
            if write is not None:
                write(result())
    return result()


def merge_runs(runs: list[dict]) -> dict:
    """One result from several runs, of one teacher or of several (e.g. teacher-19m and SmolLM2): each row keeps
    its teacher and the device, versions and date of its run. Each teacher's own row is kept once (from its first
    run); a student named twice under one teacher is refused."""
    rows, seen = [], set()
    for result in runs:
        for row in result["rows"]:
            row = {**row, **{k: row.get(k, result.get(k)) for k in ("teacher", "device", "versions", "date", "quick")}}
            key = (row["teacher"], row["name"])
            if row["name"] == "teacher" and key in seen:
                continue
            if key in seen:
                raise RadistillError(f"--merge: '{row['name']}' of teacher {row['teacher']} appears in two runs; "
                                     "rename or drop one")
            seen.add(key)
            rows.append(row)
    first = runs[0]
    teachers = list(dict.fromkeys(r["teacher"] for r in runs))
    return {"teacher": " + ".join(teachers), "teachers": teachers, "rows": rows, "settings": first["settings"],
            "settings_by_teacher": {t: next(r["settings"] for r in runs if r["teacher"] == t) for t in teachers},
            "device": ", ".join(dict.fromkeys(r["device"] for r in runs)),
            "versions": first["versions"], "date": max(r["date"] for r in runs),
            "quick": any(r.get("quick") for r in runs), "merged": len(runs)}


def read_result(path: Path) -> dict:
    """A result file of this script (or of ``smollm2.py --fidelity-out``) for --merge; a clear error otherwise."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RadistillError(f"--merge: cannot read {path}: {exc}") from exc
    if not isinstance(result, dict) or not {"teacher", "rows", "settings"} <= set(result):
        raise RadistillError(f"--merge: {path} is not a fidelity result (no teacher/rows/settings)")
    return result


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _label(path: Path) -> str:
    """The teacher as results name it: relative to the repository when inside it (the same name on every machine,
    so runs of one teacher merge), else as given (an HF id, a file elsewhere)."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if path.exists() and resolved.is_relative_to(ROOT) else str(path)


def render(result: dict) -> str:
    """Markdown: one table per teacher (a merged result may hold several)."""
    teachers = result.get("teachers") or [result["teacher"]]
    lines = [f"# Fidelity: {result['teacher']}", ""]
    for teacher in teachers:
        rows = [r for r in result["rows"] if r.get("teacher", result["teacher"]) == teacher]
        settings = (result.get("settings_by_teacher") or {}).get(teacher, result["settings"])
        if len(teachers) > 1:
            lines += [f"## {teacher}", ""]
        lines += _table(result, rows, settings)
    return "\n".join(lines)


def _versions(versions: dict) -> str:
    """"torch X, transformers Y" with what a run recorded (older results hold torch only)."""
    return ", ".join(f"{name} {versions[name]}" for name in ("torch", "transformers") if versions.get(name))


def _table(result: dict, rows: list[dict], settings: dict) -> list[str]:
    suites = list(dict.fromkeys(s for r in rows for s in r.get("suites", {})))
    pairs = list(dict.fromkeys(p for r in rows for p in r.get("kv", {})))
    runs: dict[str, list[str]] = {}  # device and versions -> the dates of its rows
    for r in rows:
        where = (f"{r.get('device', result['device'])} · {_versions(r.get('versions', result['versions']))}"
                 + (" · QUICK (smoke run)" if r.get("quick", result["quick"]) else ""))
        runs.setdefault(where, []).append(str(r.get("date", result["date"])))
    lines = [f"{result['device']} · {result.get('dtype', '')} · {_versions(result['versions'])} · {result['date']}"
             + (" · QUICK (smoke run)" if result["quick"] else ""), ""] if len(rows) <= 1 or \
        "teachers" not in result else \
        ["; ".join(f"{where} · {min(dates)}" + (f" to {max(dates)}" if max(dates) != min(dates) else "")
                   for where, dates in runs.items()), ""]
    header = ["model", "kept heads", "mixer", "state", "tokens", *(f"KV@{p}" for p in pairs), "ppl", "KL held-out",
              "top-1", "top-1 local", "top-1 long", "confident", "KL generated", "top-1 gen", "greedy (mean/median)",
              *suites]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        fid = r.get("fidelity") or {}
        held, gen = fid.get("heldout", {}), fid.get("generated", {})
        greedy = fid.get("greedy")
        mixer = r.get("mixer")
        cells = [r["name"], "all" if r["kept_heads"] is None else str(r["kept_heads"]),
                 "—" if not mixer else mixer + (f" W={r['window']}" if r.get("window") else ""),
                 str(r["state_size"] or "—"),
                 f"{r['tokens']:,}" if r.get("tokens") else "—",
                 *(_pct(r["kv"].get(p)) for p in pairs), f"{r['ppl']:.2f}" if r.get("ppl") else "—",
                 f"{held['all']['kl']:.3f}" if held else "—",
                 *(_pct(held.get(s, {}).get("top1")) for s in ("all", "local", "long")),
                 _pct(held.get("all", {}).get("confident")),
                 f"{gen['all']['kl']:.3f}" if gen else "—", _pct(gen.get("all", {}).get("top1")),
                 f"{greedy['mean']:.1f} / {greedy['median']:.0f} of {greedy['of']}" if greedy else "—",
                 *(_pct(r.get("suites", {}).get(s)) for s in suites)]
        lines.append("| " + " | ".join(cells) + " |")
    recipes = [f"- {r['name']}: {r['recipe']}" + (f" (heads {r['heads'] or 'none'})" if r["heads"] != "all" else "")
               for r in rows if r["name"] != "teacher"]
    lines += ["", "Accuracies and agreements in %; KL in nats per token (teacher || student). Local / long: the "
              "teacher's mean attention distance at the position < / >= "
              f"{(settings.get('fidelity') or {}).get('long_range', 16)} tokens (docs/eval.md)."
              + (f" KV: {settings['kv']['method']}." if isinstance(settings.get("kv"), dict)
                 and settings["kv"].get("method") else ""), "",
              *recipes, ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(TEACHER))
    parser.add_argument("--students", nargs="*", default=[], help="student folders (built or distilled)")
    parser.add_argument("--text", default=str(HELDOUT), help="held-out text for ppl and fidelity")
    parser.add_argument("--suites", nargs="*", default=None, help="JSONL suites (default: examples/suites/...)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny settings, a 4-head student")
    parser.add_argument("--merge", nargs="+", help="merge these result files into --out instead of running")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or RESULTS / ("fidelity-quick.json" if args.quick else "fidelity.json")

    def write(result: dict) -> str:
        """The JSON and its table, rewritten as rows arrive (a run cut short keeps what it measured)."""
        write_json_atomic(out, result)
        table = render(result)
        write_text_atomic(out.with_suffix(".md"), table)
        return table

    try:
        if args.merge:
            result = merge_runs([read_result(Path(p)) for p in args.merge])
        else:
            if args.quick:
                args.device = "cpu" if args.device == "auto" else args.device
            result = run(args, write)
    except RadistillError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    table = write(result)
    console.print(table)
    console.print(f"results: {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
