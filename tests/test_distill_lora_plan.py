"""Stage 3 with LoRA adapters (exported merged), and ``radistill distill --gpu-memory`` planning the run first."""

import copy
import json

import pytest
import torch
import typer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from radistill.distill.cli import register
from radistill.distill.recipe import DistillRecipe, merge
from radistill.distill.run import run_distill
from radistill.distill.trainer import Trainer
from radistill.finetune.lora import adapter_parameters, merged_copy
from radistill.hybrid.memory import load_any_config
from radistill.memplan.distill import plan_distill, recipe_overrides, stage_workload
from radistill.memplan.estimate import Estimator, Strategy
from radistill.memplan.shapes import Shapes
from radistill.utils.errors import RadistillError
from distill_helpers import char_tokenizer, tiny_recipe, tiny_student, tiny_teacher, write_corpus

pytest.importorskip("peft")


def lora_recipe(corpus):
    return merge(tiny_recipe(corpus, stages=(3,), lr=1e-2), {"stages": {3: {"trainable": "lora", "lora_rank": 4}}})


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    write_corpus(path, docs=40)
    return path


def test_stage3_lora_trains_only_adapters_and_exports_them_merged(corpus, tmp_path):
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    before = copy.deepcopy(student).eval()
    base = {k: v.clone() for k, v in student.state_dict().items()}
    recipe = lora_recipe(corpus)
    Trainer(student, teacher, char_tokenizer(), recipe, tmp_path / "run", "cpu").run()

    adapters = adapter_parameters(student)
    assert adapters and all("lora_" in n for n in adapters)
    assert any(bool(p.abs().sum() > 0) for n, p in adapters.items() if "lora_B" in n)  # B starts at zero
    after = student.state_dict()
    for name, value in base.items():  # a LoRA layer keeps its weight as base_layer.weight, unchanged bitwise
        module, _, leaf = name.rpartition(".")
        key = name if name in after else f"{module}.base_layer.{leaf}"
        assert torch.equal(after[key], value), name

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "stage3").eval()
    assert not adapter_parameters(reloaded)
    ids = torch.randint(2, 100, (2, 16))
    with torch.no_grad():
        want = merged_copy(student).eval()(ids).logits
        assert torch.allclose(reloaded(ids).logits, want, atol=1e-5)
        assert not torch.allclose(want, before(ids).logits, atol=1e-3)  # the adapters changed the model


def test_stage3_lora_resumes_exactly(corpus, tmp_path):
    recipe = lora_recipe(corpus)
    tokenizer = char_tokenizer()
    teacher = tiny_teacher()
    whole = tiny_student(teacher)
    Trainer(whole, teacher, tokenizer, recipe, tmp_path / "whole", "cpu").run()

    class Stop(Exception):
        pass

    def stop(stage, step):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        Trainer(tiny_student(teacher), teacher, tokenizer, recipe, tmp_path / "cut", "cpu", step_hook=stop).run()
    resumed = tiny_student(teacher)
    Trainer(resumed, teacher, tokenizer, recipe, tmp_path / "cut", "cpu").run(resume=True)
    want = whole.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in resumed.state_dict().items())


@pytest.fixture
def saved_pair(tmp_path):
    teacher = tiny_teacher()
    tokenizer = char_tokenizer()
    tiny_student(teacher).save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    for model in ("teacher", "student"):
        tokenizer.save_pretrained(tmp_path / model)
    return tmp_path / "student", tmp_path / "teacher"


def test_gpu_memory_too_small_stops_before_training(saved_pair, corpus, tmp_path):
    student, teacher = saved_pair
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer's subcommand form
    args = ["distill", str(student), "--teacher", str(teacher), "--data", str(corpus), "--out", str(tmp_path / "run"),
            "--stages", "2,3", "--tokens-stage2", "128", "--tokens-stage3", "128", "--seq-len", "16",
            "--micro-batch", "2", "--grad-accum", "1", "--device", "cpu", "--gpu-memory", "100KiB"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, RadistillError), result.output
    assert "does not fit in 0.0 GiB" in str(result.exception) and "distill stage 2 needs" in str(result.exception)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # the leanest stage-3 strategy is LoRA, which the plan's overrides turn into a valid recipe
    recipe = merge(tiny_recipe(corpus), {"gpu_memory": "100KiB"})
    overrides = recipe_overrides(plan_distill(student, recipe, recipe.gpu_memory), recipe)
    assert merge(recipe, overrides).stage(3).trainable == "lora"


def test_gpu_memory_that_fits_runs_with_the_plans_settings(saved_pair, corpus, tmp_path):
    student, teacher = saved_pair
    recipe = merge(tiny_recipe(corpus, stages=(2, 3)), {"gpu_memory": "80GiB"})  # from the recipe, not a flag
    run_distill(student, teacher, recipe, tmp_path / "run", device="cpu")
    overrides = recipe_overrides(plan_distill(student, recipe, recipe.gpu_memory), recipe)
    saved = DistillRecipe.load(tmp_path / "run" / "recipe.json")
    assert saved.to_dict() == merge(recipe, overrides).to_dict() != recipe.to_dict()
    assert saved.gpu_memory == "80GiB"
    assert saved.stage(3).loss.chunk_tokens == overrides["stages"][3]["loss"]["chunk_tokens"] < 2048
    assert (tmp_path / "run" / "metrics.jsonl").exists() and (tmp_path / "run" / "stage3" / "config.json").exists()


def test_gpu_memory_that_needs_layer_blocks_trains_in_blocks(saved_pair, corpus, tmp_path, monkeypatch):
    """A budget between "one layer at a time" and "all layers at once, micro-batch 1": the plan picks blocks of one
    layer, and the trainer runs them (what the plan printed is what ran)."""
    monkeypatch.setattr("radistill.memplan.distill.eight_bit_optimizer", lambda: None)  # 8-bit would fit all at once
    student, teacher = saved_pair
    recipe = tiny_recipe(corpus, stages=(2,))
    estimator = Estimator(Shapes(load_any_config(student)), stage_workload(recipe, 2))
    lean = estimator.layerwise(2, Strategy(micro_batch=2, layers_at_once=1)).total
    whole = estimator.layerwise(2, Strategy(micro_batch=1)).total
    assert lean < whole
    recipe = merge(recipe, {"gpu_memory": str(int((lean + whole) / 2 / 0.95))})  # 5% reserve
    run_distill(student, teacher, recipe, tmp_path / "run", device="cpu")
    saved = DistillRecipe.load(tmp_path / "run" / "recipe.json").stage(2)
    assert (saved.layer_block, saved.batch_size, saved.grad_accum) == (1, 2, 2)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["block"] for r in records}) == [0, 1]
