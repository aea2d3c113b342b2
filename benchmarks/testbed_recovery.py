"""The method's effect on a real model: does keeping the scan's top heads let a distilled hybrid keep retrieval?

    python benchmarks/testbed_recovery.py                      # one GPU, unattended, < ~9 minutes
    python benchmarks/testbed_recovery.py --budget-tokens 20e6 # cap the tokens per student
    python benchmarks/testbed_recovery.py --quick              # CPU smoke run (tiny budget, few probe items)

On ``../shared/fixtures/teacher-19m`` with the prose corpus ``../shared/fixtures/corpus/prose-train.txt.xz`` as the
only training text (no retrieval data; the students' normaliser is calibrated on prose too):

1. scan the teacher's 80 heads with the KV-retrieval probe (or read ``--scan scan.json``);
2. build four students: the top 4 heads with state 64 and with state 8, no heads, and 4 random heads from the
   lower half of the ranking (state 64);
3. distill each with the same recipe and token budget (stage 2 then stage 3, the trainer of ``radistill distill``);
4. report KV-retrieval accuracy at 5/10/20/40 pairs (log-likelihood over the dictionary's values) and held-out
   prose perplexity, beside the teacher's.

The budget is the same for every student: ``--budget-tokens`` (default 50M), lowered if a short throughput
measurement says four students would not fit in ``--time-limit``. If training still runs over (a slower
machine than measured), each student stops at its share of the time and its actual tokens are reported.
Writes ``benchmarks/results/testbed_recovery.json`` and ``.md`` (only ``testbed_recovery-quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from distill import time_steps  # noqa: E402  (benchmarks/distill.py)
from radistill.distill.data import (  # noqa: E402
    DOC_SEPARATOR, PackedStream, heldout_documents, is_heldout, iter_documents,
)
from radistill.distill.recipe import DistillRecipe, merge  # noqa: E402
from radistill.distill.trainer import Trainer  # noqa: E402
from radistill.models.access import load_model  # noqa: E402
from radistill.utils.console import console  # noqa: E402

SHARED = ROOT.parent / "shared" / "fixtures"
TEACHER = SHARED / "teacher-19m"
CORPUS = SHARED / "corpus" / "prose-train.txt.xz"
PAIRS = (5, 10, 20, 40)
STAGE2_SHARE = 0.2  # of each student's tokens (the authors' repo: 5B of 25B)


class OutOfTime(Exception):
    """Raised from the trainer's step hook when a student has used its share of the time."""


def recipe_for(tokens: int, quick: bool, seed: int, lr2: float = 1e-3, lr3: float = 3e-4) -> DistillRecipe:
    """The recipe every student gets: stage 2 then stage 3, cosine schedules, seq 512 (the teacher's context).

    Learning rates are those of a small model (the teacher-19m was trained at ~1e-3), not the 1B defaults."""
    batch, accum = (4, 1) if quick else (64, 1)
    seq = 128 if quick else 512
    shared = dict(seq_len=seq, batch_size=batch, grad_accum=accum, schedule="cosine", warmup=0.05, decay=0.0,
                  min_lr_ratio=0.1, checkpoint_every=10**9, log_every=10, clip=1.0)
    stage2 = max(int(tokens * STAGE2_SHARE), seq * batch * accum)
    stage3 = max(tokens - stage2, seq * batch * accum)
    return merge(DistillRecipe(), {
        "stages": {1: {"enabled": False},
                   2: {**shared, "tokens": stage2, "lr": lr2, "trainable": "all"},
                   3: {**shared, "tokens": stage3, "lr": lr3, "trainable": "all"}},
        "data": {"source": str(CORPUS)},
        "seed": seed,
        "dtype": "bf16",
        "keep_checkpoints": 1,
    })


def calibration_text(recipe: DistillRecipe, docs: int) -> str:
    """The first ``docs`` training documents, one paragraph each (the build splits calibration text at blank lines)."""
    training = (d for i, d in enumerate(iter_documents(recipe.data)) if not is_heldout(i, recipe.data))
    return "\n\n".join(re.sub(r"\n\s*\n", "\n", d) for d in itertools.islice(training, docs))


def scan_heads(args, device: str, work: Path):
    """The teacher's heads, best first, as (layer, head) pairs."""
    from radistill.scan.result import load_scan

    if args.scan is not None:
        result = load_scan(args.scan)
    else:
        from radistill.scan.run import run_scan

        result = run_scan(TEACHER, out=work / "scan", pairs=20, samples=4 if args.quick else 64, device=device)
    return [(h.layer, h.head) for h in result.heads]


