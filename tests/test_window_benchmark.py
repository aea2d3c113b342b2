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


def run_window(tmp_path: Path, *extra: str) -> dict:
    """benchmarks/window.py --quick on the committed scan with one 16-token window, results in ``tmp_path``/w.json."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "window.py"), "--quick", "--scan", str(SCAN),
                           "--windows", "16", *extra, "--results-dir", str(tmp_path), "--out", "w"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "w.json").read_text())


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.skipif(not SCAN.exists(), reason="the committed scan of teacher-19m is absent")
def test_window_benchmark_runs_and_windows_keep_retrieval(tmp_path):
    result = run_window(tmp_path, "--pairs", "20", "--kv-samples", "4", "--ppl-tokens", "512", "--distill", "",
                        "--measure", "--lengths", "256,512")
    rows = {r["name"]: r for r in result["students"]}
    assert set(rows) == {"top3-w16-s4", "top8-w16-s4", "none-w16-s4"}
    # a window (and the teacher) holds only K/V in the model's dtype: the bf16 prefill's cache tensors have the
    # computed bytes exactly, and the no-global control's stop growing once its 16-token rings are full
    for row in [result["teacher"], *rows.values()]:
        assert row["cache_bytes_measured"] == row["cache_bytes_bf16"], row["name"]
    assert rows["none-w16-s4"]["cache_bytes_measured"]["256"] == rows["none-w16-s4"]["cache_bytes_measured"]["512"]
    assert rows["top3-w16-s4"]["cache_bytes_measured_kinds"]["512"].get("ssm", 0) == 0
    # the scan's top heads carry retrieval; without them a 16-token window cannot reach a 20-pair dictionary
    assert rows["top3-w16-s4"]["kv_retrieval"]["20"] > rows["none-w16-s4"]["kv_retrieval"]["20"]
    assert rows["none-w16-s4"]["cache_bytes_bf16"]["256"] == rows["none-w16-s4"]["cache_bytes_bf16"]["512"]
    assert result["teacher"]["cache_bytes_bf16"]["512"] == 2 * result["teacher"]["cache_bytes_bf16"]["256"]
    assert result["serving"]["computed"] and (tmp_path / "w.md").read_text().startswith("# Window students")
    assert result["complete"] is True
    assert set(rows["top3-w16-s4"]["suites"]) == {"records", "facts"}


def test_students_are_labelled_by_their_mixer_heads_window_and_state():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from window import markdown, student_labels

    from radistill.hybrid.build import convert, student_config
    from test_hybrid import make_teacher

    teacher = make_teacher(num_hidden_layers=2)
    student = convert(teacher, student_config(teacher, [[0], [1, 2]], "window_recurrent",
                                              {"window": 8, "state_size": 4}))
    labels = student_labels(student)
    assert labels == {"mixer": "window_recurrent", "global": 3, "window": 8, "sink": 0, "state": 4}
    row = {"kv_retrieval": {"20": 1.0}, "heldout_ppl": 5.0, "cache_bytes_bf16": {"2048": 2048, "8192": 4096},
           "suites": {"records": 0.5, "facts": 0.75}}
    serving = {"budget_gib": 24, "rows": {}}
    text = markdown({"device": "cpu", "kv_items_per_size": 4, "heldout_tokens": 512, "pairs": [20], "serving": serving,
                     "teacher": {"name": "teacher", **row},
                     "students": [{"name": "s", **labels, **row, "distilled_tokens": 4096}]})
    assert ("| s | window_recurrent | 3 | 8 | 0 | 4 | 4,096 | 1.00 | 0.500 | 0.750 | 5.00 | - | - | 2 KiB | 4 KiB |"
            in text)
    assert "| teacher | - | - | - | - | - | - | 1.00 |" in text


def test_dm2_state_matches_the_window_cache_bytes():
    """matching_state: the DiscreteMamba2 student's cache per sequence is the closest (over N) to the window's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from window import cache_bytes, kept_per_layer, matching_state

    from radistill.hybrid.build import student_config
    from radistill.hybrid.memory import with_build_defaults
    from test_hybrid import make_teacher

    teacher = make_teacher(num_hidden_layers=2)
    for heads, window in (([], 8), ([(0, 1)], 16), ([(0, 0), (1, 2)], 32)):
        kept = kept_per_layer(teacher, heads)
        # the window student as the build makes it (with its default sinks)
        window_config = student_config(teacher, kept, "window", with_build_defaults("window", {"window": window}))
        target = cache_bytes(window_config, 8192)
        state = matching_state(teacher, heads, window)

        def gap(n):
            return abs(cache_bytes(student_config(teacher, kept, "discrete_mamba2", {"state_size": n}), 8192) - target)

        assert all(gap(state) <= gap(n) for n in range(4, 4 * window + 5, 4) if n != state), (heads, window)
        # the window's bytes do not grow past W tokens; neither does a DM2 student's: the match holds at any length
        # beyond W, and a bigger window needs a bigger state
        assert gap(state) < cache_bytes(window_config, 8192) // 4
    assert matching_state(teacher, [], 32) > matching_state(teacher, [], 8)


