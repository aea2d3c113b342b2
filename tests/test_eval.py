"""Evaluators on models whose right answers are known by construction: the shipped teacher (solves the KV probe),
models with constant logits (score exactly the share of items whose answer they always pick), and a uniform model
(perplexity = vocabulary size)."""

import json
import lzma
import math
from pathlib import Path

import pytest
import torch

from distill_helpers import char_tokenizer, tiny_student, write_corpus
from eval_helpers import constant_model
from radistill.eval import EvalConfig, EvalReport, KVEvalConfig, TaskResult, coverage, evaluate_model
from radistill.eval.choice import jsonl_task
from radistill.eval.kv import greedy_exact_match, kv_retrieval, parse_generated
from radistill.eval import perplexity as perplexity_module
from radistill.eval.perplexity import PerplexityConfig, perplexity, window_batch, window_spans
from radistill.eval.runner import parse_task
from radistill.models.presets import random_model, tiny_config
from radistill.probes.kv import KVProbeConfig, kv_items
from radistill.utils.errors import RadistillError

EXAMPLE_TEACHER = Path(__file__).resolve().parents[1] / "examples" / "teacher-19m"


@pytest.fixture(scope="module")
def teacher():
    from radistill.models.access import load_model

    return load_model(EXAMPLE_TEACHER, device="cpu", dtype="fp32")


def test_teacher_solves_kv_both_ways(teacher):
    model, tokenizer = teacher
    results = {t.name: t for t in kv_retrieval(model, tokenizer, KVEvalConfig(pairs=(5, 10), samples=12))}
    assert results["kv_ret"].value == 1.0 and results["kv_ret"].group == "retrieval"
    assert results["kv_ret_gen@10"].value == 1.0 and results["kv_ret_gen@10"].metric == "exact_match"
    assert results["kv_ret@5"].samples == 12


def test_constant_model_scores_exactly_the_share_it_always_picks(teacher):
    _, tokenizer = teacher
    items = kv_items(tokenizer, KVProbeConfig(pairs=5, samples=40, seed=3))
    value = " 7"
    (token,) = tokenizer(value, add_special_tokens=False).input_ids
    model = constant_model(tokenizer, token)
    results = {t.name: t.value for t in kv_retrieval(model, tokenizer, KVEvalConfig(pairs=(5,), samples=40, seed=3))}
    # log-likelihood: " 7" wins whenever it is among the choices; otherwise all tie and the first choice wins
    predicted = [item.choices.index(value) if value in item.choices else 0 for item in items]
    assert results["kv_ret@5"] == pytest.approx(sum(p == i.answer for p, i in zip(predicted, items)) / len(items))
    # generation: " 7 7" is never an exact match
    assert results["kv_ret_gen@5"] == 0.0


def test_uniform_model_is_at_chance(teacher):
    _, tokenizer = teacher
    model = constant_model(tokenizer, None)
    items = kv_items(tokenizer, KVProbeConfig(pairs=5, samples=40, seed=3))
    result = {t.name: t.value for t in kv_retrieval(model, tokenizer, KVEvalConfig(pairs=(5,), samples=40, seed=3))}
    # every choice ties; argmax takes the first, so accuracy is the share of items whose answer comes first
    assert result["kv_ret@5"] == pytest.approx(sum(item.answer == 0 for item in items) / len(items))


def test_generation_batches_with_left_padding_like_one_by_one(teacher):
    model, tokenizer = teacher
    items = kv_items(tokenizer, KVProbeConfig(pairs=8, samples=6, seed=1))
    short = kv_items(tokenizer, KVProbeConfig(pairs=3, samples=6, seed=2))
    mixed = items + short  # different prompt lengths in one batch
    assert greedy_exact_match(model, tokenizer, mixed, batch_size=12) == greedy_exact_match(model, tokenizer, mixed, 1)


def test_single_token_path_equals_the_packed_scorer(teacher):
    from radistill.eval.choice import single_token_logprobs
    from radistill.probes.items import encode_items
    from radistill.probes.scoring import choice_logprobs

    model, tokenizer = teacher
    items = encode_items(tokenizer, kv_items(tokenizer, KVProbeConfig(pairs=6, samples=5, seed=4))
                         + kv_items(tokenizer, KVProbeConfig(pairs=2, samples=3, seed=4)))
    for fast, packed in zip(single_token_logprobs(model, items, 4), choice_logprobs(model, items, 4)):
        torch.testing.assert_close(fast, packed, atol=1e-4, rtol=1e-4)


