"""Training-free sliding-window students of teacher-19m: KV retrieval, held-out perplexity and cache bytes.

    python benchmarks/window.py --quick --out window-cpu          # CPU, small item counts, <= 5 min
    python benchmarks/window.py --device cuda                     # GPU, full size -> results/window.{json,md}
    python benchmarks/window.py --device cuda --students RUN/stage3 ...   # add distilled students

``--students``: any student directories (e.g. the distilled ``window-rec`` / ``window-only`` / ``baseline`` of
benchmarks/fidelity_candidates.py, ``WORK/run-NAME/stage3``), each a row labelled from its config (mixer, kept heads,
window W, state N) with the same evaluation and cache bytes. The comparison to read is at equal cache bytes per
sequence: a W-token window holds K and V of W tokens per KV head (2W head_dim values), a DiscreteMamba2 head N x
head_dim, so W=16 per KV head is about N=32 per head (less with GQA sharing); ``window_recurrent`` holds both.

Every student is built from the teacher with no training and no calibration (``radistill build --keep G --mixer
window --window W``): the scan's top G heads stay full attention, every other head keeps its teacher Q/K/V/RoPE and
sees only the last W tokens. G in {3, 8} and the no-global control (G = 0) (``--globals``, e.g. ``--globals 16`` for
fidelity_candidates' ``window-only-free`` student), W in {8, 16, 32, 64}. The scan is
radistill's own (KV probe, 20 pairs, seed 0) unless ``--scan scan.json`` gives one. Evaluation: KV retrieval by
dictionary size (``radistill.eval.kv``, log-likelihood multiple choice, items seeded apart from the scan),
perplexity on held-out prose documents (the testbed's held-out split), cache bytes per sequence at 2k/8k tokens
(bf16, computed from the config by ``radistill.hybrid.memory``; measured from a real prefill with ``--measure``).
``--fidelity`` also calls ``radistill.eval.fidelity`` when that module exists.

Last, the serving limits of the Nanbeige4.1-3B shape in 24 GiB (bf16): the teacher's and the SSM student's from
``radistill.memplan`` (as benchmarks/gpu24.py plans them), and a window student's by the same arithmetic, all
COMPUTED, not measured (the window student's weights are the teacher's: its heads keep the teacher's Q/K/V).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from testbed_recovery import (  # noqa: E402
    CORPUS, KV_SEED, TEACHER, fidelity_scores, heldout_perplexity, recipe_for, suite_scores,
)
from radistill.distill.data import heldout_sequences  # noqa: E402
from radistill.eval.kv import KVEvalConfig, kv_retrieval  # noqa: E402
from radistill.hybrid.build import convert, select_heads, student_config  # noqa: E402
from radistill.hybrid.memory import (  # noqa: E402
    measure_cache_bytes,
    planned_student_rows,
    student_rows,
    teacher_rows,
)
from radistill.models.access import layout_from_config as model_layout_of  # noqa: E402
from radistill.models.access import load_model, model_layout  # noqa: E402
from radistill.scan.result import load_scan  # noqa: E402
from radistill.scan.run import probe_items, scan_model  # noqa: E402
from radistill.utils.io import write_json_atomic, write_text_atomic  # noqa: E402
from environment import device_label, versions  # noqa: E402

GLOBAL = (3, 8)
WINDOWS = (8, 16, 32, 64)
PAIRS = (5, 10, 20, 40)
LENGTHS = (2048, 8192)
SERVING_BUDGET_GIB, SERVING_KEEP, SERVING_STATE, SERVING_CONTEXT = 24, 13, 8, 32768  # as benchmarks/gpu24.py


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized item counts (the committed window-cpu result)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--teacher", default=str(TEACHER))
    p.add_argument("--scan", help="scan.json of the teacher (default: scan it here)")
    p.add_argument("--students", nargs="*", default=[], help="student directories to evaluate the same way")
    p.add_argument("--kv-samples", type=int, help="KV items per dictionary size [quick 24, else 128]")
    p.add_argument("--ppl-tokens", type=int, help="held-out tokens for perplexity [quick 4096, else 65536]")
    p.add_argument("--windows", help=f"window sizes [quick 16,64, else {','.join(map(str, WINDOWS))}]")
    p.add_argument("--globals", default=",".join(map(str, (*GLOBAL, 0))),
                   help="kept (global) head counts of the training-free students; '' for none [%(default)s]")
    p.add_argument("--pairs", help=f"KV dictionary sizes [quick 10,40, else {','.join(map(str, PAIRS))}]")
    p.add_argument("--measure", action="store_true", help="also measure cache bytes with a real prefill")
    p.add_argument("--fidelity", action="store_true", help="call radistill.eval.fidelity if it exists")
    p.add_argument("--out", default="window", help="results stem under benchmarks/results/ [window]")
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def ranking(teacher, tokenizer, scan: str | None, quick: bool, save_to: Path) -> tuple[list[tuple[int, int]], str]:
    """The heads best first, and where the scan is (a fresh scan is saved to ``save_to`` for reuse: --scan)."""
    if not scan:
        items, probe = probe_items(tokenizer, pairs=20, samples=8 if quick else 16, seed=0, probe_file=None)
        scan = str(scan_model(teacher, tokenizer, "teacher-19m", items=items, probe=probe).save(save_to))
    return [(h.layer, h.head) for h in load_scan(scan).heads], scan


def window_student(teacher, heads: list[tuple[int, int]], window: int):
    """The training-free student: ``heads`` full attention, every other head a window of ``window`` tokens."""
    layers = teacher.config.num_hidden_layers
    kept = select_heads(teacher, heads=heads).kept_per_layer(layers) if heads else [[] for _ in range(layers)]
    return convert(teacher, student_config(teacher, kept, "window", {"window": window})).eval()


def student_labels(model) -> dict:
    """The table's columns for a loaded student: its mixer, kept heads, window and state size (from its config)."""
    config = model.config
    if getattr(config, "model_type", "") != "radistill_hybrid":
        return {"mixer": config.model_type}
    names = {name for i in range(config.num_hidden_layers) for name, _, _ in config.mixer_groups(i)}
    settings = config.mixer_settings or {}
    return {"mixer": "+".join(sorted(names)) or config.mixer, "global": config.num_kept_heads,
            "window": settings.get("window", "-"), "state": settings.get("state_size", "-")}


