"""Sliding-window students against distilled DiscreteMamba2 students at equal cache bytes: KV retrieval, capability
suites, fidelity, held-out perplexity and cache bytes (computed and measured).

    python benchmarks/window.py --quick --out window-cpu          # CPU, small item counts and budgets, <= 5 min
    python benchmarks/window.py --device cuda --fidelity          # teacher-19m, one H200 -> results/window.{json,md}
    python benchmarks/window.py --device cuda --fidelity --teacher /tmp/g/smol.gguf --scan /tmp/smol/scan/scan.json \
        --pairs 5,10,20 --out window-smollm2                       # SmolLM2-135M (GGUF) -> results/window-smollm2.*
    python benchmarks/window.py --device cuda --students RUN/stage3 ...   # rows of students distilled elsewhere

Training-free students (no training, no calibration: ``radistill build --keep G --mixer window --window W``): the
scan's top G heads stay full attention, every other head keeps its teacher Q/K/V/RoPE and sees only the last W
tokens; G in {3, 8} for every W in {8, 16, 32, 64}, and the no-global control (G = 0) at W = 16 (``--globals``,
``--windows``, ``--controls``), each with no attention sinks and with ``--sinks`` S (every query also sees its
document's first S tokens, as StreamingLLM keeps them).

Distilled students (``--distill``, default both; distilled here with benchmarks/testbed_recovery.py's recipe and
``distill_student``, ``--distill-tokens`` each, ``--train-seconds`` caps each one's training), with the top
``--distill-globals`` (3) heads kept:

  dm2               the paper's student: every other head a DiscreteMamba2 head whose state N is chosen so that its
                    cache per sequence equals (is closest to) the W-token window student's with the same kept heads,
                    W = ``--match-window`` (16). A W-token window holds K and V of W tokens per KV head
                    (2 W head_dim values; with the build's sinks W + 4), a DiscreteMamba2 head N x head_dim per query
                    head plus its conv state:
                    ``matching_state`` works N out from radistill.hybrid.memory's arithmetic (teacher-19m, 8 query
                    heads on 4 KV heads: N = W minus the conv state's share).
  window_recurrent  the default student (``radistill build``'s mixer): the teacher head over its last 16 tokens plus
                    a gated DiscreteMamba2 recurrence (state 64, the mixer's default); it holds both caches.

``--students DIR ...`` adds rows of students distilled elsewhere (labelled from their config); given alone it
replaces the in-run distillation (pass ``--distill dm2,window_recurrent`` to have both).

The scan is radistill's own (KV probe, 20 pairs, seed 0) unless ``--scan scan.json`` gives one. Evaluation: KV
retrieval by dictionary size (``radistill.eval.kv``, log-likelihood multiple choice, items seeded apart from the
scan), teacher-19m's capability suites (records, facts; only for that teacher: ``--suites``/``--no-suites``),
``radistill.eval.fidelity`` against the teacher (``--fidelity``), perplexity on held-out prose documents (the
testbed's held-out split), cache bytes per sequence at 2k/8k tokens (bf16), COMPUTED from the config by
``radistill.hybrid.memory`` and MEASURED (``--measure``, on unless --quick): the bytes of the cache tensors a real
bf16 prefill of that many tokens leaves (``measure_cache_bytes``). Rows are written as each finishes (a run cut by
a time limit keeps them; ``complete`` says whether it finished).

Last, the serving limits of the Nanbeige4.1-3B shape in 24 GiB (bf16, memplan's 5% reserve): teacher, the SSM
(DiscreteMamba2) student, window_recurrent students and window students side by side, all from
``radistill.memplan`` (``serving_limits`` on meta models, as benchmarks/gpu24.py plans them): COMPUTED, not measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from testbed_recovery import (  # noqa: E402
    CORPUS, KV_SEED, TEACHER, Timings, distill_student, fidelity_scores, heldout_perplexity, recipe_for,
    suite_scores,
)
from distill import synchronizer  # noqa: E402
from radistill.distill.data import heldout_sequences  # noqa: E402
from radistill.eval.kv import KVEvalConfig, kv_retrieval  # noqa: E402
from radistill.hybrid.build import build_student, convert, select_heads, student_config  # noqa: E402
from radistill.hybrid.memory import (  # noqa: E402
    measure_cache_bytes, student_rows, teacher_rows, with_build_defaults,
)
from radistill.hybrid.mixers.window import DEFAULT_SINK  # noqa: E402
from radistill.models.access import load_model, model_layout  # noqa: E402
from radistill.scan.result import load_scan  # noqa: E402
from radistill.scan.run import probe_items, scan_model  # noqa: E402
from radistill.utils.io import write_json_atomic, write_text_atomic  # noqa: E402
from environment import device_label, versions  # noqa: E402

GLOBAL = (3, 8)
WINDOWS = (8, 16, 32, 64)
CONTROL_WINDOWS = (16,)  # where the no-global control (G = 0) runs
PAIRS = (5, 10, 20, 40)
LENGTHS = (2048, 8192)
DISTILLED = ("dm2", "window_recurrent")
# per student: a short budget that fits one GPU call beside the evaluations (fidelity_candidates' DiscreteMamba2
# student trained 6.9M tokens in 194 s on a shared H200, its window_recurrent one in 148 s): about 60 s each
DISTILL_TOKENS = 2_097_152
SERVING_BUDGET_GIB, SERVING_KEEP, SERVING_STATE, SERVING_CONTEXT = 24, 13, 8, 32768  # as benchmarks/gpu24.py


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized item counts and budgets")
    p.add_argument("--device", default="cpu")
    p.add_argument("--teacher", default=str(TEACHER), help="directory, HF id or GGUF file [teacher-19m]")
    p.add_argument("--scan", help="scan.json of the teacher (default: scan it here)")
    p.add_argument("--students", nargs="*", default=[], help="student directories to evaluate the same way")
    p.add_argument("--kv-samples", type=int, help="KV items per dictionary size [quick 24, else 128]")
    p.add_argument("--ppl-tokens", type=int, help="held-out tokens for perplexity [quick 1024, else 65536]")
    p.add_argument("--windows", help=f"window sizes [quick 16,64, else {','.join(map(str, WINDOWS))}]")
    p.add_argument("--sinks", default=str(DEFAULT_SINK), help="attention sinks of the training-free students: each "
                   f"query also sees its document's first S tokens; one row per S [{DEFAULT_SINK}, the build's]")
    p.add_argument("--globals", default=",".join(map(str, GLOBAL)),
                   help="kept (global) head counts of the training-free students; '' for none [%(default)s]")
    p.add_argument("--controls", default=",".join(map(str, CONTROL_WINDOWS)),
                   help="windows (of --windows) that also get the no-global control G = 0; '' for none [%(default)s]")
    p.add_argument("--pairs", help=f"KV dictionary sizes [quick 10,40, else {','.join(map(str, PAIRS))}]")
    p.add_argument("--distill", default=None,
                   help=f"students to distill here: {','.join(DISTILLED)} or '' [all; none when --students is given]")
    p.add_argument("--distill-tokens", type=float, help=f"tokens per distilled student [quick 2048, else "
                   f"{DISTILL_TOKENS:,}]")
    p.add_argument("--distill-globals", type=int, default=3, help="kept heads of the distilled students [3]")
    p.add_argument("--match-window", type=int, default=16, help="W whose cache bytes the dm2 student matches [16]")
    p.add_argument("--train-seconds", type=float, help="stop each student's training after this long (its row says "
                   "truncated)")
    p.add_argument("--work", help="distilled students' directories (default: a temporary folder)")
    p.add_argument("--measure", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure cache bytes with a real bf16 prefill [on; off with --quick]")
    p.add_argument("--lengths", help=f"sequence lengths of the cache columns [{','.join(map(str, LENGTHS))}]")
    p.add_argument("--suites", action=argparse.BooleanOptionalAction, default=None,
                   help="teacher-19m's capability suites [on for teacher-19m only]")
    p.add_argument("--fidelity", action="store_true", help="radistill.eval.fidelity of every student")
    p.add_argument("--out", default="window", help="results stem under benchmarks/results/ [window]")
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--merge", nargs="+", metavar="JSON", help="write --out from these runs' results instead of running "
                   "(runs of one teacher side by side, e.g. the training-free rows and the distilled rows on one GPU): "
                   "the first run's teacher row and settings, every run's student rows")
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def ranking(teacher, tokenizer, name: str, scan: str | None, quick: bool, save_to: Path):
    """The heads best first, and where the scan is (a fresh scan is saved to ``save_to`` for reuse: --scan)."""
    if not scan:
        items, probe = probe_items(tokenizer, pairs=20, samples=8 if quick else 16, seed=0, probe_file=None)
        scan = str(scan_model(teacher, tokenizer, name, items=items, probe=probe).save(save_to))
    heads = [(h.layer, h.head) for h in load_scan(scan).heads]
    layers, per_layer = teacher.config.num_hidden_layers, teacher.config.num_attention_heads
    if len(heads) != layers * per_layer or any(l >= layers or h >= per_layer for l, h in heads):
        raise SystemExit(f"{scan} ranks {len(heads)} heads; the teacher has {layers} layers x {per_layer} heads: "
                         "a scan of another model")
    return heads, scan


def kept_per_layer(teacher, heads: list[tuple[int, int]]) -> list[list[int]]:
    layers = teacher.config.num_hidden_layers
    return select_heads(teacher, heads=heads).kept_per_layer(layers) if heads else [[] for _ in range(layers)]


def window_student(teacher, heads: list[tuple[int, int]], window: int, sink: int = 0):
    """The training-free student: ``heads`` full attention, every other head a window of ``window`` tokens (and the
    first ``sink`` tokens)."""
    config = student_config(teacher, kept_per_layer(teacher, heads), "window",
                            {"window": window, **({"sink": sink} if sink else {})})
    return convert(teacher, config).eval()


def cache_bytes(config, length: int) -> int:
    """Computed bf16 cache bytes of one sequence of ``length`` tokens: KV (full and windowed), SSM and conv state."""
    (row,) = student_rows(config, [length], 2)
    return row.total_bytes + row.conv_bytes


def matching_state(teacher, heads: list[tuple[int, int]], window: int, length: int = max(LENGTHS)) -> int:
    """The DiscreteMamba2 state size N (a multiple of 4) whose student's cache per sequence of ``length`` tokens is
    closest to the ``window``-token window student's with the same kept ``heads`` (the smaller N on a tie)."""
    kept = kept_per_layer(teacher, heads)
    target = cache_bytes(student_config(teacher, kept, "window", with_build_defaults("window", {"window": window})),
                         length)
    return min(range(4, 4 * window + 5, 4), key=lambda n: (abs(cache_bytes(student_config(
        teacher, kept, "discrete_mamba2", {"state_size": n}), length) - target), n))