def test_parse_generated():
    assert parse_generated(" 42\nfoo:3") == "42"
    assert parse_generated(" 42.") == "42"
    assert parse_generated(" 4 2") == "4 2"


def test_jsonl_task(teacher, tmp_path):
    _, tokenizer = teacher
    rows = [{"prompt": f"Question {i}:", "choices": [" yes", " no"], "answer": i % 2} for i in range(10)]
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    (no,) = tokenizer(" no", add_special_tokens=False).input_ids
    assert len(tokenizer(" yes", add_special_tokens=False).input_ids) == 2  # a multi-token choice
    result = jsonl_task(constant_model(tokenizer, no), tokenizer, path, group="knowledge")
    assert (result.name, result.value, result.group, result.samples) == ("facts", 0.5, "knowledge", 10)


def test_uniform_perplexity_is_vocab_size(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(EXAMPLE_TEACHER)
    model = constant_model(tokenizer, None)
    path = tmp_path / "text.txt.xz"
    path.write_bytes(lzma.compress(("Some words of plain prose. " * 200).encode()))
    for stride in (None, 16):  # packed windows, and overlapping ones
        result = perplexity(model, tokenizer, PerplexityConfig(str(path), seq_len=64, stride=stride, max_tokens=500))
        assert result.value == pytest.approx(len(tokenizer), rel=1e-4)
        assert result.samples == 499 and not result.higher_is_better


@pytest.mark.parametrize("n,seq,stride", [(10, 4, 3), (11, 4, 2), (5, 8, 7), (100, 16, 5), (3, 2, 1)])
def test_windows_score_each_target_once(n, seq, stride):
    targets = [t for begin, end, first in window_spans(n, seq, stride) for t in range(first, end)]
    assert targets == list(range(1, n))
    assert all(end - begin <= seq for begin, end, _ in window_spans(n, seq, stride))


def full_logits_nll(model, ids: torch.Tensor, spans, batch_size: int) -> float:
    """Perplexity's summed NLL as it was computed before chunking: whole-window logits from the causal LM."""
    total = 0.0
    for start in range(0, len(spans), batch_size):
        batch = spans[start : start + batch_size]
        input_ids, mask = window_batch(ids, batch)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        for r, (begin, end, first) in enumerate(batch):
            positions = torch.arange(first - 1, end - 1) - begin
            total += float(torch.nn.functional.cross_entropy(logits[r, positions], ids[first:end], reduction="sum"))
    return total


@pytest.mark.parametrize("which", ["teacher", "hybrid"])
def test_chunked_perplexity_equals_whole_window_logits(which, tmp_path, monkeypatch):
    tokenizer = char_tokenizer()
    teacher = random_model(tiny_config("llama", vocab_size=len(tokenizer), num_hidden_layers=2), seed=1)
    model = (teacher if which == "teacher" else tiny_student(teacher, kept=((1,), (0, 2)))).eval()
    write_corpus(tmp_path / "t.txt", docs=20)
    # chunks much smaller than a batch's targets, so they straddle windows; the last window is shorter (padding)
    monkeypatch.setattr(perplexity_module, "LOGIT_CHUNK", 37)
    config = PerplexityConfig(str(tmp_path / "t.txt"), seq_len=64, stride=40, max_tokens=1000)
    result = perplexity(model, tokenizer, config, batch_size=3)
    ids = torch.tensor(tokenizer((tmp_path / "t.txt").read_text()).input_ids[:1000])
    with torch.no_grad():
        reference = math.exp(full_logits_nll(model, ids, window_spans(len(ids), 64, 40), 3) / (len(ids) - 1))
    assert len(ids) == 1000 and len(window_spans(1000, 64, 40)) % 3 != 0  # a last, smaller batch too
    assert result.value == pytest.approx(reference, rel=1e-6)
    assert result.samples == 999


def test_perplexity_matches_loss_of_one_window(teacher, tmp_path):
    model, tokenizer = teacher
    path = tmp_path / "t.txt"
    path.write_text("The kernel keeps a list of pages that are free. " * 8)
    ids = torch.tensor([tokenizer(path.read_text()).input_ids])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    result = perplexity(model, tokenizer, PerplexityConfig(str(path), seq_len=512))
    assert result.value == pytest.approx(math.exp(loss.item()), rel=1e-4)


def test_coverage_and_eval_json_round_trip(tmp_path):
    student = EvalReport("s", "f1", [
        TaskResult("kv_ret", "acc", 0.5, "retrieval"),
        TaskResult("arc_easy", "acc", 0.6, "knowledge"),
        TaskResult("piqa", "acc", 0.7, "knowledge"),
        TaskResult("ppl", "perplexity", 20.0, higher_is_better=False),
    ])
    teacher = EvalReport("t", "f0", [
        TaskResult("kv_ret", "acc", 1.0, "retrieval"),
        TaskResult("arc_easy", "acc", 0.6, "knowledge"),
        TaskResult("piqa", "acc", 0.35, "knowledge"),
        TaskResult("ppl", "perplexity", 10.0, higher_is_better=False),
    ])
    compared = student.with_teacher(teacher)
    assert compared.coverage == {"knowledge": pytest.approx(1.5), "retrieval": pytest.approx(0.5)}
    assert compared.task("ppl").ratio == pytest.approx(0.5)
    compared.save(tmp_path / "eval.json")
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["tasks"]["kv_ret"] == {"metric": "acc", "value": 0.5, "group": "retrieval", "higher_is_better": True,
                                       "samples": None, "teacher_value": 1.0}
    assert data["teacher"] == "t" and data["coverage"]["retrieval"] == pytest.approx(0.5)
    assert EvalReport.load(tmp_path / "eval.json").to_dict() == data
    assert coverage([TaskResult("x", "acc", 1.0)]) == {"knowledge": None, "retrieval": None}


def test_task_specs_and_errors():
    assert parse_task("kv").kind == "kv"
    assert parse_task("arc_easy").group == "knowledge" and parse_task("gsm8k").group == "retrieval"
    assert parse_task("my/facts.jsonl@retrieval") == parse_task("my/facts.jsonl@retrieval")
    spec = parse_task("my/facts.jsonl@retrieval")
    assert (spec.kind, spec.name, spec.group, spec.path) == ("jsonl", "facts", "retrieval", "my/facts.jsonl")
    assert parse_task("lambada_openai@knowledge").group == "knowledge"
    with pytest.raises(RadistillError, match="unknown group"):
        parse_task("piqa@memory")
    with pytest.raises(RadistillError, match="--text"):
        EvalConfig(tasks=("ppl",)).specs()
    config = EvalConfig(tasks=("kv", "ppl"), text="a.txt", kv=KVEvalConfig(pairs=(5, 10)))
    assert EvalConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(RadistillError, match="unknown eval setting"):
        EvalConfig.from_dict({"taks": ["kv"]})
    with pytest.raises(RadistillError, match="unknown eval.kv setting"):
        EvalConfig.from_dict({"kv": {"pair": [5]}})


def test_evaluate_model_runs_every_kind(teacher, tmp_path):
    model, tokenizer = teacher
    (tmp_path / "t.txt").write_text("Pages are mapped on demand. " * 40)
    (tmp_path / "mine.jsonl").write_text(json.dumps({"prompt": "A", "choices": [" b", " c"], "answer": 0}) + "\n")
    config = EvalConfig(tasks=("kv", "ppl", f"{tmp_path}/mine.jsonl@knowledge"), text=str(tmp_path / "t.txt"),
                        kv=KVEvalConfig(pairs=(5,), samples=4, generate=False), seq_len=128)
    names = [t.name for t in evaluate_model(model, tokenizer, config)]
    assert names == ["kv_ret", "kv_ret@5", "ppl", "mine"]


def test_kv_prompt_longer_than_context_is_an_error(teacher):
    model, tokenizer = teacher
    small = constant_model(tokenizer, None)
    small.config.max_position_embeddings = 64
    with pytest.raises(RadistillError, match="context"):
        kv_retrieval(small, tokenizer, KVEvalConfig(pairs=(40,), samples=2))
