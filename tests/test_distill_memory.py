"""The memory strategies the plan chooses, as the trainer applies them: stage 3 activation checkpointing, 8-bit
AdamW, stages 1/2 in layer blocks (only the block trained, on the GPU and in the optimizer), stage 3 LoRA over a
bf16 base, and ``recipe_overrides`` turning a plan into exactly these recipe settings."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from radistill.distill.checkpoint import latest, load_rank, load_trainer
from radistill.distill.data import PackedStream
from radistill.distill.recipe import DistillRecipe, merge
from radistill.distill.stages import (
    _run_teacher, layer_blocks, make_objective, set_activation_checkpointing, stage_modules, stream_teacher,
    teacher_taps, trained_layers,
)
from radistill.distill.trainer import Trainer
from radistill.finetune.lora import adapter_parameters
from radistill.memplan.distill import plan_distill, recipe_overrides
from radistill.memplan.estimate import Workload
from radistill.memplan.plan import candidates, make_plan
from radistill.memplan.shapes import Shapes
from radistill.models import presets
from radistill.models.access import decoder_layers
from radistill.models.presets import random_model, tiny_config
from radistill.utils.errors import RadistillError
from distill_helpers import char_tokenizer, run_two_gloo_processes, tiny_recipe, tiny_student, tiny_teacher

# three layers; the middle one keeps all four heads, so stage 1 (recurrent heads only) trains layers 0 and 2
KEPT = ((1,), (0, 1, 2, 3), (2,))


class Stop(Exception):
    pass


def three_layer_pair():
    teacher = random_model(tiny_config("llama", num_hidden_layers=3), seed=0)
    return teacher, tiny_student(teacher, kept=KEPT)


def two_layer_pair():
    teacher = tiny_teacher()
    return teacher, tiny_student(teacher)


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(tokenizer, run, recipe, pair=three_layer_pair, hook=None, resume=False):
    teacher, student = pair()
    Trainer(student, teacher, tokenizer, recipe, run, "cpu", step_hook=hook).run(resume=resume)
    return student


def stop_at(stage_step):
    def hook(stage, step):
        if (stage, step) == stage_step:
            raise Stop

    return hook


# ---- the recipe ------------------------------------------------------------------------------------------------------
def test_memory_fields_default_off_and_round_trip(tmp_path):
    default = DistillRecipe().stage(2)
    assert (default.optimizer, default.activation_checkpointing, default.layer_block, default.teacher_offload) == (
        "adamw", False, None, False)
    recipe = merge(DistillRecipe(), {"stages": {1: {"layer_block": 4}, 2: {"layer_block": 8, "optimizer": "adamw8bit",
                                                                           "teacher_offload": True},
                                                3: {"activation_checkpointing": True}}})
    recipe.save(tmp_path / "r.json")
    assert DistillRecipe.load(tmp_path / "r.json") == recipe
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe.to_dict()))
    assert DistillRecipe.load(tmp_path / "r.yaml") == recipe
    saved = json.loads((tmp_path / "r.json").read_text())["stages"]
    assert (saved["1"]["layer_block"], saved["2"]["optimizer"], saved["3"]["activation_checkpointing"],
            saved["3"]["layer_block"], saved["2"]["teacher_offload"]) == (4, "adamw8bit", True, None, True)


@pytest.mark.parametrize("bad, match", [
    ({2: {"optimizer": "sgd"}}, "stage 2: optimizer 'sgd' is not one of adamw, adamw8bit"),
    ({2: {"layer_block": 0}}, "stage 2: layer_block must be a whole number of layers >= 1"),
    # type errors come from the typed recipe validation, which names the key by its path
    ({1: {"layer_block": "eight"}},
     r"recipe key 'stages\.1\.layer_block' must be a whole number or null \(got 'eight'\)"),
    ({1: {"layer_block": 2.5}}, r"recipe key 'stages\.1\.layer_block' must be a whole number or null \(got 2\.5\)"),
    ({2: {"layer_block": True}}, r"recipe key 'stages\.2\.layer_block' must be a whole number or null \(got True\)"),
    ({3: {"layer_block": 4}}, "stage 3: layer_block is for stages 1/2 only"),
    ({2: {"activation_checkpointing": True}}, "stage 2: activation_checkpointing is for stage 3 only"),
    ({3: {"activation_checkpointing": "yes"}},
     r"recipe key 'stages\.3\.activation_checkpointing' must be true or false \(got 'yes'\)"),
    ({3: {"teacher_offload": True}}, "stage 3: teacher_offload is for stages 1/2 only .* use teacher_logits: topk"),
    ({2: {"teacher_offload": "yes"}}, r"recipe key 'stages\.2\.teacher_offload' must be true or false \(got 'yes'\)"),
])
def test_bad_memory_settings_are_rejected(bad, match):
    with pytest.raises(RadistillError, match=match):
        merge(DistillRecipe(), {"stages": bad})


def test_layer_block_written_as_a_string_is_the_number():
    """The typed validation reads a number spelled as a string (``"8"``, as YAML gives a quoted value) as that
    number, as it does for every numeric recipe key; the range check still applies after the conversion."""
    assert merge(DistillRecipe(), {"stages": {1: {"layer_block": "8"}}}).stage(1).layer_block == 8
    with pytest.raises(RadistillError, match="stage 1: layer_block must be a whole number of layers >= 1"):
        merge(DistillRecipe(), {"stages": {1: {"layer_block": "0"}}})


# ---- activation checkpointing ----------------------------------------------------------------------------------------
def _stage3_grads(student, teacher, ids, checkpointing: bool):
    cfg = DistillRecipe().stage(3)
    student.train().zero_grad(set_to_none=True)
    set_activation_checkpointing(student, checkpointing)
    runs = []
    # a hook at the start of each layer's forward (transformers checkpoints the forward, not the layer's own hooks;
    # the recompute stops once it has remade what backward needs, so a late hook might not be reached)
    handles = [layer.input_layernorm.register_forward_hook(lambda *_: runs.append(1))
               for layer in student.model.layers]
    try:
        loss = make_objective(3, student, teacher, cfg, []).step(ids, 1.0)
    finally:
        for handle in handles:
            handle.remove()
        set_activation_checkpointing(student, False)
    return loss, {n: p.grad.clone() for n, p in student.named_parameters()}, len(runs)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    ids = torch.randint(2, 100, (2, 24))
    loss, grads, runs = _stage3_grads(student, teacher, ids, checkpointing=False)
    loss_ckpt, grads_ckpt, runs_ckpt = _stage3_grads(student, teacher, ids, checkpointing=True)
    assert (runs, runs_ckpt) == (2, 4)  # each layer ran again in backward
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert _stage3_grads(student, teacher, ids, checkpointing=False)[2] == 2  # and it can be turned off again


def test_stage3_with_activation_checkpointing_trains_like_without(corpus, tokenizer, tmp_path):
    plain = train(tokenizer, tmp_path / "plain", tiny_recipe(corpus, stages=(3,)), two_layer_pair)
    recipe = merge(tiny_recipe(corpus, stages=(3,)), {"stages": {3: {"activation_checkpointing": True}}})
    teacher, ckpt = two_layer_pair()
    during = []
    Trainer(ckpt, teacher, tokenizer, recipe, tmp_path / "ckpt", "cpu",
            step_hook=lambda stage, step: during.append(ckpt.model.layers[0].gradient_checkpointing)).run()
    assert during == [True] * 6
    assert not any(getattr(m, "gradient_checkpointing", False) for m in ckpt.modules())  # off after the stage
    want = params_of(plain)
    for name, value in params_of(ckpt).items():
        assert torch.equal(value, want[name]), name


def test_no_gradient_outlives_its_stage(corpus, tokenizer, tmp_path):
    """Module.to carries .grad along: a stage's leftovers would sit on the next stage's device (a LoRA stage 3 would
    hold the stage-2 gradients of weights it never trains)."""
    teacher, student = two_layer_pair()
    recipe = merge(tiny_recipe(corpus, stages=(2, 3)), {"stages": {3: {"trainable": "lora", "lora_rank": 2}}})
    left = {}

    def hook(stage, step):
        if stage == 3 and step == 1:
            left["stage 3"] = [n for n, p in student.named_parameters() if p.grad is not None and "lora_" not in n]

    Trainer(student, teacher, tokenizer, recipe, tmp_path / "run", "cpu", step_hook=hook).run()
    assert left == {"stage 3": []}
    assert all(p.grad is None for p in student.parameters())


# ---- layer blocks (stages 1/2) ---------------------------------------------------------------------------------------
def blocked(corpus, stage: int, size: int | None, **extra):
    stage_cfg = {"tokens": 16 * 4 * 10, "lr": {1: 1e-2, 2: 1e-3}[stage], "layer_block": size, **extra}
    return merge(tiny_recipe(corpus, stages=(stage,)), {"stages": {stage: stage_cfg}})


def test_blocks_cut_the_trained_layers():
    _, student = three_layer_pair()
    assert trained_layers(1, student, "recurrent") == [0, 2] and trained_layers(2, student, "all") == [0, 1, 2]
    assert layer_blocks([0, 1, 2], 2) == [[0, 1], [2]] and layer_blocks([0, 2], None) == [[0, 2]]
    # what the GPU holds for a block: stage 1 the recurrent mixers it trains, stage 2 whole layers; the rotary
    # embedding (no parameters) for both, never the embeddings or the LM head
    layers, rotary = student.model.layers, student.model.rotary_emb
    assert stage_modules(1, student, [2], "recurrent") == [layers[2].self_attn.recurrent, rotary]
    assert stage_modules(2, student, [0, 1], "all") == [layers[0], layers[1], rotary]


def test_the_teacher_stops_after_the_last_layer_it_is_tapped_at():
    teacher, _ = three_layer_pair()
    ran = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
               for i, layer in enumerate(decoder_layers(teacher))]
    with teacher_taps(teacher, [0, 1], stop=True) as taps:
        _run_teacher(teacher, torch.randint(2, 100, (1, 8)))
    for handle in handles:
        handle.remove()
    assert ran == [0, 1] and taps[1].output is not None


@pytest.mark.parametrize("stage, size", [(1, 1), (2, 2)])
def test_training_in_blocks_ends_where_all_layers_at_once_end(corpus, tokenizer, tmp_path, stage, size):
    """Layers are independent problems in stages 1/2 and every block makes the whole pass over the same data with the
    same schedule, so blocks change memory and time, not the result."""
    recipe = blocked(corpus, stage, size)
    whole = params_of(train(tokenizer, tmp_path / "whole", blocked(corpus, stage, None)))
    teacher, student = three_layer_pair()
    started = params_of(student)
    blocks = layer_blocks(trained_layers(stage, student, recipe.stage(stage).trainable), size)
    assert blocks == {1: [[0], [2]], 2: [[0, 1], [2]]}[stage]
    probe = PackedStream(recipe.data, tokenizer, 16, seed=99).next_batch(8)

    def block_losses():
        losses = []
        for block in blocks:
            objective = make_objective(stage, student, teacher, recipe.stage(stage), block, block=block)
            losses.append(float(objective.step(probe, scale=0.0)) / objective.unit_count)
        student.zero_grad(set_to_none=True)
        return losses

    before = block_losses()
    run = tmp_path / "blocks"
    Trainer(student, teacher, tokenizer, recipe, run, "cpu").run()
    assert all(a < 0.9 * b for a, b in zip(block_losses(), before)), (before, block_losses())
    got = params_of(student)
    assert any(not torch.equal(value, started[name]) for name, value in got.items())
    assert [name for name, value in got.items() if not torch.equal(value, whole[name])] == []
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21)) and records[-1]["steps"] == 20
    assert [r["block"] for r in records] == [0] * 10 + [1] * 10


def test_a_block_trains_only_its_layers_with_only_their_optimizer_state(corpus, tokenizer, tmp_path):
    teacher, student = three_layer_pair()
    started = params_of(student)
    seen = {}

    def snapshot(stage, step):
        if step == 10:  # the end of block 0 (layers 0 and 1)
            seen.update(params_of(student))

    run = tmp_path / "run"
    Trainer(student, teacher, tokenizer, blocked(corpus, 2, 2, checkpoint_every=10), run, "cpu",
            step_hook=snapshot).run()
    changed = {k.split(".")[2] if k.startswith("model.layers.") else k for k in seen if
               not torch.equal(seen[k], started[k])}
    assert changed == {"0", "1"}
    # block 0's last checkpoint holds optimizer state for layers 0 and 1 only; the stage's last one for layer 2 only
    layer_params = {i: sum(1 for _ in student.model.layers[i].parameters()) for i in range(3)}
    first = load_rank(run / "checkpoints" / "stage2-step00000010", 0)["optimizer"]
    assert len(first["state"]) == layer_params[0] + layer_params[1]
    assert len(load_rank(latest(run / "checkpoints"), 0)["optimizer"]["state"]) == layer_params[2]
    assert load_trainer(latest(run / "checkpoints"))["blocks"] == [[0, 1], [2]]


@pytest.mark.parametrize("cut", [12, 10])  # inside block 1 between checkpoints; exactly at the block boundary
def test_resume_lands_in_the_right_block_at_the_right_step(corpus, tokenizer, tmp_path, cut):
    recipe = blocked(corpus, 2, 2, checkpoint_every=4)  # checkpoints at 4, 8, 10 (block end), 12, 16, 20
    want = params_of(train(tokenizer, tmp_path / "whole", recipe))
    run = tmp_path / "cut"
    with pytest.raises(Stop):
        train(tokenizer, run, recipe, hook=stop_at((2, cut + 1)))
    assert latest(run / "checkpoints").name == f"stage2-step{cut:08d}"
    got = params_of(train(tokenizer, run, recipe, resume=True))
    assert all(torch.equal(v, want[k]) for k, v in got.items())
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 20


def test_resume_refuses_other_layer_blocks(corpus, tokenizer, tmp_path, monkeypatch):
    recipe = blocked(corpus, 2, 2)
    run = tmp_path / "run"
    with pytest.raises(Stop):
        train(tokenizer, run, recipe, hook=stop_at((2, 3)))
    monkeypatch.setattr(Trainer, "blocks", lambda self, stage: [[0], [1], [2]])  # e.g. another student
    with pytest.raises(RadistillError, match=r"layer blocks \[\[0, 1\], \[2\]\], this run makes \[\[0\], \[1\]"):
        train(tokenizer, run, recipe, resume=True)


def short_blocks(corpus):
    """Stage 2 in blocks of two layers, three steps each, every checkpoint kept."""
    return merge(blocked(corpus, 2, 2, tokens=16 * 4 * 3), {"keep_checkpoints": 10})


def train_short_blocks(corpus, run_dir):
    return train(char_tokenizer(), run_dir, short_blocks(corpus))


def test_blocks_over_two_processes_end_where_one_process_ends(corpus, tokenizer, tmp_path):
    """Block [0, 1] is split over the two ranks, block [2] is rank 0's alone (rank 1 idles through it)."""
    out = tmp_path / "two.pt"
    two = run_two_gloo_processes(train_short_blocks, (corpus, tmp_path / "run2"), out)
    one = params_of(train(tokenizer, tmp_path / "run1", short_blocks(corpus)))
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # each rank checkpoints the optimizer state of its own layers: at the end of block 0 one layer each
    block0 = tmp_path / "run2" / "checkpoints" / "stage2-step00000003"
    layers = three_layer_pair()[1].model.layers
    assert [len(load_rank(block0, r)["optimizer"]["state"]) for r in (0, 1)] == [
        sum(1 for _ in layers[i].parameters()) for i in (0, 1)]


