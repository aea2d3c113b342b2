"""A real pretrained teacher end to end: SmolLM2-135M-Instruct (GGUF, Q4_1) scanned, cut down and distilled.

    python benchmarks/smollm2.py --teacher SmolLM2-135M-Instruct.Q4_1.gguf --data prose-train.txt.xz \\
        --work /tmp/smollm2 --time-limit 450
    (run the same command again: finished students are skipped, the rest continue)
    python benchmarks/smollm2.py --quick --work /tmp/q        # CPU smoke run on a tiny random Llama saved as GGUF

Several processes on one GPU, one --work (docs/distill.md, SmolLM2, has the session's commands):

    python benchmarks/smollm2.py --teacher T.gguf --work W --scan-only     # scan, teacher row, fidelity samples
    python benchmarks/smollm2.py --teacher T.gguf --work W --students top14-dm2-s8 --budget-tokens 3e6 \\
        --no-teacher --train-seconds 330 &                                   # one per student, side by side
    python benchmarks/smollm2.py --work W --collect --fidelity-out fidelity-smollm2.json   # no model loaded

Every fidelity number before this came from teacher-19m, trained in-house. Here the teacher is SmolLM2-135M-Instruct
(Llama architecture, 30 layers x 9 heads = 270 heads, 3 KV heads; the GGUF is dequantised by transformers on load):

1. scan its heads with the KV-retrieval probe (or read ``--scan``: a scan made elsewhere, e.g. on a CPU);
2. build, for each mixer of ``--mixers`` (default both: ``discrete_mamba2``, the paper's, and ``window_recurrent``
   with a 16-token window, radistill's default), four students of state size ``--state-size`` (default 8): the
   scan's top 2% and top 5% of heads (5 and 14 of 270), no heads, and as many random heads as the top-5% student
   from the lower-ranked half; names say the mixer (``top14-dm2-s8``, ``top14-wr16-s8``);
3. distill each with testbed_recovery.py's recipe (stage 2 on 20% of the tokens, stage 3 on 80%, recurrent parts
   trained) on general English prose (``--data``, the prose corpus), the same token budget for every student;
4. evaluate the teacher and each student: KV retrieval at 5/10/20 pairs (log-likelihood over the dictionary's
   values; SmolLM2 splits digits, so values are two-token numbers, scored as the sum of their tokens' log-probs),
   held-out prose perplexity, and label-free fidelity to the teacher (``radistill.eval.fidelity``).

Budget. ``--budget-tokens`` per student, or (default) the tokens that ``--student-seconds`` of training buy at the
training rate measured here after warm-up. The budget is decided once and kept in ``WORK/plan.json``, so a second
call trains the remaining students with the same budget; a call with another ``--budget-tokens`` is refused. With
``--budget-tokens`` nothing is measured, so parallel processes agree on the plan. ``--time-limit`` (seconds for this
call): a student is started only if its predicted time still fits (predicted from the measured rate, else from
``--train-seconds``, else from the last student of this call; the first student of an unmeasured call starts).
``--train-seconds`` stops a student's training after that long and still evaluates it (its row says ``truncated``).

Resumable and parallel: each student's row goes to ``WORK/<name>/row.json`` when it is done (its distilled weights
beside it), the teacher's to ``WORK/teacher.json`` (by ``--scan-only`` or the first call without ``--no-teacher``;
atomic writes, so a race leaves one whole file), what ``--collect`` needs besides to ``WORK/setup.json``; the results
(``benchmarks/results/smollm2.{json,md}``; --quick: ``smollm2-quick.json``) are rewritten after every row from what
``WORK`` holds, so a timeout keeps what was measured. Each row records mixer, window, state size, kept heads,
tokens and a one-line recipe summary; ``--fidelity-out`` writes the rows in benchmarks/fidelity.py's format, for
``fidelity.py --merge`` beside teacher-19m's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from testbed_recovery import (  # noqa: E402  (benchmarks/testbed_recovery.py: one recipe, one evaluation)
    Timings,
    chosen_students,
    distill_student,
    evaluate,
    measure_costs,
    recipe_for,
)
from distill import synchronizer  # noqa: E402  (benchmarks/distill.py)
from environment import versions as library_versions  # noqa: E402  (benchmarks/environment.py)
from fidelity import recipe_summary  # noqa: E402  (benchmarks/fidelity.py: the same one-line recipe summary)
from fidelity_candidates import WINDOW  # noqa: E402  (the window_recurrent students' span, as fidelity_candidates')
from radistill.hybrid.mixers.window import DEFAULT_SINK  # noqa: E402
from radistill.distill.data import heldout_documents, heldout_sequences  # noqa: E402
from radistill.distill.recipe import DistillRecipe, merge  # noqa: E402
from radistill.models.access import load_model, model_layout  # noqa: E402
from radistill.probes.items import EncodedItem, encode_items  # noqa: E402
from radistill.probes.kv import KVProbeConfig, kv_items  # noqa: E402
from radistill.utils.console import console  # noqa: E402
from radistill.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

SHARED = ROOT.parent / "shared" / "fixtures"
CORPUS = SHARED / "corpus" / "prose-train.txt.xz"
TOKENIZER_FOR_QUICK = SHARED / "teacher-19m"
PAIRS = (5, 10, 20)
KV_SEED = 1234  # evaluation items: not the scan's seed (0)
SHARES = (0.02, 0.05)  # kept heads: top 2% and top 5% of the teacher's heads
SCAN_PAIRS = 20
# the student mixers: (short tag in the student's name, window); window_recurrent is built as fidelity_candidates.py's
# window-rec variant (build_student's mixer/window options), the recurrence's state size is --state-size for both
MIXERS = {"discrete_mamba2": ("dm2", None), "window_recurrent": ("wr", WINDOW)}
CHECKPOINT_EVERY = 50  # optimizer steps between a student's checkpoints (50 x 8,192 tokens at --batch-size 16)


@dataclass
class EvalSet:
    """What testbed_recovery.evaluate reads: KV items per dictionary size and held-out windows ``[n, seq]``."""

    kv: dict[int, list[EncodedItem]]
    heldout: torch.Tensor


def head_count(share: float, total: int) -> int:
    """``share`` of ``total`` heads, rounded half up, at least 1 (2% of 270 = 5, 5% of 270 = 14)."""
    return max(1, int(share * total + 0.5))


def student_specs(ranked: list[tuple[int, int]], state_size: int, seed: int,
                  mixers: tuple[str, ...] = tuple(MIXERS)) -> list[dict]:
    """For each mixer: top 2% and top 5% of the ranking, no heads, and a random control (as many as top 5%) from the
    lower half (the same random heads for every mixer). Names say the mixer: ``top14-dm2-s8``, ``top14-wr16-s8``."""
    counts = sorted({head_count(s, len(ranked)) for s in SHARES})  # one student per count (tiny models: 1 and 1)
    lower_half = ranked[len(ranked) // 2 :]
    random_heads = sorted(random.Random(seed).sample(lower_half, min(counts[-1], len(lower_half))))
    specs = []
    for mixer in mixers:
        tag, window = MIXERS[mixer]
        label = f"{tag}{window or ''}-s{state_size}"
        kinds = [(f"top{k}", ranked[:k]) for k in counts]
        kinds += [("none", []), (f"random-low{counts[-1]}", random_heads)]
        # window heads get the build's attention sinks (DEFAULT_SINK): without them SmolLM2's windowed heads read
        # prose at perplexity 741-1,479 before any training, 43-58 with them (benchmarks/results/
        # window-smollm2-sinks-cpu.md)
        specs += [{"name": f"{kind}-{label}", "kept_heads": heads, "mixer": mixer, "window": window,
                   "sink": DEFAULT_SINK if window else None, "state_size": state_size} for kind, heads in kinds]
    return specs


def quick_teacher(work: Path) -> Path:
    """A tiny random Llama with teacher-19m's tokenizer, written as GGUF (what ``--quick`` distils)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from radistill.models.gguf import write_gguf

    path = work / "tiny-teacher.gguf"
    if path.exists():
        return path
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_FOR_QUICK))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, rms_norm_eps=1e-5)
    return write_gguf(LlamaForCausalLM(config), tokenizer, path)