def evaluate(model, tokenizer, heldout_file: Path, quick: bool) -> dict:
    from radistill.eval.kv import KVEvalConfig, kv_retrieval
    from radistill.eval.perplexity import PerplexityConfig, perplexity

    model.eval()
    config = KVEvalConfig(pairs=PAIRS, samples=16 if quick else 200, generate=False)
    kv = {t.name.split("@")[1]: t.value for t in kv_retrieval(model, tokenizer, config) if "@" in t.name}
    ppl = perplexity(model, tokenizer, PerplexityConfig(str(heldout_file), seq_len=512,
                                                         max_tokens=4096 if quick else 65536))
    return {"kv_retrieval": kv, "heldout_ppl": ppl.value}


def measure_rates(student_dir: Path, teacher, tokenizer, recipe: DistillRecipe, device: str) -> dict[int, float]:
    """Tokens/s of stages 2 and 3 for one student over a few steps (what sizes the budget)."""
    student, _ = load_model(student_dir, dtype="fp32", device=device)
    rates = {}
    for stage in (2, 3):
        stream = PackedStream(recipe.data, tokenizer, recipe.stage(stage).seq_len, seed=0)
        seconds, _ = time_steps(stage, student, teacher, recipe, stream, device, steps=2 if device == "cpu" else 8,
                                warmup=2)
        rates[stage] = _tokens_per_step(recipe, stage) / seconds
    return rates


def distill_student(student_dir: Path, run_dir: Path, teacher, tokenizer, recipe: DistillRecipe, device: str,
                    seconds: float):
    """Train one student (stage 2 then 3); stop early when ``seconds`` run out. Returns (model, tokens, seconds)."""
    student, _ = load_model(student_dir, dtype="fp32", device=device)
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    steps_done: dict[int, int] = {}

    def guard(stage: int, step: int) -> None:
        steps_done[stage] = step
        if time.perf_counter() > deadline:
            raise OutOfTime

    truncated = False
    try:
        Trainer(student, teacher, tokenizer, recipe, run_dir, device, step_hook=guard).run()
    except OutOfTime:
        truncated = True
    tokens = sum(step * _tokens_per_step(recipe, stage) for stage, step in steps_done.items())
    return student, tokens, time.perf_counter() - started, truncated