def student_labels(model) -> dict:
    """The table's columns for a loaded student: its mixer, kept heads, window and state size (from its config)."""
    config = model.config
    if getattr(config, "model_type", "") != "radistill_hybrid":
        return {"mixer": config.model_type}
    names = {name for i in range(config.num_hidden_layers) for name, _, _ in config.mixer_groups(i)}
    settings = config.mixer_settings or {}
    return {"mixer": "+".join(sorted(names)) or config.mixer, "global": config.num_kept_heads,
            "window": settings.get("window", "-"), "sink": settings.get("sink", "-") if "window" in settings else "-",
            "state": settings.get("state_size", "-")}


def _relative(path: str) -> str:
    return str(Path(path).resolve().relative_to(ROOT)) if Path(path).resolve().is_relative_to(ROOT) else str(path)


def measured_cache(model, lengths) -> dict[str, dict[str, int]]:
    """{length: {kind: bytes}} per sequence of the cache tensors a bf16 prefill of each length leaves (kinds kv,
    ssm, conv, total; on CUDA also allocated). A bf16 copy of ``model`` runs it, so the numbers compare with the
    computed bf16 column; a kind the cache keeps in another dtype (the SSM state in fp32) shows up as a
    difference."""
    twin = copy.deepcopy(model).to(torch.bfloat16)
    try:
        with torch.inference_mode():
            return {str(n): measure_cache_bytes(twin, n) for n in lengths}
    finally:
        del twin


