"""Two gloo processes (stages 2/3: layers spread over ranks, then DDP) end where one process ends."""

import torch

from radistill.distill.recipe import merge
from radistill.distill.trainer import Trainer
from distill_helpers import (
    char_tokenizer, run_two_gloo_processes, tiny_recipe, tiny_student, tiny_teacher, write_corpus,
)


def recipe_for(corpus, world: int):
    # stage 3 global batch = 2 sequences either way: 1 process x 2, or 2 processes x 1
    recipe = tiny_recipe(corpus, stages=(2, 3), lr=1e-3)
    return merge(recipe, {"stages": {3: {"batch_size": 2 // world}}})


def train(corpus, run_dir, world: int):
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    Trainer(student, teacher, char_tokenizer(), recipe_for(corpus, world), run_dir, "cpu").run()
    return student


def train_two_ranks(corpus, run_dir):
    return train(corpus, run_dir, world=2)


def test_two_gloo_processes_agree_with_one(tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, docs=50)
    out = tmp_path / "two.pt"
    two = run_two_gloo_processes(train_two_ranks, (corpus, tmp_path / "run2"), out)
    one = train(corpus, tmp_path / "run1", world=1).state_dict()
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    # the 2-process run's checkpoints hold one optimizer shard per rank for stage 2, rank 0's for stage 3
    assert sorted(p.name for p in (tmp_path / "run2" / "checkpoints" / "stage3-step00000006").iterdir()) == [
        "manifest.json", "model.pt", "rank0.pt", "rank1.pt", "trainer.pt"]
