"""How many kept heads does teacher-19m's retrieval need? KV accuracy of *undistilled* students vs kept heads.

    python benchmarks/fresh_retrieval.py     # CPU, 1 thread, ~6 min -> benchmarks/results/fresh_retrieval.json

Students are built as ``radistill build`` does (``--calibration-data`` = the prose corpus, half-lives from the
teacher's attention distance, DiscreteMamba2 state 64) keeping the scan's top K heads (KV probe, 20 pairs, 16
samples, seed 0), or K random heads as a control, and evaluated before any training with the testbed's evaluation
(``benchmarks/testbed_recovery.py``: 48 KV items per dictionary size, seeded apart from the scan; 4k held-out tokens).
An untrained student is where distillation starts: if retrieval is already there, training only has to keep it.
"""

from __future__ import annotations

import json
import platform
import random
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from testbed_recovery import CORPUS, TEACHER, EvalSet, evaluate, recipe_for  # noqa: E402
from radistill.hybrid.build import convert, select_heads, student_config  # noqa: E402
from radistill.hybrid.calibrate import calibrate, calibration_batches  # noqa: E402
from radistill.models.access import load_model  # noqa: E402
from radistill.scan.run import probe_items, scan_model  # noqa: E402
from radistill.utils.io import write_json_atomic  # noqa: E402

TOP_K = (0, 4, 8, 12, 16, 24, 32, 48)
RANDOM_K = (4, 8, 16, 32)
STATE = 64


def cpu_scan(teacher, tokenizer) -> list[tuple[int, int]]:
    """The teacher's heads, best first: the KV probe at 20 pairs, 16 samples, seed 0 (this script's ranking)."""
    items, probe = probe_items(tokenizer, pairs=20, samples=16, seed=0, probe_file=None)
    return [(h.layer, h.head) for h in scan_model(teacher, tokenizer, "teacher-19m", items=items, probe=probe).heads]


def fresh_student(teacher, heads: list[tuple[int, int]], batches, state: int = STATE):
    """The untrained student keeping ``heads`` (layer, head), built and calibrated as ``radistill build`` does."""
    layers = teacher.config.num_hidden_layers
    kept = select_heads(teacher, heads=heads).kept_per_layer(layers) if heads else [[] for _ in range(layers)]
    student = convert(teacher, student_config(teacher, kept, "discrete_mamba2", {"state_size": state}))
    calibrate(student, teacher, batches)
    return student


def main() -> int:
    if not TEACHER.exists() or not CORPUS.exists():
        print(f"needs {TEACHER} and {CORPUS}")
        return 2
    torch.set_num_threads(1)
    start = time.time()
    teacher, tok = load_model(TEACHER, dtype="fp32", device="cpu")
    ranked = cpu_scan(teacher, tok)
    evalset = EvalSet(tok, recipe_for(1 << 20, True, 0), 48, 4096, 256)
    batches = calibration_batches(tok, CORPUS, 8192)
    students = [("top", k, ranked[:k]) for k in TOP_K]
    students += [("random", k, random.Random(k).sample(ranked, k)) for k in RANDOM_K]
    teacher_row = {"name": "teacher", **evaluate(teacher, evalset, "cpu", 16)}
    rows = []
    for kind, k, heads in students:
        student = fresh_student(teacher, heads, batches)
        row = {"name": f"{kind}-{k}", "selection": kind, "keep": k, "kept_heads": [list(h) for h in heads],
               **evaluate(student, evalset, "cpu", 16)}
        rows.append(row)
        kv = " ".join(f"{p}:{v:.2f}" for p, v in row["kv_retrieval"].items())
        print(f"{row['name']:>10}  KV {kv}  ppl {row['heldout_ppl']:.1f}", flush=True)
    result = {"teacher": teacher_row, "students": rows, "state_size": STATE, "scan_top16": ranked[:16],
              "kv_items_per_size": 48, "heldout_tokens": int(evalset.heldout.numel()),
              "seconds": round(time.time() - start, 1),
              "device": f"cpu ({platform.processor() or platform.machine()}), 1 thread",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    out = ROOT / "benchmarks" / "results" / "fresh_retrieval.json"
    write_json_atomic(out, result)
    print(f"teacher: {json.dumps(teacher_row['kv_retrieval'])}; wrote {out.relative_to(ROOT)} in "
          f"{result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
