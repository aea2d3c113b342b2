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
    def run(names, budget=50, wall=10.0, lr=1, skipped_lr=1):
        recipe = {"seed": 0, "stages": {"1": {"enabled": False, "lr": skipped_lr}, "2": {"enabled": True, "lr": lr}}}
        return {"students": [{"name": n} for n in names], "teacher": {"ppl": 5.5}, "recipe": recipe,
                "budget_tokens": budget, "budget_mode": "fixed", "device": "H100", "torch": "2.11",
                "kv_items_per_size": 200, "heldout_tokens": 64, "quick": False, "wall_seconds": wall,
                "predicted_seconds": wall, "timings": {}, "compiled_graphs": 1, "measured_tokens_per_s": {},
                "measured_seconds_per_student": {}}

    sys.path.insert(0, str(BENCHMARKS))
    from testbed_recovery import merge_runs

    merged = merge_runs([run(["top4"], wall=2.0), run(["none", "random"], wall=3.0, skipped_lr=9)])  # a skipped
    assert [s["name"] for s in merged["students"]] == ["top4", "none", "random"]  # stage's settings change nothing
    assert merged["wall_seconds"] == 5.0 and [r["students"] for r in merged["runs"]] == [["top4"], ["none", "random"]]
    again = merge_runs([merged, run(["top8"], wall=4.0)])  # a merged file merged again keeps its runs
    assert [r["students"] for r in again["runs"]] == [["top4"], ["none", "random"], ["top8"]]
    assert again["wall_seconds"] == 9.0
    for bad, why in (([run(["a"]), run(["b"], budget=60)], "budget_tokens"), ([run(["a"]), run(["b"], lr=2)], "recipe"),
                     ([run(["a"]), run(["a"])], "more than one")):
        with pytest.raises(SystemExit, match=why):
            merge_runs(bad)


@pytest.mark.skipif(not (BENCHMARKS.parents[1] / "shared" / "fixtures" / "teacher-19m").exists(),
                    reason="needs ../shared/fixtures (teacher-19m and the prose corpus)")
def test_testbed_quick_runs_stage1_before_stages_2_and_3(tmp_path):
    result = run_quick("testbed_recovery.py", tmp_path / "testbed.json", "--students", "top4-s64",
                       "--stage1-share", "0.25", "--budget-tokens", "4096", "--work", str(tmp_path / "work"))
    stages = result["recipe"]["stages"]
    assert [k for k, cfg in stages.items() if cfg["enabled"]] == ["1", "2", "3"]
    (student,) = result["students"]
    assert student["tokens"] == sum(cfg["tokens"] for cfg in stages.values()) > stages["3"]["tokens"]
    assert set(student["kv_retrieval"]) == {"5", "10", "20", "40"}
    assert (tmp_path / "work" / "top4-s64").is_dir()


def test_startup_benchmark_times_help_and_usage_errors(tmp_path):
    out = tmp_path / "startup.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "startup.py"), "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["versions"]["python"] and result["machine"]["cpus"]
    rows = {r["case"]: r for r in result["rows"]}
    for row in rows.values():
        assert row["exit_code"] == row["expected_exit"] and row["median_s"] > 0, row
        if row["expected_exit"] == 2:  # a usage error is one line
            assert row["stderr_lines"] == 1, row


