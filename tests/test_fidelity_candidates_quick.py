"""benchmarks/fidelity_candidates.py --quick: variants run alone, and rows of separate calls join one table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from test_benchmarks_quick import BENCHMARKS, run_quick

SHARED = BENCHMARKS.parents[1] / "shared" / "fixtures"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "teacher-19m").exists(), reason="needs ../shared/fixtures (teacher-19m, corpus)")
def test_variants_run_alone_and_accumulate(tmp_path):
    out, work = tmp_path / "fc.json", tmp_path / "work"
    small = ("--kv-items", "2", "--ppl-tokens", "512", "--no-fidelity", "--work", str(work))
    first = run_quick("fidelity_candidates.py", out, "--variants", "bos", *small)
    assert [r["variant"] for r in first["rows"]] == ["bos"]
    assert first["rows"][0]["recipe_changes"] == {"data": {"bos": True, "packing": "documents"}}
    second = run_quick("fidelity_candidates.py", out, "--variants", "stage1-recal", "--scan",
                       str(work / "scan" / "scan.json"), *small)
    assert [r["variant"] for r in second["rows"]] == ["bos", "stage1-recal"]
    row = second["rows"][1]
    assert set(row["stage_seconds"]) == {"stage1", "stage2", "stage3"}  # stage 1 did run
    assert set(row["kv_retrieval"]) == {"5", "10", "20", "40"} and row["heldout_ppl"] > 1
    assert set(row["suites"]) == {"records", "facts"} and set(second["teacher_eval"]["suites"]) == {"records", "facts"}
    assert row["truncated"] is False
    assert "| stage1-recal |" in out.with_suffix(".md").read_text()


def test_unknown_variant_is_refused(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    from fidelity_candidates import main

    with pytest.raises(SystemExit):
        main(["--quick", "--variants", "bogus", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_merge_joins_rows_of_one_setup(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    from fidelity_candidates import main

    def run(rows, budget=100):
        kv = {"5": 1.0, "10": 1.0, "20": 0.5, "40": 0.25}
        return {"teacher": "t", "budget_tokens": budget, "top": 16, "state": 8, "quick": False, "device": "gpu",
                "kv_items_per_size": 2, "heldout_tokens": 10, "teacher_eval": {"kv_retrieval": kv, "heldout_ppl": 5.0},
                "rows": [{"variant": v, "tokens": budget, "kv_retrieval": kv, "heldout_ppl": ppl, "train_seconds": 1.0}
                         for v, ppl in rows]}

    paths = []
    for i, (rows, budget) in enumerate([([("baseline", 7.0), ("bos", 6.0)], 100), ([("bos", 6.5)], 100),
                                        ([("x", 1.0)], 200)]):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(run(rows, budget)))
    assert main(["--merge", str(paths[0]), str(paths[1]), "--out", str(tmp_path / "all.json")]) == 0
    merged = json.loads((tmp_path / "all.json").read_text())
    assert [(r["variant"], r["heldout_ppl"]) for r in merged["rows"]] == [("baseline", 7.0), ("bos", 6.5)]
    with pytest.raises(SystemExit):
        main(["--merge", str(paths[0]), str(paths[2]), "--out", str(tmp_path / "bad.json")])


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "teacher-19m").exists(), reason="needs ../shared/fixtures (teacher-19m, corpus)")
def test_window_variants_build_the_mixers_and_training_opens_the_gates(tmp_path):
    from radistill.hybrid import HybridForCausalLM

    out, work = tmp_path / "fc.json", tmp_path / "work"
    scan = BENCHMARKS / "results" / "window-cpu-scan" / "scan.json"  # the committed scan of teacher-19m, if there
    result = run_quick("fidelity_candidates.py", out, "--variants", "window-rec,window-only-free", "--kv-items", "2",
                       "--ppl-tokens", "512", "--no-fidelity", "--work", str(work),
                       *(["--scan", str(scan)] if scan.exists() else []))
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["window-rec"]["distilled"] and rows["window-rec"]["tokens"] > 0
    assert not rows["window-only-free"]["distilled"] and rows["window-only-free"]["tokens"] == 0
    assert rows["window-rec"]["build"] == {"mixer": "window_recurrent", "window": 16}
    built = HybridForCausalLM.from_pretrained(work / "student-mixer_window_recurrent-window_16")
    trained = HybridForCausalLM.from_pretrained(work / "run-window-rec" / "stage3")
    assert built.config.mixer_settings["state_size"] == result["state"]
    gates = [(layer.self_attn.recurrent.gate, trained.model.layers[i].self_attn.recurrent.gate)
             for i, layer in enumerate(built.model.layers)]
    assert all(bool((b == 0).all()) for b, _ in gates)  # built closed: the window student
    assert all(bool((t != 0).all()) for _, t in gates)  # the recipe's trainable: recurrent trained every gate
    window_only = HybridForCausalLM.from_pretrained(work / "student-mixer_window-state_size_None-window_16")
    assert window_only.config.mixer == "window"
