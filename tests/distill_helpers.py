"""Shared pieces of the distillation tests: a tiny corpus, a character tokenizer, a tiny teacher and student."""

from __future__ import annotations

import random
import string
from pathlib import Path


from radistill.distill.recipe import DistillRecipe, merge
from radistill.models.presets import random_model, tiny_config

EOS = "<|endoftext|>"


def char_tokenizer():
    """An HF fast tokenizer with one token per printable ASCII character (no network, no training)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(string.printable)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, unk_token="<unk>", pad_token=EOS)


def write_corpus(path: Path, docs: int = 60, seed: int = 0) -> list[str]:
    """A .txt corpus of ``docs`` short documents separated as the project's corpora are."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "kernel", "page", "lock", "queue", "the", "a", "of", "and"]
    texts = [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for i in range(docs)]
    path.write_text("\n<|endoftext|>\n".join(texts) + "\n<|endoftext|>\n")
    return texts


def tiny_teacher(seed: int = 0):
    return random_model(tiny_config("llama", num_hidden_layers=2), seed=seed)


def tiny_student(teacher, kept=((1,), (2,)), state_size: int = 8):
    """The hybrid student of ``teacher`` keeping ``kept[layer]`` query heads (in memory, uncalibrated)."""
    from radistill.hybrid.build import convert, student_config

    config = student_config(teacher, [list(k) for k in kept], "discrete_mamba2", {"state_size": state_size})
    return convert(teacher, config)


def tiny_recipe(corpus: Path, stages=(2, 3), **stage_overrides) -> DistillRecipe:
    stage = {**dict(tokens=16 * 4 * 6, seq_len=16, batch_size=2, grad_accum=2, lr=3e-3, warmup=0.0, decay=0.0,
                    schedule="constant", checkpoint_every=2, log_every=1), **stage_overrides}
    overrides = {
        "stages": {s: {**stage, "enabled": s in stages} for s in (1, 2, 3)},
        "data": {"source": str(corpus), "shuffle_window": 8, "heldout_docs": 2, "heldout_stride": 10},
        "dtype": "fp32",
    }
    return merge(DistillRecipe(), overrides)


class Interrupt(Exception):
    """Raised by :func:`stop_at`'s hook: a run killed at a chosen step."""


def fresh_pair():
    """A tiny teacher and its student (the same seed every call)."""
    teacher = tiny_teacher()
    return teacher, tiny_student(teacher)


def params_of(model) -> dict:
    """A detached copy of ``model``'s state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def stop_at(stop: tuple[int, int]):
    """A trainer step hook that raises :class:`Interrupt` at ``(stage, step)``."""
    def hook(stage, step):
        if (stage, step) == stop:
            raise Interrupt

    return hook


def run_two_gloo_processes(train, args: tuple, out: Path) -> dict:
    """Run ``train(*args) -> student`` in two spawned gloo processes (ranks 0, 1 of one group); returns rank 0's
    final student state dict. ``train`` must be a module-level function (spawn pickles it)."""
    return _run_two_processes(train, args, out, gpus=False)


def run_two_gpu_processes(train, args: tuple, out: Path) -> dict:
    """As :func:`run_two_gloo_processes`, over NCCL with one GPU per rank (``train`` finds its own through
    ``torch.cuda.current_device()``)."""
    return _run_two_processes(train, args, out, gpus=True)


def _run_two_processes(train, args: tuple, out: Path, gpus: bool) -> dict:
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_rank_main, args=(port, train, args, out, gpus), nprocs=2, start_method="spawn")
    return torch.load(out)


def _rank_main(rank: int, port: int, train, args: tuple, out: Path, gpus: bool) -> None:
    import os

    if not gpus:  # before CUDA starts: init_from_env picks NCCL whenever a GPU is visible
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from radistill.scan.distributed import init_from_env

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_from_env()
    try:
        student = train(*args)
        if rank == 0:
            torch.save(student.state_dict(), out)
    finally:
        torch.distributed.destroy_process_group()