@pytest.mark.slow
def test_generate_benchmark_quick_runs_teacher_and_both_hybrids_through_generate(tmp_path):
    result = run_quick("generate.py", tmp_path / "generate.json")
    assert result["errors"] == [] and result["skipped"] == []
    teacher, *hybrids = result["models"]
    assert [h.split()[1] for h in hybrids] == ["discrete_mamba2", "window_recurrent"]
    for name in result["models"]:
        assert all(v > 0 for v in result["prefill_s"][name].values())
        assert all(cell["tokens_per_s"] > 0 and cell["bound_tokens_per_s"] > 0
                   for cell in result["decode"][name].values())
        assert result["long"][name]["ttft_s"] > 0
    # the byte counts come from the real caches: the teacher's KV per sequence is the config's 2 * layers *
    # kv_heads * head_dim * length * 4 (float32 on CPU); the window_recurrent cache holds its ring and recurrence
    (length,) = result["cache_bytes_per_sequence"][teacher]
    assert result["cache_bytes_per_sequence"][teacher][length]["kv"] == 2 * 4 * 2 * 32 * int(length) * 4
    assert {"window.k", "recurrence.ssm"} <= set(result["cache_bytes_per_sequence"][hybrids[1]][length])
    for name in result["models"]:  # float32 everywhere on CPU: the caches hold what radistill.memory accounts
        measured, config = (result[k][name][length] for k in ("cache_bytes_per_sequence", "config_bytes_per_sequence"))
        assert measured["kv"] == config["kv"] and measured["total"] == sum(config.values())
    for name in hybrids:  # ceiling = teacher bytes / hybrid bytes, per cell
        for cell, ceiling in result["ceiling"][name].items():
            assert ceiling == pytest.approx(result["decode"][teacher][cell]["bytes_per_step"]
                                            / result["decode"][name][cell]["bytes_per_step"])
        assert set(result["prefill_torch_scan_s"][name]) == {"32x1", "64x1"}
        # the compiled static path continues prompts exactly as the eager growing cache does (float32 on CPU)
        assert result["agreement"][name]["equal_fraction"] == 1.0
        assert result["agreement"][name]["first_different_step"] is None
    # every decode step of a cell called the compiled forward with the same tensor layouts (one graph)
    assert all(cell["step_input_layouts"] == 1 for name in result["models"]
               for cell in result["decode"][name].values())
    # each hybrid once more through its own greedy loop (on CPU run without a graph): same bytes, its own speed
    assert result["graph_loop_models"] == [f"{h} graph loop" for h in hybrids]
    for name, hybrid in zip(result["graph_loop_models"], hybrids):
        assert set(result["decode"][name]) == set(result["decode"][hybrid])
        for cell, row in result["decode"][name].items():
            assert row["tokens_per_s"] > 0 and row["bytes_per_step"] == result["decode"][hybrid][cell]["bytes_per_step"]
    assert (tmp_path / "generate.md").read_text().startswith("# generate() benchmark")
    assert "| ceiling |" in (tmp_path / "generate.md").read_text()
    assert "graph loop |" in (tmp_path / "generate.md").read_text()
    for name in result["graph_loop_models"]:  # the long generation through the loop too
        assert result["long"][name]["ttft_s"] > 0 and result["long"][name]["decode_tokens_per_s"] > 0
    # --graph-loop-only: the loop's rows again (nothing compiles), the teacher's copied from the run above, said so
    # (--compiled-loop: the loop once more with the step's forward compiled; on CPU traced by aot_eager)
    again = run_quick("generate.py", tmp_path / "graph.json", "--graph-loop-only", "--mixers", "discrete_mamba2",
                      "--teacher-rows-from", str(tmp_path / "generate.json"), "--compiled-loop")
    loop, compiled = again["graph_loop_models"]
    assert compiled == f"{loop} compiled"
    assert again["errors"] == [] and again["decode"][again["models"][1]] == {}
    assert set(again["decode"][loop]) == set(again["decode"][compiled]) == set(result["decode"][loop])
    # (tokens/s may be None on CPU: two 2-4-token calls of a tiny model differ by less than their spread)
    assert all(row["short_tokens"] >= 2 and row["first_token_s"] > 0 for name in (loop, compiled)
               for row in again["decode"][name].values())
    assert again["decode"][teacher] == result["decode"][teacher]
    assert again["teacher_rows_from"]["file"] == str(tmp_path / "generate.json")
    assert "copied from" in (tmp_path / "graph.md").read_text()


