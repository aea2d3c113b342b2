"""The public mixer API: register_mixer, the radistill.mixers entry points, and the two example mixers of
examples/mixers/slot_bank.py in both slots (kept heads and recurrent heads): decode == full, distillation learns."""

from __future__ import annotations

import importlib.util
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

import radistill
from radistill.hybrid import HybridCache, HybridForCausalLM, output_cache
from radistill.hybrid import mixers as mixer_registry
from radistill.hybrid.build import convert, student_config
from radistill.hybrid.memory import cache_nbytes, measure_cache_bytes, student_rows
from radistill.hybrid.mixers import MIXERS, RecurrentMixer, find_mixer, get_mixer
from radistill.utils.errors import RadistillError
from test_hybrid import left_padded, make_teacher

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mixers" / "slot_bank.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("radistill_example_slot_bank", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that an entry point can name it
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture
def registered(example):
    radistill.register_mixer("slot_memory", example.SlotMemory)
    radistill.register_mixer("gated_matrix", example.GatedMatrixMemory)
    yield example
    MIXERS.pop("slot_memory", None)
    MIXERS.pop("gated_matrix", None)


def test_register_mixer_checks_its_input(registered):
    assert get_mixer("slot_memory") is registered.SlotMemory
    radistill.register_mixer("slot_memory", registered.SlotMemory)  # the same class again is fine
    with pytest.raises(RadistillError, match="taken by SlotMemory"):
        radistill.register_mixer("slot_memory", registered.GatedMatrixMemory)
    with pytest.raises(RadistillError, match="subclass"):
        radistill.register_mixer("linear", torch.nn.Linear)
    with pytest.raises(RadistillError, match="unknown mixer 'nope'"):
        get_mixer("nope")


def test_entry_points_are_loaded_when_a_name_is_missing(example, monkeypatch):
    point = EntryPoint(name="gated_ep", value="radistill_example_slot_bank:GatedMatrixMemory",
                       group=mixer_registry.ENTRY_POINT_GROUP)
    asked = []

    def fake_entry_points(group, name):
        asked.append((group, name))
        return [point] if name == "gated_ep" else []

    monkeypatch.setattr(mixer_registry, "entry_points", fake_entry_points)
    try:
        assert find_mixer("gated_ep") is example.GatedMatrixMemory and MIXERS["gated_ep"] is example.GatedMatrixMemory
        assert find_mixer("absent") is None
        assert asked == [("radistill.mixers", "gated_ep"), ("radistill.mixers", "absent")]
    finally:
        MIXERS.pop("gated_ep", None)


def example_student(teacher):
    """Kept heads {0} / {2} served by SlotMemory, all other heads by GatedMatrixMemory (no softmax, no KV cache)."""
    config = student_config(teacher, [[0], [2], [], [1, 3]], "gated_matrix", {}, kept_mixer="slot_memory",
                            kept_mixer_settings={"slots": 4})
    return convert(teacher, config).eval()


def test_examples_in_both_slots_decode_like_the_full_forward(registered):
    student = example_student(make_teacher())
    mixer = student.model.layers[0].self_attn
    assert mixer.attention is None and mixer.recurrent_heads == [0, 1, 2, 3]
    assert [type(g).__name__ for g in mixer.recurrent.groups] == ["SlotMemory", "GatedMatrixMemory"]
    ids, mask, positions = left_padded(length=12)
    with torch.no_grad():
        full = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = student(input_ids=ids[:, :7], attention_mask=mask[:, :7], position_ids=positions[:, :7], use_cache=True)
        steps, cache = [out.logits], output_cache(out)
        for t in range(7, 12):
            out = student(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                          position_ids=positions[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full)[mask.bool()].abs().max() <= 1e-4
    measured = measure_cache_bytes(student, 10)
    (row,) = student_rows(student.config, [10], nbytes=4)
    assert measured["kv"] == 0 == row.kv_bytes and measured["total"] == row.ssm_bytes  # constant state only



def test_kept_heads_served_by_a_mixer_get_no_key_value_cache(registered):
    """The cache holds keys/values for softmax attention heads only: kept heads under a kept-head mixer keep their
    state in the mixer, so a static cache of 6 positions neither allocates K/V layers nor refuses a 9th token, and
    its bytes are what `radistill memory` counts."""
    student = example_student(make_teacher())
    cache = HybridCache(student.config, max_length=6)
    assert [layer.kv for layer in cache.layers] == [None] * student.config.num_hidden_layers
    ids = torch.randint(1, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = student(input_ids=ids).logits
        steps = [student(input_ids=ids[:, :6], cache=cache, use_cache=True).logits]
        for t in range(6, 9):  # past max_length: nothing there needs room
            steps.append(student(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4
    (row,) = student_rows(student.config, [9], nbytes=4)
    held = {k: v // 2 for k, v in cache_nbytes(cache).items()}  # per sequence
    assert held["kv"] == 0 == row.kv_bytes and held["total"] == row.total_bytes > 0

def test_gated_matrix_mixing_matrix_is_its_forward(registered):
    torch.manual_seed(0)
    mixer = registered.GatedMatrixMemory(32, 2, 8).double()
    torch.nn.init.normal_(mixer.gate.weight, std=0.3)
    u = torch.randn(2, 9, 32, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    y, _ = mixer(u, mask)
    v = mixer.qkv(u).view(2, 9, 3, 2, 8)[:, :, 2].transpose(1, 2)  # [B, H, T, P]
    assert torch.allclose((mixer.mixing_matrix(u, mask) @ v).transpose(1, 2), y, atol=1e-10)


def test_a_few_distillation_steps_lower_the_loss(registered, tmp_path):
    from radistill.distill.data import PackedStream
    from radistill.distill.stages import make_objective
    from radistill.distill.trainer import Trainer
    from distill_helpers import char_tokenizer, tiny_recipe, tiny_teacher, write_corpus

    write_corpus(tmp_path / "corpus.txt")
    tokenizer, teacher = char_tokenizer(), tiny_teacher()
    student = convert(teacher, student_config(teacher, [[1], [2]], "gated_matrix", {}, kept_mixer="slot_memory",
                                              kept_mixer_settings={"slots": 4}))
    recipe = tiny_recipe(tmp_path / "corpus.txt", stages=(2,), tokens=16 * 4 * 15, lr=1e-3)
    probe = PackedStream(recipe.data, tokenizer, 16, seed=99).next_batch(8)

    def loss_now():
        objective = make_objective(2, student, teacher, recipe.stage(2), [0, 1])
        value = float(objective.step(probe, scale=0.0)) / objective.unit_count
        student.zero_grad(set_to_none=True)
        return value

    before = loss_now()
    Trainer(student, teacher, tokenizer, recipe, tmp_path / "run", "cpu").run()
    assert loss_now() < 0.8 * before
    reloaded = HybridForCausalLM.from_pretrained(tmp_path / "run" / "stage2")  # registered mixers load by name
    assert isinstance(reloaded.model.layers[0].self_attn.recurrent.groups[0], registered.SlotMemory)
    assert issubclass(registered.SlotMemory, RecurrentMixer)