def test_serving_rows_put_window_window_recurrent_and_ssm_students_side_by_side():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from window import SERVING_KEEP, serving_rows

    serving = serving_rows()
    rows = serving["rows"]
    names = set(rows)
    assert {"teacher", f"ssm K={SERVING_KEEP} N=8", f"window K={SERVING_KEEP} W=16",
            f"window_recurrent K={SERVING_KEEP} W=16 N=8"} <= names
    window, ssm = rows[f"window K={SERVING_KEEP} W=16"], rows[f"ssm K={SERVING_KEEP} N=8"]
    recurrent = rows[f"window_recurrent K={SERVING_KEEP} W=16 N=8"]
    # the same kept heads: the same KV per token; window_recurrent holds the window's ring and the SSM state
    assert window["kv_bytes_per_token"] == ssm["kv_bytes_per_token"] == recurrent["kv_bytes_per_token"]
    assert recurrent["state_bytes"] > max(window["state_bytes"], ssm["state_bytes"])
    assert recurrent["weights_bytes"] > window["weights_bytes"] >= rows["teacher"]["weights_bytes"]
    # the ring of 64 + 4 sink tokens against 16 + 4 (less a small per-layer bookkeeping that does not grow with W)
    wide = rows[f"window K={SERVING_KEEP} W=64"]["state_bytes"]
    assert 0.99 * 68 / 20 * window["state_bytes"] < wide < 68 / 20 * window["state_bytes"]
    assert all(r["max_context_b1"] > rows["teacher"]["max_context_b1"] for k, r in rows.items() if k != "teacher")


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.skipif(not SCAN.exists(), reason="the committed scan of teacher-19m is absent")
def test_window_benchmark_distills_a_dm2_student_at_the_window_cache_bytes(tmp_path):
    """The in-run distillation: a dm2 student whose state matches the W-window's bytes, trained, evaluated alike."""
    result = run_window(tmp_path, "--globals", "3", "--controls", "", "--pairs", "20", "--kv-samples", "4",
                        "--ppl-tokens", "512", "--distill", "dm2", "--distill-tokens", "1024", "--no-suites",
                        "--work", str(tmp_path / "work"))
    window, dm2 = result["students"]
    assert (window["name"], dm2["name"]) == ("top3-w16-s4", "dm2-top3")
    assert dm2["mixer"] == "discrete_mamba2" and dm2["global"] == 3 and dm2["matches_window"] == 16
    assert dm2["kept_heads"] == window["kept_heads"]
    assert dm2["distilled_tokens"] == 1024 and not dm2["truncated"]
    # equal cache bytes per sequence, within one state step (4 values per head)
    step = 10 * 8 * 4 * 48 * 2  # layers x heads x 4 x head_dim x bf16, an upper bound on one step's bytes
    assert abs(dm2["cache_bytes_bf16"]["8192"] - window["cache_bytes_bf16"]["8192"]) <= step
    assert "suites" not in dm2 and (tmp_path / "work" / "dm2-top3" / "config.json").exists()
    assert "dm2-top3: state N =" in (tmp_path / "w.md").read_text()


