"""How many calibration tokens a build needs: build time against how far the calibrated start moves.

    python benchmarks/calibration_tokens.py                       # teacher-19m, CPU -> results/calibration_tokens.*
    python benchmarks/calibration_tokens.py --tokens 2048,8192    # other counts (the largest is the reference)
    python benchmarks/calibration_tokens.py --quick               # smoke run: 256 and 512 tokens

For each token count, ``build_student`` of the teacher (the scan's top ``--keep`` heads, DiscreteMamba2 state 8,
calibrated on the prose corpus) in this process, timed; then, against the build on the most tokens: the recurrent
heads' initial half-lives (median and largest relative difference over heads, from ``selection.json``), the static
normaliser's per-channel teacher and student spreads (median relative difference, worst layer), and the built
student's held-out perplexity (before any training, so the calibration is all that differs). The DiscreteMamba2
student is the one whose start depends on both half-lives and normaliser (a window_recurrent student starts as its
window heads whatever the calibration: its recurrence's gate is 0).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from environment import device_label, versions  # noqa: E402
from testbed_recovery import CORPUS, TEACHER, heldout_perplexity, recipe_for  # noqa: E402
from radistill.distill.data import heldout_sequences  # noqa: E402
from radistill.hybrid.build import build_student, load_selection  # noqa: E402
from radistill.models.access import load_model  # noqa: E402
from radistill.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

SCAN = ROOT / "benchmarks" / "results" / "window-cpu-scan" / "scan.json"


def relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-12)


def compare(built: dict, reference: dict) -> dict:
    """Half-life and normaliser-spread differences of one build against the reference build."""
    pairs = [(a, b) for la, lb in zip(built["half_lives"], reference["half_lives"]) for a, b in zip(la, lb)]
    half = [abs(a - b) / b for a, b in pairs]
    spreads = {}
    for kind in ("teacher_std", "student_std"):
        layers = [relative(built["spreads"][k], reference["spreads"][k]).median().item()
                  for k in reference["spreads"] if k.endswith(kind)]
        spreads[kind] = max(layers) if layers else None
    return {"half_life_median_rel": statistics.median(half), "half_life_max_rel": max(half),
            "spread_median_rel_worst_layer": spreads}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="2048,4096,8192,16384", help="calibration token counts (the last: reference)")
    p.add_argument("--keep", type=int, default=16)
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--quick", action="store_true", help="a smoke run: two small counts, few held-out tokens")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "calibration_tokens"))
    args = p.parse_args(argv)
    counts = [256, 512] if args.quick else sorted(int(x) for x in args.tokens.split(","))
    if not (TEACHER / "config.json").exists() or not CORPUS.exists() or not SCAN.exists():
        print(f"needs {TEACHER}, {CORPUS} and {SCAN}")
        return 2
    teacher, tokenizer = load_model(TEACHER, dtype="fp32", device="cpu")
    seq = 128 if args.quick else 512
    heldout = heldout_sequences(recipe_for(1 << 20, True, 0).data, tokenizer, seq,
                                max(1, (512 if args.quick else args.ppl_tokens) // seq))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="calibration-tokens-") as work:
        for n in counts:
            started = time.perf_counter()
            path = build_student(teacher, Path(work) / str(n), scan=SCAN, keep=args.keep, mixer="discrete_mamba2",
                                 state_size=8, tokenizer=tokenizer, calibration_data=CORPUS, calibration_tokens=n,
                                 device="cpu", dtype="fp32")
            seconds = time.perf_counter() - started
            student, _ = load_model(path, dtype="fp32", device="cpu")
            rows[n] = {"tokens": n, "build_s": round(seconds, 2),
                       "built_ppl": heldout_perplexity(student, heldout, 4, "cpu"),
                       "half_lives": load_selection(path)["calibration"]["half_life_tokens"],
                       "spreads": {k: v.clone() for k, v in student.state_dict().items() if k.endswith("_std")}}
            print(f"{n:>6} tokens: build {seconds:.1f} s, built student ppl {rows[n]['built_ppl']:.3f}", flush=True)
    reference = rows[counts[-1]]
    table = []
    for n in counts:
        row = {k: v for k, v in rows[n].items() if k not in ("half_lives", "spreads")}
        if n != counts[-1]:
            row.update(compare(rows[n], reference))
        table.append(row)
    result = {"teacher": TEACHER.name, "keep": args.keep, "mixer": "discrete_mamba2", "state_size": 8,
              "reference_tokens": counts[-1], "heldout_tokens": int(heldout.numel()), "rows": table,
              "device": device_label("cpu"), "threads": torch.get_num_threads(), "versions": versions(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    lines = [f"# Calibration tokens: build time against the calibrated start ({result['device']}, {result['date']})",
             "",
             f"teacher-19m, top {args.keep} heads, DiscreteMamba2 state 8; differences against the build on "
             f"{counts[-1]:,} tokens; built student's perplexity on {result['heldout_tokens']:,} held-out tokens "
             "before any training.", "",
             "| tokens | build s | built ppl | half-life diff (median / max) | spread diff, teacher / student "
             "(worst layer) |", "|---|---|---|---|---|"]
    for r in table:
        if "half_life_median_rel" in r:
            s = r["spread_median_rel_worst_layer"]
            diff = (f"{r['half_life_median_rel']:.1%} / {r['half_life_max_rel']:.1%} | "
                    f"{s['teacher_std']:.1%} / {s['student_std']:.1%}")
        else:
            diff = "reference | reference"
        lines.append(f"| {r['tokens']:,} | {r['build_s']:.1f} | {r['built_ppl']:.3f} | {diff} |")
    write_json_atomic(Path(args.out).with_suffix(".json"), result)
    write_text_atomic(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
