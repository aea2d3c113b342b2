"""Packed documents (data.packing: documents): positions restart per document, attention and recurrent state stay
inside it, for the teacher and the student alike; BOS at the start of every document (data.bos)."""

from __future__ import annotations

import pytest
import torch

from distill_helpers import char_tokenizer, tiny_recipe, tiny_student, tiny_teacher, write_corpus
from radistill.distill.data import PackedStream, frame
from radistill.models.packing import document_ids, document_position_ids, document_resets


def _perturb(student):
    """Random-ish recurrent weights (conv taps, decays, D) so a leak across documents would show."""
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in student.model.layers:
            rec = layer.self_attn.recurrent
            rec.conv1d.weight.normal_(0, 0.5)
            rec.D.normal_()
            rec.in_proj.weight.add_(torch.randn_like(rec.in_proj.weight) * 0.1)
    return student.eval()


def _packed_vs_alone(model, lengths=(7, 12, 5), vocab=64):
    torch.manual_seed(0)
    docs = [torch.randint(3, vocab, (n,)) for n in lengths]
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=d[None], use_cache=False).logits[0] for d in docs])
        crossing = model(input_ids=ids, use_cache=False).logits[0]
    return packed, alone, crossing


def test_position_ids_restart_per_document():
    eos, bos = 0, 9
    ids = torch.tensor([[5, 6, 0, 7, 0, 8, 8, 8]])
    assert document_position_ids(ids, None, eos).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    ids = torch.tensor([[4, 9, 5, 6, 9, 7, 7, 9]])
    assert document_position_ids(ids, bos, eos).tolist() == [[0, 0, 1, 2, 0, 1, 2, 0]]
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert document_ids(positions).tolist() == [[0, 0, 0, 1, 1, 2]]
    assert document_resets(positions).tolist() == [[False, False, False, True, False, True]]


def test_teacher_packed_equals_alone():
    teacher = tiny_teacher()
    packed, alone, crossing = _packed_vs_alone(teacher)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    assert (crossing - alone).abs().max() > 1e-3  # the check can fail: without positions documents do mix


@pytest.mark.parametrize("kept", [((1,), (2,)), ((), (0, 3))])
def test_student_packed_equals_alone(kept):
    student = _perturb(tiny_student(tiny_teacher(), kept=kept))
    packed, alone, crossing = _packed_vs_alone(student)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    assert (crossing - alone).abs().max() > 1e-3


def test_mixing_matrix_and_gradients_with_resets():
    """The mixer with resets: the same output and gradients as each document alone; no entry across documents."""
    student = _perturb(tiny_student(tiny_teacher(), kept=((), ())))
    rec = student.model.layers[0].self_attn.recurrent
    lengths = (5, 9)
    torch.manual_seed(2)
    hidden = torch.randn(1, sum(lengths), student.config.hidden_size, requires_grad=True)
    reset = document_resets(torch.cat([torch.arange(n) for n in lengths])[None])
    y, _ = rec(hidden, reset=reset)
    y.square().sum().backward()
    packed_grad = rec.in_proj.weight.grad.clone()
    rec.zero_grad()
    alone = [rec(part)[0] for part in hidden.detach().split(lengths, dim=1)]
    sum(a.square().sum() for a in alone).backward()
    torch.testing.assert_close(y, torch.cat(alone, dim=1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed_grad, rec.in_proj.weight.grad, atol=1e-4, rtol=1e-3)
    matrix = rec.mixing_matrix(hidden.detach(), reset=reset)
    assert matrix[..., lengths[0]:, : lengths[0]].abs().max() == 0
    assert matrix[..., : lengths[0], : lengths[0]].abs().max() > 0


def test_stream_bos_and_positions(tmp_path):
    corpus = tmp_path / "c.txt"
    write_corpus(corpus, docs=30)
    tok = char_tokenizer()
    recipe = tiny_recipe(corpus)
    data = recipe.data
    data.bos, data.packing = True, "documents"
    from radistill.utils.errors import RadistillError

    with pytest.raises(RadistillError, match="no BOS"):  # the char tokenizer has none: refused, not ignored
        PackedStream(data, tok, 64, seed=0).next_batch(1)
    tok.bos_token = "\x0c"  # a character the corpus never holds, as a BOS distinct from EOS
    bos = tok.bos_token_id
    stream = PackedStream(data, tok, 64, seed=0)
    batch = stream.next_batch(3)
    positions = stream.position_ids(batch)
    assert (batch == bos).sum() >= 3 and (positions[batch == bos] == 0).all()
    starts = batch == bos
    starts[:, 0] = True
    assert (positions[~starts] > 0).all()
    tokens = frame([5, 6], tok, bos=True)
    assert tokens.tolist() == [bos, 5, 6, tok.eos_token_id]
    data.bos = False
    stream = PackedStream(data, tok, 64, seed=0)
    batch = stream.next_batch(3)
    positions = stream.position_ids(batch)
    eos = tok.eos_token_id
    after_eos = torch.zeros_like(batch, dtype=torch.bool)
    after_eos[:, 1:] = batch[:, :-1] == eos
    assert (positions[after_eos] == 0).all() and (positions[:, 0] == 0).all()
    assert (positions[~after_eos][1:] > 0).any()


def test_stage3_loss_on_packed_documents_is_the_per_document_loss(tmp_path):
    """Teacher and student given the same restarting positions: the packed batch's KL is the token-weighted mean of
    each document's own KL (nothing crosses a document boundary in either model)."""
    from radistill.distill.stages import make_objective

    teacher = tiny_teacher()
    student = _perturb(tiny_student(teacher))
    cfg = tiny_recipe(tmp_path / "unused.txt").stage(3)
    objective = make_objective(3, student, teacher, cfg, [0, 1])
    lengths = (9, 14)
    torch.manual_seed(3)
    docs = [torch.randint(3, 64, (n,)) for n in lengths]
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = objective.module(ids, None, positions)
        alone = [objective.module(d[None]) for d in docs]
        crossing = objective.module(ids)
    # per position: the KL is a mean over positions of each row
    weighted = sum(loss * n for loss, n in zip(alone, lengths)) / sum(lengths)
    torch.testing.assert_close(packed, weighted, atol=1e-5, rtol=1e-4)
    assert abs(float(crossing - weighted)) > 1e-5


def test_trainer_runs_all_stages_on_packed_documents(tmp_path):
    from radistill.distill.recipe import merge
    from radistill.distill.trainer import Trainer

    corpus = tmp_path / "c.txt"
    write_corpus(corpus, docs=40)
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    recipe = merge(tiny_recipe(corpus, stages=(1, 2, 3), tokens=16 * 4 * 2), {"data": {"packing": "documents"}})
    results = Trainer(student, teacher, char_tokenizer(), recipe, tmp_path / "run", "cpu").run()
    assert [r.stage for r in results] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r.loss)) for r in results)