def evaluate(model, tokenizer, heldout, args, device: str) -> dict:
    model.to(device).eval()
    config = KVEvalConfig(pairs=args.pairs, samples=args.kv_samples, seed=KV_SEED, generate=False)
    batch = 64 if device.startswith("cuda") else 16
    results = {t.name: t.value for t in kv_retrieval(model, tokenizer, config, batch_size=batch)}
    row = {"kv_retrieval": {str(p): results[f"kv_ret@{p}"] for p in args.pairs},
           "heldout_ppl": heldout_perplexity(model, heldout, 4, device)}
    if args.suites:
        row["suites"] = suite_scores(model, tokenizer, batch, args.quick)
    if getattr(model.config, "model_type", "") == "radistill_hybrid":
        rows = student_rows(model.config, list(args.lengths), 2)
    else:
        rows = teacher_rows(model_layout(model), list(args.lengths), 2)
    row["cache_bytes_bf16"] = {str(r.length): r.total_bytes + r.conv_bytes for r in rows}
    if args.measure:
        kinds = measured_cache(model, args.lengths)
        row["cache_bytes_measured"] = {n: k["total"] for n, k in kinds.items()}
        row["cache_bytes_measured_kinds"] = kinds
    return row


def distilled_specs(teacher, ranked, args) -> list[dict]:
    """The in-run distilled students (``--distill``): name and build options."""
    heads = ranked[: args.distill_globals]
    specs = {
        "dm2": {"mixer": "discrete_mamba2",
                "state_size": matching_state(teacher, heads, args.match_window), "matches_window": args.match_window},
        "window_recurrent": {"mixer": "window_recurrent"},  # the mixer's defaults (window 16, state 64)
    }
    chosen = [n.strip() for n in args.distill.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(specs))
    if unknown:
        raise SystemExit(f"--distill {args.distill}: unknown {unknown}; choose from {', '.join(specs)}")
    return [{"name": f"{name}-top{args.distill_globals}", "heads": heads, **specs[name]} for name in chosen]


