"""Which recipe change keeps the teacher's capabilities? One variable at a time from today's testbed recipe.

    python benchmarks/fidelity_candidates.py                           # every variant, 13.8M tokens each (one GPU)
    python benchmarks/fidelity_candidates.py --variants baseline,bos   # some of them (rows join the existing file)
    python benchmarks/fidelity_candidates.py --quick                   # CPU smoke run (tiny budget, few items)
    python benchmarks/fidelity_candidates.py --merge a.json b.json --out all.json   # rows of separate runs
    python benchmarks/fidelity_candidates.py --merge all.json --out all.json --fidelity-out fc-fidelity.json
                                                    # ... and the rows in fidelity.py's format, for its --merge

On ``../shared/fixtures/teacher-19m`` with the prose corpus, the scan's top ``--top`` heads (16) at state ``--state``
(8) are distilled with benchmarks/testbed_recovery.py's recipe and machinery (stage 2 on 20% of the tokens, then
stage 3; recurrent heads trained; cosine schedules, seq 512), each variant changing one thing:

  baseline        the testbed recipe as it is
  bos             documents start with BOS and are packed with restarting positions (attention and recurrent
                  state reset per document; data.bos + data.packing: documents)
  teacher-data    25% of the training sequences from text the teacher generated (data.teacher_share)
  stage3-all      stage 3 trains every parameter (trainable: all) instead of the recurrent heads
  stage3-kept     stage 3 trains the kept heads too (trainable: recurrent,kept-heads)
  private-kv      as stage3-kept, the student built with a private K/V projection per kept query head (build
                  --private-kv): compare with stage3-kept (with the kept heads frozen the copies never diverge and
                  the student would be the baseline's)
  stage1-recal    stage 1 (matrix orientation) on 10% of the tokens, then the normalisers recalibrated
  window-rec      every other head a window_recurrent head (build --mixer window_recurrent --window 16): the
                  teacher head over its last 16 tokens plus a DiscreteMamba2 head (state --state) behind a per-head
                  gate that starts at 0, so the built student is window-only-free exactly and training adds the
                  recurrence (gate, recurrence and window projections train under trainable: recurrent)
  window-only     the same heads as plain window heads (build --mixer window --window 16), distilled alike
  window-only-free  that window student as built, not trained (the start of both window variants)
  window-rec-g1   window-rec with gate_scale 1 (its default is 16: the gate moves 16 times faster under Adam)

Second round, after the first (benchmarks/results/fidelity_candidates.md):

  teacher-data-50          50% teacher-generated sequences (the same 2,000 texts, read about twice as often)
  teacher-data+private-kv  teacher-data combined with private-kv (the two best on records)
  window-rec+teacher-data  window-rec with teacher-data's 25% teacher text

Each student is evaluated by KV retrieval at 5/10/20/40 pairs and held-out perplexity (testbed_recovery's
evaluation), and by ``radistill.eval.fidelity`` against the teacher (unless ``--no-fidelity``; KL, top-1 and
confident agreement on held-out and teacher-generated text). Rows are written as each variant finishes, into
``benchmarks/results/fidelity_candidates.json`` and ``.md`` (``--quick``: ``fidelity_candidates-quick.json``); a
run with ``--variants`` keeps the rows of other variants already in the file when the setup (budget, heads, state)
is the same, so several GPU calls can fill one table.

GPU time (H200, from benchmarks/results/testbed_recovery-top16.md: top16-s8 trained 13.8M tokens in 93 s, its first
evaluation 51 s with compilation): about 3 minutes per variant after ~2 minutes of setup (scan, builds, teacher);
teacher-data adds the generation (2,000 texts of 512 tokens, batched 256: about a minute, once per --work
directory), stage1-recal its stage 1 (1.4M tokens at stage 2's speed or slower: about 20 s more). The window
variants' heads also run a blockwise softmax over their window (not timed on a GPU yet: budget ~1.5x a variant);
window-only-free is an evaluation only (about a minute).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from testbed_recovery import (  # noqa: E402
    CORPUS, TEACHER, EvalSet, Timings, distill_student, evaluate, fidelity_scores, recipe_for, scan_heads,
    suite_scores,
)
from distill import synchronizer  # noqa: E402
from radistill.distill.recipe import DistillRecipe, merge  # noqa: E402
from radistill.eval.fidelity import table_summary  # noqa: E402
from radistill.models.access import load_model  # noqa: E402
from radistill.utils.console import console  # noqa: E402
from radistill.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

DEFAULT_BUDGET = 13_795_328  # the testbed's top-16 budget (stage 2 2,752,512 + stage 3 11,042,816)
TEACHER_SHARE = 0.25
STAGE1_SHARE = 0.1
WINDOW = 16  # the window variants' span: the training-free top-3 window student's (docs/hybrid.md)


def variants(quick: bool) -> dict[str, dict]:
    """name -> {"recipe": overrides of the baseline recipe, "stage1_share", "build": build_student options}."""
    gen = {"teacher_documents": 8, "teacher_new_tokens": 64, "teacher_batch_size": 8} if quick else \
        {"teacher_documents": 2000, "teacher_new_tokens": 480, "teacher_batch_size": 256}
    return {
        "baseline": {},
        "bos": {"recipe": {"data": {"bos": True, "packing": "documents"}}},
        "teacher-data": {"recipe": {"data": {"teacher_share": TEACHER_SHARE, **gen}}},
        "stage3-all": {"recipe": {"stages": {3: {"trainable": "all"}}}},
        # private K/V copies only differ from shared ones once kept heads train: both train them in stage 3, so
        # private-kv against stage3-kept isolates the private projections
        "stage3-kept": {"recipe": {"stages": {3: {"trainable": "recurrent,kept-heads"}}}},
        "private-kv": {"build": {"private_kv": True}, "recipe": {"stages": {3: {"trainable": "recurrent,kept-heads"}}}},
        "stage1-recal": {"stage1_share": STAGE1_SHARE, "recipe": {"stages": {1: {"recalibrate": True}}}},
        # after the first round (teacher-data the clear winner on records): more of the teacher's text, and the
        # winner combined with the runner-up on records
        "teacher-data-50": {"recipe": {"data": {"teacher_share": 0.5, **gen}}},
        "teacher-data+private-kv": {"build": {"private_kv": True},
                                    "recipe": {"data": {"teacher_share": TEACHER_SHARE, **gen},
                                               "stages": {3: {"trainable": "recurrent,kept-heads"}}}},
        # the recurrence's state size is --state, as the baseline's; a window head has none (state_size None)
        "window-rec": {"build": {"mixer": "window_recurrent", "window": WINDOW}},
        "window-rec+teacher-data": {"build": {"mixer": "window_recurrent", "window": WINDOW},
                                    "recipe": {"data": {"teacher_share": TEACHER_SHARE, **gen}}},
        "window-only": {"build": {"mixer": "window", "window": WINDOW, "state_size": None}},
        "window-only-free": {"build": {"mixer": "window", "window": WINDOW, "state_size": None}, "distill": False},
        # the same with a plain gate (gate_scale 1: Adam moves it ~lr per step): does the gate's speed matter?
        "window-rec-g1": {"build": {"mixer": "window_recurrent", "window": WINDOW,
                                    "mixer_settings": {"gate_scale": 1.0}}},
    }


def variant_recipe(name: str, spec: dict, budget: int, args, work: Path) -> DistillRecipe:
    share = spec.get("stage1_share", 0.0)
    if share and args.quick:  # the quick budget is 4 steps: stage 1 gets one of them
        share = 0.25
    recipe = recipe_for(budget, args.quick, args.seed, args.lr_stage2, args.lr_stage3, "recurrent", "recurrent",
                        args.compile, share)
    if share and not recipe.stage(1).enabled:
        raise SystemExit(f"variant {name}: --budget-tokens {budget:,} leaves stage 1 no whole step")
    overrides = json.loads(json.dumps(spec.get("recipe", {})))  # a copy
    if overrides.get("data", {}).get("teacher_share"):  # generated once per work directory, reused by reruns
        documents = overrides["data"].get("teacher_documents", "default")  # a store per size: never a stale one
        overrides["data"]["teacher_dir"] = str(work / f"teacher_text-{documents}")
    return merge(recipe, overrides)


def _setup_key(result: dict) -> dict:
    return {k: result.get(k) for k in ("budget_tokens", "top", "state", "quick", "teacher")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=None,
                        help="comma-separated (default: all): " + ", ".join(variants(False)))
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny budget, few probe items")
    parser.add_argument("--budget-tokens", type=float, default=None, help=f"per student (default {DEFAULT_BUDGET:,}; "
                        "quick 2,048)")
    parser.add_argument("--top", type=int, default=16, help="kept heads: the scan's top K")
    parser.add_argument("--state", type=int, default=8, help="the recurrent heads' state size")
    parser.add_argument("--scan", type=Path, default=None, help="use this scan.json instead of scanning")
    parser.add_argument("--kv-items", type=int, default=None, help="KV items per dictionary size (200; quick 8)")
    parser.add_argument("--ppl-tokens", type=int, default=None, help="held-out tokens (65,536; quick 2,048)")
    parser.add_argument("--eval-batch", type=int, default=None, help="rows per evaluation forward (256; quick 8)")
    parser.add_argument("--no-fidelity", action="store_true", help="skip radistill.eval.fidelity")
    parser.add_argument("--lr-stage2", type=float, default=1e-3)
    parser.add_argument("--lr-stage3", type=float, default=5e-4)
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="stop each student's training after this long (its row says truncated; for a device call's "
                             "time limit: evaluation still runs)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="students, runs, generated text (default: temp)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="join the rows of these result files (same setup; a later file's row of a variant wins)")
    parser.add_argument("--fidelity-out", type=Path, default=None,
                        help="also write the rows in benchmarks/fidelity.py's format (and .md), for its --merge")
    args = parser.parse_args(argv)
    if args.merge:
        if args.out is None:
            parser.error("--merge needs --out")
        runs = [json.loads(path.read_text()) for path in args.merge]
        if any(_setup_key(r) != _setup_key(runs[0]) for r in runs):
            parser.error("--merge: the files differ in budget, heads, state or teacher; merge runs of one setup")
        merged = {**runs[0], "rows": []}
        for run in runs:
            names = {r["variant"] for r in run["rows"]}
            merged["rows"] = [r for r in merged["rows"] if r["variant"] not in names] + run["rows"]
        write_json_atomic(args.out, merged)
        write_text_atomic(args.out.with_suffix(".md"), markdown(merged) + "\n")
        write_fidelity_rows(merged, args.fidelity_out)
        print(markdown(merged))
        return 0

    table = variants(args.quick)
    chosen = list(table) if args.variants is None else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(table))
    if unknown or not chosen:
        parser.error(f"unknown variants {unknown}: choose from {', '.join(table)}")
    if not TEACHER.exists() or not CORPUS.exists():
        console.print(f"[red]needs {TEACHER} and {CORPUS}[/]")
        return 2
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    args.quick = args.quick or device == "cpu"
    torch.set_num_threads(1) if device == "cpu" else None
    budget = int(args.budget_tokens or (2048 if args.quick else DEFAULT_BUDGET))
    kv_items = args.kv_items or (8 if args.quick else 200)
    ppl_tokens = args.ppl_tokens or (2048 if args.quick else 65536)
    batch = args.eval_batch or (8 if args.quick else 256)
    out = args.out or ROOT / "benchmarks" / "results" / (
        "fidelity_candidates-quick.json" if args.quick else "fidelity_candidates.json")
    work = args.work or Path(tempfile.mkdtemp(prefix="fidelity-candidates-"))
    work.mkdir(parents=True, exist_ok=True)
    timings = Timings(synchronizer(device))

    from radistill.hybrid.build import build_student

    with timings("setup (teacher, held-out, probe items, scan)"):
        teacher, tokenizer = load_model(TEACHER, dtype="bf16" if device == "cuda" else "fp32", device=device)
        base = variant_recipe("baseline", {}, budget, args, work)
        evalset = EvalSet(tokenizer, base, kv_items, ppl_tokens, base.stage(3).seq_len)
        ranked = scan_heads(args, device, work)
    heads = ranked[: args.top]
    result = {
        "teacher": str(TEACHER.name), "budget_tokens": budget, "top": args.top, "state": args.state,
        "quick": args.quick, "kept_heads": [list(h) for h in heads], "rows": [],
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "kv_items_per_size": kv_items, "heldout_tokens": int(evalset.heldout.numel()),
    }
    if out.exists():  # rows of other variants from an earlier call with the same setup stay
        earlier = json.loads(out.read_text())
        if _setup_key(earlier) == _setup_key(result):
            result["rows"] = [r for r in earlier.get("rows", []) if r["variant"] not in chosen]
    with timings("eval: teacher"):
        result["teacher_eval"] = evaluate(teacher, evalset, device, batch)
        result["teacher_eval"]["suites"] = suite_scores(teacher, tokenizer, batch, args.quick)

    cpu_teacher = None
    for name in chosen:
        spec = table[name]
        recipe = variant_recipe(name, spec, budget, args, work)
        build = spec.get("build", {})
        # one directory per distinct build (variants that build alike share it)
        label = re.sub(r"[^\w.-]", "", "-".join(f"{k}_{v}" for k, v in sorted(build.items())))
        student_dir = work / (f"student-{label}" if build else "student")
        if not (student_dir / "config.json").exists():
            with timings(f"build {student_dir.name}"):
                if cpu_teacher is None:
                    cpu_teacher, _ = load_model(TEACHER, dtype="fp32", device="cpu")
                build_student(cpu_teacher, student_dir, heads=heads, tokenizer=tokenizer, calibration_data=CORPUS,
                              calibration_tokens=2048 if args.quick else 16384, overwrite=True,
                              **{"state_size": args.state, **build})
        model, _ = load_model(student_dir, dtype="fp32", device=device)
        started = time.perf_counter()
        tokens, truncated, stage_seconds = 0, False, {}
        if spec.get("distill", True):
            console.print(f"distilling variant {name} ...")
            tokens, truncated, stage_seconds = distill_student(model, work / f"run-{name}", teacher, tokenizer,
                                                               recipe, device, args.train_seconds, timings, name)
        with timings(f"{name}: eval"):
            row = {"variant": name, "tokens": tokens, "truncated": truncated,
                   "train_seconds": round(time.perf_counter() - started, 1),
                   "stage_seconds": {f"stage{k}": round(v, 1) for k, v in stage_seconds.items()},
                   "recipe_changes": spec.get("recipe", {}), "build": build, "distilled": bool(tokens),
                   **evaluate(model, evalset, device, batch), "suites": suite_scores(model, tokenizer, batch, args.quick)}
            if not args.no_fidelity:
                row["fidelity"] = fidelity_scores(teacher, tokenizer, model, args.quick, batch)
        row["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        result["rows"].append(row)
        result["timings"] = timings.to_dict()
        write_json_atomic(out, result)
        write_text_atomic(out.with_suffix(".md"), markdown(result) + "\n")
        console.print(f"{name}: KV {row['kv_retrieval']} ppl {row['heldout_ppl']:.2f}")
        del model
    write_fidelity_rows(result, args.fidelity_out)
    print(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def write_fidelity_rows(result: dict, path: Path | None) -> None:
    """With ``--fidelity-out PATH``: :func:`fidelity_rows` to PATH and its table (fidelity.py's) beside it."""
    if path is not None:
        from fidelity import render

        rows = fidelity_rows(result)
        write_json_atomic(path, rows)
        write_text_atomic(path.with_suffix(".md"), render(rows))


def _fidelity_cells(fid: dict | None) -> list[str]:
    """KL / top-1 / confident agreement on held-out text, KL on the teacher's samples and the mean greedy agreement,
    where the fidelity module's result has them ("–" where not)."""
    def cell(*path, digits=3):
        value = fid
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return "–" if value is None else f"{value:.{digits}f}"

    return [cell("texts", "heldout", "all", "kl"), cell("texts", "heldout", "all", "top1"),
            cell("texts", "heldout", "all", "confident"), cell("texts", "generated", "all", "kl"),
            cell("greedy", "mean", digits=1)]


def fidelity_rows(result: dict) -> dict:
    """The rows in benchmarks/fidelity.py's format, for ``fidelity.py --merge`` beside other teachers' runs. KV here
    is testbed_recovery's evaluation (log-likelihood choice over the dictionary's values; ``kv_method`` says so)."""
    heads = [f"{layer}.{head}" for layer, head in result["kept_heads"]]
    teacher = result.get("teacher_eval") or {}

    def row(r: dict) -> dict:
        build = r.get("build") or {}
        mixer = build.get("mixer", "discrete_mamba2")
        changes = json.dumps(r.get("recipe_changes") or {}, sort_keys=True)
        recipe = ("testbed recipe (stage 2 on 20% of the tokens, then stage 3, seq 512, cosine, the recurrent heads "
                  f"trained) with variant {r['variant']}'s changes: {changes}"
                  if r.get("distilled", bool(r.get("tokens"))) else "built, not distilled")
        return {"name": r["variant"], "path": None, "kept_heads": len(heads), "heads": ",".join(heads),
                "mixer": mixer, "window": build.get("window"), "sink": build.get("sink", 0) if build.get("window")
                else None, "state_size": None if mixer == "window" else result["state"], "tokens": r["tokens"],
                "recipe": recipe + (" (training cut by --train-seconds)" if r.get("truncated") else ""),
                "truncated": r.get("truncated"), "kv": r["kv_retrieval"], "kv_gen": {}, "ppl": r["heldout_ppl"],
                **({"fidelity": table_summary(r["fidelity"])} if r.get("fidelity") else {}),
                "suites": r.get("suites", {}), "train_seconds": r.get("train_seconds"), "date": r.get("date")}

    teacher_row = {"name": "teacher", "path": result["teacher"], "kept_heads": None, "heads": "all", "mixer": None,
                   "window": None, "sink": None, "state_size": None, "tokens": None, "recipe": "teacher",
                   "kv": teacher.get("kv_retrieval", {}), "kv_gen": {}, "ppl": teacher.get("heldout_ppl"),
                   "suites": teacher.get("suites", {})}
    dates = [r["date"] for r in result["rows"] if r.get("date")]
    return {"teacher": result["teacher"], "rows": ([teacher_row] if teacher else []) + [row(r) for r in result["rows"]],
            "settings": {"kv": {"pairs": [5, 10, 20, 40], "samples": result["kv_items_per_size"],
                                "method": "benchmarks/fidelity_candidates.py (testbed_recovery.evaluate)"},
                         "ppl_tokens": result["heldout_tokens"], "text": "the prose corpus (held-out documents)",
                         "fidelity": next((r["fidelity"]["config"] for r in result["rows"] if r.get("fidelity")), {})},
            "device": result["device"], "dtype": "bf16 (autocast)" if result["device"] != "cpu" else "float32",
            "versions": {"torch": result.get("torch")}, "date": max(dates) if dates else None,
            "quick": result.get("quick", False),
            "kv_method": "log-likelihood choice over the dictionary's values"}


def markdown(result: dict) -> str:
    head = ("| variant | tokens | KV@5 | KV@10 | KV@20 | KV@40 | records | facts | held-out ppl | KL (held-out) "
            "| top-1 | confident top-1 | KL (teacher's text) | greedy agreement | train s |")
    lines = [head, "|" + "---|" * 15]

    def suites(row: dict) -> str:
        values = row.get("suites", {})
        return " | ".join("–" if values.get(k) is None else f"{values[k]:.3f}" for k in ("records", "facts"))

    t = result.get("teacher_eval", {})
    if t:
        kv = t["kv_retrieval"]
        lines.append(f"| teacher | – | {kv['5']:.2f} | {kv['10']:.2f} | {kv['20']:.2f} | {kv['40']:.2f} | "
                     f"{suites(t)} | {t['heldout_ppl']:.2f} | 0 | 1 | 1 | 0 | – | – |")
    for r in result["rows"]:
        kv = r["kv_retrieval"]
        cut = " (cut)" if r.get("truncated") else ""
        lines.append(f"| {r['variant']} | {r['tokens']:,}{cut} | {kv['5']:.2f} | {kv['10']:.2f} | {kv['20']:.2f} | "
                     f"{kv['40']:.2f} | {suites(r)} | {r['heldout_ppl']:.2f} | "
                     + " | ".join(_fidelity_cells(r.get("fidelity"))) + f" | {r['train_seconds']:.0f} |")
    lines.append(f"\n{result['device']}, top-{result['top']} heads at state {result['state']}, "
                 f"{result['budget_tokens']:,} tokens per student, {result['kv_items_per_size']} KV items per size, "
                 f"{result['heldout_tokens']:,} held-out tokens.")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