def ranked_heads(args, teacher_spec: str, device: str, work: Path, layout) -> tuple[list[tuple[int, int]], dict]:
    """The teacher's heads best first, and where the ranking came from."""
    from radistill.scan.result import load_scan

    if args.scan is not None:
        result = load_scan(args.scan)
        source = str(args.scan)
    else:
        from radistill.scan.run import run_scan

        scan_dir = work / "scan"
        if (scan_dir / "scan.json").exists():  # a scan from an earlier call of this run
            result = load_scan(scan_dir)
        else:
            result = run_scan(teacher_spec, out=scan_dir, pairs=SCAN_PAIRS, samples=args.scan_samples, device=device)
        source = str(scan_dir / "scan.json")
    heads = [(h.layer, h.head) for h in result.heads]
    if len(heads) != layout.total_heads or max(l for l, _ in heads) >= layout.num_layers:
        raise SystemExit(f"{source} ranks {len(heads)} heads; the teacher has {layout.num_layers} layers x "
                         f"{layout.num_heads} heads: a scan of another model")
    return heads, {"source": source, "pairs": result.probe.get("pairs") if isinstance(result.probe, dict) else None,
                   "samples": result.probe.get("samples") if isinstance(result.probe, dict) else None,
                   "metric": result.metric, "top": [f"{l}.{h}" for l, h in heads[:14]]}