@pytest.mark.slow
def test_generate_benchmark_profile_of_a_decode_step_and_a_prefill_per_model(tmp_path):
    """--profile: per model, the compiled and the eager decode step (with generate's own inputs) and a prefill,
    each with its top ops and counts -> generate-profile.{json,md} (CPU: aten ops stand in for kernels)."""
    result = run_quick("generate.py", tmp_path / "generate.json", "--profile", "--mixers", "window_recurrent",
                       "--skip", "prefill,long,agreement,hf-loop")
    assert result["errors"] == [] and result["done"][-1].startswith("profile")
    # hf-loop: the hybrid's decode rows through transformers' loop are left out, its graph-loop rows stay
    teacher, hybrid = result["models"]
    assert result["decode"][hybrid] == {} and result["decode"][teacher]
    assert set(result["decode"][f"{hybrid} graph loop"]) == set(result["decode"][teacher])
    profile = json.loads((tmp_path / "generate-profile.json").read_text())
    assert profile["errors"] == [] and set(profile["cases"]) == set(result["models"])
    for cases in profile["cases"].values():
        step = cases["decode step 48x2"]
        assert step["compiled"]["top"] and step["eager"]["kernels_run"] > 0
        assert ["input_ids", [2, 1]] in step["step_inputs"]  # one token per sequence of the batch
        assert step["compiled"]["top"][0]["total_us"] >= step["compiled"]["top"][-1]["total_us"] > 0
        assert cases["prefill 32x1"]["top"][0]["total_us"] > 0
    assert "compiled step" in (tmp_path / "generate-profile.md").read_text()


def test_generate_benchmark_parts_start_only_when_expected_to_end_by_the_limit():
    """run_parts on a fake clock: a part is skipped when the longest finished part of its kind (for a first of a
    kind: of any kind) would overrun the limit less the profile's reserve; the profile is expected to need the
    reserve and may use it."""
    sys.path.insert(0, str(BENCHMARKS))
    from generate import run_parts

    now = [0.0]
    costs = {"a1": 30, "b1": 5, "a2": 30, "a3": 30, "b2": 5, "c1": 1, "profile": 20}
    work = [(w, w[0] if w != "profile" else "profile", lambda w=w: now.__setitem__(0, now[0] + costs[w]))
            for w in costs]
    result = {"done": [], "skipped": []}
    saves = []
    run_parts(work, 100.0, 25.0, 0.0, result, lambda: saves.append(1), clock=lambda: now[0])
    # limit 75 before the profile: a1 -> 30; b1 (expected 30, the longest so far) -> 35; a2 (30) -> 65; a3 would end
    # at 95: skipped; b2 (5) -> 70; c1 (expected 30) would end at 100: skipped; profile (expected 25 <= 100) -> 90
    assert [d.split(" (")[0] for d in result["done"]] == ["a1", "b1", "a2", "b2", "profile"]
    assert result["skipped"] == ["a3", "c1"] and len(saves) == 5
    result = {"done": [], "skipped": []}
    now[0] = 0.0
    run_parts(work, None, 25.0, 0.0, result, lambda: None, clock=lambda: now[0])
    assert len(result["done"]) == len(costs) and result["skipped"] == []


def test_generate_benchmark_time_limit_stops_between_parts_and_keeps_what_ran(tmp_path):
    """--time-limit: parts after the limit are listed as not run, and what ran is saved (json and md)."""
    result = run_quick("generate.py", tmp_path / "generate.json", "--time-limit", "0.001", "--mixers",
                       "window_recurrent")
    assert result["done"] == [] and result["skipped"][:2] == ["decode 48x1 teacher",
                                                             "decode 48x1 hybrid window_recurrent K=4 N=8 W=16 S=4"]
    assert result["skipped"][-1] == "agreement"
    assert "Not run (--time-limit" in (tmp_path / "generate.md").read_text()


