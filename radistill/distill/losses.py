"""The three MOHAWK losses, as plain functions of tensors (no models, no training state).

* stage 1: :func:`matrix_orientation_loss` between a student's mixing matrices and the teacher's attention
  probabilities (:func:`radistill.models.attention.attention_probs`);
* stage 2: :func:`hidden_alignment_loss`;
* stage 3: :func:`distillation_loss`, KL(teacher || student) over the vocabulary (+ optional CE), fused with the
  LM heads and chunked over tokens so the ``[tokens, vocab]`` logits never exist whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from radistill.distill.recipe import LossConfig


# --- stage 1 ----------------------------------------------------------------------------------------------
def matrix_orientation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """MOHAWK stage 1: the Frobenius norm of ``student - teacher`` per (batch, head), averaged.

    student, teacher: [batch, heads, seq, seq]. Returns a scalar (fp32).
    """
    return torch.linalg.matrix_norm(student.float() - teacher.float(), ord="fro").mean()


# --- stage 2 ----------------------------------------------------------------------------------------------
def hidden_alignment_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """MOHAWK stage 2 as in the authors' code: the mean over tokens of the L2 norm (not squared) of the difference.

    student, teacher: [batch, seq, hidden]. Returns a scalar (fp32).
    """
    return torch.linalg.vector_norm(student.float() - teacher.float(), dim=-1).mean()


# --- stage 3 ----------------------------------------------------------------------------------------------
def distillation_loss(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor,
                      input_ids: Tensor, cfg: LossConfig) -> Tensor:
    """``kl_weight * T^2 * mean_tokens KL(p_teacher/T || p_student/T) + ce_weight * mean CE(student, next token)``.

    student_hidden, teacher_hidden: [batch, seq, hidden] (final-norm outputs); student_head, teacher_head:
    [vocab, hidden] LM-head weights; input_ids: [batch, seq] (CE targets are the next tokens; the last position
    has none). KL covers every position. Gradients flow to ``student_hidden`` and ``student_head``.
    """
    labels = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], dim=1)
    label_count = input_ids.shape[0] * (input_ids.shape[1] - 1)  # from the shape: counting on the GPU would sync
    return _FusedDistillation.apply(
        student_hidden.flatten(0, 1), student_head, teacher_hidden.flatten(0, 1).detach(), teacher_head.detach(),
        labels.flatten(), max(label_count, 1), cfg,
    )


class _FusedDistillation(torch.autograd.Function):
    """Forward and gradient together, ``cfg.chunk_tokens`` rows at a time.

    Each chunk's student and teacher logits ([chunk, vocab], fp32) are made, turned into the loss and into the
    gradient w.r.t. the student logits, which is immediately pushed through the head (d hidden = g W,
    d W += gᵀ h) and dropped. Memory: O(tokens·hidden + chunk·vocab); compute: no recomputation in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, labels, label_count: int, cfg: LossConfig):
        tokens = hidden.shape[0]
        dtype = hidden.dtype  # of the head matmuls; under autocast they run in bf16 whatever this is
        w, tw = weight.to(dtype), teacher_weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, tokens, cfg.chunk_tokens):
            rows = slice(start, start + cfg.chunk_tokens)
            h = hidden[rows].to(dtype)
            logits = (h @ w.t()).float()
            teacher_logits = (teacher_hidden[rows].to(dtype) @ tw.t()).float()
            chunk_loss, grad_logits = _chunk_terms(logits, teacher_logits, labels[rows], cfg, tokens, label_count)
            loss += chunk_loss
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits.to(dtype) @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h.float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _chunk_terms(logits: Tensor, teacher_logits: Tensor, target: Tensor, cfg: LossConfig, tokens: int,
                 label_count: int) -> tuple[Tensor, Tensor]:
    """One chunk's share of the loss and its gradient w.r.t. the student logits [chunk, vocab] (in-place where it
    can: at a 128k vocabulary each [chunk, vocab] fp32 temporary is ~1 GB per 2048 rows)."""
    temp = cfg.temperature
    loss = logits.new_zeros(())
    grad = torch.zeros_like(logits)
    if cfg.kl_weight:
        log_q = F.log_softmax(logits / temp, dim=-1)
        log_p = F.log_softmax(teacher_logits / temp, dim=-1)
        p = log_p.exp()
        loss += (cfg.kl_weight * temp * temp / tokens) * (p * (log_p - log_q)).sum()
        # d/dz [T^2 KL(p_T || softmax(z/T))] = T (softmax(z/T) - p_T)
        grad += log_q.exp_().sub_(p).mul_(cfg.kl_weight * temp / tokens)
    if cfg.ce_weight:
        valid = target != -100
        safe = target.clamp(min=0)
        log_q1 = F.log_softmax(logits, dim=-1)
        loss -= (cfg.ce_weight / label_count) * log_q1.gather(1, safe[:, None]).squeeze(1)[valid].sum()
        g = log_q1.exp_()
        g[torch.arange(len(safe), device=g.device), safe] -= 1.0
        grad += g.mul_(valid[:, None] * (cfg.ce_weight / label_count))
    return loss, grad


def reference_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, input_ids: Tensor,
                                cfg: LossConfig) -> Tensor:
    """The same loss from whole logits [batch, seq, vocab]: the oracle that the fused version is tested against."""
    temp = cfg.temperature
    log_q = F.log_softmax(student_logits.float() / temp, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temp, dim=-1)
    loss = cfg.kl_weight * temp * temp * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    if cfg.ce_weight:
        ce = F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
        loss = loss + cfg.ce_weight * ce
    return loss