def distill_one(spec: dict, teacher, tokenizer, args, device: str, work: Path) -> tuple:
    """Build ``spec``'s student from the teacher (calibrated on the corpus) and distill it with the testbed's recipe.
    Returns (model, row fields about the training)."""
    out = work / spec["name"]
    build = {k: spec[k] for k in ("mixer", "state_size") if k in spec}
    build_student(teacher.cpu(), out, heads=spec["heads"], tokenizer=tokenizer, calibration_data=CORPUS,
                  calibration_tokens=2048 if args.quick else 16384, overwrite=True, device="cpu", dtype="fp32",
                  **build)
    model, _ = load_model(out, dtype="fp32", device=device)
    recipe = recipe_for(args.distill_tokens, args.quick, 0)
    timings = Timings(synchronizer(device))
    started = time.perf_counter()
    tokens, truncated, stages = distill_student(model, work / f"run-{spec['name']}", teacher.to(device), tokenizer,
                                                recipe, device, args.train_seconds, timings, spec["name"])
    return model, {"distilled_tokens": tokens, "truncated": truncated,
                   "train_seconds": round(time.perf_counter() - started, 1),
                   "stage_seconds": {f"stage{k}": round(v, 1) for k, v in stages.items()},
                   **({"matches_window": spec["matches_window"]} if "matches_window" in spec else {})}