def _relative(path: str) -> str:
    return str(Path(path).resolve().relative_to(ROOT)) if Path(path).resolve().is_relative_to(ROOT) else str(path)


def evaluate(model, tokenizer, heldout, args, device: str) -> dict:
    model.to(device).eval()
    config = KVEvalConfig(pairs=args.pairs, samples=args.kv_samples, seed=KV_SEED, generate=False)
    batch = 64 if device.startswith("cuda") else 16
    results = {t.name: t.value for t in kv_retrieval(model, tokenizer, config, batch_size=batch)}
    row = {"kv_retrieval": {str(p): results[f"kv_ret@{p}"] for p in args.pairs},
           "heldout_ppl": heldout_perplexity(model, heldout, 4, device),
           "suites": suite_scores(model, tokenizer, batch, args.quick)}
    if getattr(model.config, "model_type", "") == "radistill_hybrid":
        rows = student_rows(model.config, list(LENGTHS), 2)
    else:
        rows = teacher_rows(model_layout(model), list(LENGTHS), 2)
    row["cache_bytes_bf16"] = {str(r.length): r.total_bytes + r.conv_bytes for r in rows}
    if args.measure:
        row["cache_bytes_measured"] = {str(n): measure_cache_bytes(model, n)["total"] for n in LENGTHS}
    return row