@pytest.mark.gpu
def test_on_cuda_only_the_block_being_trained_is_on_the_gpu(corpus, tokenizer, tmp_path):
    teacher, student = three_layer_pair()
    teacher.cuda()
    seen = []

    def devices(stage, step):
        if step in (1, 11):  # in block 0 (layers 0, 1), in block 1 (layer 2)
            seen.append({name.split(".")[2] if ".layers." in name else name: p.device.type
                         for name, p in student.named_parameters()})

    Trainer(student, teacher, tokenizer, blocked(corpus, 2, 2), tmp_path / "run", "cuda", step_hook=devices).run()
    on_gpu = [{k for k, device in snapshot.items() if device == "cuda"} for snapshot in seen]
    assert on_gpu == [{"0", "1"}, {"2"}]
    assert {p.device.type for p in student.parameters()} == {"cpu"}  # back where it came from


# ---- the teacher streamed from CPU memory (stages 1/2) ---------------------------------------------------------------
def hooked(teacher) -> set[str]:
    """The teacher's modules that carry accelerate hooks."""
    return {name for name, module in teacher.named_modules() if hasattr(module, "_hf_hook")}


@pytest.mark.parametrize("stage", [1, 2])
def test_a_streamed_teacher_trains_like_a_resident_one(corpus, tokenizer, tmp_path, stage):
    """teacher_offload changes where the teacher's weights wait, not what it computes: on CPU accelerate's hooks are
    installed all the same (the execution device is the CPU), and gone after the stage."""
    resident = params_of(train(tokenizer, tmp_path / "resident", blocked(corpus, stage, None)))
    teacher, student = three_layer_pair()
    weights = params_of(teacher)
    seen = []

    def check(*_):
        seen.append(hooked(teacher))
        assert all(p.device.type == "meta" for p in decoder_layers(teacher).parameters())  # in the hooks' CPU map

    Trainer(student, teacher, tokenizer, blocked(corpus, stage, None, teacher_offload=True), tmp_path / "streamed",
            "cpu", step_hook=check).run()
    assert len(seen) == 10 and all({"model.embed_tokens", "model.layers.0.self_attn.q_proj"} <= names
                                   for names in seen), seen[0]
    assert hooked(teacher) == set() and not hasattr(teacher.model, "_old_forward")
    assert {name: value for name, value in params_of(teacher).items() if not torch.equal(value, weights[name])} == {}
    got = params_of(student)
    assert [name for name, value in got.items() if not torch.equal(value, resident[name])] == []


