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
