"""The GPU benchmarks' ``--quick`` CPU modes run end to end, so a change to the code they drive (the trainer, the
planner) that breaks them shows here rather than on the next, scarce, GPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_quick(script: str, out: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_distill_benchmark_quick_times_a_step_and_its_parts(tmp_path):
    result = run_quick("distill.py", tmp_path / "distill.json", "--profile")
    assert [row.get("error") for row in result["runs"]] == [None]
    assert result["runs"][0]["tokens_per_s"] > 0
    assert set(result["profile"]["seconds"]) == {"teacher forward", "student forward+backward", "fused KL (+grads)",
                                                 "AdamW step"}


def test_gpu24_benchmark_quick_runs_every_step_and_the_serving_checks(tmp_path):
    result = run_quick("gpu24.py", tmp_path / "24gb.json")
    assert [s["name"] for s in result["stages"]] == ["distill stage 1", "distill stage 2", "distill stage 3",
                                                     "finetune"]
    assert all("oom" not in s and s["tokens_per_s"] > 0 for s in result["stages"])
    for which in ("teacher", "hybrid"):
        assert result["serving"][which]["verified_context_b1"]["fits"]