def test_a_streamed_teacher_is_given_back_with_its_own_parameters():
    teacher = random_model(tiny_config("llama", num_hidden_layers=2, tie_word_embeddings=True), seed=0)
    own = dict(teacher.named_parameters(remove_duplicate=False))
    restore = stream_teacher(teacher, "cpu")
    with teacher_taps(teacher, [0, 1], stop=True) as taps:
        _run_teacher(teacher, torch.randint(2, 100, (1, 8)))
    assert taps[1].output is not None and hooked(teacher)
    restore()
    assert all(p is own[name] for name, p in teacher.named_parameters(remove_duplicate=False))
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight


@pytest.mark.gpu
def test_on_cuda_a_streamed_teacher_stays_in_cpu_memory(corpus, tokenizer, tmp_path):
    teacher, student = three_layer_pair()
    seen = []

    def devices(stage, step):
        seen.append({p.device.type for p in teacher.parameters()})

    recipe = blocked(corpus, 2, None, teacher_offload=True)
    Trainer(student, teacher, tokenizer, recipe, tmp_path / "run", "cuda", step_hook=devices).run()
    # between forwards the hooked modules hold meta tensors, the LM head (never run) its CPU weights
    assert seen and all(snapshot <= {"meta", "cpu"} for snapshot in seen)
    assert {p.device.type for p in teacher.parameters()} == {"cpu"} and hooked(teacher) == set()


