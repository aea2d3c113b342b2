"""A stage stopped inside a layer block (a step hook that raises, as the benchmarks' ``--train-seconds`` does, the NaN
guard, or any other error) leaves the student and the teacher where, and as, a finished stage leaves them.

On the CPU "CPU memory" and "the device" are one place, so where stages 1/2 put each module is invisible there. The
:func:`fake_device` fixture makes it visible: ``Module.to(FAKE)`` moves to the CPU as usual but records, for each
tensor it moves, that it went to the device; ``Module.to("cpu")`` records that it went to CPU memory. The run's
models start on the fake device, and the placement is told that is their device and home, as on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from radistill.distill.recipe import merge
from radistill.distill.trainer import Trainer
from radistill.finetune.lora import adapter_parameters
from distill_helpers import Interrupt, stop_at, tiny_recipe, tiny_student
from radistill.models.presets import random_model, tiny_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
FAKE = "fake-accelerator"
KEPT = ((1,), (0, 1, 2, 3), (2,))  # three layers: stage 2 in blocks of two is blocks [0, 1] and [2]


def three_layer_pair():
    teacher = random_model(tiny_config("llama", num_hidden_layers=3), seed=0)
    return teacher, tiny_student(teacher, kept=KEPT)


def stage2_in_blocks(corpus, **extra):
    """Stage 2 in blocks of two layers, ten steps each (20 in all)."""
    stage = {"tokens": 16 * 4 * 10, "lr": 1e-3, "layer_block": 2, **extra}
    return merge(tiny_recipe(corpus, stages=(2,)), {"stages": {2: stage}})


@pytest.fixture
def fake_device(monkeypatch):
    """``where(tensor)``: FAKE or "cpu", where the last ``Module.to`` naming a device sent ``tensor``."""
    sent: dict[int, str] = {}
    real_to = nn.Module.to

    def to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (str, torch.device)):
            label = FAKE if target == FAKE else torch.device(target).type
            if label == FAKE:
                args, kwargs = (("cpu", *args[1:]), kwargs) if args else (args, {**kwargs, "device": "cpu"})
            moved = real_to(self, *args, **kwargs)
            for tensor in (*self.parameters(), *self.buffers()):  # Module.to keeps each Parameter and CPU buffer
                sent[id(tensor)] = label
            return moved
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", to)
    return lambda tensor: sent.get(id(tensor), "never moved")


def on_fake_device(trainer: Trainer) -> Trainer:
    """The trainer's placement told that the models' device and home are the fake device (the run's own batches stay
    on the real CPU: ``trainer.device``)."""
    trainer.student.to(FAKE)
    trainer.teacher.to(FAKE)
    placement = trainer.placement
    placement.device = placement.home = placement.teacher_home = FAKE
    return trainer


def checkpointing(model: nn.Module) -> bool:
    """Whether any decoder layer recomputes its forward in the backward."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def state(model: nn.Module, where) -> dict[str, tuple]:
    """Per parameter and buffer: where it is, its dtype, whether it requires grad, whether it holds a gradient; and
    the model's training flag."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    got = {name: (where(t), t.dtype, t.requires_grad, t.grad is not None) for name, t in tensors.items()}
    return {**got, "training": model.training}


def test_a_stage2_stopped_inside_a_block_leaves_every_module_on_the_device(corpus, tokenizer, tmp_path, fake_device):
    """The GPU failure this guards: ``--train-seconds`` stopped stage 2 in a block, whose layers alone were on the
    device, and the evaluation after it ran a student half in CPU memory."""
    seen = []

    def look(stage, step):
        if step == 5:  # in block 0: layers 0 and 1 on the device, the rest in CPU memory
            seen.append({name: fake_device(p) for name, p in student.named_parameters()})
            raise Interrupt

    teacher, student = three_layer_pair()
    stopped = on_fake_device(Trainer(student, teacher, tokenizer, stage2_in_blocks(corpus), tmp_path / "stop", "cpu",
                                     step_hook=look))
    with pytest.raises(Interrupt):
        stopped.run()
    # the fake device tells the places apart: mid-block the stage's placement is what a GPU run has
    on_device = {name.split(".")[2] if ".layers." in name else name for name, d in seen[0].items() if d == FAKE}
    assert on_device == {"0", "1"}

    finished_teacher, finished_student = three_layer_pair()
    on_fake_device(Trainer(finished_student, finished_teacher, tokenizer, stage2_in_blocks(corpus), tmp_path / "done",
                           "cpu")).run()
    assert {fake_device(t) for t in (*finished_student.parameters(), *finished_student.buffers())} == {FAKE}
    assert state(student, fake_device) == state(finished_student, fake_device)
    assert state(teacher, fake_device) == state(finished_teacher, fake_device)


def test_a_stopped_stage_gives_back_a_streamed_teacher(corpus, tokenizer, tmp_path):
    """Stage 2 with ``teacher_offload`` stopped inside a block: the teacher is a plain module again, its own weights
    in place (not the hooks' meta tensors), and both models run."""
    teacher, student = three_layer_pair()
    own = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    trainer = Trainer(student, teacher, tokenizer, stage2_in_blocks(corpus, teacher_offload=True), tmp_path / "run",
                      "cpu", step_hook=stop_at((2, 3)))
    with pytest.raises(Interrupt):
        trainer.run()
    assert not any(hasattr(m, "_hf_hook") for m in teacher.modules()) and not hasattr(teacher.model, "_old_forward")
    assert all(torch.equal(p, own[name]) for name, p in teacher.named_parameters())
    ids = torch.randint(2, 100, (1, 8))
    assert torch.isfinite(teacher(ids).logits).all() and torch.isfinite(student(ids).logits).all()
    assert not student.training and all(p.requires_grad and p.grad is None for p in student.parameters())


def test_a_stopped_stage3_lora_leaves_the_base_in_fp32(corpus, tokenizer, tmp_path):
    """Stage 3 with LoRA under bf16 autocast holds the frozen base in bf16 while it trains; stopped, the student is
    back in fp32 with activation checkpointing off, as after the stage."""
    pytest.importorskip("peft")
    teacher, student = three_layer_pair()
    recipe = merge(tiny_recipe(corpus, stages=(3,)), {"stages": {3: {"trainable": "lora", "lora_rank": 4,
                                                                   "activation_checkpointing": True}}})
    held = []

    def look(stage, step):
        held.append(({p.dtype for p in student.parameters()}, checkpointing(student)))
        if step == 3:
            raise Interrupt

    trainer = Trainer(student, teacher, tokenizer, recipe, tmp_path / "run", "cpu", step_hook=look)
    trainer.autocast = True  # what CUDA with dtype bf16 sets
    with pytest.raises(Interrupt):
        trainer.run()
    assert held[-1] == ({torch.float32, torch.bfloat16}, True)  # what release has to undo
    assert {p.dtype for p in student.parameters()} == {torch.float32} and adapter_parameters(student)
    assert not checkpointing(student) and not student.training


def test_benchmarks_out_of_time_student_is_whole_on_the_device(corpus, tokenizer, tmp_path, fake_device, monkeypatch):
    """``distill_student`` (testbed_recovery.py, and through it smollm2.py, window.py, fidelity_candidates.py) with a
    deadline already past: stopped after the first step, reported truncated, and the student ready to evaluate."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import testbed_recovery

    made = []

    class FakeDeviceTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(on_fake_device(self))

    monkeypatch.setattr(testbed_recovery, "Trainer", FakeDeviceTrainer)
    teacher, student = three_layer_pair()
    tokens, truncated, stage_seconds = testbed_recovery.distill_student(
        student, tmp_path / "run", teacher, tokenizer, stage2_in_blocks(corpus), "cpu", 0.0,
        testbed_recovery.Timings(lambda: None), "student")
    assert made and truncated and tokens == 16 * 2 * 2 and stage_seconds == {}
    assert {fake_device(t) for t in (*student.parameters(), *student.buffers())} == {FAKE}
    assert not student.training


@pytest.mark.gpu
def test_on_cuda_a_stage2_stopped_inside_a_block_leaves_the_student_on_the_gpu(corpus, tokenizer, tmp_path):
    """The fake device's test on a real one: the student and teacher given on the GPU, stage 2 stopped in block 0."""
    teacher, student = three_layer_pair()
    teacher.cuda()
    student.cuda()
    trainer = Trainer(student, teacher, tokenizer, stage2_in_blocks(corpus), tmp_path / "run", "cuda",
                      step_hook=stop_at((2, 5)))
    with pytest.raises(Interrupt):
        trainer.run()
    assert {t.device.type for t in (*student.parameters(), *student.buffers())} == {"cuda"}
    assert {t.device.type for t in teacher.parameters()} == {"cuda"}
    ids = torch.randint(2, 100, (1, 8), device="cuda")
    assert torch.isfinite(student(ids).logits).all()


def test_benchmarks_student_run_left_by_an_earlier_process_is_continued(corpus, tokenizer, tmp_path, monkeypatch):
    """A student process killed mid-training leaves its run folder (recipe.json, checkpoints); the benchmark run
    again continues it from the newest checkpoint instead of refusing the folder, and counts the whole stage."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import testbed_recovery

    class KilledAtStep7(Trainer):  # the first process dies at step 7 of 20 (its last checkpoint: step 6)
        def __init__(self, *args, step_hook=None, **kwargs):
            kill = stop_at((2, 7))
            super().__init__(*args, step_hook=lambda stage, step: (step_hook(stage, step), kill(stage, step)),
                             **kwargs)

    recipe = merge(stage2_in_blocks(corpus), {"stages": {2: {"checkpoint_every": 3}}})
    teacher, student = three_layer_pair()
    monkeypatch.setattr(testbed_recovery, "Trainer", KilledAtStep7)
    with pytest.raises(Interrupt):
        testbed_recovery.distill_student(student, tmp_path / "run", teacher, tokenizer, recipe, "cpu", None,
                                         testbed_recovery.Timings(lambda: None), "student")
    assert (tmp_path / "run" / "recipe.json").exists() and not (tmp_path / "run" / "stage2").exists()
    seen = []

    class Watched(Trainer):
        def __init__(self, *args, step_hook=None, **kwargs):
            super().__init__(*args, step_hook=lambda stage, step: (seen.append(step), step_hook(stage, step)),
                             **kwargs)

    monkeypatch.setattr(testbed_recovery, "Trainer", Watched)
    teacher, student = three_layer_pair()
    tokens, truncated, _ = testbed_recovery.distill_student(
        student, tmp_path / "run", teacher, tokenizer, recipe, "cpu", None, testbed_recovery.Timings(lambda: None),
        "student")
    assert seen[0] == 7 and seen[-1] == 20  # on from the checkpoint at step 6
    assert not truncated and tokens == 16 * 4 * 20
    assert (tmp_path / "run" / "stage2").is_dir()


def test_benchmarks_continued_student_counts_the_stages_the_earlier_process_finished(corpus, tokenizer, tmp_path,
                                                                                        monkeypatch):
    """Killed in stage 3 after stage 2 finished: the continued run trains only the rest of stage 3, and its token
    count still holds stage 2 (a SmolLM2 run reported stage 3's tokens alone, a third of what the students saw)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import testbed_recovery

    class KilledInStage3(Trainer):
        def __init__(self, *args, step_hook=None, **kwargs):
            kill = stop_at((3, 3))
            super().__init__(*args, step_hook=lambda stage, step: (step_hook(stage, step), kill(stage, step)),
                             **kwargs)

    recipe = tiny_recipe(corpus, stages=(2, 3))  # 6 steps of 64 tokens per stage, a checkpoint every 2
    teacher, student = three_layer_pair()
    monkeypatch.setattr(testbed_recovery, "Trainer", KilledInStage3)
    with pytest.raises(Interrupt):
        testbed_recovery.distill_student(student, tmp_path / "run", teacher, tokenizer, recipe, "cpu", None,
                                         testbed_recovery.Timings(lambda: None), "student")
    monkeypatch.setattr(testbed_recovery, "Trainer", Trainer)
    teacher, student = three_layer_pair()
    tokens, truncated, stage_seconds = testbed_recovery.distill_student(
        student, tmp_path / "run", teacher, tokenizer, recipe, "cpu", None, testbed_recovery.Timings(lambda: None),
        "student")
    assert set(stage_seconds) == {3} and not truncated  # only stage 3 trained in this call
    assert tokens == recipe.stage(2).tokens + recipe.stage(3).tokens == 2 * 6 * 64