def test_window_benchmark_reads_a_gguf_teacher(tmp_path):
    """A GGUF teacher (as SmolLM2's Q4_1 file on the GPU) loads through radistill's loader, is scanned here, and
    gets no teacher-19m suites."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    pytest.importorskip("gguf")
    from smollm2 import TOKENIZER_FOR_QUICK, quick_teacher

    if not TOKENIZER_FOR_QUICK.exists():
        pytest.skip("../shared fixtures are absent")
    gguf = quick_teacher(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "window.py"), "--quick", "--teacher", str(gguf),
                           "--windows", "8", "--globals", "1", "--controls", "8", "--pairs", "5", "--kv-samples", "2",
                           "--ppl-tokens", "512", "--distill", "", "--measure", "--lengths", "64",
                           "--results-dir", str(tmp_path), "--out", "g"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["teacher_name"] == "tiny-teacher" and (tmp_path / "g-scan" / "scan.json").exists()
    assert [r["name"] for r in result["students"]] == ["top1-w8-s4", "none-w8-s4"]
    assert all("suites" not in r for r in [result["teacher"], *result["students"]])
    # 2 layers x 2 KV heads x K and V x (8 + 4 sink) tokens x head_dim 16 x bf16: the control's ring and sinks (plus
    # a few bytes of bookkeeping per layer), computed and measured alike
    control = result["students"][1]
    ring = 2 * 2 * 2 * (8 + 4) * 16 * 2
    assert ring <= control["cache_bytes_bf16"]["64"] < ring + 2 * 64
    assert control["cache_bytes_measured"] == control["cache_bytes_bf16"]
    assert "tiny-teacher" in (tmp_path / "g.md").read_text().splitlines()[0]


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
    result = run_window(tmp_path, "--globals", "3", "--controls", "", "--pairs", "20", "--kv-samples", "4",
                        "--ppl-tokens", "512", "--students", str(student))
    window, built = result["students"]
    assert window["name"] == "top3-w16-s4" and window["mixer"] == "window"
    assert (built["mixer"], built["global"], built["window"], built["state"]) == ("window_recurrent", 3, 16, 8)
    # as built (gate 0) it is the window student: the same retrieval and perplexity, more cache (its SSM state)
    assert built["kv_retrieval"] == window["kv_retrieval"]
    assert built["heldout_ppl"] == pytest.approx(window["heldout_ppl"], rel=1e-5)
    assert built["cache_bytes_bf16"]["2048"] > window["cache_bytes_bf16"]["2048"]


def test_merge_puts_runs_side_by_side_and_refuses_other_settings(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from window import merge_runs

    def run(name: str, students: list[str], **extra) -> Path:
        result = {"teacher_name": "teacher-19m", "teacher": {"name": "teacher"}, "pairs": [5, 10], "lengths": [2048],
                  "kv_items_per_size": 128, "heldout_tokens": 65536, "distill_tokens": None, "complete": True,
                  "seconds": 12.0, "device": "H200", "students": [{"name": s} for s in students], **extra}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(result))
        return path

    free = run("free", ["top3-w16-s4", "none-w16-s4"])
    distilled = run("distilled", ["dm2-top3"], distill_tokens=2097152, complete=False)
    merged = merge_runs([free, distilled])
    assert [r["name"] for r in merged["students"]] == ["top3-w16-s4", "none-w16-s4", "dm2-top3"]
    assert merged["distill_tokens"] == 2097152 and merged["complete"] is False
    assert [r["complete"] for r in merged["runs"]] == [True, False]
    with pytest.raises(SystemExit, match="pairs"):
        merge_runs([free, run("other", ["x"], pairs=[5, 40])])
