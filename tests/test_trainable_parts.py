"""Which parameters a stage trains: the named groups and comma-separated parts (kept heads, MLPs, norms, ...)."""

from __future__ import annotations

import pytest
import torch

from distill_helpers import char_tokenizer, tiny_recipe, tiny_student, tiny_teacher, write_corpus
from radistill.distill.recipe import merge
from radistill.distill.stages import model_parameters
from radistill.utils.errors import RadistillError


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_parts_select_their_parameters():
    student = tiny_student(tiny_teacher())
    names = _names(student, model_parameters(student, "mlp,norms"))
    assert names and all(".mlp." in n or "layernorm" in n or n == "model.norm.weight" for n in names)
    assert "model.norm.weight" in names and any("input_layernorm" in n for n in names)
    kept = _names(student, model_parameters(student, "kept-heads"))
    assert kept and all(".self_attn.attention." in n for n in kept)
    emb = _names(student, model_parameters(student, "embeddings"))
    assert "model.embed_tokens.weight" in emb
    recurrent = _names(student, model_parameters(student, "recurrent"))
    assert recurrent == _names(student, model_parameters(student, "recurrent,recurrent"))
    everything = _names(student, model_parameters(student, "recurrent,kept-heads,o-proj,mlp,norms,embeddings,lm-head"))
    assert everything == {n for n, _ in student.named_parameters()}


@pytest.mark.parametrize("stage,trainable,message", [
    (3, "mlp,bogus", "comma-separated list of parts"),
    (2, "mlp,embeddings", "never runs the embeddings"),
    (1, "mlp", "stage 1: trains only"),
])
def test_bad_parts_are_refused(tmp_path, stage, trainable, message):
    with pytest.raises(RadistillError, match=message):
        merge(tiny_recipe(tmp_path / "c.txt"), {"stages": {stage: {"trainable": trainable}}})


def test_stage3_trains_only_the_named_parts(tmp_path):
    from radistill.distill.trainer import Trainer

    corpus = tmp_path / "c.txt"
    write_corpus(corpus, docs=40)
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    recipe = merge(tiny_recipe(corpus, stages=(3,), tokens=16 * 4 * 2),
                   {"stages": {3: {"trainable": "kept-heads,mlp"}}})
    Trainer(student, teacher, char_tokenizer(), recipe, tmp_path / "run", "cpu").run()
    changed = {n for n, p in student.named_parameters() if not torch.equal(p.detach().cpu(), before[n])}
    assert changed and all(".mlp." in n or ".self_attn.attention." in n for n in changed)
    assert any(".self_attn.attention." in n for n in changed) and any(".mlp." in n for n in changed)


def test_kept_heads_part_with_a_kept_mixer():
    """--kept-mixer: the kept heads are a mixer (the first group of the layer's MixerBank, or the layer's only mixer
    when every head is kept); ``kept-heads`` selects it, and nothing of the other mixer heads."""
    from radistill.hybrid.build import convert, student_config

    teacher = tiny_teacher()
    heads = teacher.config.num_attention_heads
    config = student_config(teacher, [[1], list(range(heads))], "discrete_mamba2", {"state_size": 8},
                            kept_mixer="window", kept_mixer_settings={"window": 4})
    student = convert(teacher, config)
    kept = _names(student, model_parameters(student, "kept-heads"))
    assert kept == {n for n, _ in student.named_parameters()
                    if n.startswith("model.layers.0.self_attn.recurrent.groups.0.")
                    or n.startswith("model.layers.1.self_attn.recurrent.")}
    assert any(n.startswith("model.layers.0.") for n in kept) and any(n.startswith("model.layers.1.") for n in kept)