# ---- 8-bit AdamW -----------------------------------------------------------------------------------------------------
def test_8bit_adamw_without_a_library_stops_before_training(corpus, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr("radistill.memplan.plan.eight_bit_optimizer", lambda: None)
    recipe = merge(tiny_recipe(corpus, stages=(2, 3)), {"stages": {3: {"optimizer": "adamw8bit"}}})
    teacher, student = two_layer_pair()
    with pytest.raises(RadistillError, match="stage 3: optimizer adamw8bit needs torchao or bitsandbytes: pip install"):
        Trainer(student, teacher, tokenizer, recipe, tmp_path / "run", "cpu")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _eight_bit_states(state) -> int:
    """Moments held in 8 bits in an optimizer state dict: torchao's quantised tensors (uint8 ``codes``) or
    bitsandbytes' uint8 states (in a nested dict)."""
    if isinstance(state, dict):
        return sum(_eight_bit_states(value) for value in state.values())
    return isinstance(state, torch.Tensor) and getattr(state, "codes", state).dtype == torch.uint8


@pytest.mark.parametrize("library", ["torchao", "bitsandbytes"])
def test_8bit_adamw_trains_and_resumes_exactly(corpus, tokenizer, tmp_path, monkeypatch, library):
    pytest.importorskip(library)
    monkeypatch.setattr("radistill.memplan.plan.eight_bit_optimizer", lambda: library)
    recipe = merge(tiny_recipe(corpus, stages=(2, 3), lr=1e-3),
                   {"stages": {2: {"optimizer": "adamw8bit", "layer_block": 1}, 3: {"optimizer": "adamw8bit"}}})
    started = params_of(two_layer_pair()[1])
    want = params_of(train(tokenizer, tmp_path / "whole", recipe, two_layer_pair))
    assert any(not torch.equal(v, started[k]) for k, v in want.items())
    run = tmp_path / "cut"
    with pytest.raises(Stop):
        train(tokenizer, run, recipe, two_layer_pair, hook=stop_at((3, 5)))
    assert _eight_bit_states(load_rank(latest(run / "checkpoints"), 0)["optimizer"]["state"]) > 0
    got = params_of(train(tokenizer, run, recipe, two_layer_pair, resume=True))
    assert all(torch.equal(v, want[k]) for k, v in got.items())


# ---- stage 3 LoRA over a bf16 base -----------------------------------------------------------------------------------
def test_stage3_lora_holds_the_frozen_base_in_bf16_under_autocast(corpus, tokenizer, tmp_path):
    pytest.importorskip("peft")
    teacher, student = two_layer_pair()
    started = params_of(student)
    recipe = merge(tiny_recipe(corpus, stages=(3,), lr=1e-2), {"stages": {3: {"trainable": "lora", "lora_rank": 4}}})
    held = []

    def dtypes(stage, step):
        adapters = set(adapter_parameters(student))
        held.append({(name in adapters, p.dtype) for name, p in student.named_parameters()})

    trainer = Trainer(student, teacher, tokenizer, recipe, tmp_path / "run", "cpu", step_hook=dtypes)
    trainer.autocast = True  # what CUDA with dtype bf16 sets; CPU autocast makes the same bf16 matmuls
    trainer.run()
    assert held == [{(True, torch.float32), (False, torch.bfloat16)}] * 6
    assert {p.dtype for p in student.parameters()} == {torch.float32}  # back in fp32 after the stage
    # the export: every weight is its bf16 rounding, the adapted ones (recurrent in_proj, kept q/k/v) plus their
    # merged adapters
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "stage3").state_dict()
    weights = {n for n, _ in two_layer_pair()[1].named_parameters()}
    changed = {n for n in weights if not torch.equal(merged[n], started[n].to(torch.bfloat16).float())}
    assert changed and all(part in n for n in changed for part in ("layers.", "_proj.weight"))
    assert all(".recurrent.in_proj." in n or ".attention." in n for n in changed)