def fidelity_config(quick: bool):
    from radistill.eval.fidelity import FidelityConfig

    return (FidelityConfig(windows=4, window=64, samples=2, prompt=16, generate=32, greedy_prompts=2,
                           greedy_tokens=16, text_tokens=4096) if quick else FidelityConfig())


def fidelity_of(teacher, student, tokenizer, text_path: Path, quick: bool, batch: int, samples_file: Path) -> dict:
    """Label-free fidelity of ``student`` to ``teacher`` on held-out prose (``radistill.eval.fidelity``), in
    benchmarks/fidelity.py's row format (per text kind and split: KL, top-1, confident top-1; greedy agreement;
    attention reach). Every student is scored on the same teacher samples, kept in ``samples_file`` (the first
    call, or ``--scan-only``, writes them)."""
    from radistill.eval.fidelity import fidelity, table_summary

    stored = json.loads(samples_file.read_text()) if samples_file.exists() else None
    result = fidelity(teacher, tokenizer, student, tokenizer, str(text_path), fidelity_config(quick),
                      batch_size=batch, samples=stored)
    if stored is None:
        write_json_atomic(samples_file, result.samples)
    return table_summary(result.to_dict())


def versions() -> dict:
    out = library_versions()
    try:
        from importlib.metadata import version

        out["gguf"] = version("gguf")
    except Exception:  # noqa: BLE001 (report what we can)
        pass
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def collect(work: Path, names: list[str]) -> tuple[dict | None, list[dict]]:
    """The teacher's row and every finished student's row in ``work``: ``names``' order first, then any other
    student folder with a row (written by a process given another ``--students`` subset or ``--mixers``)."""
    teacher = json.loads((work / "teacher.json").read_text()) if (work / "teacher.json").exists() else None
    found = sorted(p.parent.name for p in work.glob("*/row.json"))
    order = [n for n in names if n in found] + [n for n in found if n not in names]
    return teacher, [json.loads((work / n / "row.json").read_text()) for n in order]


def results_of(work: Path, quick: bool) -> dict:
    """smollm2.json's content from what ``work`` holds (``setup.json``, ``plan.json``, the rows): no model loaded."""
    setup_file, plan_file = work / "setup.json", work / "plan.json"
    if not setup_file.exists():
        raise SystemExit(f"{work} has no setup.json: nothing of a run of benchmarks/smollm2.py to collect")
    setup = json.loads(setup_file.read_text())
    plan = json.loads(plan_file.read_text()) if plan_file.exists() else None
    teacher_row, rows = collect(work, setup["students"])
    done = {r["name"] for r in rows}
    return {**setup, "date": now(), "budget_tokens": plan["budget_tokens"] if plan else None, "plan": plan,
            "teacher": teacher_row, "students": rows, "pending": [n for n in setup["students"] if n not in done]}