def _tokens_per_step(recipe: DistillRecipe, stage: int) -> int:
    cfg = recipe.stage(stage)
    return cfg.seq_len * cfg.batch_size * cfg.grad_accum


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny budget, few probe items")
    parser.add_argument("--budget-tokens", type=float, default=None, help="tokens per student (default 50M; quick 40k)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run (default 480)")
    parser.add_argument("--scan", type=Path, default=None, help="use this scan.json instead of scanning")
    parser.add_argument("--lr-stage2", type=float, default=1e-3)
    parser.add_argument("--lr-stage3", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="where students and runs go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if not TEACHER.exists() or not CORPUS.exists():
        console.print(f"[red]needs {TEACHER} and {CORPUS}[/]")
        return 2
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    quick = args.quick or device == "cpu"
    budget = int(args.budget_tokens or (40_000 if quick else 50_000_000))
    time_limit = args.time_limit or (1200.0 if quick else 480.0)
    out = args.out or ROOT / "benchmarks" / "results" / ("testbed_recovery-quick.json" if quick else
                                                         "testbed_recovery.json")
    work = args.work or Path(tempfile.mkdtemp(prefix="testbed-recovery-"))
    work.mkdir(parents=True, exist_ok=True)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    from radistill.hybrid.build import build_student

    teacher, tokenizer = load_model(TEACHER, dtype="bf16" if device == "cuda" else "fp32", device=device)
    recipe = recipe_for(budget, quick, args.seed, args.lr_stage2, args.lr_stage3)
    heldout = heldout_documents(recipe.data)
    heldout_file = work / "heldout.txt"
    heldout_file.write_text(DOC_SEPARATOR.join(heldout))
    # the normaliser's statistics come from training prose too: the students never see a retrieval-format text
    calibration_file = work / "calibration.txt"
    calibration_file.write_text(calibration_text(recipe, 8 if quick else 64))

    console.print("scanning the teacher's heads ...")
    ranked = scan_heads(args, device, work)
    lower_half = ranked[len(ranked) // 2 :]
    random_low = sorted(random.Random(args.seed).sample(lower_half, 4))
    students = [
        {"name": "top4-s64", "kept_heads": ranked[:4], "state_size": 64},
        {"name": "top4-s8", "kept_heads": ranked[:4], "state_size": 8},
        {"name": "none-s64", "kept_heads": [], "state_size": 64},
        {"name": "random-low4-s64", "kept_heads": random_low, "state_size": 64},
    ]
    for s in students:
        build_student(teacher, work / s["name"], heads=s["kept_heads"], state_size=s["state_size"],
                      tokenizer=tokenizer, calibration_text=calibration_file, overwrite=True)

    console.print("evaluating the teacher ...")
    eval_start = time.perf_counter()
    teacher_result = {"name": "teacher", **evaluate(teacher, tokenizer, heldout_file, quick)}
    eval_seconds = time.perf_counter() - eval_start

    rates = measure_rates(work / students[0]["name"], teacher, tokenizer, recipe, device)
    # reserve per student: its evaluation (slower than the teacher's: first calls compile the recurrence), export
    remaining = time_limit - (time.perf_counter() - started) - len(students) * (max(3 * eval_seconds, 30) + 10)
    per_student = max(remaining / len(students), 1.0)
    seconds_per_token = STAGE2_SHARE / rates[2] + (1 - STAGE2_SHARE) / rates[3]
    fits = int(0.8 * per_student / seconds_per_token)  # 20% margin: stage switches, exports, data
    rate_text = f"stage 2 {rates[2]:,.0f} tok/s, stage 3 {rates[3]:,.0f} tok/s"
    if fits < budget:
        console.print(f"[yellow]{budget:,} tokens per student would not fit in the time limit ({rate_text}): "
                      f"using {fits:,}[/]")
        budget = fits
        recipe = recipe_for(budget, quick, args.seed, args.lr_stage2, args.lr_stage3)
    console.print(f"budget: {budget:,} tokens per student ({rate_text}, {per_student:.0f} s each)")

    rows = []
    for s in students:
        console.print(f"distilling {s['name']} ...")
        model, tokens, seconds, truncated = distill_student(
            work / s["name"], work / f"run-{s['name']}", teacher, tokenizer, recipe, device, per_student)
        row = {**s, "kept_heads": [list(h) for h in s["kept_heads"]], "tokens": tokens,
               "train_seconds": round(seconds, 1), "truncated": truncated,
               **evaluate(model, tokenizer, heldout_file, quick)}
        rows.append(row)
        console.print(_row_line(row))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

    result = {
        "students": rows,
        "teacher": teacher_result,
        "recipe": recipe.to_dict(),
        "budget_tokens": budget,
        "measured_tokens_per_s": {f"stage{k}": v for k, v in rates.items()},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "quick": quick,
        "torch": torch.__version__,
        "kv_items_per_size": 16 if quick else 200,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    print(table)
    if not quick:  # quick results are smoke tests (the *-quick.json files are git-ignored)
        out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out}" + ("" if quick else f" and {out.with_suffix('.md')}") + f" in {result['wall_seconds']:.0f} s")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _row_line(row: dict) -> str:
    kv = " ".join(f"{k}:{v:.2f}" for k, v in row["kv_retrieval"].items())
    return f"{row['name']}: KV {kv}  ppl {row['heldout_ppl']:.2f}  {row.get('tokens', 0):,} tokens"


def markdown(result: dict) -> str:
    head = "| model | kept heads | state | tokens | " + " | ".join(f"KV@{p}" for p in PAIRS) + " | held-out ppl |"
    lines = [head, "|" + "---|" * (5 + len(PAIRS))]
    t = result["teacher"]
    lines.append("| teacher | all 80 | – | – | " + " | ".join(f"{t['kv_retrieval'][str(p)]:.2f}" for p in PAIRS)
                 + f" | {t['heldout_ppl']:.2f} |")
    for r in result["students"]:
        kept = ", ".join(f"{l}.{h}" for l, h in r["kept_heads"]) or "none"
        note = " (time cap)" if r["truncated"] else ""
        lines.append(f"| {r['name']} | {kept} | {r['state_size']} | {r['tokens']:,}{note} | "
                     + " | ".join(f"{r['kv_retrieval'][str(p)]:.2f}" for p in PAIRS) + f" | {r['heldout_ppl']:.2f} |")
    lines.append(f"\n{result['device']}, {result['wall_seconds']:.0f} s wall, {result['kv_items_per_size']} KV items "
                 f"per size, stage 2 {result['recipe']['stages']['2']['tokens']:,} + stage 3 "
                 f"{result['recipe']['stages']['3']['tokens']:,} tokens budgeted per student.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