def serving_rows() -> dict:
    """Nanbeige4.1-3B shape, 24 GiB (memplan's 5% reserve), bf16: the teacher, the SSM student, window_recurrent and
    window students, each from ``radistill.memplan.estimate.serving_limits`` on meta models. All computed."""
    from radistill.memplan.estimate import GiB, serving_limits
    from radistill.memplan.plan import make_plan
    from radistill.memplan.shapes import Shapes
    from radistill.models import presets

    config = presets.shape_config("nanbeige4.1-3b")
    plan = make_plan(config, int(SERVING_BUDGET_GIB * GiB), keep=SERVING_KEEP, state_size=SERVING_STATE,
                     serving_context=SERVING_CONTEXT, steps=())
    rows = {"teacher": plan.serving["teacher"].to_dict(),
            f"ssm K={SERVING_KEEP} N={SERVING_STATE}": plan.serving["student"].to_dict()}
    students = [("window_recurrent", {"window": 16, "state_size": SERVING_STATE}, f"W=16 N={SERVING_STATE}"),
                ("window_recurrent", {"window": 16}, "W=16 N=64"),
                ("window", {"window": 16}, "W=16"), ("window", {"window": 64}, "W=64")]
    teacher = Shapes(config, keep=SERVING_KEEP, state_size=SERVING_STATE).teacher  # a meta model
    from radistill.memplan.shapes import hypothetical_kept_heads

    for mixer, settings, label in students:
        hybrid = student_config(teacher, hypothetical_kept_heads(config, SERVING_KEEP), mixer,
                                with_build_defaults(mixer, settings))
        limits = serving_limits(Shapes(hybrid), "student", plan.budget, "bf16", SERVING_CONTEXT)
        rows[f"{mixer} K={SERVING_KEEP} {label}"] = limits.to_dict()
    return {"budget_gib": SERVING_BUDGET_GIB, "budget_bytes": plan.budget, "computed": True, "rows": rows}


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _kib(value) -> str:
    return "-" if value is None else f"{value / 2**10:,.0f} KiB"


def markdown(result: dict) -> str:
    pairs = result["pairs"]
    lengths = result.get("lengths", list(LENGTHS))
    measured = any("cache_bytes_measured" in r for r in [result["teacher"], *result["students"]])
    cache_heads = [f"cache {n // 1024}k" if n >= 1024 else f"cache {n}" for n in lengths]
    if measured:
        cache_heads += [f"{h} measured" for h in cache_heads]
    lines = [f"# Window students against distilled students, {result.get('teacher_name', 'teacher-19m')} "
             f"({result['device']})", "",
             f"KV retrieval (log-likelihood, {result['kv_items_per_size']} items per size, seed {KV_SEED}); suites "
             f"(multiple choice); fidelity on held-out prose (KL to the teacher, confident top-1 agreement); held-out "
             f"perplexity on {result['heldout_tokens']} tokens; cache per sequence in bf16, computed from the config"
             + (" and measured after a bf16 prefill" if measured else "") + "."
             + (f" Distilled rows: {result['distill_tokens']:,} tokens each (the `tokens` column: what was trained)."
                if result.get("distill_tokens") else ""), "",
             "| model | mixer | global | W | sink | N | tokens | " + " | ".join(f"KV@{p}" for p in pairs) +
             " | records | facts | ppl | KL | confident top-1 | " + " | ".join(cache_heads) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * (len(pairs) + 5 + len(cache_heads))]
    for row in [result["teacher"], *result["students"]]:
        kv = " | ".join(f"{row['kv_retrieval'][str(p)]:.2f}" for p in pairs)
        cache = [_kib(row["cache_bytes_bf16"].get(str(n))) for n in lengths]
        if measured:
            cache += [_kib(row.get("cache_bytes_measured", {}).get(str(n))) for n in lengths]
        labels = " | ".join(str(row.get(k, "-")) for k in ("mixer", "global", "window", "sink", "state"))
        tokens = f"{row['distilled_tokens']:,}" if "distilled_tokens" in row else "-"
        suites = " | ".join(_cell((row.get("suites") or {}).get(k)) for k in ("records", "facts"))
        held = (row.get("fidelity") or {}).get("texts", {}).get("heldout", {}).get("all", {})
        fid = " | ".join(_cell(held.get(k)) for k in ("kl", "confident"))
        lines.append(f"| {row['name']} | {labels} | {tokens} | {kv} | {suites} | {row['heldout_ppl']:.2f} | {fid} | "
                     f"{' | '.join(cache)} |")
    if measured:
        lines += ["", "Computed: radistill.hybrid.memory at 2 bytes per value. Measured: the bytes of the cache "
                  "tensors "
                  "after a prefill of a bf16 copy (`cache_bytes_measured_kinds` in the JSON splits them into kv, ssm, "
                  "conv); where they differ, the cache keeps that part in another dtype (the SSM state: fp32)."]
    matched = [r for r in result["students"] if "matches_window" in r]
    for r in matched:
        lines += ["", f"{r['name']}: state N = {r['state']} gives the cache bytes of a W = {r['matches_window']} "
                  "window "
                  "student with the same kept heads (closest multiple of 4, radistill.hybrid.memory's arithmetic)."]
    serving = result["serving"]
    lines += ["", f"Nanbeige4.1-3B shape in {serving['budget_gib']} GiB (memplan's 5% reserve), bf16, COMPUTED "
              "(memplan's serving_limits on meta models, not measured; benchmarks/results/24gb.json has the measured "
              "teacher and SSM rows):", "",
              "| model | weights GiB | KV B/token | state MiB | max context (batch 1) | max batch at 32k |",
              "|---|---|---|---|---|---|"]
    for name, r in serving["rows"].items():
        lines.append(f"| {name} | {r['weights_bytes'] / 2**30:.2f} | {r['kv_bytes_per_token']:,} | "
                     f"{r['state_bytes'] / 2**20:.2f} | {r['max_context_b1']:,} | {r['max_batch']:,} |")
    if not result.get("complete", True):
        lines += ["", "**Incomplete**: the run was cut before every student was evaluated."]
    if result.get("serving_note"):
        lines += ["", f"Note: {result['serving_note']}."]
    lines += ["", "Every student is capped by the model's 262,144 positions; the window student keeps the teacher's "
              "weights (its heads keep Q/K/V), the SSM student's in_proj is larger (its z gate), window_recurrent "
              "holds both the window's projections and the recurrence's."]
    return "\n".join(lines) + "\n"


