"""The report builds from a small hand-made run directory, embeds its images, and says "not run" for what is missing."""

import base64
import html
import json
import re
from pathlib import Path

import pytest

from radistill.eval.coverage import EvalReport, TaskResult
from radistill.report import build_report, discover
from radistill.utils.errors import RadistillError

LAYERS, HEADS = 3, 4


def scan_json() -> dict:
    heads = [{"layer": l, "head": h, "kv_head": h // 2, "score": float(l * HEADS + h) / 10,
              "accuracy_drop": 0.1, "logprob_drop": float(l * HEADS + h) / 10}
             for l in range(LAYERS) for h in range(HEADS)]
    heads.sort(key=lambda row: -row["score"])
    layout = {"model_type": "llama", "num_layers": LAYERS, "num_heads": HEADS, "num_kv_heads": 2, "head_dim": 16,
              "hidden_size": 64, "max_positions": 512}
    return {"model": "tiny-teacher", "fingerprint": "abc", "layout": layout, "probe": {"kind": "kv", "pairs": 5},
            "metric": "logprob", "ablation": "zero", "baseline": {"accuracy": 1.0, "logprob": -0.1}, "heads": heads}


def student_config(directory: Path, kept: list[list[int]]) -> None:
    from radistill.hybrid.configuration import HybridConfig

    HybridConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, num_key_value_heads=2, head_dim=16, kept_heads=kept,
                 mixer_settings={"state_size": 8}).save_pretrained(directory)


def eval_report(model: str, kv: float, ppl: float) -> EvalReport:
    tasks = [TaskResult("kv_ret", "acc", kv, "retrieval"), TaskResult("kv_ret@5", "acc", kv),
             TaskResult("kv_ret@20", "acc", kv / 2), TaskResult("kv_ret_gen@5", "exact_match", kv),
             TaskResult("arc_easy", "acc", 0.5, "knowledge"),
             TaskResult("ppl", "perplexity", ppl, higher_is_better=False)]
    return EvalReport(model, model + "-fp", tasks, {"tasks": ["kv", "ppl"]})


def metrics(path: Path, scale: float) -> None:
    rows = [{"stage": stage, "step": step, "tokens": step * 1024, "loss": scale * (2 + stage) / step, "lr": 1e-3,
             "tokens_per_s": 900.0} for stage in (2, 3) for step in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": 3, "st')  # torn last line


@pytest.fixture
def pipeline_run(tmp_path) -> Path:
    root = tmp_path / "run"
    (root / "scan").mkdir(parents=True)
    (root / "scan" / "scan.json").write_text(json.dumps(scan_json()))
    # absolute paths as `radistill run` records them: the run's own, and one outside it
    recipe = {"teacher": str(tmp_path / "no-such-teacher"), "out": str(root), "tokenizer": "meta-llama/Llama-3.2-1B",
              "eval": {"text": [str(root / "data" / "heldout.txt")]},
              "students": [{"name": "top2", "keep": 2}, {"name": "none", "keep": 0}]}
    (root / "recipe.json").write_text(json.dumps(recipe))
    for name, kept, scale in (("top2", [[], [], [2, 3]], 1.0), ("none", [[], [], []], 2.0)):
        student_config(root / "students" / name, kept)
        (root / "runs" / name).mkdir(parents=True)
        metrics(root / "runs" / name / "metrics.jsonl", scale)
        student_config(root / "runs" / name / "stage3", kept)
    (root / "eval").mkdir()
    teacher = eval_report("teacher", 1.0, 10.0)
    teacher.save(root / "eval" / "teacher.json")
    eval_report("top2", 0.9, 12.0).with_teacher(teacher).save(root / "eval" / "top2.json")
    eval_report("none", 0.1, 13.0).save(root / "eval" / "none.json")  # no teacher values: the report adds them
    return root


def images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_of_a_pipeline_run(pipeline_run):
    page_path = build_report(pipeline_run)
    assert page_path == pipeline_run / "report" / "index.html"
    page = page_path.read_text()
    pictures = images(page)
    assert len(pictures) == 4 and all(p.startswith(b"\x89PNG") for p in pictures)
    for png in ("heads.png", "kv_retrieval.png", "training.png", "memory.png"):
        assert (page_path.parent / png).stat().st_size > 1000
    assert "top2 (2 attention heads kept)" in page and "none (0 attention heads kept)" in page
    assert "90.0 (90%)" in page and "10.0 (10%)" in page  # KV-Ret with student ÷ teacher
    assert "coverage (retrieval-heavy)" in page
    assert "2.3" in page and "2.2" in page  # kept heads by L.H
    assert "G&amp;A analysis: not run" in page  # no analysis.json in this run
    assert "&quot;teacher&quot;" in page  # the recipe is shown


def test_report_shows_no_absolute_paths(pipeline_run, monkeypatch):
    monkeypatch.chdir(pipeline_run.parent)
    page = build_report(Path(pipeline_run.name)).read_text()  # a relative run directory, as typed on a command line
    assert str(pipeline_run.parent) not in page  # neither the maker's directories nor the run's own location
    assert "Run directory: run · teacher: …/no-such-teacher" in page
    settings = json.loads(html.unescape(re.search(r"<pre>(.*?)</pre>", page, re.S).group(1)))
    assert settings["teacher"] == "…/no-such-teacher" and settings["out"] == "."
    assert settings["eval"]["text"] == ["data/heldout.txt"]  # inside the run: relative to it
    assert settings["tokenizer"] == "meta-llama/Llama-3.2-1B"  # an HF id is no path


def test_report_of_an_empty_directory_says_not_run(tmp_path):
    page = build_report(tmp_path).read_text()
    assert images(page) == []
    for part in ("head scan", "evaluation", "distillation", "memory accounting", "recipe"):
        assert f"{part}: not run" in page


def test_report_of_a_single_distill_run(pipeline_run, tmp_path):
    run = pipeline_run / "runs" / "top2"
    EvalReport.load(pipeline_run / "eval" / "top2.json").save(run / "eval.json")
    inputs = discover(run)
    assert [s.name for s in inputs.students] == ["top2"] and inputs.students[0].kept_heads == [(2, 2), (2, 3)]
    page = build_report(run, tmp_path / "out").read_text()
    assert len(images(page)) == 3  # no scan: kv, training, memory
    assert "head scan: not run" in page


def test_report_of_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(RadistillError, match="not a directory"):
        build_report(tmp_path / "nope")


def test_report_fidelity_section_and_headline(pipeline_run):
    from radistill.eval.fidelity import FidelityConfig, FidelityResult, SplitStats

    assert "fidelity: not run" in build_report(pipeline_run).read_text()
    splits = {"all": SplitStats(10, 2.5, 8, 4, 3), "local": SplitStats(6, 1.0, 5, 2, 2),
              "long": SplitStats(4, 1.5, 3, 2, 1)}
    result = FidelityResult(FidelityConfig(long_range=12), {"heldout": splits}, greedy=[3, 5, 40])
    path = pipeline_run / "eval" / "top2.json"
    report = EvalReport.load(path)
    report.tasks += result.task_results()
    report.save(path)
    page = build_report(pipeline_run).read_text()
    assert "fidelity: not run" not in page and "&gt;= 12 tokens" in page
    assert "fidelity to the teacher: KL 0.250, top-1 80.0%, confident 75.0%" in page  # 2.5 / 10, 8 / 10, 3 / 4
    assert "mean 16.0, median 5 of 64 tokens" in page
    assert "fidelity_top1" not in page  # in its own section, not the task table
