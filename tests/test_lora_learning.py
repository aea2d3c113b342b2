"""benchmarks/lora_learning.py: its two made-up tasks are what they claim (new names, held-out phrasings, the value
before its key, disjoint keys), its runs go in priority order, and its --quick mode runs end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEACHER_19M

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import lora_learning  # noqa: E402
from radistill.probes.items import encode_items  # noqa: E402

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TEACHER_19M)


def test_facts_are_about_invented_names_and_asked_in_phrasings_never_trained(tokenizer):
    from radistill.probes.kv import words

    statements, heldout, seen, facts = lora_learning.facts_task(tokenizer, entities=40, choices=4, seed=3)
    names = {name for name, _, _ in facts}
    assert len(names) == 40 and not {n.lower() for n in names} & {w.lower() for w in words()}
    assert {attr for _, attr, _ in facts} == {"job", "colour"}
    for name, attr, value in facts:  # every fact is stated four ways, each naming the entity and its value
        assert sum(name in s and re.search(rf"\b{value}\b", s) is not None for s in statements) >= 4
    assert len(heldout) == 2 * len(facts) and len(seen) == len(facts)
    for item in heldout:  # a held-out question is not how any training statement begins
        assert not any(s.startswith(item.prompt) for s in statements)
        assert len(set(item.choices)) == 4
    for item in seen:  # the seen phrasing is a training statement cut before its value
        assert any(s.startswith(item.prompt + item.choices[item.answer]) for s in statements)
    again = lora_learning.facts_task(tokenizer, entities=40, choices=4, seed=3)
    assert again[0] == statements  # seeded


def test_value_first_lists_answer_with_the_value_before_the_key(tokenizer):
    docs, items = lora_learning.reversed_kv_task(tokenizer, pairs=6, train_docs=30, heldout=30, seed=0)
    line = re.compile(r"^(\d+) goes to (\w+)\.$", re.M)
    train_keys = set()
    for pieces in docs:
        doc = "".join(piece for piece, _ in pieces)
        pairs = dict((k, v) for v, k in line.findall(doc))
        assert len(pairs) == 6
        asked = re.findall(r"\nWhich number goes to (\w+)\? Answer: ?(\d+)\.", doc)
        assert sorted(k for k, _ in asked) == sorted(pairs) and all(pairs[k] == v for k, v in asked)
        assert [p.strip() for p, scored in pieces if scored] == [v for _, v in asked]  # the loss: on the answers only
        train_keys |= set(pairs)
    heldout_keys = set()
    for item in items:
        pairs = dict((k, v) for v, k in line.findall(item.prompt))
        key = re.search(r"\nWhich number goes to (\w+)\? Answer: ?$", item.prompt).group(1)
        assert item.choices[item.answer].strip() == pairs[key]
        assert sorted(c.strip() for c in item.choices) == sorted(pairs.values())
        heldout_keys |= set(pairs)
    encoded = encode_items(tokenizer, items)  # one token per value: scoring compares like with like
    assert all(len(c) == 1 for item in encoded for c in item.choice_ids)
    assert not train_keys & heldout_keys  # held-out lists use other words: nothing to memorise


def test_every_method_runs_at_its_middle_lr_first():
    plan = lora_learning.schedule({"lora": [1e-3, 3e-3, 1e-2], "full": [1e-4, 3e-4, 1e-3]}, ["facts", "reversed-kv"])
    assert len(plan) == 18
    first = plan[:6]
    assert [(t, m) for t, m, _, _ in first] == [(t, m) for t in ("facts", "reversed-kv")
                                                for m in ("lora-restricted", "lora-all", "full")]
    assert {lr for _, m, _, lr in first if m == "full"} == {3e-4}
    assert {lr for _, m, _, lr in first if m != "full"} == {3e-3}


def test_chosen_first_lrs_run_first_and_every_lr_runs_once():
    lrs = {"lora": [1e-3, 3e-3, 1e-2], "full": [1e-4, 3e-4, 1e-3]}
    plan = lora_learning.schedule(lrs, ["facts", "reversed-kv"], first={"lora-restricted": 1e-2, "full": 1e-3})
    assert len(plan) == 18 and len(set(plan)) == 18
    assert [(t, m, lr) for t, m, _, lr in plan[:6]] == [
        (t, m, lr) for t in ("facts", "reversed-kv")
        for m, lr in (("lora-restricted", 1e-2), ("lora-all", 3e-3), ("full", 1e-3))]
    assert [lr for t, m, _, lr in plan if t == "facts" and m == "lora-restricted"] == [1e-2, 3e-3, 1e-3]
    # a first lr outside the sweep runs as well as the whole sweep
    plan = lora_learning.schedule(lrs, ["facts"], ["full"], first={"full": 5e-4})
    assert [lr for _, _, _, lr in plan] == [5e-4, 3e-4, 1e-4, 1e-3]
    # per task: the facts' choice does not carry over to the value-first task, which starts at the middle lr
    plan = lora_learning.schedule(lrs, ["facts", "reversed-kv"], ["full"], first={"facts:full": 1e-3})
    assert [(t, lr) for t, _, _, lr in plan[:2]] == [("facts", 1e-3), ("reversed-kv", 3e-4)]


@pytest.mark.slow
def test_quick_run_writes_rows_with_learning_and_forgetting(tmp_path):
    out = tmp_path / "lora_learning.json"
    scan = BENCHMARKS / "results" / "window-cpu-scan" / "scan.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "lora_learning.py"), "--quick", "--scan", str(scan),
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["student"]["distilled"] is False and len(result["student"]["kept_heads"]) == 16
    assert [(r["task"], r["method"]) for r in result["runs"]] == [
        (t, m) for t in ("facts", "reversed-kv") for m in ("lora-restricted", "lora-all", "full")]
    for r in result["runs"]:
        assert r["loss_last"] < r["loss_first"]  # three steps at the quick lrs already lower the training loss
        assert 0 <= r["after"][r["task"]] <= 1 and r["heldout_ppl"] > 1 and r["heldout_ppl_first32"] > 1
        assert r["kl_vs_start"] > 0 and 0 <= r["top1_vs_start"] <= 1
    params = {r["method"]: r["trainable_params"] for r in result["runs"]}
    assert params["lora-restricted"] < params["lora-all"] < params["full"]
    assert (tmp_path / "lora_learning.md").read_text().count("\n| facts |") == 3


def test_key_first_replay_lists_are_the_probe_order_scored_on_the_answer(tokenizer):
    """--replay-kv rehearses the KV probe's own format (key first), the loss on the answer only, on items that are
    not the evaluation's (another seed)."""
    from radistill.probes.kv import KVProbeConfig, kv_items

    lists = lora_learning.key_first_lists(tokenizer, 6, 10, seed=7)
    evaluation = kv_items(tokenizer, KVProbeConfig(pairs=10, samples=6, seed=1234))
    assert len(lists) == 6 and all(len(d) == 2 and not d[0][1] and d[1][1] for d in lists)
    assert {d[0][0] for d in lists}.isdisjoint(item.prompt for item in evaluation)
    item = kv_items(tokenizer, KVProbeConfig(pairs=10, samples=6, seed=7))[0]
    assert lists[0] == [(item.prompt, False), (item.choices[item.answer], True)]


