"""Two gloo processes (stages 2/3: layers spread over ranks, then DDP; stage 3 under FSDP2) end where one process
ends; on a machine with two GPUs, two NCCL processes too."""

import pytest
import torch
from torch import nn

from radistill.distill.parallel import is_sharded
from radistill.distill.recipe import merge
from radistill.distill.trainer import Trainer
from distill_helpers import (
    char_tokenizer, run_two_gloo_processes, run_two_gpu_processes, tiny_recipe, tiny_student, tiny_teacher,
    write_corpus,
)

FSDP = {"parallel": "fsdp", "shard_teacher": True}


class Interrupt(Exception):
    pass


def recipe_for(corpus, world: int, stages=(2, 3), **top):
    # stage 3 global batch = 2 sequences either way: 1 process x 2, or 2 processes x 1
    recipe = tiny_recipe(corpus, stages=stages, lr=1e-3)
    return merge(recipe, {"stages": {3: {"batch_size": 2 // world}}, **top})


def train(recipe, run_dir, resume: bool = False, stop_after: int | None = None, device: str = "cpu"):
    def hook(stage, step):
        if step == stop_after:
            raise Interrupt

    teacher = tiny_teacher().to(device)
    student = tiny_student(teacher).to(device)
    Trainer(student, teacher, char_tokenizer(), recipe, run_dir, device, step_hook=hook).run(resume=resume)
    return student.cpu()


def train_two_ranks(corpus, run_dir):
    return train(recipe_for(corpus, world=2), run_dir)


def test_two_gloo_processes_agree_with_one(tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, docs=50)
    out = tmp_path / "two.pt"
    two = run_two_gloo_processes(train_two_ranks, (corpus, tmp_path / "run2"), out)
    one = train(recipe_for(corpus, world=1), tmp_path / "run1").state_dict()
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    # the 2-process run's checkpoints hold one optimizer shard per rank for stage 2, rank 0's for stage 3
    assert sorted(p.name for p in (tmp_path / "run2" / "checkpoints" / "stage3-step00000006").iterdir()) == [
        "manifest.json", "model.json", "model.safetensors", "rank0.json", "rank0.safetensors", "rank1.json",
        "rank1.safetensors", "trainer.json"]


def train_fsdp_two_ranks(corpus, run_dir):
    """Stage 3 under FSDP2 (student and teacher sharded): once through, and once stopped after step 3 and resumed
    from step 2's checkpoint. Both students must come back plain."""
    recipe = recipe_for(corpus, 2, stages=(3,), **FSDP)
    whole = train(recipe, run_dir / "whole")
    try:
        train(recipe, run_dir / "cut", stop_after=3)
    except Interrupt:
        pass
    resumed = train(recipe, run_dir / "cut", resume=True)
    assert not is_sharded(whole) and not is_sharded(resumed)
    return nn.ModuleDict({"whole": whole, "resumed": resumed})


def test_fsdp_over_two_gloo_processes_agrees_with_one_and_resumes(tmp_path):
    from transformers import AutoModelForCausalLM

    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, docs=50)
    two = run_two_gloo_processes(train_fsdp_two_ranks, (corpus, tmp_path / "fsdp"), tmp_path / "two.pt")
    one = train(recipe_for(corpus, 1, stages=(3,), **FSDP), tmp_path / "one").state_dict()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "whole" / "stage3").state_dict()
    for name in one:
        torch.testing.assert_close(two[f"whole.{name}"], one[name], rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(two[f"resumed.{name}"], two[f"whole.{name}"]), name
        assert torch.equal(exported[name], two[f"whole.{name}"]), name


def train_on_two_gpus(corpus, run_dir):
    """Stages 2 and 3 (DDP), then stage 3 alone under FSDP2 with the teacher sharded, each rank on its own GPU."""
    device = f"cuda:{torch.cuda.current_device()}"
    ddp = train(recipe_for(corpus, 2), run_dir / "ddp", device=device)
    fsdp = train(recipe_for(corpus, 2, stages=(3,), **FSDP), run_dir / "fsdp", device=device)
    return nn.ModuleDict({"ddp": ddp, "fsdp": fsdp})


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_over_nccl_agree_with_one(tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, docs=50)
    two = run_two_gpu_processes(train_on_two_gpus, (corpus, tmp_path / "two"), tmp_path / "two.pt")
    for key, stages, top in (("ddp", (2, 3), {}), ("fsdp", (3,), FSDP)):
        one = train(recipe_for(corpus, 1, stages=stages, **top), tmp_path / key, device="cuda:0")
        for name, value in one.state_dict().items():
            # TF32 is off by default for matmuls; NCCL's reduction order differs from one process's sum
            torch.testing.assert_close(two[f"{key}.{name}"], value, rtol=1e-4, atol=1e-5, msg=f"{key}: {name}")
