"""scan.json / scan.csv / heads.png, the loader's errors, the CLI, and errors for models the scan cannot take."""

import json

import pytest
import typer
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from radistill.models.access import HeadLayout, UnsupportedModelError
from radistill.models.presets import random_model, tiny_config
from radistill.probes.items import ProbeItem
from radistill.scan import load_scan, scan_model
from radistill.scan.cli import register
from radistill.scan.result import ScanResult, rank_heads
from radistill.utils.errors import RadistillError

LAYOUT = HeadLayout("llama", num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, hidden_size=16)


def small_result(metric="logprob") -> ScanResult:
    baseline = {"accuracy": 1.0, "logprob": -0.1}
    ablated = {(0, 0): {"accuracy": 1.0, "logprob": -0.5}, (0, 1): {"accuracy": 0.5, "logprob": -0.2},
               (1, 0): {"accuracy": 1.0, "logprob": -0.1}, (1, 1): {"accuracy": 0.5, "logprob": -0.9}}
    return ScanResult("tiny", "abc", LAYOUT, {"kind": "kv", "pairs": 3}, metric, "zero", baseline,
                      rank_heads(LAYOUT, baseline, ablated, metric))


def test_ranking_by_either_metric():
    assert [h.name for h in small_result("logprob").heads] == ["1.1", "0.0", "0.1", "1.0"]
    assert [h.name for h in small_result("accuracy").heads] == ["1.1", "0.1", "0.0", "1.0"]  # ties: log-prob
    assert small_result().heads[0].kv_head == 0


def test_files_round_trip(tmp_path):
    result = small_result()
    result.save(tmp_path)
    assert load_scan(tmp_path) == result == load_scan(tmp_path / "scan.json")
    data = json.loads((tmp_path / "scan.json").read_text())
    assert set(data["heads"][0]) == {"layer", "head", "kv_head", "score", "accuracy_drop", "logprob_drop"}
    assert (tmp_path / "scan.csv").read_text().splitlines()[1].startswith("1,1,1,0,")
    assert (tmp_path / "heads.png").read_bytes()[:4] == b"\x89PNG"


def test_loader_errors(tmp_path):
    with pytest.raises(RadistillError, match="run `radistill scan"):
        load_scan(tmp_path)
    (tmp_path / "scan.json").write_text("{oops")
    with pytest.raises(RadistillError, match="not valid JSON"):
        load_scan(tmp_path)
    (tmp_path / "scan.json").write_text('{"model": "x"}')
    with pytest.raises(RadistillError, match="missing fingerprint"):
        load_scan(tmp_path)


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64)).eval()
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        scan_model(gpt2, None, "gpt2-tiny", items=[ProbeItem("a", ("b",), 0)], probe={})


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, teacher_19m_path):
    """A tiny random Llama saved with the teacher's tokenizer (a complete HF directory, built in a second)."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    random_model(tiny_config("llama", vocab_size=8192)).save_pretrained(directory)
    AutoTokenizer.from_pretrained(teacher_19m_path).save_pretrained(directory)
    return directory


def cli_app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


@pytest.mark.shared
def test_cli_scan_and_analyze(tiny_model_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "scan"
    result = runner.invoke(cli_app(), ["scan", str(tiny_model_dir), "--out", str(out), "--pairs", "4",
                                       "--samples", "3", "--device", "cpu", "--ablation", "mean"])
    assert result.exit_code == 0, result.output
    scan = load_scan(out)
    assert len(scan.heads) == 12 and scan.probe["pairs"] == 4 and scan.ablation == "mean"
    result = runner.invoke(cli_app(), ["analyze", str(tiny_model_dir), "--scan", str(out / "scan.json"),
                                       "--out", str(out), "--top", "2", "--samples", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    analysis = json.loads((out / "analysis.json").read_text())
    assert [(h["layer"], h["head"]) for h in analysis["heads"]] == [(h.layer, h.head) for h in scan.heads[:2]]
    assert all((out / h["image"]).exists() for h in analysis["heads"])


@pytest.mark.shared
def test_cli_scan_with_a_user_probe(tiny_model_dir, tmp_path):
    probe = tmp_path / "probe.jsonl"
    probe.write_text('{"prompt": "The capital of France is", "choices": [" Paris", " a big city"], "answer": 0}\n'
                     '{"prompt": "2 + 2 =", "choices": [" 4", " five"], "answer": " 4"}\n')
    result = CliRunner().invoke(cli_app(), ["scan", str(tiny_model_dir), "--out", str(tmp_path), "--probe", str(probe),
                                            "--device", "cpu", "--metric", "accuracy"])
    assert result.exit_code == 0, result.output
    scan = load_scan(tmp_path)
    assert scan.probe["kind"] == "jsonl" and scan.probe["items"] == 2 and scan.metric == "accuracy"


@pytest.mark.shared
def test_cli_errors(tiny_model_dir, tmp_path):
    runner = CliRunner()
    cases = [
        (["scan", str(tmp_path / "nowhere"), "--out", str(tmp_path)], "could not load"),
        (["scan", str(tiny_model_dir), "--out", str(tmp_path), "--pairs", "100", "--device", "cpu"], "context is 512"),
        (["scan", str(tiny_model_dir), "--out", str(tmp_path), "--metric", "f1"], "unknown metric"),
        (["analyze", str(tiny_model_dir), "--scan", str(tmp_path / "scan.json"), "--out", str(tmp_path)],
         "run `radistill scan"),
    ]
    for args, message in cases:
        result = runner.invoke(cli_app(), args)
        assert isinstance(result.exception, RadistillError), (args, result.output)
        assert message in str(result.exception)