def test_merge_keeps_each_run_beside_the_start_of_its_own_file(tmp_path):
    """--merge joins runs of one student made with different settings (here the committed facts run with prose
    replay and the value-first run with key-first replay): each file stays a part with its own starting scores, the
    summary has one row per run, and a file of another student or another version of a task is refused."""
    results = BENCHMARKS / "results"
    facts = results / "lora_learning-cpu-facts-replay-distilled.json"
    kv = results / "lora_learning-cpu-kv-kvreplay-all.json"
    out = tmp_path / "merged.json"
    assert lora_learning.main(["--merge", str(facts), str(kv), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert [p["file"] for p in merged["parts"]] == [facts.name, kv.name] and set(merged["tasks"]) == {"facts",
                                                                                                   "reversed-kv"}
    starts = [p["before"]["student"]["heldout_ppl"] for p in merged["parts"]]
    assert starts[0] != starts[1]  # measured on other held-out windows: each run keeps its own
    text = out.with_suffix(".md").read_text()
    summary = [line for line in text.splitlines() if re.match(r"\| (facts|reversed-kv) \|", line)]
    assert len(summary) == 2 * sum(len(p["runs"]) for p in merged["parts"])  # the summary and each part's table
    assert f"{starts[1]:.2f} → " in text and "## Part 2: " + kv.name in text

    other = json.loads(kv.read_text())
    other["student"]["source"] = "/elsewhere"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="another student"):
        lora_learning.main(["--merge", str(kv), str(tmp_path / "other.json"), "--out", str(tmp_path / "x.json")])
    changed = json.loads(kv.read_text())
    changed["tasks"]["reversed-kv"]["heldout_items"] += 1
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(SystemExit, match="task reversed-kv"):
        lora_learning.main(["--merge", str(kv), str(tmp_path / "changed.json"), "--out", str(tmp_path / "y.json")])
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()
