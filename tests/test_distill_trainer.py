"""The trainer on a tiny teacher/student: losses fall, resume is exact, checkpoints are verified, NaNs stop it."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from radistill.distill.checkpoint import CheckpointError, latest, verify
from radistill.distill.data import PackedStream
from radistill.distill.stages import make_objective
from radistill.distill.trainer import NonFiniteLossError, Trainer
from radistill.utils.errors import RadistillError
from distill_helpers import Interrupt, fresh_pair, params_of, tiny_recipe, tiny_student, tiny_teacher


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_lowers_its_loss(corpus, tokenizer, tmp_path, stage):
    teacher, student = fresh_pair()
    recipe = tiny_recipe(corpus, stages=(stage,), tokens=16 * 4 * 15, lr={1: 1e-2, 2: 1e-3, 3: 1e-3}[stage])
    cfg = recipe.stage(stage)
    layers = list(range(2))
    probe = PackedStream(recipe.data, tokenizer, cfg.seq_len, seed=99).next_batch(8)

    def loss_now():
        objective = make_objective(stage, student, teacher, cfg, layers)
        value = float(objective.step(probe, scale=0.0)) / objective.unit_count
        student.zero_grad(set_to_none=True)
        return value

    before = loss_now()
    Trainer(student, teacher, tokenizer, recipe, tmp_path / "run", "cpu").run()
    after = loss_now()
    assert after < 0.8 * before, (before, after)
    # the stage's output is a loadable HF checkpoint with the tokenizer
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / f"stage{stage}")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), student.state_dict().values()))
    assert (tmp_path / "run" / f"stage{stage}" / "tokenizer.json").exists()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 16))
    assert {"stage", "step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed"} <= set(records[0])


def test_resume_after_an_interruption_matches_an_uninterrupted_run(corpus, tokenizer, tmp_path):
    recipe = tiny_recipe(corpus, stages=(2, 3))  # 6 steps each, checkpoints every 2
    teacher, student = fresh_pair()
    Trainer(student, teacher, tokenizer, recipe, tmp_path / "whole", "cpu").run()
    want = params_of(student)

    for stop_stage, stop_step in ((2, 3), (3, 5)):  # mid-stage, between checkpoints
        run = tmp_path / f"cut{stop_stage}"

        def hook(stage, step):
            if (stage, step) == (stop_stage, stop_step):
                raise Interrupt

        teacher, student = fresh_pair()
        with pytest.raises(Interrupt):
            Trainer(student, teacher, tokenizer, recipe, run, "cpu", step_hook=hook).run()
        teacher, student = fresh_pair()  # a new process: fresh models, everything else from disk
        Trainer(student, teacher, tokenizer, recipe, run, "cpu").run(resume=True)
        got = params_of(student)
        for name in want:
            assert torch.equal(got[name], want[name]), (stop_stage, name)
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 12  # the steps redone after the checkpoint are not logged twice


def test_a_finished_run_is_not_overwritten_and_resume_rejects_a_changed_recipe(corpus, tokenizer, tmp_path):
    recipe = tiny_recipe(corpus, stages=(3,))
    teacher, student = fresh_pair()
    Trainer(student, teacher, tokenizer, recipe, tmp_path / "run", "cpu").run()
    with pytest.raises(RadistillError, match="--resume"):
        Trainer(student, teacher, tokenizer, recipe, tmp_path / "run", "cpu").run()
    changed = tiny_recipe(corpus, stages=(3,), lr=1e-4)
    with pytest.raises(RadistillError, match="recipe differs"):
        Trainer(student, teacher, tokenizer, changed, tmp_path / "run", "cpu").run(resume=True)


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "missing_file"])
def test_damaged_checkpoints_are_detected(corpus, tokenizer, tmp_path, damage):
    recipe = tiny_recipe(corpus, stages=(3,))
    teacher, student = fresh_pair()
    run = tmp_path / "run"
    Trainer(student, teacher, tokenizer, recipe, run, "cpu").run()
    path = latest(run / "checkpoints")
    verify(path)  # intact
    target = path / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
        match = "truncated"
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        match = "sha256"
    elif damage == "no_manifest":
        (path / "manifest.json").unlink()
        match = "no manifest.json"
    else:
        (path / "rank0.safetensors").unlink()
        match = "lacks rank0.safetensors"
    teacher, student = fresh_pair()
    with pytest.raises(CheckpointError, match=match) as info:
        Trainer(student, teacher, tokenizer, recipe, run, "cpu").run(resume=True)
    assert "stage3-step00000004" in str(info.value)  # it names the older checkpoint to fall back on


def test_a_half_written_checkpoint_is_ignored(corpus, tokenizer, tmp_path):
    """Killed while writing: the partial directory is not published, latest.json still names the previous one."""
    recipe = tiny_recipe(corpus, stages=(3,))
    teacher, student = fresh_pair()
    run = tmp_path / "run"

    def hook(stage, step):
        if step == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(student, teacher, tokenizer, recipe, run, "cpu", step_hook=hook).run()
    partial = run / "checkpoints" / ".stage3-step00000006.partial"
    shutil.copytree(latest(run / "checkpoints"), partial)  # as if killed mid-write
    (partial / "manifest.json").unlink()
    assert latest(run / "checkpoints").name == "stage3-step00000004"
    teacher, student = fresh_pair()
    Trainer(student, teacher, tokenizer, recipe, run, "cpu").run(resume=True)
    assert latest(run / "checkpoints").name == "stage3-step00000006"


def test_nan_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(corpus, tokenizer, tmp_path):
    recipe = tiny_recipe(corpus, stages=(3,))
    teacher, student = fresh_pair()
    run = tmp_path / "run"

    def poison(stage, step):
        if step == 2:
            with torch.no_grad():
                student.model.norm.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"stage 3, step 3: the loss is nan") as info:
        Trainer(student, teacher, tokenizer, recipe, run, "cpu", step_hook=poison).run()
    assert "stage3-step00000002" in str(info.value)
    verify(latest(run / "checkpoints"))
    assert latest(run / "checkpoints").name == "stage3-step00000002"


_KILLABLE_RUN = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from pathlib import Path
from distill_helpers import char_tokenizer, tiny_recipe, tiny_student, tiny_teacher
from radistill.distill.trainer import Trainer
torch.set_num_threads(1)

def hook(stage, step):
    if (stage, step) == (3, 3):
        Path({marker!r}).write_text("here")
        time.sleep(600)  # killed here with SIGKILL

teacher = tiny_teacher()
recipe = tiny_recipe(Path({corpus!r}), stages=(2, 3))
Trainer(tiny_student(teacher), teacher, char_tokenizer(), recipe, Path({run!r}), "cpu", step_hook=hook).run()
"""


def test_resume_after_kill_9(corpus, tokenizer, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    run, marker = tmp_path / "run", tmp_path / "marker"
    script = _KILLABLE_RUN.format(tests=str(Path(__file__).parent), marker=str(marker), corpus=str(corpus),
                                  run=str(run))
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None, "the training subprocess died before reaching the kill point"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert latest(run / "checkpoints").name == "stage3-step00000002"

    recipe = tiny_recipe(corpus, stages=(2, 3))
    teacher, student = fresh_pair()
    Trainer(student, teacher, tokenizer, recipe, run, "cpu").run(resume=True)
    teacher, reference = fresh_pair()
    Trainer(reference, teacher, tokenizer, recipe, tmp_path / "whole", "cpu").run()
    want = params_of(reference)
    assert all(torch.equal(v, want[k]) for k, v in params_of(student).items())
