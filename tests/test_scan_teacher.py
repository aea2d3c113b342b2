"""The scan on the real teacher-19m: quick on CPU, and its top heads carry KV retrieval."""

import random
import time

import pytest

from radistill.models.access import load_model
from radistill.probes.items import encode_items
from radistill.probes.kv import KVProbeConfig, kv_items
from radistill.probes.scoring import choice_logprobs, summarize
from radistill.scan import scan_model
from radistill.scan.ablation import ablate_heads
from radistill.scan.analyze import analyze
from radistill.scan.run import probe_items

pytestmark = [pytest.mark.shared, pytest.mark.slow]


@pytest.fixture(scope="module")
def teacher(teacher_19m_path):
    return load_model(teacher_19m_path, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def scan(teacher):
    model, tokenizer = teacher
    items, probe = probe_items(tokenizer, pairs=10, samples=8, seed=0, probe_file=None)
    start = time.perf_counter()
    result = scan_model(model, tokenizer, "teacher-19m", items=items, probe=probe)
    assert time.perf_counter() - start < 180
    return result


def test_top_heads_carry_retrieval(teacher, scan):
    model, tokenizer = teacher
    items = encode_items(tokenizer, kv_items(tokenizer, KVProbeConfig(pairs=40, samples=16, seed=7)))
    answers = [item.answer for item in items]

    def accuracy(heads):
        with ablate_heads(model, heads):
            return summarize(choice_logprobs(model, items), answers).accuracy

    clean = accuracy([])
    top = accuracy([(h.layer, h.head) for h in scan.heads[:2]])
    low = scan.heads[len(scan.heads) // 2 :]  # the lower-ranked half
    random_low = accuracy([(h.layer, h.head) for h in random.Random(0).sample(low, 2)])
    assert clean >= 0.9
    assert random_low >= clean - 0.15
    assert top <= random_low - 0.4, (clean, top, random_low)


def test_analysis_finds_an_aggregate_head(teacher, scan, tmp_path):
    model, tokenizer = teacher
    heads = analyze(model, tokenizer, scan, tmp_path, top=3, samples=4)
    assert "aggregate" in [h.label for h in heads]
    assert (tmp_path / "analysis.json").exists()