# ---- the plan, as the trainer applies it -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nanbeige_student():
    return Shapes(presets.shape_config("nanbeige4.1-3b"), keep=13, state_size=8).student_config


def test_recipe_overrides_carry_every_planned_strategy(nanbeige_student):
    recipe = merge(DistillRecipe(), {"stages": {1: {"enabled": True}}})
    plan = plan_distill(nanbeige_student, recipe, "24GiB")
    assert plan.fits
    fitted = merge(recipe, recipe_overrides(plan, recipe))
    for step in plan.steps:
        number, st = int(step.step[-1]), step.strategy
        cfg = fitted.stage(number)
        assert (cfg.batch_size, cfg.optimizer, st.teacher) == (st.micro_batch, st.optimizer, "resident")
        assert not cfg.teacher_offload
        assert cfg.batch_size * cfg.grad_accum == 8 * 16
        if number == 3:
            assert (cfg.activation_checkpointing, cfg.trainable == "lora") == (st.checkpointing, st.trainable == "lora")
        else:
            assert cfg.layer_block == (st.layers_at_once or None)
    # Nanbeige4.1-3B's 13-head student on 24 GiB: stage 2 in blocks of 8 layers, stage 3 LoRA with checkpointing
    assert fitted.stage(2).layer_block == 8 and fitted.stage(1).layer_block is None
    assert fitted.stage(3).activation_checkpointing and fitted.stage(3).trainable == "lora"