def test_fidelity_benchmark_quick_rows_and_merge(tmp_path):
    """``fidelity.py --quick``: a teacher row and a 4-head student row with KV, ppl, fidelity and the suites;
    ``--merge`` joins runs of one teacher and refuses a student named twice."""
    result = run_quick("fidelity.py", tmp_path / "fidelity.json")
    teacher, student = result["rows"]
    assert teacher["name"] == "teacher" and teacher["kept_heads"] == 80 and "fidelity" not in teacher
    assert student["kept_heads"] == 4 and student["state_size"] == 8 and student["recipe"].startswith("untrained")
    assert 0 < student["fidelity"]["heldout"]["all"]["top1"] < 1 and student["fidelity"]["heldout"]["all"]["kl"] > 0
    assert set(student["kv"]) == {"5", "20"} and student["ppl"] > teacher["ppl"]
    assert set(student["suites"]) == set(teacher["suites"])
    assert (tmp_path / "fidelity.md").read_text().count("\n| ") == 3  # header + two rows

    sys.path.insert(0, str(BENCHMARKS))
    from fidelity import merge_runs

    other = {**result, "rows": [teacher, {**student, "name": "other"}], "device": "H200"}
    merged = merge_runs([result, other])
    assert [r["name"] for r in merged["rows"]] == ["teacher", student["name"], "other"]
    assert merged["rows"][2]["device"] == "H200"
    with pytest.raises(Exception, match="two runs"):
        merge_runs([result, result])


@pytest.mark.parametrize("mixer", ["discrete_mamba2", "window_recurrent"])
def test_host_overhead_benchmark_quick_counts_every_operator_once(tmp_path, mixer):
    """benchmarks/host_overhead.py --quick: the prefill's operators split into outside-the-layers, per layer and
    the scan add up to the total; the teacher has no scan; decode steps and generate's own work were counted; with
    --mixer window_recurrent the hybrid is the build's default student (window 16, 4 sinks), its recurrences
    counted as the scan."""
    result = run_quick("host_overhead.py", tmp_path / "host.json", "--mixer", mixer)
    teacher, hybrid = result["models"].values()
    label = list(result["models"])[1]
    assert (mixer in label and "W=16 S=4" in label) if mixer == "window_recurrent" else label == "hybrid K=4 N=8"
    for model in (teacher, hybrid):
        ops = model["prefill_ops"]
        parts = ops["outside_layers"] + ops["scan"] + sum(ops["per_layer"])
        assert ops["total"] == parts == sum(ops["by_name"].values())
        assert model["decode_ops"] > 0 and model["generate_outside_ops"] > 0 and model["prefill_host_ms"] > 0
    assert teacher["prefill_ops"]["scan"] == 0 and hybrid["prefill_ops"]["scan_calls"] == 4  # one per layer
    assert hybrid["prefill_ops"]["layer_with_kept_heads"] > hybrid["prefill_ops"]["layer_recurrent_only"]
    assert (tmp_path / "host.md").read_text().count("| aten ops per prefill forward |") == 1


@pytest.mark.skipif(not (BENCHMARKS.parents[1] / "shared" / "fixtures" / "teacher-19m").exists(),
                    reason="needs ../shared/fixtures (teacher-19m and the prose corpus)")
def test_calibration_tokens_benchmark_compares_each_build_with_the_largest(tmp_path):
    result = run_quick("calibration_tokens.py", tmp_path / "calibration_tokens.json")
    small, reference = result["rows"]
    assert (small["tokens"], reference["tokens"], result["reference_tokens"]) == (256, 512, 512)
    assert "half_life_median_rel" not in reference and small["half_life_max_rel"] >= small["half_life_median_rel"]
    assert small["half_life_max_rel"] > 0  # other text, other distances: a comparison that sees nothing is broken
    assert all(r["build_s"] > 0 and r["built_ppl"] > 1 for r in result["rows"])
    assert "| 512 |" in (tmp_path / "calibration_tokens.md").read_text()
