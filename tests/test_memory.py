"""``radistill memory``: the paper's Llama-3.2-1B rows, built students, the JSON output, errors."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from radistill.hybrid import HybridConfig
from radistill.hybrid.cli import register
from radistill.hybrid.memory import memory_rows, student_rows
from radistill.models.presets import shape_config
from radistill.utils.errors import RadistillError

LENGTHS = [128, 2048, 4096]


def megabytes(rows, model_prefix: str) -> list[str]:
    """Totals of the rows whose model name starts with ``model_prefix``, as printed (MB = 1e6 B, 2 decimals)."""
    return [f"{r.total_bytes / 1e6:.2f}" for r in rows if r.model.startswith(model_prefix)]


def test_paper_rows_for_llama_3_2_1b():
    rows = memory_rows("llama-3.2-1b", LENGTHS, dtype="bf16", keep=10, state_size=8, baselines=["mil-50"])
    assert megabytes(rows, "teacher") == ["4.19", "67.11", "134.22"]
    # the paper's table: 10 kept heads (own K and V each) + the SSM state of all 512 heads, d_state 8
    assert megabytes(rows, "student K=10 N=8 (paper") == ["0.85", "5.77", "11.01"]
    # what radistill's student allocates at most: state only for the 502 recurrent heads
    assert [f"{r.total_bytes / 1e6:.2f}" for r in rows if r.model == "student K=10 N=8"] == ["0.84", "5.76", "11.00"]
    assert megabytes(rows, "mil-50") == ["4.19", "35.65", "69.21"]
    conv = {r.model: r.conv_bytes for r in rows if r.length == 128}
    assert conv["teacher"] == 0 and conv["student K=10 N=8"] == 502 * (64 + 16) * 3 * 2


def test_built_student_counts_shared_kv_heads():
    # Llama-3.2-1B shape with the authors' 10 heads: (8, 16) and (8, 19) share KV head 4 -> 9 KV heads cached.
    heads = [(9, 25), (4, 4), (10, 26), (0, 20), (8, 20), (8, 19), (8, 16), (7, 22), (10, 20), (5, 5)]
    kept = [[h for l, h in heads if l == layer] for layer in range(16)]
    base = shape_config("llama-3.2-1b")
    config = HybridConfig(**{k: getattr(base, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rope_parameters")}, kept_heads=kept, mixer_settings={"state_size": 8})
    (row,) = student_rows(config, [4096], nbytes=2)
    assert row.kv_bytes == 9 * 2 * 64 * 2 * 4096
    assert row.ssm_bytes == 502 * 8 * 64 * 2
    rows = memory_rows(config, [4096])
    assert [r.model for r in rows] == ["teacher (llama)", "student K=10 N=8"]
    assert rows[0].total_bytes / rows[1].total_bytes > 6  # the goal: <= 1/6 of the teacher's cache at 4k


def test_json_output(tmp_path):
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["memory", "llama-3.2-1b", "--lengths", "128,4096", "--keep", "10",
                                      "--state-size", "8", "--baseline", "mil-50", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert set(rows[0]) == {"model", "length", "kv_bytes", "ssm_bytes", "conv_bytes", "total_bytes"}
    assert [r["length"] for r in rows[:2]] == [128, 4096] and rows[1]["total_bytes"] == 134217728
    table = CliRunner().invoke(app, ["memory", "llama-3.2-1b", "--lengths", "4096"])
    assert table.exit_code == 0 and "134.22" in table.output


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dtype="int3"), "unknown --dtype"),
        (dict(baselines=["mamba-50"]), "unknown --baseline"),
        (dict(keep=600), "out of range"),
        (dict(state_size=8), "needs --keep"),
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(RadistillError, match=message):
        memory_rows("llama-3.2-1b", LENGTHS, **kwargs)
