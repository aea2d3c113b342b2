"""Does a jointly chosen set of K heads retrieve better than the scan's top K? Greedy selection on teacher-19m (CPU).

    python benchmarks/joint_selection.py               # K 4 from the scan's top 20: ~15 min on 2 CPU threads
    python benchmarks/joint_selection.py --quick       # K 2 from the top 4, few items (a smoke run)

The scan ranks heads one at a time (the drop in retrieval when each alone is ablated), but a student keeps a *set*:
heads can be redundant (two gather heads for the same segments) or useful only together (a gather head and the
aggregate head that reads it). Greedy forward selection: from the scan's top ``--pool`` heads, add the head whose
untrained student (built as ``radistill build`` does: calibrated on the prose corpus, state 64) scores best on KV
retrieval at 20 and 40 pairs, ``--keep`` times. The selection's items have their own probe seed; the chosen set is
then evaluated beside the scan's top K on the testbed's evaluation items (``benchmarks/testbed_recovery.py``), as
``fresh_retrieval.py`` does. An untrained student is where distillation starts (docs/distill.md: top-16 went from
0.30 to 1.00 at 40 pairs, top-4 from 0.09 to 0.32 in 50M tokens), so a better start is a candidate for a better
distilled student, not a proof of one. Measured (H100, 50M tokens, ``testbed_recovery.py --heads``): it is not —
greedy-8 starts at 0.68 at 40 pairs and distils to 0.66, the scan's top 8 start at 0.15 and distil to 0.98
(``benchmarks/results/testbed_recovery-greedy.md``). The untrained score rewards heads the initialisation happens to
serve; the teacher's ablation ranking predicts the distilled student.

Writes ``benchmarks/results/joint_selection.json`` (``joint_selection-quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from fresh_retrieval import cpu_scan, fresh_student  # noqa: E402
from testbed_recovery import CORPUS, KV_SEED, TEACHER, EvalSet, evaluate, kv_accuracy, recipe_for  # noqa: E402
from radistill.hybrid.calibrate import calibration_batches  # noqa: E402
from radistill.models.access import load_model  # noqa: E402
from radistill.probes.items import encode_items  # noqa: E402
from radistill.probes.kv import KVProbeConfig, kv_items  # noqa: E402
from radistill.utils.io import write_json_atomic  # noqa: E402

SELECT_SEED = KV_SEED + 1  # selection items: neither the scan's (0) nor the evaluation's
SELECT_PAIRS = (20, 40)


def greedy_selection(teacher, pool: list[tuple[int, int]], keep: int, items: dict, batches, log) -> list[dict]:
    """``keep`` rounds; each adds the pool head whose student scores best (mean KV accuracy over ``items``' sizes;
    ties go to the scan's higher rank). -> one record per round: the head added, the set, every candidate's score."""
    chosen: list[tuple[int, int]] = []
    rounds = []
    for _ in range(keep):
        scores = {}
        for head in (h for h in pool if h not in chosen):
            student = fresh_student(teacher, [*chosen, head], batches)
            scores[head] = sum(kv_accuracy(student, its, 16, "cpu") for its in items.values()) / len(items)
        best = max(scores, key=lambda h: (scores[h], -pool.index(h)))
        chosen.append(best)
        rounds.append({"added": list(best), "kept": [list(h) for h in chosen], "score": scores[best],
                       "candidates": {f"{l}.{h}": s for (l, h), s in scores.items()}})
        log(f"round {len(chosen)}: + {best[0]}.{best[1]} -> {scores[best]:.3f} "
            f"(candidates {min(scores.values()):.3f}-{max(scores.values()):.3f})")
    return rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=int, default=None, help="heads to choose (4; quick 2)")
    parser.add_argument("--pool", type=int, default=None, help="choose among the scan's top N heads (20; quick 4)")
    parser.add_argument("--select-items", type=int, default=None, help="selection items per size (32; quick 4)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not TEACHER.exists() or not CORPUS.exists():
        print(f"needs {TEACHER} and {CORPUS}")
        return 2
    keep, pool_size = args.keep or (2 if args.quick else 4), args.pool or (4 if args.quick else 20)
    select_items, eval_items = args.select_items or (4 if args.quick else 32), 4 if args.quick else 48
    out = args.out or ROOT / "benchmarks" / "results" / f"joint_selection{'-quick' if args.quick else ''}.json"
    torch.set_num_threads(args.threads)
    start = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - start:6.0f} s] {message}", flush=True)

    teacher, tok = load_model(TEACHER, dtype="fp32", device="cpu")
    ranked = cpu_scan(teacher, tok)
    batches = calibration_batches(tok, CORPUS, 8192)
    selection = {p: encode_items(tok, kv_items(tok, KVProbeConfig(pairs=p, samples=select_items, seed=SELECT_SEED)))
                 for p in SELECT_PAIRS}
    log(f"scan done; choosing {keep} of the top {pool_size}")
    rounds = greedy_selection(teacher, ranked[:pool_size], keep, selection, batches, log)
    chosen = [tuple(h) for h in rounds[-1]["kept"]]

    evalset = EvalSet(tok, recipe_for(1 << 20, True, 0), eval_items, 4096, 256)
    rows = []
    for name, heads in (("teacher", None), (f"scan-top{keep}", ranked[:keep]), (f"greedy-{keep}", chosen)):
        model = teacher if heads is None else fresh_student(teacher, heads, batches)
        rows.append({"name": name, "kept_heads": None if heads is None else [list(h) for h in heads],
                     **evaluate(model, evalset, "cpu", 16)})
        kv = " ".join(f"{p}:{v:.2f}" for p, v in rows[-1]["kv_retrieval"].items())
        log(f"{name:>12}  KV {kv}  ppl {rows[-1]['heldout_ppl']:.1f}")
    result = {"keep": keep, "pool": ranked[:pool_size], "select_items_per_size": select_items,
              "select_pairs": list(SELECT_PAIRS), "rounds": rounds, "evaluation": rows,
              "kv_items_per_size": eval_items, "heldout_tokens": int(evalset.heldout.numel()), "state_size": 64,
              "seconds": round(time.time() - start, 1), "quick": args.quick,
              "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} threads",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    write_json_atomic(out, result)
    log(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
