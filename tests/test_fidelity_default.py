"""benchmarks/fidelity_default.sh --quick: the documented default path (scan, build --keep 16, distill with the
default recipe and its teacher text, fidelity.py) on teacher-19m with tiny settings, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.shared
def test_fidelity_default_script_quick_makes_the_default_student_and_its_row(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    work, out = tmp_path / "work", tmp_path / "fidelity.json"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "fidelity_default.sh"), "--quick", str(work), str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    teacher, student = result["rows"]
    assert teacher["name"] == "teacher" and teacher["kept_heads"] == 80
    assert student["name"] == "run/stage3" and student["kept_heads"] == 16 and student["mixer"] == "window_recurrent"
    assert student["window"] == 16 and student["tokens"] == 512
    assert student["recipe"] == "stage 2: 256 tok, lr 0.0001, all; stage 3: 256 tok, lr 1e-05, all"  # the defaults
    recipe = json.loads((work / "run" / "recipe.json").read_text())
    assert recipe["data"]["teacher_share"] == 0.25 and any((work / "run" / "teacher_text").iterdir())
    assert set(student["kv"]) == {"5", "20"} and student["ppl"] > 1
    assert 0 < student["fidelity"]["heldout"]["all"]["top1"] < 1

    usage = subprocess.run(["bash", str(ROOT / "benchmarks" / "fidelity_default.sh"), str(work)],
                           capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "usage" in usage.stderr
