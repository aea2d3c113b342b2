"""`radistill run RECIPE` end to end on a tiny random teacher (every step, then every step skipped, then only what
a changed setting affects), the recipe's parsing, and `radistill demo --quick` as CI runs it."""

import json
from pathlib import Path

import pytest
import yaml

from radistill.pipeline import Pipeline, Recipe, deep_merge
from radistill.utils.errors import RadistillError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from radistill.models.presets import random_model, tiny_config

    path = tmp_path_factory.mktemp("teacher")
    tokenizer = AutoTokenizer.from_pretrained(EXAMPLES / "teacher-19m")
    random_model(tiny_config("llama", vocab_size=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_recipe(teacher: Path, out: Path) -> dict:
    stage = {"tokens": 256, "seq_len": 64, "batch_size": 2, "grad_accum": 1, "log_every": 1}
    return {
        "teacher": str(teacher), "out": str(out), "data": str(EXAMPLES / "data" / "prose-train.txt.xz"),
        "students": [{"name": "top2", "keep": 2}, {"name": "none", "keep": 0}], "state_size": 8, "device": "cpu",
        "scan": {"pairs": 5, "samples": 4, "analyze_top": 2},
        "distill": {"stages": {"2": stage, "3": stage}, "data": {"heldout_docs": 0, "shuffle_window": 8}},
        "eval": {"tasks": ["kv", "ppl"], "kv": {"pairs": [5], "samples": 4}, "seq_len": 128, "ppl_tokens": 256,
                 "text": str(EXAMPLES / "data" / "prose-heldout.txt.xz")},
    }


def mtimes(root: Path) -> dict[str, float]:
    files = ["scan/scan.json", "students/top2/model.safetensors", "runs/top2/stage3/config.json",
             "runs/none/stage3/config.json", "eval/teacher.json", "eval/top2.json"]
    return {f: (root / f).stat().st_mtime_ns for f in files}


def test_run_does_each_step_once(tiny_teacher, tmp_path):
    out = tmp_path / "run"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe(tiny_teacher, out)))
    page = Pipeline(Recipe.load(recipe_file)).run()
    assert page == out / "report" / "index.html" and "top2 (2 attention heads kept)" in page.read_text()
    evaluated = json.loads((out / "eval" / "top2.json").read_text())
    assert evaluated["teacher"] == str(tiny_teacher) and "teacher_value" in evaluated["tasks"]["kv_ret"]
    assert json.loads((out / "runs" / "top2" / "stage3" / "config.json").read_text())["kept_heads"] != [[]] * 3
    assert (out / "scan" / "analysis.json").exists()

    before = mtimes(out)
    Pipeline(Recipe.load(recipe_file)).run()
    assert mtimes(out) == before  # nothing redone

    changed = tiny_recipe(tiny_teacher, out)
    changed["eval"]["kv"]["samples"] = 6
    Pipeline(Recipe.from_dict(changed)).run()
    after = mtimes(out)
    assert after["eval/top2.json"] != before["eval/top2.json"]
    assert {k: v for k, v in after.items() if not k.startswith("eval")} == {
        k: v for k, v in before.items() if not k.startswith("eval")}


def test_recipe_paths_are_relative_to_the_recipe_file(tmp_path):
    (tmp_path / "models" / "t").mkdir(parents=True)
    (tmp_path / "held.txt").write_text("x")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"teacher": "models/t", "out": "run", "data": "org/dataset",
                                                      "eval": {"tasks": ["kv", "ppl"], "text": "held.txt"}}))
    recipe = Recipe.load(tmp_path / "r.yaml")
    assert recipe.teacher == str(tmp_path / "models" / "t") and recipe.out == str(tmp_path / "run")
    assert recipe.data == "org/dataset"  # not a local path: an HF dataset id
    assert recipe.eval_config().text == str(tmp_path / "held.txt")
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))).to_dict() == recipe.to_dict()


def test_recipe_builds_window_recurrent_students_with_their_window(tmp_path, monkeypatch):
    """`mixer: window_recurrent` + `window: 16` reach build_student; a recipe without `window` keeps its old stamp."""
    import radistill.hybrid.build as build

    seen = {}
    monkeypatch.setattr(build, "build_student", lambda *a, **kw: seen.update(kw))
    recipe = Recipe.from_dict({"teacher": "t", "out": str(tmp_path / "run"), "mixer": "window_recurrent",
                               "window": 16})
    pipeline = Pipeline(recipe)
    pipeline.build(recipe.students[0], "scan")
    assert (seen["mixer"], seen["window"]) == ("window_recurrent", 16)
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))).window == 16
    assert Recipe.from_dict({"teacher": "t"}).window is None


def test_recipe_errors_name_the_fix():
    with pytest.raises(RadistillError, match="valid keys"):
        Recipe.from_dict({"teacher": "t", "studnets": []})
    with pytest.raises(RadistillError, match="names no teacher"):
        Recipe.from_dict({"out": "x"})
    with pytest.raises(RadistillError, match="exactly one of keep"):
        Recipe.from_dict({"teacher": "t", "students": [{"name": "a"}]})
    with pytest.raises(RadistillError, match="distinct names"):
        Recipe.from_dict({"teacher": "t", "students": [{"name": "a", "keep": 1}, {"name": "a", "keep": 2}]})
    with pytest.raises(RadistillError, match="unknown recipe key"):
        Recipe.from_dict({"teacher": "t", "distill": {"stages": {"2": {"tokns": 5}}}})


def test_demo_recipes_are_valid():
    from radistill.distill.recipe import read_recipe_file

    demo = Recipe.load(EXAMPLES / "demo.yaml")
    quick = Recipe.from_dict(
        deep_merge(read_recipe_file(EXAMPLES / "demo.yaml"), read_recipe_file(EXAMPLES / "demo-quick.yaml")),
        base=EXAMPLES)
    assert Path(demo.teacher, "config.json").exists() and Path(demo.data).exists()
    assert [s.keep for s in demo.students] == [s.keep for s in quick.students]
    assert quick.distill_recipe().stage(3).tokens < demo.distill_recipe().stage(3).tokens


def test_demo_quick(tmp_path):
    from typer.testing import CliRunner

    from radistill.cli import app

    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "demo" / "report" / "index.html").read_text()
    assert "not run" not in page
    assert "top16 (16 attention heads kept)" in page and "no-heads (0 attention heads kept)" in page
    assert "fidelity to the teacher: KL" in page and "own samples" in page
    from rich.console import Console

    recorder = Console(record=True, width=200)  # the summary table the demo prints last
    recorder.print(Pipeline(Recipe.from_dict(json.loads((tmp_path / "demo" / "recipe.json").read_text()))).summary())
    text = recorder.export_text()
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith("│")}
    assert "confident" in text and "—" not in rows["top16"] and "—" not in rows["no-heads"]
    student = json.loads((tmp_path / "demo" / "eval" / "top16.json").read_text())
    assert student["tasks"]["fidelity"]["details"]["texts"]["heldout"]["all"]["positions"] == 2 * 64
