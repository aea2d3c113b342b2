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


def test_rows_in_fidelity_format_merge_beside_another_teacher(tmp_path):
    """--fidelity-out writes the variants as benchmarks/fidelity.py rows: its --merge joins them with another
    teacher's (SmolLM2's) into one file, each variant with its mixer, tokens, KV, suites and fidelity summary."""
    sys.path.insert(0, str(BENCHMARKS))
    from fidelity import main as fidelity_main
    from fidelity_candidates import main

    kv = {"5": 1.0, "10": 1.0, "20": 0.5, "40": 0.25}
    split = {"kl": 0.2, "top1": 0.8, "confident": 0.99, "positions": 10, "confident_positions": 3, "kl_sum": 2.0,
             "top1_hits": 8, "confident_hits": 3}
    details = {"config": {"long_range": 16}, "texts": {kind: {s: dict(split) for s in ("all", "local", "long")}
                                                       for kind in ("heldout", "generated")},
               "greedy": {"tokens": [3, 5], "mean": 4.0, "median": 4.0, "of": 64}, "reach": {}}
    run = {"teacher": "t19", "budget_tokens": 100, "top": 2, "state": 8, "quick": False, "device": "gpu",
           "torch": "2.x", "kv_items_per_size": 2, "heldout_tokens": 10, "kept_heads": [[0, 1], [3, 2]],
           "teacher_eval": {"kv_retrieval": kv, "heldout_ppl": 5.0, "suites": {"records": 0.99}},
           "rows": [{"variant": "baseline", "tokens": 100, "kv_retrieval": kv, "heldout_ppl": 7.0,
                     "train_seconds": 1.0, "recipe_changes": {}, "build": {}, "suites": {"records": 0.7},
                     "fidelity": details, "date": "2026-12-04T16:00:00+00:00"},
                    {"variant": "window-only-free", "tokens": 0, "kv_retrieval": kv, "heldout_ppl": 8.0,
                     "train_seconds": 0.0, "recipe_changes": {}, "build": {"mixer": "window", "window": 16},
                     "distilled": False, "suites": {"records": 0.98}, "date": "2026-12-04T17:00:00+00:00"}]}
    (tmp_path / "fc.json").write_text(json.dumps(run))
    assert main(["--merge", str(tmp_path / "fc.json"), "--out", str(tmp_path / "all.json"),
                 "--fidelity-out", str(tmp_path / "fc-fid.json")]) == 0
    rows = json.loads((tmp_path / "fc-fid.json").read_text())
    assert [r["name"] for r in rows["rows"]] == ["teacher", "baseline", "window-only-free"]
    base, window = rows["rows"][1], rows["rows"][2]
    assert base["heads"] == "0.1,3.2" and base["mixer"] == "discrete_mamba2" and base["state_size"] == 8
    assert base["fidelity"]["heldout"]["all"]["top1"] == 0.8 and "kl_sum" not in base["fidelity"]["heldout"]["all"]
    assert base["fidelity"]["greedy"] == {"mean": 4.0, "median": 4.0, "of": 64} and "testbed recipe" in base["recipe"]
    assert window["mixer"] == "window" and window["state_size"] is None and window["recipe"] == "built, not distilled"
    other = {"teacher": "smol", "settings": {}, "device": "gpu", "versions": {"torch": "2.x"}, "date": "d",
             "quick": False, "rows": [{"name": "teacher", "kept_heads": 270, "heads": "all", "mixer": None,
                                       "state_size": None, "tokens": None, "recipe": "teacher", "kv": kv, "ppl": 16.0}]}
    (tmp_path / "smol.json").write_text(json.dumps(other))
    assert fidelity_main(["--merge", str(tmp_path / "fc-fid.json"), str(tmp_path / "smol.json"),
                          "--out", str(tmp_path / "fidelity.json")]) == 0
    merged = json.loads((tmp_path / "fidelity.json").read_text())
    assert merged["teachers"] == ["t19", "smol"] and len(merged["rows"]) == 4
    text = (tmp_path / "fidelity.md").read_text()
    assert "## t19" in text and "## smol" in text and "| window-only-free | 2 | window W=16 |" in text


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
