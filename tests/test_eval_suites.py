"""Capability suites: record lookups are well-formed and seeded, facts are mined only where the teacher is confident
and not copying, and the shipped teacher-19m suites load and are solved by the teacher itself."""

import json
from pathlib import Path

import pytest
import torch

from radistill.eval.choice import jsonl_task
from radistill.eval.suites import (JOBS, FactsConfig, RecordsConfig, confident_facts, facts_suite, records_suite,
                                   write_suite)
from radistill.probes.items import load_jsonl
from radistill.utils.errors import RadistillError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TEACHER = EXAMPLES / "teacher-19m"
SUITES = EXAMPLES / "suites" / "teacher-19m"


@pytest.fixture(scope="module")
def teacher():
    from radistill.models.access import load_model

    if not TEACHER.exists():
        pytest.skip("examples/teacher-19m is absent")
    return load_model(TEACHER, device="cpu", dtype="fp32")


def test_records_are_seeded_and_answerable(tmp_path):
    items = records_suite(RecordsConfig(items=40, seed=3))
    assert items == records_suite(RecordsConfig(items=40, seed=3)) and items != records_suite(RecordsConfig(40, seed=4))
    for item in items:
        lines = item.prompt.split("\n")
        records = [dict(f.split(": ") for f in line.split("; ")) for line in lines[:-1]]
        question = lines[-1]
        answer = item.choices[item.answer].strip()
        assert len(set(item.choices)) == len(item.choices) == len(records) >= 3
        assert all(r["Job"] in JOBS for r in records)
        name = question.removeprefix("The phone number of ").removesuffix(" is")
        assert [r["Phone"] for r in records if r["Name"] == name] == [answer]
    write_suite(tmp_path / "r.jsonl", items, {"kind": "records"})
    assert load_jsonl(tmp_path / "r.jsonl") == items
    assert json.loads((tmp_path / "r.meta.json").read_text())["kind"] == "records"


def test_confident_facts_skip_copies_and_unsure_positions(teacher):
    model, tokenizer = teacher
    config = FactsConfig(confident=0.9)
    recalled = tokenizer("Notified lives in Kestrel and likes the colour orange.").input_ids
    facts = confident_facts(model, tokenizer, recalled, config)
    assert facts and all(f.probability >= 0.9 and f.answer.strip().lower() not in f.prompt.lower() for f in facts)
    # the same answer already in the text is a copy, not a recalled fact
    copied = tokenizer("Kestrel is a town. Notified lives in Kestrel and likes the colour orange.").input_ids
    assert "Kestrel" not in [f.answer.strip() for f in confident_facts(model, tokenizer, copied, config)]
    assert confident_facts(model, tokenizer, recalled, FactsConfig(confident=0.999999)) == []


def test_facts_suite_items_come_from_the_teacher(teacher):
    model, tokenizer = teacher
    config = FactsConfig(items=6, choices=2, documents=12, tokens=64, seed=1)
    items, summary = facts_suite(model, tokenizer, config, batch_size=4)
    assert 0 < len(items) <= 6 and summary["mined"] >= len(items)
    for item in items:
        assert len(set(item.choices)) == 2
        ids = torch.tensor([[0] + tokenizer(item.prompt).input_ids])
        with torch.no_grad():
            probs = torch.softmax(model(ids).logits[0, -1], -1)
        first = tokenizer(item.prompt + item.choices[item.answer]).input_ids[ids.shape[1] - 1]
        assert float(probs[first]) >= 0.9 * 0.9  # re-encoding the decoded prompt can shift a probability a little
    again, _ = facts_suite(model, tokenizer, config, batch_size=4)
    assert again == items
    with pytest.raises(RadistillError, match="no confident"):
        facts_suite(model, tokenizer, FactsConfig(items=5, documents=2, tokens=4, seed=1))


@pytest.mark.skipif(not (SUITES / "facts.jsonl").exists(), reason="shipped suites absent")
def test_teacher_solves_its_shipped_suites(teacher):
    model, tokenizer = teacher
    for name in ("records", "facts"):
        items = load_jsonl(SUITES / f"{name}.jsonl")
        assert len(items) >= 100
        assert json.loads((SUITES / f"{name}.meta.json").read_text())["kind"] == name
    for name in ("records", "facts"):  # the facts are the teacher's own confident answers, by construction
        assert jsonl_task(model, tokenizer, SUITES / f"{name}.jsonl", batch_size=16).value >= 0.95


def test_suite_records_cli_writes_and_refuses_to_overwrite(tmp_path):
    from typer.testing import CliRunner

    from radistill.cli import app

    out = tmp_path / "records.jsonl"
    args = ["suite", "records", "--out", str(out), "--items", "6", "--seed", "2"]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert load_jsonl(out) == records_suite(RecordsConfig(items=6, seed=2))
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, RadistillError) and "--overwrite" in str(again.exception)
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
    bad = CliRunner().invoke(app, ["suite", "records", "--out", str(tmp_path / "r.txt")])
    assert isinstance(bad.exception, RadistillError) and ".jsonl" in str(bad.exception)