def progress(row: dict, start: float) -> None:
    """One line per evaluated model as the run goes: its KV by pairs and perplexity."""
    kv = " ".join(f"{p}:{v:.2f}" for p, v in row["kv_retrieval"].items())
    print(f"{row['name']:>24}  KV {kv}  ppl {row['heldout_ppl']:.2f}  ({time.time() - start:.0f} s)", flush=True)


def merge_runs(paths: list[Path]) -> dict:
    """One result from several runs of the same teacher and settings: the first run's teacher row and settings, the
    student rows of all, in order; ``runs`` records each file's device, duration and completeness."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]
    for path, run in zip(paths[1:], runs[1:]):
        for key in ("teacher_name", "pairs", "lengths", "kv_items_per_size", "heldout_tokens"):
            if run.get(key) != first.get(key):
                raise SystemExit(f"--merge: {path} has {key} {run.get(key)!r}, {paths[0]} {first.get(key)!r}")
    merged = {**first, "students": [row for run in runs for row in run["students"]],
              "distill_tokens": next((r["distill_tokens"] for r in runs if r.get("distill_tokens")), None),
              "complete": all(r.get("complete") for r in runs),
              "runs": [{"file": _relative(str(p)), "seconds": r.get("seconds"), "complete": r.get("complete"),
                        "device": r.get("device")} for p, r in zip(paths, runs)]}
    return merged


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        out = Path(args.results_dir) / args.out
        result = merge_runs([Path(p) for p in args.merge])
        write_json_atomic(out.with_suffix(".json"), result)
        write_text_atomic(out.with_suffix(".md"), markdown(result))
        print(markdown(result))
        return 0
    args.kv_samples = args.kv_samples or (24 if args.quick else 128)
    args.ppl_tokens = args.ppl_tokens or (1024 if args.quick else 65536)
    args.windows = _ints(args.windows or ("16,64" if args.quick else ",".join(map(str, WINDOWS))))
    args.pairs = tuple(_ints(args.pairs or ("10,40" if args.quick else ",".join(map(str, PAIRS)))))
    args.globals, args.controls, args.sinks = _ints(args.globals), _ints(args.controls), _ints(args.sinks)
    args.lengths = _ints(args.lengths) if args.lengths else list(LENGTHS)
    args.measure = (not args.quick) if args.measure is None else args.measure
    if args.distill is None:
        args.distill = "" if args.students else ",".join(DISTILLED)
    args.distill_tokens = int(args.distill_tokens or (2048 if args.quick else DISTILL_TOKENS))
    teacher_path = Path(args.teacher)
    teacher_name = teacher_path.stem if teacher_path.suffix == ".gguf" else teacher_path.name
    if args.suites is None:
        args.suites = teacher_name == TEACHER.name
    if not teacher_path.exists() or not CORPUS.exists():
        print(f"needs {args.teacher} and {CORPUS}")
        return 2
    start = time.time()
    device = args.device
    teacher, tok = load_model(args.teacher, dtype="fp32", device="cpu")
    out = Path(args.results_dir) / args.out
    ranked, scan = ranking(teacher, tok, teacher_name, args.scan, args.quick, out.with_name(out.name + "-scan"))
    print(f"scan: {scan}; top 8 {ranked[:8]} ({time.time() - start:.0f} s)", flush=True)
    heldout = heldout_sequences(recipe_for(1 << 20, True, 0).data, tok, 512, max(1, args.ppl_tokens // 512))
    specs = distilled_specs(teacher, ranked, args)  # before any work: a bad --distill stops here
    teacher_row = {"name": "teacher", **evaluate(teacher, tok, heldout, args, device)}
    progress(teacher_row, start)
    rows, serving = [], serving_rows()

    def save(done: bool) -> dict:
        """Written after every row, so a run cut by a time limit keeps its finished rows (``complete`` says)."""
        result = {
            "teacher_name": teacher_name, "teacher": teacher_row, "students": rows, "scan": _relative(scan),
            "pairs": list(args.pairs), "lengths": args.lengths, "scan_top8": ranked[:8],
            "kv_items_per_size": args.kv_samples, "heldout_tokens": int(heldout.numel()),
            "distill_tokens": args.distill_tokens if specs else None, "serving": serving,
            "seconds": round(time.time() - start, 1), "complete": done,
            "device": device_label(device), "versions": versions(),
        }
        write_json_atomic(out.with_suffix(".json"), result)
        write_text_atomic(out.with_suffix(".md"), markdown(result))
        return result

    def add(row: dict, student) -> None:
        if args.fidelity:
            row["fidelity"] = fidelity_scores(teacher.to(device), tok, student, args.quick)
        rows.append(row)
        save(False)
        progress(row, start)

    for sink in args.sinks:
        for window in args.windows:
            for top in [*args.globals, *([0] if window in args.controls and 0 not in args.globals else [])]:
                student = window_student(teacher.cpu(), ranked[:top], window, sink)
                name = (f"top{top}" if top else "none") + f"-w{window}" + (f"-s{sink}" if sink else "")
                add({"name": name, "mixer": "window", "global": top, "window": window, "sink": sink,
                     "kept_heads": [list(h) for h in ranked[:top]], **evaluate(student, tok, heldout, args, device)},
                    student)
                del student
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="window-distill-"))
    for spec in specs:
        student, trained = distill_one(spec, teacher, tok, args, device, work)
        add({"name": spec["name"], **student_labels(student), **trained,
             "kept_heads": [list(h) for h in spec["heads"]], **evaluate(student, tok, heldout, args, device)},
            student)
        del student
    for path in args.students:
        student, _ = load_model(path, dtype="fp32", device="cpu")
        add({"name": _relative(str(path)), **student_labels(student),
             **evaluate(student, tok, heldout, args, device)}, student)
        del student
    result = save(True)
    print(markdown(result))
    print(f"wrote {_relative(str(out))}.{{json,md}} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
