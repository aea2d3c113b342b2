"""Fidelity (student vs teacher next-token distributions): a model against itself is perfect, a damaged copy is not,
the local/long-range split adds up, the attention reach is the documented statistic, and the CLI writes it all."""

import copy
import json
from pathlib import Path

import pytest
import torch

from distill_helpers import char_tokenizer, tiny_student, tiny_teacher, write_corpus
from radistill.eval import EvalConfig, EvalReport, evaluate_model
from radistill.eval.fidelity import (SPLITS, FidelityConfig, FidelityResult, attention_reach, check_same_tokenizer,
                                     fidelity, greedy_agreement)
from radistill.utils.errors import RadistillError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TEACHER = EXAMPLES / "teacher-19m"
HELDOUT = EXAMPLES / "data" / "prose-heldout.txt.xz"
SMALL = FidelityConfig(windows=3, window=64, samples=2, prompt=12, generate=24, greedy_prompts=3, greedy_tokens=16)

needs_teacher = pytest.mark.skipif(not TEACHER.exists(), reason="examples/teacher-19m is absent")


@pytest.fixture(scope="module")
def teacher():
    from radistill.models.access import load_model

    return load_model(TEACHER, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def damaged(teacher):
    """teacher-19m with one layer's attention output zeroed: same tokenizer, visibly different predictions."""
    model = copy.deepcopy(teacher[0])
    with torch.no_grad():
        model.model.layers[5].self_attn.o_proj.weight.zero_()
    return model


@pytest.fixture(scope="module")
def self_result(teacher):
    model, tokenizer = teacher
    return fidelity(model, tokenizer, model, tokenizer, str(HELDOUT), SMALL, batch_size=2)


@needs_teacher
def test_teacher_against_itself_is_perfect(self_result):
    for kind in ("heldout", "generated"):
        every = self_result.texts[kind]["all"]
        assert every.positions > 0 and every.kl == 0.0 and every.top1 == 1.0
        assert every.confident_positions > 0 and every.confident == 1.0
    assert self_result.texts["heldout"]["all"].positions == SMALL.windows * SMALL.window
    assert self_result.texts["generated"]["all"].positions == SMALL.samples * (SMALL.generate + 1)
    assert self_result.greedy == [SMALL.greedy_tokens] * SMALL.greedy_prompts


@needs_teacher
def test_damaged_student_is_lower_and_the_split_adds_up(teacher, damaged, self_result):
    model, tokenizer = teacher
    result = fidelity(model, tokenizer, damaged, tokenizer, str(HELDOUT), SMALL, batch_size=2)
    for kind in ("heldout", "generated"):
        splits = result.texts[kind]
        assert splits["all"].kl > 0.01 and splits["all"].top1 < 1.0
        local, long, every = splits["local"], splits["long"], splits["all"]
        assert local.positions + long.positions == every.positions
        assert local.top1_hits + long.top1_hits == every.top1_hits
        assert local.confident_positions + long.confident_positions == every.confident_positions
        assert local.kl_sum + long.kl_sum == pytest.approx(every.kl_sum, rel=1e-9)
    assert result.greedy_mean < SMALL.greedy_tokens
    # the same seed draws the same teacher samples whatever the student
    assert result.samples == self_result.samples and result.greedy_continuations == self_result.greedy_continuations
    # and stored samples are scored again exactly
    again = fidelity(model, tokenizer, damaged, tokenizer, str(HELDOUT), SMALL, batch_size=3, samples=result.samples)
    assert again.texts["generated"]["all"].kl_sum == pytest.approx(result.texts["generated"]["all"].kl_sum, rel=1e-5)
    # ... the greedy prompts too (drawn after the sample prompts, whether or not those were generated), and stored
    # greedy continuations: the same agreement without generating
    assert again.greedy_continuations == result.greedy_continuations and again.greedy == result.greedy
    stored = fidelity(model, tokenizer, damaged, tokenizer, str(HELDOUT), SMALL, batch_size=3, samples=result.samples,
                      greedy_continuations=result.greedy_continuations)
    assert stored.greedy == result.greedy and stored.greedy_continuations == result.greedy_continuations
    with pytest.raises(RadistillError, match="greedy continuations"):
        fidelity(model, tokenizer, damaged, tokenizer, str(HELDOUT), SMALL, greedy_continuations=[[1, 2]])


@needs_teacher
def test_result_round_trips_and_names_its_tasks(self_result):
    again = FidelityResult.from_dict(json.loads(json.dumps(self_result.to_dict())))
    assert again.to_dict() == self_result.to_dict()
    tasks = {t.name: t for t in self_result.task_results()}
    assert tasks["fidelity"].metric == "kl" and not tasks["fidelity"].higher_is_better
    assert tasks["fidelity_top1"].value == 1.0 and tasks["fidelity_greedy"].value == SMALL.greedy_tokens
    assert tasks["fidelity"].details["texts"]["heldout"]["all"]["positions"] == SMALL.windows * SMALL.window


def test_reach_is_the_mean_over_heads_of_the_attention_weighted_distance(flush_denormals):
    """Against a direct computation from ``output_attentions`` of the whole model."""
    model = tiny_teacher()
    ids = torch.randint(3, 90, (2, 20))
    before = model.config._attn_implementation
    reach = attention_reach(model, ids)
    assert model.config._attn_implementation == before  # restored after its eager pass
    model.set_attn_implementation("eager")
    attentions = torch.stack(model(ids, output_attentions=True).attentions)  # [layers, batch, heads, T, T]
    t = torch.arange(20)
    distance = (t[:, None] - t[None, :]).clamp(min=0).float()
    distance[:, 0] = 0
    expected = (attentions * distance).sum(-1).mean(dim=(0, 2))  # [batch, T]
    assert torch.allclose(reach, expected, atol=1e-4)


def test_hybrid_student_and_hybrid_teacher(tmp_path, flush_denormals):
    """Any causal LM and our hybrid: a hybrid student of a tiny Llama, and the hybrid as teacher (its kept heads
    give the reach)."""
    tokenizer = char_tokenizer()
    text = tmp_path / "text.txt"
    write_corpus(text, docs=40)
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    config = FidelityConfig(windows=2, window=32, samples=2, prompt=8, generate=8, greedy_prompts=2, greedy_tokens=6)
    result = fidelity(teacher, tokenizer, student, tokenizer, str(text), config, batch_size=2)
    assert result.texts["heldout"]["all"].positions == 64 and result.texts["heldout"]["all"].kl > 0
    result = fidelity(student, tokenizer, teacher, tokenizer, str(text), config, batch_size=2)
    assert result.texts["generated"]["all"].positions == 2 * 9
    assert sum(s.positions for s in (result.texts["heldout"][k] for k in ("local", "long"))) == 64


def test_greedy_agreement_counts_tokens_before_the_first_miss():
    class Echo(torch.nn.Module):
        """Predicts token 5 everywhere."""

        def get_decoder(self):
            return lambda input_ids, use_cache: type("O", (), {"last_hidden_state": torch.zeros(*input_ids.shape, 1)})

        def get_output_embeddings(self):
            return lambda h: torch.nn.functional.one_hot(torch.full(h.shape[:-1], 5), 8).float()

        def parameters(self):
            return iter([torch.zeros(1)])

    rows = torch.tensor([[1, 2, 5, 5, 5], [1, 2, 5, 3, 5], [1, 2, 4, 5, 5]])
    assert greedy_agreement(Echo(), rows, prompt=2) == [3, 1, 0]


def test_tokenizers_must_match(teacher):
    model, tokenizer = teacher
    with pytest.raises(RadistillError, match="tokenizer"):
        check_same_tokenizer(tokenizer, char_tokenizer())
    with pytest.raises(RadistillError, match="--text"):
        fidelity(model, tokenizer, model, tokenizer, None, SMALL)


def test_config_checks_and_settings():
    with pytest.raises(RadistillError, match="confident"):
        FidelityConfig(confident=1.5)
    with pytest.raises(RadistillError, match="--text"):
        EvalConfig(tasks=("fidelity",)).specs()
    # the fidelity settings are part of eval.json's settings only when the task runs (old caches stay valid)
    assert "fidelity" not in EvalConfig(tasks=("kv",)).to_dict()
    config = EvalConfig(tasks=("fidelity",), text="x.txt", fidelity=FidelityConfig(windows=3))
    assert EvalConfig.from_dict(config.to_dict()) == config
    with pytest.raises(RadistillError, match="eval.fidelity"):
        EvalConfig.from_dict({"tasks": ["fidelity"], "fidelity": {"nope": 1}})


@needs_teacher
def test_runner_skips_fidelity_without_a_teacher(teacher):
    model, tokenizer = teacher
    config = EvalConfig(tasks=("fidelity",), text=str(HELDOUT), fidelity=SMALL)
    assert evaluate_model(model, tokenizer, config) == []


@needs_teacher
def test_cli_writes_fidelity_to_eval_json(tmp_path, damaged, teacher):
    from typer.testing import CliRunner

    from radistill.cli import app

    student = tmp_path / "student"
    damaged.save_pretrained(student)
    teacher[1].save_pretrained(student)
    out = tmp_path / "eval.json"
    settings = "windows=2,window=48,samples=1,prompt=12,generate=16,greedy_prompts=2,greedy_tokens=8"
    result = CliRunner().invoke(app, ["eval", str(student), "--teacher", str(TEACHER), "--tasks", "fidelity",
                                      "--text", str(HELDOUT), "--fidelity", settings, "--out", str(out),
                                      "--device", "cpu", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    report = EvalReport.load(out)
    data = json.loads(out.read_text())
    assert data["settings"]["fidelity"]["window"] == 48
    kl = report.task("fidelity")
    assert kl is not None and kl.value > 0 and kl.details["texts"]["heldout"]["all"]["positions"] == 96
    assert report.task("fidelity_top1").value < 1.0 and report.task("fidelity_greedy") is not None
    assert set(kl.details["texts"]["generated"]) == set(SPLITS)
    # bad input is a RadistillError (the entry point prints it as one line, exit 2)
    bad = CliRunner().invoke(app, ["eval", str(student), "--tasks", "fidelity", "--text", str(HELDOUT)])
    assert isinstance(bad.exception, RadistillError) and "--teacher" in str(bad.exception)
    bad = CliRunner().invoke(app, ["eval", str(student), "--teacher", str(TEACHER), "--tasks", "fidelity",
                                   "--text", str(HELDOUT), "--fidelity", "windows=two"])
    assert isinstance(bad.exception, RadistillError) and "windows" in str(bad.exception)


def test_bf16_models_compare_in_fp32(tmp_path, flush_denormals):
    tokenizer = char_tokenizer()
    text = tmp_path / "text.txt"
    write_corpus(text, docs=30)
    teacher = tiny_teacher().to(torch.bfloat16)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    config = FidelityConfig(windows=2, window=32, samples=1, prompt=8, generate=8, greedy_prompts=1, greedy_tokens=4)
    same = fidelity(teacher, tokenizer, teacher, tokenizer, str(text), config, batch_size=2)
    assert same.texts["heldout"]["all"].kl == 0.0 and same.texts["generated"]["all"].top1 == 1.0
    other = fidelity(teacher, tokenizer, student, tokenizer, str(text), config, batch_size=2)
    assert 0.0 < other.texts["heldout"]["all"].kl < float("inf")


@pytest.mark.gpu
@needs_teacher
def test_cli_fidelity_on_cuda_for_a_built_hybrid(tmp_path, teacher):
    """`radistill eval --tasks fidelity` on CUDA in bf16: the teacher against itself is exact (both compared in fp32),
    and a hybrid built with the default mixer (its window heads and recurrences on the GPU) is scored like on CPU."""
    from typer.testing import CliRunner

    from radistill.cli import app
    from radistill.hybrid.build import build_student

    student = tmp_path / "student"
    build_student(teacher[0], student, heads=[(0, 0), (3, 1), (5, 2), (8, 3)], tokenizer=teacher[1],
                  mixer="window_recurrent", window=16, sink=4, state_size=8, calibration_tokens=1024)
    settings = "windows=2,window=64,samples=2,prompt=12,generate=24,greedy_prompts=2,greedy_tokens=8"
    for model, name in ((TEACHER, "self"), (student, "hybrid")):
        out = tmp_path / f"{name}.json"
        result = CliRunner().invoke(app, ["eval", str(model), "--teacher", str(TEACHER), "--tasks", "fidelity",
                                          "--text", str(HELDOUT), "--fidelity", settings, "--out", str(out),
                                          "--device", "cuda", "--dtype", "bf16"])
        assert result.exit_code == 0, result.output
        report = EvalReport.load(out)
        kl, top1 = report.task("fidelity").value, report.task("fidelity_top1").value
        if name == "self":
            assert kl == 0.0 and top1 == 1.0
        else:
            assert 0.0 < kl < 5.0 and 0.2 < top1 < 1.0
            assert report.task("fidelity_greedy") is not None
