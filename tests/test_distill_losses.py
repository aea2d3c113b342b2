"""The MOHAWK losses and their pieces against independent references (exact checks where they exist)."""

import math

import pytest
import torch

from radistill.distill.losses import (distillation_loss, hidden_alignment_loss, matrix_orientation_loss,
                                      reference_distillation_loss)
from radistill.distill.recipe import LossConfig, StageConfig
from radistill.models.attention import attention_probs
from radistill.distill.schedule import lr_multiplier
from radistill.distill.stages import MatrixOrientation, attention_input, teacher_taps
from radistill.models.access import decoder_layers
from distill_helpers import tiny_student, tiny_teacher


@pytest.mark.parametrize("cfg", [LossConfig(chunk_tokens=5), LossConfig(ce_weight=0.5, temperature=2.0, chunk_tokens=7),
                                 LossConfig(kl_weight=0.0, ce_weight=1.0, chunk_tokens=64)])
def test_fused_distillation_loss_matches_whole_logits(cfg):
    torch.manual_seed(0)
    batch, seq, hidden, vocab = 2, 9, 8, 23
    h = torch.randn(batch, seq, hidden, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=torch.float64, requires_grad=True)
    th, tw = torch.randn(batch, seq, hidden, dtype=torch.float64), torch.randn(vocab, hidden, dtype=torch.float64)
    ids = torch.randint(0, vocab, (batch, seq))

    fused = distillation_loss(h, w, th, tw, ids, cfg)
    g_h, g_w = torch.autograd.grad(fused * 3.0, (h, w))
    ref = reference_distillation_loss(h @ w.t(), th @ tw.t(), ids, cfg).double()
    r_h, r_w = torch.autograd.grad(ref * 3.0, (h, w))
    torch.testing.assert_close(fused.double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_h, r_h, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_w, r_w, rtol=1e-6, atol=1e-7)


def test_kl_is_zero_for_identical_models():
    h, w = torch.randn(1, 6, 4), torch.randn(11, 4)
    loss = distillation_loss(h, w, h, w, torch.zeros(1, 6, dtype=torch.long), LossConfig(chunk_tokens=4))
    assert abs(loss.item()) < 1e-6


def test_attention_probs_equal_the_teachers_own_attention_weights():
    teacher = tiny_teacher()
    teacher.config._attn_implementation = "eager"
    ids = torch.randint(0, 256, (2, 12))
    layer = 1
    with teacher_taps(teacher, [layer]) as taps:
        out = teacher(ids, output_attentions=True)
    want = out.attentions[layer]  # [batch, heads, seq, seq]
    heads = [3, 0, 2]  # any subset, any order; GQA groups of 2
    module = decoder_layers(teacher)[layer]
    chunks = attention_probs(module.self_attn, attention_input(module, taps[layer]),
                             taps[layer].kwargs["position_embeddings"], heads, group_size=2, head_chunk=2)
    torch.testing.assert_close(torch.cat(list(chunks), dim=1), want[:, heads], rtol=1e-5, atol=1e-6)


def test_stage1_loss_is_exactly_zero_when_the_mixer_reproduces_attention(monkeypatch):
    """Stage 1 end to end (taps, head chunking, GQA): a mixer whose matrix *is* the teacher's attention scores 0."""
    import radistill.distill.stages as stages

    monkeypatch.setattr(stages, "HEAD_CHUNK", 2)  # 3 recurrent heads per layer -> chunks of 2 + 1
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    objective = MatrixOrientation(student, teacher, [0, 1], StageConfig(trainable="recurrent"))
    ids = torch.randint(0, 256, (2, 10))
    with teacher_taps(teacher, [0, 1]) as taps:
        teacher(ids)
    for i in (0, 1):
        mixer = objective.student_layers[i].self_attn
        layer = decoder_layers(teacher)[i]
        exact = torch.cat(list(attention_probs(layer.self_attn, attention_input(layer, taps[i]),
                                               taps[i].kwargs["position_embeddings"], mixer.recurrent_heads, 2, 2)), 1)
        monkeypatch.setattr(mixer.recurrent, "mixing_matrix", lambda x, m=None, exact=exact: exact.clone())
        context = objective.batch_context(taps[i])  # one stretch of positions: no documents, no resets
        assert objective.layer_loss(i, taps[i], context).item() == 0.0
        off = exact.clone()
        off[0, 1, 4, :5] = 0.0  # a row of one head's matrix wiped: loss = its norm / (batch * heads)
        monkeypatch.setattr(mixer.recurrent, "mixing_matrix", lambda x, m=None, off=off: off)
        want = exact[0, 1, 4, :5].norm() / (2 * len(mixer.recurrent_heads))
        torch.testing.assert_close(objective.layer_loss(i, taps[i], context), want.float())


