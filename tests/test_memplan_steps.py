"""``--gpu-memory`` on ``radistill scan`` and ``radistill eval``: estimates against measured peaks, budgets that stop
the step before it loads the weights, budgets that make it take a smaller batch (same results), and the flag.

Measured peaks: on CPU, live tensor storage op by op (``LiveTensors``, weights included); on CUDA, the allocator's
peak. Two tokenizers give the two code paths of choice scoring: the bundled teacher's (KV values are one token:
no tree mask, scores at the prompt's last token) and a character tokenizer (values of several tokens: tree-packed
rows under a 4D mask for a teacher, one row per choice for a hybrid).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer
from typer.testing import CliRunner

from distill_helpers import char_tokenizer, tiny_student, write_corpus
from radistill.eval import EvalConfig, KVEvalConfig
from radistill.eval.choice import choice_accuracy
from radistill.eval.kv import greedy_exact_match
from radistill.eval.perplexity import PerplexityConfig, perplexity, window_spans
from radistill.eval.runner import evaluate, evaluate_path, fit_eval
from radistill.memplan import Strategy, measure_peak
from radistill.memplan.eval import choice_pass, generate_pass, pass_breakdown, plan_eval, ppl_pass
from radistill.memplan.scan import ProbeShape, inference_model, plan_scan, scan_breakdown, scan_candidates
from radistill.models.access import load_config
from radistill.models.presets import random_model, tiny_config
from radistill.probes.items import encode_items
from radistill.probes.kv import KVProbeConfig, kv_items
from radistill.scan import run as scan_run
from radistill.scan.ablation import head_means
from radistill.scan.fast import fast_scan
from radistill.utils.errors import RadistillError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXAMPLE_TEACHER = Path(__file__).resolve().parents[1] / "examples" / "teacher-19m"
SCAN_ARGS = dict(pairs=4, samples=12, seed=0, device="cpu", dtype="fp32")


pytestmark = pytest.mark.usefixtures("flush_denormals")


@pytest.fixture(scope="module")
def tokenizers():
    return {"one-token values": AutoTokenizer.from_pretrained(EXAMPLE_TEACHER), "char": char_tokenizer()}


def small_teacher(tokenizer, layers: int = 2):
    config = tiny_config("llama", vocab_size=len(tokenizer), num_hidden_layers=layers, max_position_embeddings=2048)
    return random_model(config).to(DEVICE).eval()


def kv(tokenizer, pairs=4, samples=8):
    return kv_items(tokenizer, KVProbeConfig(pairs=pairs, samples=samples))


def resident(model) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def assert_close_to(estimate, measured):
    # the estimate must see what matters, not just the weights, for the comparison to mean anything
    assert estimate.total - estimate.weights > 0.3 * measured, (estimate, measured)
    assert abs(estimate.total / measured - 1) < 0.20, (estimate, measured)


# ---- estimate vs measured ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens, rows, chunk, ablation", [
    ("char", 32, 8, "zero"),  # tree mask; one chunk, rows = every head of every prompt of a layer
    ("char", 8, 2, "mean"),  # several chunks, and the means' own forward first
    ("char", 4, 12, "zero"),  # the cache of 12 prompts dominates
    ("one-token values", 32, 8, "zero"),  # no mask; the logits at the scored positions dominate
])
def test_scan_estimate_within_20_percent_of_measured(tokenizers, tokens, rows, chunk, ablation):
    tokenizer = tokenizers[tokens]
    model = small_teacher(tokenizer, layers=3)
    items = encode_items(tokenizer, kv(tokenizer, samples=12))
    heads = [(layer, head) for layer in range(3) for head in range(4)]

    def scan():
        means = head_means(model, items) if ablation == "mean" else None
        fast_scan(model, items, heads, ablation=ablation, means=means, batch_size=rows, prompt_chunk=chunk)

    measured = measure_peak(scan, resident=resident(model), device=DEVICE)
    shapes, meta = inference_model(model.config)
    strategy = Strategy(micro_batch=rows, trainable="none", optimizer="none", prompt_chunk=chunk)
    estimate = scan_breakdown(shapes, meta, ProbeShape.of(items), strategy, torch.float32, 4, ablation)
    assert_close_to(estimate, measured)


@pytest.mark.parametrize("tokens, which, task, batch", [
    ("one-token values", "teacher", "choice", 16),
    ("char", "teacher", "choice", 16),  # tree-packed
    ("char", "student", "choice", 4),  # one row per choice through the recurrent heads
    ("char", "teacher", "generate", 16),
    ("char", "student", "generate", 8),
    ("one-token values", "teacher", "ppl", 2),  # the scored positions' logits dominate, all in one chunk
    ("one-token values", "teacher", "ppl", 8),  # ~1,500 scored positions: the logits chunk binds
    ("char", "student", "ppl", 2),
])
def test_eval_estimate_within_20_percent_of_measured(tokenizers, tmp_path, tokens, which, task, batch):
    tokenizer = tokenizers[tokens]
    teacher = small_teacher(tokenizer)
    model = teacher if which == "teacher" else tiny_student(teacher.cpu(), kept=((1,), (0, 2))).to(DEVICE).eval()
    items = kv(tokenizer, pairs=5, samples=16)
    encoded = encode_items(tokenizer, items)
    if task == "ppl":
        write_corpus(tmp_path / "text.txt", docs=40)  # shorter than max_tokens: every token is read
        config = PerplexityConfig(str(tmp_path / "text.txt"), seq_len=256, max_tokens=2048)
        tokens = min(len(tokenizer((tmp_path / "text.txt").read_text()).input_ids), config.max_tokens)
        planned = ppl_pass(window_spans(tokens, 256, 255))

        def run():
            perplexity(model, tokenizer, config, batch)
    elif task == "generate":
        planned = generate_pass(encoded)

        def run():
            greedy_exact_match(model, tokenizer, items, batch)
    else:
        planned = choice_pass(encoded, hybrid=which == "student")

        def run():
            choice_accuracy(model, tokenizer, items, batch)
    measured = measure_peak(run, resident=resident(model), device=DEVICE)
    shapes, meta = inference_model(model.config)
    estimate = pass_breakdown(shapes, meta, planned, batch, torch.float32)
    assert_close_to(estimate, measured)


# ---- the plan's choices ------------------------------------------------------------------------------------------
def test_scan_shrinks_the_prompt_chunk_before_the_rows_per_forward():
    probe = ProbeShape(lengths=(100,) * 64, prompt=90, scores=5, branches=True)
    order = [(s.micro_batch, s.prompt_chunk) for s in scan_candidates(probe, 32, 256, heads_per_layer=4)]
    assert order[:5] == [(32, 64), (32, 32), (32, 16), (32, 8), (16, 64)]  # 8 prompts x 4 heads still fill 32 rows
    assert order[-1] == (1, 1) and len(set(order)) == len(order)


@pytest.fixture(scope="module")
def saved_teacher(tokenizers, tmp_path_factory):
    """A tiny teacher on disk with the character tokenizer (multi-token KV values: tree masks)."""
    path = tmp_path_factory.mktemp("teacher")
    small_teacher(tokenizers["char"], layers=2).save_pretrained(path)
    tokenizers["char"].save_pretrained(path)
    return path


def _no_loading(*args, **kwargs):
    raise AssertionError("the model was loaded although the plan cannot fit")


def just_below(estimate: int) -> int:
    """A GPU size whose budget (after the 5% reserve) is one byte short of ``estimate``."""
    return int((estimate - 1) / 0.95)


def test_scan_that_cannot_fit_stops_before_loading_the_weights(saved_teacher, monkeypatch):
    monkeypatch.setattr(scan_run, "load_model", _no_loading)
    with pytest.raises(RadistillError, match=r"scan needs \d+\.\d MiB even with 1 \(prompt, head\) rows per forward, "
                                             r"1 prompts cached per chunk \(weights .*--pairs"):
        scan_run.run_scan(saved_teacher, None, gpu_memory="1MiB", **SCAN_ARGS)


def test_scan_budget_below_the_default_takes_smaller_batches_with_the_same_results(saved_teacher, monkeypatch):
    tokenizer = char_tokenizer()
    items, _ = scan_run.probe_items(tokenizer, SCAN_ARGS["pairs"], SCAN_ARGS["samples"], 0, None)
    ample = plan_scan(load_config(saved_teacher), encode_items(tokenizer, items), "1GiB", batch_size=32,
                      prompt_chunk=scan_run.PROMPT_CHUNK, dtype=torch.float32).step("scan")
    assert (ample.strategy.micro_batch, ample.strategy.prompt_chunk) == (32, SCAN_ARGS["samples"])
    default = scan_run.run_scan(saved_teacher, None, **SCAN_ARGS)
    calls = []

    def recording(*args, **kwargs):
        calls.append((kwargs["batch_size"], kwargs["prompt_chunk"]))
        return fast_scan(*args, **kwargs)

    monkeypatch.setattr(scan_run, "fast_scan", recording)
    planned = scan_run.run_scan(saved_teacher, None, gpu_memory=just_below(ample.memory.total), **SCAN_ARGS)
    (rows, chunk), = calls
    assert rows < 32 or chunk < SCAN_ARGS["samples"]
    assert planned.baseline == pytest.approx(default.baseline, abs=1e-6)
    for metric in ("accuracy_drop", "logprob_drop"):
        want = {h.name: getattr(h, metric) for h in default.heads}
        assert {h.name: getattr(h, metric) for h in planned.heads} == pytest.approx(want, abs=1e-5)


def eval_config(**overrides) -> EvalConfig:
    return EvalConfig(tasks=("kv",), kv=KVEvalConfig(pairs=(4,), samples=12), batch_size=16, **overrides)


def test_eval_that_cannot_fit_stops_before_loading_the_weights(saved_teacher, monkeypatch):
    import radistill.models.access as access

    monkeypatch.setattr(access, "load_model", _no_loading)
    with pytest.raises(RadistillError, match=r"eval kv needs \d+\.\d MiB even with batch 1 .*--kv-pairs"):
        evaluate_path(saved_teacher, eval_config(gpu_memory="256KiB"), device="cpu", dtype="fp32")


def test_eval_budget_below_the_default_takes_a_smaller_batch_with_the_same_results(saved_teacher, monkeypatch):
    import radistill.eval.runner as runner

    default = evaluate_path(saved_teacher, eval_config(), device="cpu", dtype="fp32")
    ample = plan_eval(load_config(saved_teacher), char_tokenizer(), eval_config(), "1GiB",
                      dtype=torch.float32).step("eval kv")
    assert ample.fits and ample.strategy.micro_batch == 16
    batches, original = [], runner.kv_retrieval

    def recording(model, tokenizer, config, batch_size):
        batches.append(batch_size)
        return original(model, tokenizer, config, batch_size)

    monkeypatch.setattr(runner, "kv_retrieval", recording)
    budget = str(just_below(ample.memory.total))  # in bytes, as the flag passes it
    assert fit_eval(saved_teacher, eval_config(gpu_memory=budget), device="cpu", dtype="fp32")["kv"] < 16
    planned = evaluate_path(saved_teacher, eval_config(gpu_memory=budget), device="cpu", dtype="fp32")
    assert batches and batches[0] < 16
    assert planned.to_dict() == default.to_dict()  # the same numbers; gpu_memory is not an evaluation setting


def test_a_teacher_that_cannot_fit_stops_the_evaluation_before_the_student_runs(saved_teacher, tmp_path, monkeypatch):
    import radistill.models.access as access

    tokenizer = char_tokenizer()
    big = tiny_config("llama", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    random_model(big).save_pretrained(tmp_path / "big")
    tokenizer.save_pretrained(tmp_path / "big")
    leanest = plan_eval(big, tokenizer, eval_config(), "1KiB", dtype=torch.float32).step("eval kv")
    assert leanest.strategy.micro_batch == 1 and not leanest.fits
    budget = just_below(leanest.memory.total)
    assert fit_eval(saved_teacher, eval_config(gpu_memory=budget), device="cpu", dtype="fp32")  # the model fits
    monkeypatch.setattr(access, "load_model", _no_loading)
    with pytest.raises(RadistillError, match="eval kv needs"):
        evaluate(saved_teacher, eval_config(gpu_memory=budget), teacher=tmp_path / "big", device="cpu", dtype="fp32")


def test_gpu_memory_is_not_an_evaluation_setting():
    config = EvalConfig.from_dict({"tasks": ["kv"], "gpu_memory": "24GiB"})  # a recipe's eval section
    assert config.gpu_memory == "24GiB" and "gpu_memory" not in config.to_dict()


# ---- the flag ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, title", [("24GiB", "in 24.0 GiB"), ("24GB", "in 22.4 GiB"),
                                         (str(24 << 30), "in 24.0 GiB")])
def test_cli_scan_plans_with_the_flag(saved_teacher, tmp_path, size, title):
    from radistill.cli import app

    result = CliRunner().invoke(app, ["scan", str(saved_teacher), "--out", str(tmp_path), "--pairs", "4",
                                      "--samples", "8", "--device", "cpu", "--gpu-memory", size])
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())  # rich wraps long lines at the terminal's width
    assert title in printed and "rows per forward" in printed
    assert json.loads((tmp_path / "scan.json").read_text())["heads"]


def test_cli_eval_flag_plans_and_stops(saved_teacher):
    from radistill.cli import app

    args = ["eval", str(saved_teacher), "--tasks", "kv", "--kv-pairs", "4", "--kv-samples", "8", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--gpu-memory", "256KiB"])
    assert isinstance(result.exception, RadistillError) and "eval kv needs" in str(result.exception)
    assert "memory plan for" in " ".join(result.output.split())
    result = CliRunner().invoke(app, [*args, "--gpu-memory", "lots"])
    assert isinstance(result.exception, RadistillError) and "not a size" in str(result.exception)
    result = CliRunner().invoke(app, [*args, "--gpu-memory", "1GiB"])
    assert result.exit_code == 0, result.output
    assert "eval kv: batch 16" in " ".join(result.output.split()) and "kv_ret" in result.output