def test_stage1_targets_stay_inside_documents():
    """attention_probs with documents: each document's block equals its probabilities alone, zero across."""
    from radistill.models.attention import attention_probs

    teacher = tiny_teacher()
    attn = teacher.model.layers[0].self_attn
    group = teacher.config.num_attention_heads // teacher.config.num_key_value_heads
    lengths = (6, 10)
    torch.manual_seed(4)
    hidden = torch.randn(1, sum(lengths), teacher.config.hidden_size)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    rope = teacher.model.rotary_emb(hidden, positions)
    heads = [0, 3]
    (packed,) = attention_probs(attn, hidden, rope, heads, group, documents=document_ids(positions))
    a = lengths[0]
    (first,) = attention_probs(attn, hidden[:, :a], teacher.model.rotary_emb(hidden[:, :a], positions[:, :a]),
                               heads, group)
    (second,) = attention_probs(attn, hidden[:, a:], teacher.model.rotary_emb(hidden[:, a:], positions[:, a:]),
                                heads, group)
    torch.testing.assert_close(packed[..., :a, :a], first)
    torch.testing.assert_close(packed[..., a:, a:], second)
    assert packed[..., a:, :a].abs().max() == 0


@pytest.mark.parametrize("overrides,message", [
    ({"data": {"packing": "docs"}}, "data.packing 'docs'"),
    ({"data": {"bos": "yes"}}, "'data.bos' must be true or false"),  # the typed check (radistill/utils/typed.py)
    ({"data": {"teacher_share": 1.0}}, "teacher_share must be a number in"),
    ({"data": {"teacher_top_p": 0}}, "teacher_top_p"),
    ({"data": {"teacher_documents": 0}}, "teacher_documents must be a whole number"),
    ({"stages": {2: {"recalibrate": True}}}, "recalibrate is for stage 1 only"),
])
def test_bad_options_are_refused(tmp_path, overrides, message):
    from radistill.distill.recipe import merge
    from radistill.utils.errors import RadistillError

    with pytest.raises(RadistillError, match=message):
        merge(tiny_recipe(tmp_path / "c.txt"), overrides)


def test_options_round_trip_through_recipe_json(tmp_path):
    from radistill.distill.recipe import DistillRecipe, merge

    recipe = merge(tiny_recipe(tmp_path / "c.txt"), {"data": {"packing": "documents", "bos": True,
                                                              "teacher_share": 0.25},
                                                     "stages": {1: {"recalibrate": True, "trainable": "recurrent"},
                                                                3: {"trainable": "recurrent,mlp"}}})
    recipe.save(tmp_path / "recipe.json")
    assert DistillRecipe.load(tmp_path / "recipe.json").to_dict() == recipe.to_dict()


# ---- packed documents through the other mixers: window heads, a MixerBank, the kept-mixer slot ------------------


def _window_student(teacher, kept, head_mixers=None, mixer="discrete_mamba2", kept_mixer=None):
    from radistill.hybrid.build import convert, student_config

    config = student_config(teacher, [list(k) for k in kept], mixer, {"state_size": 8} if mixer != "window" else
                            {"window": 3}, head_mixers=head_mixers, kept_mixer=kept_mixer,
                            kept_mixer_settings={"window": 4} if kept_mixer else None)
    student = convert(teacher, config)
    torch.manual_seed(1)
    with torch.no_grad():  # recurrent groups away from their identity start, so a leak across documents would show
        for module in student.modules():
            if hasattr(module, "conv1d"):
                module.conv1d.weight.normal_(0, 0.5)
                module.D.normal_()
    return student.eval()