def test_matrix_and_hidden_losses_by_hand():
    a = torch.zeros(1, 2, 3, 3)
    b = torch.zeros(1, 2, 3, 3)
    b[0, 0, 0, 0], b[0, 1] = 3.0, 1.0  # head norms 3 and 3
    assert matrix_orientation_loss(a, b).item() == pytest.approx(3.0)
    x = torch.zeros(1, 2, 2)
    y = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])  # token norms 5 and 1 (not squared)
    assert hidden_alignment_loss(x, y).item() == pytest.approx(3.0)


def test_schedules():
    cfg = StageConfig(schedule="wsd", warmup=0.1, decay=0.2, min_lr_ratio=0.0)
    lrs = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[50] == 1.0 and lrs[79] == 1.0
    assert lrs[80] == pytest.approx(1 - 1 / 20) and lrs[99] == pytest.approx(0.0)
    cos = StageConfig(schedule="cosine", warmup=0.0, decay=0.0, min_lr_ratio=0.1)
    assert lr_multiplier(0, 11, cos) == 1.0 and lr_multiplier(10, 11, cos) == pytest.approx(0.1)
    assert lr_multiplier(5, 11, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_chunk_arithmetic_matches_eager(device):
    """compiled=True fuses the per-chunk loss arithmetic with torch.compile: same loss and gradients as eager, in
    bf16 as the GPU runs it (the public functions compile on CUDA only; the graphs are checked here on either)."""
    from radistill.distill.losses import _ce_terms, _compiled, _full_kl_terms, _topk_kl_terms

    torch.manual_seed(0)
    rows, vocab, k = 24, 1000, 16
    logits, teacher = (torch.randn(rows, vocab, device=device) * 3).bfloat16(), torch.randn(rows, vocab, device=device)
    log_p, ids = torch.log_softmax(teacher / 2.0, -1).topk(k, -1)
    target = torch.randint(0, vocab, (rows,), device=device)
    target[-1] = -100
    scale = torch.tensor(0.37, device=device)
    calls = [(_full_kl_terms, (logits, teacher.bfloat16(), 2.0, scale)), (_ce_terms, (logits, target, scale)),
             (_topk_kl_terms, (logits, log_p.half(), ids, 2.0, scale))]
    for fn, args in calls:
        (loss, grad), (want_loss, want_grad) = _compiled(fn)(*args), fn(*args)
        assert grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.float(), want_grad.float(), rtol=1.6e-2, atol=1e-5)


@pytest.mark.gpu
def test_compiled_distillation_loss_matches_eager_on_gpu():
    """The public path on CUDA under bf16 autocast, chunks of unequal size: compiled == eager (loss and gradients)."""
    torch.manual_seed(0)
    batch, seq, hidden, vocab = 2, 300, 64, 5000
    h = torch.randn(batch, seq, hidden, device="cuda", requires_grad=True)
    w = torch.randn(vocab, hidden, device="cuda", requires_grad=True)
    th, tw = torch.randn(batch, seq, hidden, device="cuda"), torch.randn(vocab, hidden, device="cuda")
    ids = torch.randint(0, vocab, (batch, seq), device="cuda")
    cfg = LossConfig(ce_weight=0.3, temperature=1.5, chunk_tokens=256)
    results = []
    for compiled in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = distillation_loss(h, w, th, tw, ids, cfg, compiled)
        results.append((loss, *torch.autograd.grad(loss, (h, w))))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=1e-4)


def test_stage1_works_on_teacher_layers_compiled_before_it():
    """Regression: stage 1 once read the attention input from a hook on ``self_attn``, which dynamo skips inside a
    layer whose compiled graph was made without it (the H100 testbed's cost measurement ran stage 3, then stage 1
    crashed on a missing input)."""
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    ids = torch.randint(0, 256, (2, 10))
    objective = MatrixOrientation(student, teacher, [0, 1], StageConfig(trainable="recurrent"))
    want = objective.step(ids, 1.0)
    torch._dynamo.reset()
    for layer in decoder_layers(teacher):
        layer.compile(backend="eager")  # dynamo's guards, not inductor's code, are what this is about
    with torch.no_grad():
        teacher.model(input_ids=ids, use_cache=False)  # the first compiled forward has no taps (as in stage 3)
    try:
        torch.testing.assert_close(objective.step(ids, 1.0), want)
    finally:
        torch._dynamo.reset()
