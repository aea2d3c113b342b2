"""Two gloo processes (stages 2/3: layers spread over ranks, then DDP) end where one process ends."""

import os
import socket

import torch
import torch.multiprocessing as mp

from radistill.distill.recipe import merge
from radistill.distill.trainer import Trainer
from distill_helpers import (
    char_tokenizer, tiny_recipe, tiny_student, tiny_teacher, write_corpus,
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


def _worker(rank: int, port: int, corpus, run_dir, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from radistill.scan.distributed import init_from_env

    init_from_env()
    try:
        student = train(corpus, run_dir, world=2)
        if rank == 0:
            torch.save(student.state_dict(), out)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_agree_with_one(tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, docs=50)
    out = tmp_path / "two.pt"
    mp.start_processes(_worker, args=(_free_port(), corpus, tmp_path / "run2", out), nprocs=2, start_method="spawn")
    two = torch.load(out)
    one = train(corpus, tmp_path / "run1", world=1).state_dict()
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    # the 2-process run's checkpoints hold one optimizer shard per rank for stage 2, rank 0's for stage 3
    assert sorted(p.name for p in (tmp_path / "run2" / "checkpoints" / "stage3-step00000006").iterdir()) == [
        "manifest.json", "model.pt", "rank0.pt", "rank1.pt", "trainer.pt"]