def fidelity_rows(result: dict) -> dict:
    """The same rows in benchmarks/fidelity.py's format, for ``fidelity.py --merge`` beside other teachers' runs.
    KV here is smollm2.py's log-likelihood choice over the dictionary's values (``kv_method`` says so)."""
    def row(r: dict, teacher: bool) -> dict:
        heads = r.get("kept_heads", [])
        layout = result["teacher_layout"]
        return {"name": r["name"], "path": None,
                "kept_heads": layout["num_layers"] * layout["num_heads"] if teacher else len(heads),
                "heads": "all" if teacher else ",".join(heads),
                "mixer": None if teacher else r.get("mixer"), "window": None if teacher else r.get("window"),
                "sink": None if teacher else r.get("sink"),
                "state_size": None if teacher else r.get("state_size"),
                "tokens": None if teacher else r.get("tokens"),
                "recipe": "teacher" if teacher else r.get("recipe", "") + (
                    f" (training cut by --train-seconds at {r['tokens']:,} tokens)" if r.get("truncated") else ""),
                "truncated": None if teacher else r.get("truncated"),
                "kv": r["kv_retrieval"], "kv_gen": {}, "ppl": r["heldout_ppl"],
                **({"fidelity": r["fidelity"]} if r.get("fidelity") else {}), "suites": {},
                "train_seconds": r.get("train_seconds"), "date": r.get("date", result["date"])}

    rows = ([row(result["teacher"], True)] if result.get("teacher") else []) + [row(r, False)
                                                                                for r in result["students"]]
    return {"teacher": f"SmolLM2-135M-Instruct ({Path(result['teacher_file']).name})", "rows": rows,
            "settings": {"kv": {"pairs": result["kv_pairs"], "samples": result["kv_items_per_size"],
                                "method": "benchmarks/smollm2.py (testbed_recovery.evaluate)"},
                         "ppl_tokens": result["heldout_tokens"], "text": result["data"] + " (held-out documents)",
                         "fidelity": result.get("fidelity_config") or {}},
            "device": result["device"], "dtype": "bf16 (autocast)" if result["device"] != "cpu" else "float32",
            "versions": result["versions"], "date": result["date"], "quick": result["quick"],
            "kv_method": "log-likelihood choice over the dictionary's values (multi-token values: summed log-probs)"}


