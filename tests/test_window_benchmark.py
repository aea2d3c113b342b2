"""benchmarks/window.py end to end on teacher-19m at a tiny size (the committed scan, one window, few items)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCAN = ROOT / "benchmarks" / "results" / "window-cpu-scan" / "scan.json"


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.skipif(not SCAN.exists(), reason="the committed scan of teacher-19m is absent")
def test_window_benchmark_runs_and_windows_keep_retrieval(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "window.py"), "--quick", "--scan", str(SCAN),
                           "--windows", "16", "--pairs", "20", "--kv-samples", "4", "--ppl-tokens", "512",
                           "--results-dir", str(tmp_path), "--out", "w"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "w.json").read_text())
    rows = {r["name"]: r for r in result["students"]}
    assert set(rows) == {"top3-w16", "top8-w16", "none-w16"}
    # the scan's top heads carry retrieval; without them a 16-token window cannot reach a 20-pair dictionary
    assert rows["top3-w16"]["kv_retrieval"]["20"] > rows["none-w16"]["kv_retrieval"]["20"]
    assert rows["none-w16"]["cache_bytes_bf16"]["2048"] == rows["none-w16"]["cache_bytes_bf16"]["8192"]
    assert result["teacher"]["cache_bytes_bf16"]["8192"] == 4 * result["teacher"]["cache_bytes_bf16"]["2048"]
    assert result["serving"]["computed"] and (tmp_path / "w.md").read_text().startswith("# Training-free")
    assert result["complete"] is True
    assert set(rows["top3-w16"]["suites"]) == {"records", "facts"}


def test_students_are_labelled_by_their_mixer_heads_window_and_state():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from window import markdown, student_labels

    from radistill.hybrid.build import convert, student_config
    from test_hybrid import make_teacher

    teacher = make_teacher(num_hidden_layers=2)
    student = convert(teacher, student_config(teacher, [[0], [1, 2]], "window_recurrent",
                                              {"window": 8, "state_size": 4}))
    labels = student_labels(student)
    assert labels == {"mixer": "window_recurrent", "global": 3, "window": 8, "state": 4}
    row = {"kv_retrieval": {"20": 1.0}, "heldout_ppl": 5.0, "cache_bytes_bf16": {"2048": 2048, "8192": 4096},
           "suites": {"records": 0.5, "facts": 0.75}}
    serving = {"budget_gib": 24, "rows": {}}
    text = markdown({"device": "cpu", "kv_items_per_size": 4, "heldout_tokens": 512, "pairs": [20], "serving": serving,
                     "teacher": {"name": "teacher", **row}, "students": [{"name": "s", **labels, **row}]})
    assert "| s | window_recurrent | 3 | 8 | 4 | 1.00 | 0.500 | 0.750 | 5.00 | - | - | 2 KiB | 4 KiB |" in text


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.skipif(not SCAN.exists(), reason="the committed scan of teacher-19m is absent")
def test_window_benchmark_adds_a_window_recurrent_student(tmp_path):
    """--globals picks the training-free students (here one) and --students rows carry their mixer and state."""
    from radistill.hybrid.build import build_student
    from radistill.scan.result import load_scan

    teacher = ROOT.parent / "shared" / "fixtures" / "teacher-19m"
    heads = [(h.layer, h.head) for h in load_scan(SCAN).heads[:3]]
    student = build_student(teacher, tmp_path / "wr", heads=heads, mixer="window_recurrent", window=16,
                            state_size=8, calibration_tokens=512, device="cpu", dtype="fp32")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "window.py"), "--quick", "--scan", str(SCAN),
                           "--windows", "16", "--globals", "3", "--pairs", "20", "--kv-samples", "4", "--ppl-tokens",
                           "512", "--students", str(student), "--results-dir", str(tmp_path), "--out", "w"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "w.json").read_text())
    window, built = result["students"]
    assert window["name"] == "top3-w16" and window["mixer"] == "window"
    assert (built["mixer"], built["global"], built["window"], built["state"]) == ("window_recurrent", 3, 16, 8)
    # as built (gate 0) it is the window student: the same retrieval and perplexity, more cache (its SSM state)
    assert built["kv_retrieval"] == window["kv_retrieval"]
    assert built["heldout_ppl"] == pytest.approx(window["heldout_ppl"], rel=1e-5)
    assert built["cache_bytes_bf16"]["2048"] > window["cache_bytes_bf16"]["2048"]
