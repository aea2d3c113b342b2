"""The GPU benchmarks' ``--quick`` CPU modes run end to end, so a change to the code they drive (the trainer, the
planner) that breaks them shows here rather than on the next, scarce, GPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_testbed_merge_joins_runs_of_one_setup_and_refuses_others(tmp_path):
    """``testbed_recovery.py --merge``: students of separate runs in one table; a differing setup or a student in two
    runs is refused (the merged file is the issue's table, it must be one experiment)."""
    def run(names, budget=50, wall=10.0):
        return {"students": [{"name": n} for n in names], "teacher": {"ppl": 5.5}, "recipe": {"lr": 1},
                "budget_tokens": budget, "budget_mode": "fixed", "device": "H100", "torch": "2.11",
                "kv_items_per_size": 200, "heldout_tokens": 64, "quick": False, "wall_seconds": wall,
                "predicted_seconds": wall, "timings": {}, "compiled_graphs": 1, "measured_tokens_per_s": {},
                "measured_seconds_per_student": {}}

    sys.path.insert(0, str(BENCHMARKS))
    from testbed_recovery import merge_runs

    merged = merge_runs([run(["top4"], wall=2.0), run(["none", "random"], wall=3.0)])
    assert [s["name"] for s in merged["students"]] == ["top4", "none", "random"]
    assert merged["wall_seconds"] == 5.0 and [r["students"] for r in merged["runs"]] == [["top4"], ["none", "random"]]
    for bad, why in (([run(["a"]), run(["b"], budget=60)], "budget_tokens"), ([run(["a"]), run(["a"])], "more than one")):
        with pytest.raises(SystemExit, match=why):
            merge_runs(bad)