def markdown(result: dict) -> str:
    rows = ([result["teacher"]] if result.get("teacher") else []) + result["students"]
    fid = any(r.get("fidelity") for r in rows)
    head = ["model", "mixer", "state", "heads kept", "tokens"] + [f"KV@{p}" for p in PAIRS] + ["held-out ppl"]
    if fid:
        head += ["KL held-out", "top-1 held-out", "top-1 local", "top-1 long-range", "confident top-1",
                 "greedy agree"]
    budget = f"{result['budget_tokens']:,}" if result.get("budget_tokens") else "-"
    lines = [f"teacher {result['teacher_file']} ({result['teacher_layout']['num_layers']} layers x "
             f"{result['teacher_layout']['num_heads']} heads) on {result['device']}, {result['date']}; "
             f"budget {budget} tokens per student; versions {result['versions']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mixer = r.get("mixer")
        sink = f", sink {r['sink']}" if r.get("sink") else ""
        window = f" (W={r['window']}{sink})" if r.get("window") else ""
        cells = [r["name"], "-" if mixer is None else mixer + window,
                 str(r.get("state_size") or "-"),
                 str(len(r.get("kept_heads", []))) if "kept_heads" in r else "all",
                 (f"{r['tokens']:,}" + (" (cut)" if r.get("truncated") else "")) if "tokens" in r else "-"]
        cells += [f"{r['kv_retrieval'][str(p)]:.2f}" for p in PAIRS] + [f"{r['heldout_ppl']:.2f}"]
        if fid:
            f = r.get("fidelity") or {}
            held = f.get("heldout", {})
            cells += [_num(held.get("all", {}).get("kl"), ".3f"),
                      *(_num(held.get(s, {}).get("top1"), ".3f") for s in ("all", "local", "long")),
                      _num(held.get("all", {}).get("confident"), ".3f"),
                      _num((f.get("greedy") or {}).get("mean"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    recipes = [f"- {r['name']}: {r['recipe']}" for r in result["students"] if r.get("recipe")]
    if recipes:
        lines += ["", *recipes]
    if result.get("pending"):
        lines += ["", f"not yet run: {', '.join(result['pending'])} (run the same command again to continue)"]
    return "\n".join(lines)


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def write_results(work: Path, out: Path, quick: bool, fidelity_out: Path | None = None, extra: dict | None = None
                  ) -> dict:
    """Rewrite ``out`` (and its .md, and ``fidelity_out`` in fidelity.py's format) from what ``work`` holds."""
    result = {**results_of(work, quick), **(extra or {})}
    write_json_atomic(out, result)
    if not quick and result.get("plan"):
        write_text_atomic(out.with_suffix(".md"), markdown(result) + "\n")
    if fidelity_out is not None:
        from fidelity import render

        rows = fidelity_rows(result)
        write_json_atomic(fidelity_out, rows)
        write_text_atomic(fidelity_out.with_suffix(".md"), render(rows))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="the teacher: a .gguf file, DIR::FILE.gguf, or an HF model "
                        "directory (--quick: a tiny random Llama written as GGUF into --work)")
    parser.add_argument("--data", type=Path, default=CORPUS, help="training prose (.txt/.txt.xz, documents split "
                        "by <|endoftext|>); its held-out documents give perplexity and fidelity")
    parser.add_argument("--scan", type=Path, default=None, help="use this scan.json instead of scanning")
    parser.add_argument("--scan-samples", type=int, default=None, help="KV prompts of the scan (64; quick 4)")
    parser.add_argument("--work", type=Path, required=True, help="students, their rows and the plan (resumable)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run on a tiny random GGUF teacher")
    parser.add_argument("--state-size", type=int, default=8)
    parser.add_argument("--mixers", default=",".join(MIXERS),
                        help=f"mixers of the students' other heads, comma-separated (default: {', '.join(MIXERS)})")
    parser.add_argument("--budget-tokens", type=float, default=None, help="tokens per student (default: what "
                        "--student-seconds of training buy at the measured rate; quick 2,048). Give it to every "
                        "process of a parallel run: no measurement, one budget")
    parser.add_argument("--student-seconds", type=float, default=75.0,
                        help="training seconds per student that size the budget when --budget-tokens is not given")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for this call: start a student only if it is predicted to finish in time")
    parser.add_argument("--train-seconds", type=float, default=None, help="stop a student's training after this "
                        "long (its row says truncated, with the tokens it got; evaluation still runs): a safety net "
                        "for parallel processes whose speed was not measured")
    parser.add_argument("--students", default=None, help="comma-separated subset of the students (default: all; "
                        "'' = none: scan, teacher row and setup only)")
    parser.add_argument("--scan-only", action="store_true", help="prepare WORK for parallel student processes: "
                        "scan, the teacher's row, the fidelity samples and setup.json; no student")
    parser.add_argument("--no-teacher", action="store_true", help="do not evaluate the teacher here (another "
                        "process or --scan-only writes WORK/teacher.json)")
    parser.add_argument("--collect", action="store_true", help="only rewrite --out (and .md) from what WORK holds; "
                        "loads no model")
    parser.add_argument("--fidelity-out", type=Path, default=None, help="also write the rows in "
                        "benchmarks/fidelity.py's format here (+ .md), for fidelity.py --merge")
    parser.add_argument("--kv-items", type=int, default=None, help="KV items per dictionary size (100; quick 8)")
    parser.add_argument("--ppl-tokens", type=int, default=None, help="held-out tokens for perplexity "
                        "(65,536; quick 2,048)")
    parser.add_argument("--eval-batch", type=int, default=None, help="rows per evaluation forward (64; quick 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="training sequences per step (recipe: 64)")
    parser.add_argument("--lr-stage2", type=float, default=1e-3)
    parser.add_argument("--lr-stage3", type=float, default=5e-4)
    parser.add_argument("--no-fidelity", action="store_true", help="skip the fidelity report")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    quick = args.quick or device == "cpu"
    work = args.work
    if args.collect:  # quick or not as the run in WORK was, wherever this collects it
        setup = work / "setup.json"
        if not setup.exists():
            parser.error(f"--collect: {work} has no setup.json (not a --work of this script, or not started yet)")
        quick = json.loads(setup.read_text())["quick"]
    out = args.out or ROOT / "benchmarks" / "results" / ("smollm2-quick.json" if quick else "smollm2.json")
    if args.collect:
        result = write_results(work, out, quick, args.fidelity_out)
        print(markdown(result))
        print(f"wrote {out}" + ("" if quick else f" and {out.with_suffix('.md')}")
              + (f" and {args.fidelity_out}" if args.fidelity_out else ""))
        return 0
    mixers = tuple(m.strip() for m in args.mixers.split(",") if m.strip())
    if not mixers or set(mixers) - set(MIXERS):
        parser.error(f"--mixers {args.mixers!r}: choose from {', '.join(MIXERS)}")
    if device == "cpu":
        torch.set_num_threads(1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    work.mkdir(parents=True, exist_ok=True)
    if args.teacher is None and not args.quick:
        parser.error("--teacher is required (the SmolLM2 GGUF file), except with --quick")
    if not args.data.exists():
        parser.error(f"--data {args.data} does not exist")
    teacher_spec = args.teacher or str(quick_teacher(work))
    timings = Timings(synchronizer(device))
    kv_per_size = args.kv_items or (8 if quick else 100)
    ppl_tokens = args.ppl_tokens or (2048 if quick else 65536)
    eval_batch = args.eval_batch or (8 if quick else 64)
    args.scan_samples = args.scan_samples or (4 if quick else 64)

    def recipe_of(tokens: int) -> DistillRecipe:
        # a checkpoint every CHECKPOINT_EVERY steps (testbed_recovery's recipe writes them only at stage ends): these
        # students share a GPU inside time-limited calls, and one cut mid-stage continues from there, not from the
        # stage's start (on the H200, 2026-12-05, six students cut at stage-3 steps 60-260 of 293 restarted at 0)
        recipe = merge(recipe_for(tokens, quick, args.seed, args.lr_stage2, args.lr_stage3),
                       {"data": {"source": str(args.data)},
                        "stages": {k: {"checkpoint_every": CHECKPOINT_EVERY} for k in (2, 3)}})
        if args.batch_size:
            recipe = merge(recipe, {"stages": {k: {"batch_size": args.batch_size} for k in (2, 3)}})
            recipe = recipe_for_batch(recipe, tokens)
        return recipe

    from radistill.hybrid.build import build_student

    with timings("load teacher (GGUF dequantised on the CPU)"):
        teacher, tokenizer = load_model(teacher_spec, dtype="fp32", device="cpu", attn_implementation="sdpa")
        layout = model_layout(teacher)
        if device == "cuda":
            teacher.to(device)  # fp32 on the GPU while the students are built (calibration in fp32)
    with timings("scan (or read --scan)"):
        ranked, scan_info = ranked_heads(args, teacher_spec, device, work, layout)
    every = student_specs(ranked, args.state_size, args.seed, tuple(MIXERS))
    students = student_specs(ranked, args.state_size, args.seed, mixers)
    students = [] if args.scan_only or args.students == "" else chosen_students(parser, students, args.students)

    plan_file = work / "plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.exists() else None
    if plan is not None and plan["teacher"] != teacher_spec:
        parser.error(f"{work} holds a run of teacher {plan['teacher']}, not {teacher_spec}: use another --work")
    if plan is not None and args.budget_tokens is not None and \
            plan["recipe"] != json.loads(json.dumps(recipe_of(int(args.budget_tokens)).to_dict())):
        parser.error(f"{plan_file} holds another budget or recipe ({plan['budget_tokens']:,} tokens) than "
                     f"--budget-tokens {int(args.budget_tokens):,} with these options: one budget per --work")

    with timings("build students"):
        for s in students:
            done = (work / s["name"] / "row.json").exists()  # finished in an earlier call (maybe on another machine)
            if not done and not (work / s["name"] / "config.json").exists():
                build_student(teacher, work / s["name"], heads=s["kept_heads"], mixer=s["mixer"], window=s["window"],
                              sink=s.get("sink"), state_size=s["state_size"], tokenizer=tokenizer,
                              calibration_data=args.data, calibration_tokens=2048 if quick else 16384, overwrite=True)
    if device == "cuda":
        teacher.to(torch.bfloat16)  # the teacher of distillation and evaluation, as testbed_recovery loads it

    with timings("setup (probe items, held-out text)"):
        recipe = recipe_of(int(plan["budget_tokens"]) if plan else 2048)
        evalset = EvalSet(
            kv={p: encode_items(tokenizer, kv_items(tokenizer, KVProbeConfig(pairs=p, samples=kv_per_size,
                                                                          seed=KV_SEED))) for p in PAIRS},
            heldout=heldout_sequences(recipe.data, tokenizer, recipe.stage(3).seq_len,
                                      max(1, ppl_tokens // recipe.stage(3).seq_len)))
        heldout_text = work / "heldout.txt"
        if not heldout_text.exists():
            write_text_atomic(heldout_text, "\n\n".join(heldout_documents(recipe.data)))
    fidelity_samples = work / "fidelity-samples.json"

    # what --collect needs besides the rows; every process writes the same (atomically), the last one stays
    write_json_atomic(work / "setup.json", {
        "teacher_file": teacher_spec, "teacher_layout": layout.to_dict(), "scan": scan_info,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "versions": versions(), "quick": quick, "kv_items_per_size": kv_per_size, "kv_pairs": list(PAIRS),
        "heldout_tokens": int(evalset.heldout.numel()), "data": str(args.data), "state_size": args.state_size,
        "fidelity_config": None if args.no_fidelity else fidelity_config(quick).to_dict(),
        "students": [s["name"] for s in every]})

    def results() -> dict:
        return write_results(work, out, quick, args.fidelity_out, {"timings_this_call": timings.to_dict()})

    if not (work / "teacher.json").exists() and not args.no_teacher:
        console.print("evaluating the teacher ...")
        with timings("eval: teacher"):
            row = {"name": "teacher", **evaluate(teacher, evalset, device, eval_batch), "date": now()}
        write_json_atomic(work / "teacher.json", row)  # atomic: a parallel process writing it too leaves one whole
    if args.scan_only and not args.no_fidelity and not fidelity_samples.exists():
        with timings("fidelity samples (the teacher against itself)"):
            fidelity_of(teacher, teacher, tokenizer, heldout_text, quick, eval_batch // 4 or 1, fidelity_samples)
    results()
    if (work / "teacher.json").exists():
        console.print(f"teacher: {json.loads((work / 'teacher.json').read_text())}")
    if not students:
        console.print(f"prepared {work} (scan, setup{'' if args.no_teacher else ', teacher row'}): no student here")
        print("\n" + timings.table())
        return 0

    if plan is None:
        if args.budget_tokens is not None:  # a fixed budget: nothing to measure (parallel processes agree on it)
            recipe = recipe_of(int(args.budget_tokens))
            plan = {"seconds_per_token": None, "trainer_overhead_s": None}
        else:
            console.print(f"measuring the training rate after warm-up on {students[0]['name']} ...")
            with timings("measure throughput"):
                probe, _ = load_model(work / students[0]["name"], dtype="fp32", device=device)
                rates, trainer_fixed = measure_costs(probe, teacher, tokenizer, recipe, device, work / "run-probe")
                del probe
            stage_tokens = {k: recipe.stage(k).tokens for k in rates}
            seconds_per_token = sum(stage_tokens[k] / rates[k] for k in rates) / sum(stage_tokens.values())
            recipe = recipe_of(2048 if quick else int(args.student_seconds / seconds_per_token))
            plan = {"seconds_per_token": seconds_per_token,
                    "measured_tokens_per_s": {f"stage{k}": round(v, 1) for k, v in rates.items()},
                    "trainer_overhead_s": round(trainer_fixed, 2)}
        budget = sum(recipe.stage(k).tokens for k in recipe.enabled_stages())  # whole steps
        plan = {"teacher": teacher_spec, "budget_tokens": budget, **plan, "recipe": recipe.to_dict()}
        write_json_atomic(plan_file, plan)  # parallel processes with one --budget-tokens write the same plan
    recipe = merge(DistillRecipe(), plan["recipe"])  # the plan's recipe itself: every process trains the same
    summary = recipe_summary(recipe.to_dict())[1]
    predicted_train = (plan["seconds_per_token"] * plan["budget_tokens"] + plan["trainer_overhead_s"] + 30
                       if plan.get("seconds_per_token") else None)
    console.print(f"budget: {plan['budget_tokens']:,} tokens per student"
                  + (f" ({predicted_train:.0f} s predicted each)" if predicted_train
                     else " (fixed; rate not measured)"))
    results()

    per_student = None  # measured in this call: the last student's wall seconds
    for s in students:
        if (work / s["name"] / "row.json").exists():
            console.print(f"{s['name']}: done in an earlier call, skipped")
            continue
        # None: a fixed budget's first student without --train-seconds, nothing measured yet (it starts)
        predicted = per_student or predicted_train or (args.train_seconds + 60 if args.train_seconds else None)
        if args.time_limit is not None and predicted is not None and timings.elapsed() + predicted > args.time_limit:
            console.print(f"[yellow]{s['name']}: {predicted:.0f} s predicted, {args.time_limit - timings.elapsed():.0f}"
                          " s left: stopping here; run the same command again to continue[/]")
            break
        started = time.perf_counter()
        console.print(f"distilling {s['name']} ...")
        model, _ = load_model(work / s["name"], dtype="fp32", device=device)
        tokens, truncated, stage_seconds = distill_student(
            model, work / f"run-{s['name']}", teacher, tokenizer, recipe, device, args.train_seconds, timings,
            s["name"])
        with timings(f"{s['name']}: eval"):
            row = {**s, "kept_heads": [f"{l}.{h}" for l, h in s["kept_heads"]], "tokens": tokens,
                   "truncated": truncated,
                   "recipe": summary, "train_seconds": {f"stage{k}": round(v, 1) for k, v in stage_seconds.items()},
                   **evaluate(model, evalset, device, eval_batch)}
            if not args.no_fidelity:
                model.eval()
                row["fidelity"] = fidelity_of(teacher, model, tokenizer, heldout_text, quick, eval_batch // 4 or 1,
                                              fidelity_samples)
        row["date"] = now()
        model.save_pretrained(work / s["name"] / "distilled")
        write_json_atomic(work / s["name"] / "row.json", row)
        results()
        console.print(f"{s['name']}: KV {row['kv_retrieval']}  ppl {row['heldout_ppl']:.2f}  {tokens:,} tokens")
        per_student = time.perf_counter() - started
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

    result = results()
    print(markdown(result))
    print("\n" + timings.table())
    print(f"wrote {out}" + ("" if quick else f" and {out.with_suffix('.md')}"))
    return 0


def recipe_for_batch(recipe: DistillRecipe, tokens: int) -> DistillRecipe:
    """``recipe`` with each stage's tokens rounded to whole steps of its (changed) batch size, same 20/80 split."""
    steps = {}
    for k in (2, 3):
        cfg = recipe.stage(k)
        per_step = cfg.seq_len * cfg.batch_size * cfg.grad_accum
        share = cfg.tokens / max(1, recipe.stage(2).tokens + recipe.stage(3).tokens)
        steps[k] = {"tokens": max(1, int(tokens * share) // per_step) * per_step}
    return merge(recipe, {"stages": steps})


if __name__ == "__main__":
    raise SystemExit(main())