def test_the_distill_plan_streams_the_teacher_when_it_cannot_stay_on_the_gpu(nanbeige_student):
    # in 8 GiB the bf16 teacher alone (7.7 GiB) leaves no room: stage 2 streams it from CPU memory (teacher_offload)
    only_stage2 = merge(DistillRecipe(), {"stages": {3: {"enabled": False}}})
    plan = plan_distill(nanbeige_student, only_stage2, "8GiB")
    assert plan.fits and plan.steps[0].strategy.teacher == "streamed"
    assert plan.steps[0].strategy == make_plan(nanbeige_student, "8GiB", steps=("distill stage 2",)).steps[0].strategy
    fitted = merge(only_stage2, recipe_overrides(plan, only_stage2))
    assert fitted.stage(2).teacher_offload and not fitted.stage(3).teacher_offload
    assert not any("does not" in note for note in plan.steps[0].notes)


def test_the_distill_plan_leaves_out_what_the_trainer_does_not_do():
    # stages 1/2: every teacher `radistill plan` knows; stage 3: not top-k teacher logits from disk (opt-in)
    for step, trainer in [("distill stage 1", {"resident", "streamed"}), ("distill stage 2", {"resident", "streamed"}),
                          ("distill stage 3", {"resident"})]:
        assert {st.teacher for st in candidates(step, Workload(), 32, True, trainer_only=True)} == trainer, step
        planned = {st.teacher for st in candidates(step, Workload(), 32, True)}
        assert planned == trainer | ({"topk"} if step.endswith("3") else set()), step
