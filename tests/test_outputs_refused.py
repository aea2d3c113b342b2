"""`scan`, `eval` and `build` never overwrite earlier results without --overwrite, and refuse before loading
anything; `eval` writes eval.json beside the model by default, and lm-eval's own results beside it."""

import json
import sys

import pytest
from typer.testing import CliRunner

from radistill.cli import app, main
from radistill.eval.coverage import EvalReport, TaskResult
from radistill.models.presets import random_model, tiny_config
from radistill.utils.errors import RadistillError
from distill_helpers import char_tokenizer


class Loaded(Exception):
    """Raised by a stand-in for load_model: the command got as far as loading the model."""


def no_loading(*args, **kwargs):
    raise Loaded


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama on disk with the character tokenizer."""
    tokenizer = char_tokenizer()
    path = tmp_path_factory.mktemp("tiny") / "model"
    random_model(tiny_config("llama", vocab_size=len(tokenizer), num_hidden_layers=2,
                             max_position_embeddings=2048)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- scan ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("existing", ["scan.json", "scan.csv", "heads.png"])
def test_scan_refuses_existing_results_before_loading(tmp_path, monkeypatch, existing):
    from radistill.scan.run import run_scan

    monkeypatch.setattr("radistill.scan.run.load_model", no_loading)
    (tmp_path / existing).write_text("earlier results")
    with pytest.raises(RadistillError, match=f"{existing} already exists: pass --overwrite"):
        run_scan("some/model", tmp_path)
    assert (tmp_path / existing).read_text() == "earlier results"
    with pytest.raises(Loaded):  # --overwrite gets past the check
        run_scan("some/model", tmp_path, overwrite=True)


def test_scan_cli_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("radistill.scan.run.load_model", no_loading)
    monkeypatch.setattr("radistill.models.access.load_config", no_loading)  # the CLI reads the config first
    (tmp_path / "scan.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["radistill", "scan", "some/model", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    error = " ".join(capsys.readouterr().err.split())  # rich wraps at the terminal's width
    assert "scan.json already exists: pass --overwrite" in error
    result = CliRunner().invoke(app, ["scan", "some/model", "--out", str(tmp_path), "--overwrite"])
    assert isinstance(result.exception, Loaded)


# --- build -----------------------------------------------------------------------------------------------------
def test_build_refuses_an_existing_out_before_loading_the_teacher(tmp_path, monkeypatch):
    from radistill.hybrid.build import build_student

    monkeypatch.setattr("radistill.hybrid.build.load_model", no_loading)
    monkeypatch.setattr("radistill.hybrid.build.load_config", no_loading)  # read first, for the saved dtype
    out = tmp_path / "student"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(RadistillError, match="already exists: choose another --out or pass --overwrite"):
        build_student("some/teacher", out, heads="0.1", state_size=8)
    assert (out / "config.json").read_text() == "{}"
    with pytest.raises(Loaded):
        build_student("some/teacher", out, heads="0.1", state_size=8, overwrite=True)


# --- eval ------------------------------------------------------------------------------------------------------
EVAL_ARGS = ["--tasks", "kv", "--kv-pairs", "2", "--kv-samples", "2", "--no-generate", "--device", "cpu"]


def test_eval_writes_eval_json_beside_the_model_and_refuses_to_replace_it(model_dir):
    target = model_dir / "eval.json"
    target.unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["eval", str(model_dir), *EVAL_ARGS])
    assert result.exit_code == 0, result.output
    assert str(target) in "".join(result.output.split())  # it says where (rich may wrap the path)
    report = EvalReport.load(target)
    assert report.model == str(model_dir) and report.tasks[0].name.startswith("kv")
    first = target.read_text()
    result = CliRunner().invoke(app, ["eval", str(model_dir), *EVAL_ARGS])
    assert isinstance(result.exception, RadistillError) and "eval.json already exists" in str(result.exception)
    assert target.read_text() == first
    result = CliRunner().invoke(app, ["eval", str(model_dir), *EVAL_ARGS, "--overwrite"])
    assert result.exit_code == 0, result.output
    EvalReport.load(target)


def test_eval_out_refuses_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr("radistill.models.access.load_model", no_loading)
    out = tmp_path / "results.json"
    out.write_text("earlier")
    result = CliRunner().invoke(app, ["eval", "some/model", "--out", str(out), *EVAL_ARGS])
    assert isinstance(result.exception, RadistillError) and "results.json already exists" in str(result.exception)
    assert out.read_text() == "earlier"
    # a directory given as --out gets eval.json inside it
    result = CliRunner().invoke(app, ["eval", "some/model", "--out", str(tmp_path), *EVAL_ARGS])
    assert isinstance(result.exception, Loaded)


def test_default_path_of_a_hub_id_is_in_the_current_directory():
    from radistill.eval.runner import default_eval_path, harness_path

    assert str(default_eval_path("org/model")) == "eval-org--model.json"
    assert harness_path(default_eval_path("org/model")).name == "eval-org--model.lm-eval.json"


def test_lm_eval_results_are_kept_beside_eval_json(model_dir, tmp_path, monkeypatch):
    """What lm-eval returns (stderr, versions) is written as it came, for the model and the teacher; a rerun with
    --overwrite and no lm-eval task removes it (it would describe the replaced results)."""
    calls = []

    def fake_harness(model, tokenizer, tasks, *args, raw=None, **kwargs):
        calls.append(dict(tasks))
        raw.update({"results": {"mytask": {"acc,none": 0.5 + len(calls) / 10, "acc_stderr,none": 0.01}},
                    "versions": {"mytask": 1.0}, "n-shot": {"mytask": 0}})
        return [TaskResult("mytask", "acc", 0.5 + len(calls) / 10)]

    monkeypatch.setattr("radistill.eval.runner.lm_eval_tasks", fake_harness)
    out = tmp_path / "eval.json"
    args = ["eval", str(model_dir), "--teacher", str(model_dir), "--out", str(out), "--tasks", "mytask@retrieval",
            "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    raw = json.loads((tmp_path / "eval.lm-eval.json").read_text())
    assert raw["model"] == str(model_dir) and raw["teacher"] == str(model_dir)
    assert raw["lm_eval"]["model"]["results"]["mytask"]["acc_stderr,none"] == 0.01
    assert raw["lm_eval"]["teacher"]["versions"] == {"mytask": 1.0}
    assert raw["lm_eval"]["teacher"]["results"]["mytask"]["acc,none"] == pytest.approx(0.7)
    assert "lm-eval's results" in " ".join(result.output.split())
    result = CliRunner().invoke(app, args)  # both files exist: refused
    assert isinstance(result.exception, RadistillError) and "already exists" in str(result.exception)
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--out", str(out), *EVAL_ARGS, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "eval.lm-eval.json").exists()
