"""A student folder explains itself: its model card (README.md), the dtype it is saved in, and how it loads with and
without radistill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import radistill  # noqa: F401
from radistill.hybrid import HybridConfig, HybridForCausalLM, write_model_card
from radistill.hybrid.build import build_student
from radistill.models.presets import random_model, tiny_config
from radistill.utils.errors import RadistillError
from test_build import VOCAB, byte_tokenizer

HEADS = [(0, 1), (2, 3)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny Llama teacher saved in bf16, as most checkpoints are, with its tokenizer."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "tiny-llama"
    random_model(tiny_config("llama", vocab_size=VOCAB)).to(torch.bfloat16).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def student_dir(teacher_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("students") / "student"
    return build_student(teacher_dir, out, heads=HEADS, state_size=4, device="cpu")


def saved_dtypes(folder: Path) -> set[torch.dtype]:
    with safe_open(folder / "model.safetensors", framework="pt") as fh:
        return {fh.get_tensor(name).dtype for name in fh.keys()}


# ---- dtype --------------------------------------------------------------------------------------------------------


def test_student_is_saved_in_the_teachers_dtype(student_dir):
    assert json.loads((student_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert saved_dtypes(student_dir) == {torch.bfloat16}


def test_dtype_option_overrides_the_saved_dtype(teacher_dir, tmp_path):
    out = build_student(teacher_dir, tmp_path / "fp32", heads=HEADS, state_size=4, device="cpu", dtype="fp32")
    assert saved_dtypes(out) == {torch.float32}
    from radistill.cli import app

    result = CliRunner().invoke(app, ["build", str(teacher_dir), "--heads", "0.1", "--state-size", "4",
                                      "--device", "cpu", "--dtype", "fp32", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert saved_dtypes(tmp_path / "cli") == {torch.float32}


# ---- model card ---------------------------------------------------------------------------------------------------


def front_matter(card: str) -> dict[str, str]:
    head = card.split("---\n")[1]
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in head.splitlines()) if v.strip()}


def test_build_writes_a_model_card(student_dir, teacher_dir):
    card = (student_dir / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "radistill" and json.loads(meta["base_model"]) == str(teacher_dir)
    assert "- radistill" in card
    assert "**2 of" in card and "0.1, 2.3" in card  # kept heads: count and list
    assert "state size N: 4" in card
    # cache per token, from the config: the kept heads' KV heads, K and V of head_dim values, 2 bytes each (bf16)
    config = HybridConfig.from_pretrained(student_dir)
    kv_heads = sum(len(config.kept_kv_heads(i)) for i in range(config.num_hidden_layers))
    teacher_kv = config.num_hidden_layers * config.num_key_value_heads
    assert f"**{kv_heads * 2 * config.head_dim * 2:,} bytes per token**" in card
    assert f"against the teacher's {teacher_kv * 2 * config.head_dim * 2:,}" in card
    assert "Not distilled" in card and "## Evaluation" not in card
    assert "pip install radistill" in card and "import radistill" in card and "from_pretrained(" in card


def test_card_is_refreshed_with_eval_and_recipe(student_dir, tmp_path):
    run = tmp_path / "run"
    stage = run / "stage2"
    stage.mkdir(parents=True)
    for name in ("config.json", "selection.json"):
        (stage / name).write_bytes((student_dir / name).read_bytes())
    (run / "recipe.json").write_text(json.dumps({"stages": [{"stage": 2, "tokens": 12345}]}))
    (stage / "eval.json").write_text(json.dumps({
        "model": "s", "fingerprint": "x", "coverage": {"retrieval": 0.5},
        "tasks": {"kv": {"metric": "acc", "value": 0.25, "teacher_value": 0.5, "group": "retrieval",
                         "higher_is_better": True}}}))
    path = write_model_card(stage)
    card = path.read_text()
    assert path == stage / "README.md"
    assert "12345" in card and "Not distilled" not in card
    assert "| kv | retrieval | acc | 0.25 | 0.5 | 0.5 |" in card
    (stage / "eval.json").unlink()
    assert "## Evaluation" not in write_model_card(stage).read_text()


def test_card_of_a_folder_that_is_not_a_student(teacher_dir, tmp_path):
    with pytest.raises(RadistillError, match="not a radistill student"):
        write_model_card(teacher_dir)
    with pytest.raises(RadistillError, match="does not exist"):
        write_model_card(tmp_path)


# ---- loading ------------------------------------------------------------------------------------------------------


def test_loads_with_and_without_trust_remote_code(student_dir):
    plain = AutoModelForCausalLM.from_pretrained(student_dir)
    remote = AutoModelForCausalLM.from_pretrained(student_dir, trust_remote_code=True)
    assert type(plain) is type(remote) is HybridForCausalLM
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(plain(ids).logits, remote(ids).logits)


def test_resaving_keeps_the_loader(student_dir, tmp_path):
    """A distill stage saves through save_pretrained too: the loader module and auto_map go with every save."""
    HybridForCausalLM.from_pretrained(student_dir).save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_radistill.HybridForCausalLM"
    assert (tmp_path / "again" / "modeling_radistill.py").exists()


HIDDEN = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "radistill" or name.startswith("radistill."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[2] == "1")
except Exception as exc:
    print(type(exc).__name__, exc)
else:
    print("loaded")
"""


@pytest.mark.parametrize("trust", ["0", "1"])
def test_without_radistill_the_error_says_what_to_do(student_dir, trust):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([sys.executable, "-c", HIDDEN, str(student_dir), trust], capture_output=True, text=True,
                         env=env, stdin=subprocess.DEVNULL, timeout=120)
    said = run.stdout
    assert "loaded" not in said and "upgrade" not in said.lower(), said + run.stderr
    if trust == "1":
        assert "pip install radistill" in said, said + run.stderr
    else:
        assert "trust_remote_code=True" in said, said + run.stderr