@pytest.mark.parametrize("case", ["window", "bank", "kept-mixer"])
def test_window_heads_packed_equal_alone(case):
    """A window never reaches back across a document start: window-only, window + recurrent heads in one layer
    (MixerBank), and window heads in the kept heads' slot."""
    teacher = tiny_teacher()
    if case == "window":
        student = _window_student(teacher, ((1,), (2,)), mixer="window")
    elif case == "bank":
        student = _window_student(teacher, ((1,), ()), head_mixers=[
            {"mixer": "window", "settings": {"window": 3}, "heads": [[0, 2], [1, 3]]}])
    else:
        student = _window_student(teacher, ((1,), (0, 2)), kept_mixer="window")
    packed, alone, crossing = _packed_vs_alone(student)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)
    assert (crossing - alone).abs().max() > 1e-3


def test_window_mixer_resets_its_state_and_matrix():
    """WindowAttention with resets: outputs and gradients as each document alone, the carried state holds only the
    last document (as if it had run alone), and the mixing matrix has no entry across documents."""
    from radistill.hybrid.mixers import WindowAttention

    torch.manual_seed(3)
    hidden_size, heads, hd, lengths = 16, 2, 8, (6, 4)
    mixer = WindowAttention(hidden_size, heads, hd, window=5, block_size=4)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    angles = (positions[..., None] * 0.3).expand(-1, -1, hd)  # a RoPE of the restarting positions
    cos, sin = torch.cos(angles), torch.sin(angles)
    rope = (cos, sin)
    hidden = torch.randn(1, sum(lengths), hidden_size, requires_grad=True)
    reset = document_resets(positions)
    state = mixer.empty_state(1, "cpu", torch.float32)
    y, _ = mixer(hidden, state=state, position_embeddings=rope, reset=reset)
    y.square().sum().backward()
    packed_grad = mixer.q_proj.weight.grad.clone()
    mixer.zero_grad()
    parts, cuts = hidden.detach().split(lengths, dim=1), [0, lengths[0], sum(lengths)]
    alone_state = mixer.empty_state(1, "cpu", torch.float32)
    alone = [mixer(part, state=alone_state if i == 1 else None,
                   position_embeddings=(cos[:, cuts[i] : cuts[i + 1]], sin[:, cuts[i] : cuts[i + 1]]))[0]
             for i, part in enumerate(parts)]
    sum(a.square().sum() for a in alone).backward()
    torch.testing.assert_close(y, torch.cat(alone, dim=1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed_grad, mixer.q_proj.weight.grad, atol=1e-4, rtol=1e-3)
    assert int(state["valid"].sum()) == lengths[1]  # the first document's keys are not carried on
    torch.testing.assert_close(state["k"] * state["valid"][:, None, :, None],
                               alone_state["k"] * alone_state["valid"][:, None, :, None])
    matrix = mixer.mixing_matrix(hidden.detach(), position_embeddings=rope, reset=reset)
    assert matrix[..., lengths[0]:, : lengths[0]].abs().max() == 0
    assert matrix[..., lengths[0]:, lengths[0]:].abs().max() > 0


def test_a_mixer_that_cannot_reset_is_refused_for_packed_documents(monkeypatch):
    from radistill.hybrid.mixers import DiscreteMamba2
    from radistill.utils.errors import RadistillError

    student = tiny_student(tiny_teacher()).eval()
    monkeypatch.setattr(DiscreteMamba2, "supports_reset", False)
    ids, positions = torch.randint(3, 64, (1, 8)), torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with pytest.raises(RadistillError, match="supports_reset.*packing: concat"):
        student(input_ids=ids, position_ids=positions, use_cache=False)
    student(input_ids=ids, use_cache=False)  # one document: nothing to reset, nothing refused


def test_causal_conv_with_documents_equals_each_document_alone():
    """The token-major conv's document mask against F.conv1d run on each document by itself."""
    import torch.nn.functional as F

    from radistill.hybrid.mixers.discrete_mamba2 import causal_conv

    torch.manual_seed(4)
    channels, width, lengths = 6, 4, (2, 5, 3)
    weight, bias = torch.randn(channels, width), torch.randn(channels)
    x = torch.randn(1, sum(lengths), channels)
    reset = document_resets(torch.cat([torch.arange(n) for n in lengths])[None])
    documents = torch.cat([reset.new_zeros(1, width - 1), reset], dim=1).int().cumsum(1)
    window = torch.cat([x.new_zeros(1, width - 1, channels), x], dim=1)
    packed = causal_conv(window, weight, bias, documents)
    alone = [F.conv1d(F.pad(part.transpose(1, 2), (width - 1, 0)), weight[:, None], bias, groups=channels)
             .transpose(1, 2) for part in x.split(lengths, dim=1)]
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), atol=1e-5, rtol=1e-4)
    assert (causal_conv(window, weight, bias) - packed).abs().max() > 1e-3