def serving_rows() -> dict:
    """Nanbeige4.1-3B shape, 24 GiB, bf16: teacher and SSM student from memplan; a window student by the same
    formula (memplan.estimate.serving_limits) with the teacher's weights and prefill. All computed."""
    from radistill.memplan.estimate import GiB
    from radistill.memplan.plan import make_plan
    from radistill.models import presets

    config = presets.shape_config("nanbeige4.1-3b")
    plan = make_plan(config, int(SERVING_BUDGET_GIB * GiB), keep=SERVING_KEEP, state_size=SERVING_STATE,
                     serving_context=SERVING_CONTEXT)
    rows = {"teacher": plan.serving["teacher"].to_dict(),
            f"ssm K={SERVING_KEEP} N={SERVING_STATE}": plan.serving["student"].to_dict()}
    teacher = plan.serving["teacher"]
    free = int(SERVING_BUDGET_GIB * GiB) - teacher.weights_bytes - teacher.prefill_bytes
    for window in (16, 64):
        # radistill memory's planned student: kept heads each with their own KV head (an upper bound), window heads
        # one ring per (layer, KV head)
        (row,) = planned_student_rows(model_layout_of(config), [1], 2, SERVING_KEEP, "window", {"window": window})
        per_token, state = row.kv_bytes, row.ssm_bytes + row.conv_bytes
        rows[f"window K={SERVING_KEEP} W={window}"] = {
            "weights_bytes": teacher.weights_bytes, "kv_bytes_per_token": per_token, "state_bytes": state,
            "prefill_bytes": teacher.prefill_bytes, "max_context_b1": (free - state) // per_token,
            "max_batch": free // (per_token * SERVING_CONTEXT + state), "batch_context": SERVING_CONTEXT,
            "max_positions": config.max_position_embeddings}
    return {"budget_gib": SERVING_BUDGET_GIB, "computed": True, "rows": rows}


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(result: dict) -> str:
    pairs = result["pairs"]
    lines = [f"# Training-free window students of teacher-19m ({result['device']})", "",
             f"KV retrieval (log-likelihood, {result['kv_items_per_size']} items per size, seed {KV_SEED}); "
             f"held-out perplexity on {result['heldout_tokens']} tokens; cache per sequence in bf16 (computed).", "",
             "| model | mixer | global | W | N | " + " | ".join(f"KV@{p}" for p in pairs) +
             " | records | facts | ppl | KL | confident top-1 | cache 2k | cache 8k |",
             "|---|---|---|---|---|" + "---|" * (len(pairs) + 7)]
    for row in [result["teacher"], *result["students"]]:
        kv = " | ".join(f"{row['kv_retrieval'][str(p)]:.2f}" for p in pairs)
        cache = " | ".join(f"{row['cache_bytes_bf16'][str(n)] / 2**10:,.0f} KiB" for n in LENGTHS)
        labels = " | ".join(str(row.get(k, "-")) for k in ("mixer", "global", "window", "state"))
        suites = " | ".join(_cell(row.get("suites", {}).get(k)) for k in ("records", "facts"))
        held = (row.get("fidelity") or {}).get("texts", {}).get("heldout", {}).get("all", {})
        fid = " | ".join(_cell(held.get(k)) for k in ("kl", "confident"))
        lines.append(f"| {row['name']} | {labels} | {kv} | {suites} | {row['heldout_ppl']:.2f} | {fid} | {cache} |")
    serving = result["serving"]
    lines += ["", f"Nanbeige4.1-3B shape in {serving['budget_gib']} GiB, bf16, COMPUTED (memplan arithmetic, not "
              "measured; benchmarks/results/24gb.json has the measured teacher and SSM rows):", "",
              "| model | KV B/token | state MiB | max context (batch 1) | max batch at 32k |", "|---|---|---|---|---|"]
    for name, r in serving["rows"].items():
        lines.append(f"| {name} | {r['kv_bytes_per_token']:,} | {r['state_bytes'] / 2**20:.2f} | "
                     f"{r['max_context_b1']:,} | {r['max_batch']:,} |")
    if not result.get("complete", True):
        lines += ["", "**Incomplete**: the run was cut before every student was evaluated."]
    if result.get("serving_note"):
        lines += ["", f"Note: {result['serving_note']}."]
    lines += ["", "Both students are capped by the model's 262,144 positions; the window student holds the teacher's "
              "weights (its heads keep Q/K/V), the SSM student's in_proj is larger (its z gate), hence the room."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.kv_samples = args.kv_samples or (24 if args.quick else 128)
    args.ppl_tokens = args.ppl_tokens or (1024 if args.quick else 65536)
    windows = args.windows or ("16,64" if args.quick else ",".join(map(str, WINDOWS)))
    pairs = args.pairs or ("10,40" if args.quick else ",".join(map(str, PAIRS)))
    args.windows, args.pairs = [int(w) for w in windows.split(",")], tuple(int(p) for p in pairs.split(","))
    args.globals = [int(g) for g in args.globals.split(",") if g.strip()]
    if not Path(args.teacher).exists() or not CORPUS.exists():
        print(f"needs {args.teacher} and {CORPUS}")
        return 2
    start = time.time()
    device = args.device
    teacher, tok = load_model(args.teacher, dtype="fp32", device="cpu")
    out = Path(args.results_dir) / args.out
    ranked, scan = ranking(teacher, tok, args.scan, args.quick, out.with_name(out.name + "-scan"))
    print(f"scan: {scan}; top 8 {ranked[:8]} ({time.time() - start:.0f} s)", flush=True)
    heldout = heldout_sequences(recipe_for(1 << 20, True, 0).data, tok, 512, max(1, args.ppl_tokens // 512))
    teacher_row = {"name": "teacher", **evaluate(teacher, tok, heldout, args, device)}
    rows, serving = [], serving_rows()

    def save(done: bool) -> dict:
        """Written after every row, so a run cut by a time limit keeps its finished rows (``complete`` says)."""
        result = {
            "teacher": teacher_row, "students": rows, "scan": _relative(scan), "pairs": list(args.pairs),
            "scan_top8": ranked[:8], "kv_items_per_size": args.kv_samples, "heldout_tokens": int(heldout.numel()),
            "serving": serving, "seconds": round(time.time() - start, 1), "complete": done,
            "device": device_label(device), "versions": versions(),
        }
        write_json_atomic(out.with_suffix(".json"), result)
        write_text_atomic(out.with_suffix(".md"), markdown(result))
        return result

    for window in args.windows:
        for top in args.globals:
            student = window_student(teacher.cpu(), ranked[:top], window)
            row = {"name": f"top{top}-w{window}" if top else f"none-w{window}", "mixer": "window", "global": top,
                   "window": window,
                   "kept_heads": [list(h) for h in ranked[:top]],
                   **evaluate(student, tok, heldout, args, device)}
            if args.fidelity:
                row["fidelity"] = fidelity_scores(teacher.to(device), tok, student, args.quick)
            rows.append(row)
            save(False)
            kv = " ".join(f"{p}:{v:.2f}" for p, v in row["kv_retrieval"].items())
            print(f"{row['name']:>10}  KV {kv}  ppl {row['heldout_ppl']:.2f}  ({time.time() - start:.0f} s)",
                  flush=True)
            del student
    for path in args.students:
        student, _ = load_model(path, dtype="fp32", device="cpu")
        row = {"name": _relative(str(path)), **student_labels(student),
               **evaluate(student, tok, heldout, args, device)}
        if args.fidelity:
            row["fidelity"] = fidelity_scores(teacher.to(device), tok, student, args.quick)
        rows.append(row)
        save(False)
    result = save(True)
    text = markdown(result)
    print(text)
    print(f"wrote {_relative(str(out))}.{{json,md}} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
