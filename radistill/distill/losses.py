"""The three MOHAWK losses, as plain functions of tensors (no models, no training state).

* stage 1: :func:`matrix_orientation_loss` between a student's mixing matrices and the teacher's attention
  probabilities (:func:`radistill.models.attention.attention_probs`);
* stage 2: :func:`hidden_alignment_loss`;
* stage 3: :func:`distillation_loss`, KL(teacher || student) over the vocabulary (+ optional CE), fused with the
  LM heads and chunked over tokens so the ``[tokens, vocab]`` logits never exist whole; and
  :func:`topk_distillation_loss`, the same against the teacher's top-k logits stored on disk (:func:`teacher_topk`,
  ``radistill/distill/teacher_logits.py``), the KL coarsened to the top k + one class for the rest.

Stage 3's per-chunk arithmetic (log-softmaxes, KL, gradient w.r.t. the logits) is a handful of passes over a
[chunk, vocab] block: eager, each is its own kernel and fp32 temporary (at a 128k vocabulary the eager loss took
69.9 ms of a Llama-3.2-1B-shaped step's 238 on an H200; compiled, 42.1 ms of 221 on an H100:
benchmarks/results/distill*.md). ``compiled=True`` runs those functions under torch.compile (CUDA only), which
fuses them into a few kernels that read the bf16 logits once.
"""

from __future__ import annotations

import functools

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
                      input_ids: Tensor, cfg: LossConfig, compiled: bool = False) -> Tensor:
    """``kl_weight * T^2 * mean_tokens KL(p_teacher/T || p_student/T) + ce_weight * mean CE(student, next token)``.

    student_hidden, teacher_hidden: [batch, seq, hidden] (final-norm outputs); student_head, teacher_head:
    [vocab, hidden] LM-head weights; input_ids: [batch, seq] (CE targets are the next tokens; the last position
    has none). KL covers every position. Gradients flow to ``student_hidden`` and ``student_head``. ``compiled``:
    the per-chunk arithmetic under torch.compile on CUDA (module docstring); the same numbers up to rounding.
    """
    dtype = student_hidden.dtype  # of the head matmuls; under autocast they run in bf16 whatever this is
    teacher_hidden, teacher_head = teacher_hidden.flatten(0, 1).detach(), teacher_head.detach().to(dtype)
    terms = _kernel(_full_kl_terms, compiled and student_hidden.is_cuda)

    def kl_terms(logits: Tensor, rows: slice, scale: Tensor) -> tuple[Tensor, Tensor]:
        return terms(logits, teacher_hidden[rows].to(dtype) @ teacher_head.t(), cfg.temperature, scale)

    return _fused(student_hidden, student_head, kl_terms, input_ids, cfg, compiled)


def topk_distillation_loss(student_hidden: Tensor, student_head: Tensor, teacher_logprobs: Tensor,
                           teacher_indices: Tensor, input_ids: Tensor, cfg: LossConfig,
                           compiled: bool = False) -> Tensor:
    """Stage 3 against the teacher's stored top-k (:func:`teacher_topk`): :func:`distillation_loss` with the KL taken
    between the two next-token distributions coarsened to k + 1 classes.

    The classes are the teacher's k most likely tokens and "any other token". The teacher's probabilities are
    p_i = exp(teacher_logprobs_i) (exact, from the log-sum-exp of its whole row) and p_tail = 1 - sum_i p_i; the
    student's are its softmax q at the same k ids and q_tail = 1 - sum_i q_i. Per position

        KL_k = sum_i p_i log(p_i / q_i) + p_tail log(p_tail / q_tail)

    which is the exact KL between the coarsened distributions, <= the full KL, and equal to it when k = vocab (no
    tail class). Its gradient w.r.t. the student's logits is T (q - p~), where p~ is p on the top k and the teacher's
    tail mass spread over the other tokens in the student's own proportions (p_tail q_j / q_tail). Temperature
    applies as in :func:`distillation_loss` (the stored log-probabilities are those of the teacher's logits / T).

    student_hidden: [batch, seq, hidden]; student_head: [vocab, hidden]; teacher_logprobs: [batch, seq, k] (any float
    dtype: fp16 as stored); teacher_indices: [batch, seq, k] (any integer dtype); input_ids: [batch, seq].
    """
    logprobs, indices = teacher_logprobs.flatten(0, 1), teacher_indices.flatten(0, 1)
    terms = _kernel(_topk_kl_terms, compiled and student_hidden.is_cuda)

    def kl_terms(logits: Tensor, rows: slice, scale: Tensor) -> tuple[Tensor, Tensor]:
        return terms(logits, logprobs[rows], indices[rows].long(), cfg.temperature, scale)

    return _fused(student_hidden, student_head, kl_terms, input_ids, cfg, compiled)


def teacher_topk(logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's side of :func:`topk_distillation_loss` from its logits [rows, vocab]: the log-probabilities of
    its k most likely tokens at ``temperature`` [rows, k] (fp32, in descending order), their ids [rows, k] and the
    log-sum-exp of the whole row of logits / T [rows] (so the logits are ``T * (logprobs + lse)``)."""
    scaled = logits.float() / temperature if temperature != 1 else logits.float()
    lse = torch.logsumexp(scaled, dim=-1)
    values, indices = scaled.topk(k, dim=-1)
    return values - lse[:, None], indices, lse


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    # dynamic=None: one static graph per chunk shape, then one dynamic graph once a second shape (a last, shorter
    # chunk) turns up; the temperature is a constant of the graph
    return torch.compile(fn)


def _kernel(fn, compiled: bool):
    return _compiled(fn) if compiled else fn


def _fused(student_hidden: Tensor, student_head: Tensor, kl_terms, input_ids: Tensor, cfg: LossConfig,
           compiled: bool) -> Tensor:
    labels = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], dim=1).flatten()
    label_count = max(input_ids.shape[0] * (input_ids.shape[1] - 1), 1)  # from the shape: counting on the GPU syncs
    # the weights enter the chunk functions as tensors: a Python float that changes with the batch shape would be
    # baked into (and recompile) a compiled graph
    kl_scale = torch.full((), cfg.kl_weight / input_ids.numel(), device=input_ids.device)
    ce_scale = torch.full((), cfg.ce_weight / label_count, device=input_ids.device)
    ce_terms = _kernel(_ce_terms, compiled and student_hidden.is_cuda)

    def chunk_terms(logits: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        """One chunk's share of the loss (fp32) and its gradient w.r.t. the logits [chunk, vocab] (logits' dtype)."""
        loss, grad = None, None
        if cfg.kl_weight:
            loss, grad = kl_terms(logits, rows, kl_scale)
        if cfg.ce_weight:
            ce, g = ce_terms(logits, labels[rows], ce_scale)
            loss, grad = (ce, g) if grad is None else (loss + ce, grad.add_(g))
        return loss, grad

    return _FusedDistillation.apply(student_hidden.flatten(0, 1), student_head, chunk_terms, cfg.chunk_tokens)


class _FusedDistillation(torch.autograd.Function):
    """Forward and gradient together, ``chunk_tokens`` rows at a time.

    Each chunk's student logits ([chunk, vocab], in the head matmul's dtype) are made and handed to
    ``chunk_terms(logits, rows)``, which gives the chunk's share of the loss and the gradient w.r.t. those logits;
    the gradient is immediately pushed through the head (d hidden = g W, d W += gᵀ h) and dropped. Memory:
    O(tokens·hidden + chunk·vocab); compute: no recomputation in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, chunk_terms, chunk_tokens: int):
        tokens = hidden.shape[0]
        dtype = hidden.dtype  # of the head matmuls; under autocast they run in bf16 whatever this is
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, tokens, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h = hidden[rows].to(dtype)
            chunk_loss, grad_logits = chunk_terms(h @ w.t(), rows)
            loss += chunk_loss
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ w.to(grad_logits.dtype)).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h.to(grad_logits.dtype)
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
        return grad_hidden, grad_weight, None, None


# --- stage 3, per chunk: logits [rows, vocab] in the head matmul's dtype -> (scale * summed loss (fp32), scale *
# its gradient w.r.t. the logits, in the logits' dtype). Plain tensor functions, so torch.compile can fuse them;
# arithmetic in fp32 (fp64 stays fp64), in place where it can: each [2048, 128k] fp32 temporary is ~1 GB.
def _wide(logits: Tensor) -> Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _full_kl_terms(logits: Tensor, teacher_logits: Tensor, temp: float, scale: Tensor) -> tuple[Tensor, Tensor]:
    """``T^2 KL(p_T || softmax(z/T))`` summed over the rows, and its gradient ``T (softmax(z/T) - p_T)``."""
    log_q = F.log_softmax(_wide(logits) / temp, dim=-1)
    log_p = F.log_softmax(_wide(teacher_logits) / temp, dim=-1)
    p = log_p.exp()
    kl = temp * temp * (p * (log_p - log_q)).sum()
    return scale * kl, log_q.exp_().sub_(p).mul_(scale * temp).to(logits.dtype)


def _ce_terms(logits: Tensor, target: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy with the next tokens ``target`` [rows] (-100: no target) summed over the rows, and its gradient."""
    valid = target != -100
    safe = target.clamp(min=0)
    log_q = F.log_softmax(_wide(logits), dim=-1)
    loss = -log_q.gather(1, safe[:, None]).squeeze(1).mul(valid).sum()
    grad = log_q.exp_()
    grad[torch.arange(len(safe), device=grad.device), safe] -= 1.0
    return scale * loss, grad.mul_(valid[:, None] * scale).to(logits.dtype)


def _topk_kl_terms(logits: Tensor, logprobs: Tensor, indices: Tensor, temp: float,
                   scale: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`topk_distillation_loss`'s summed ``T^2 KL_k`` over the rows and its gradient w.r.t. ``logits``.

    logprobs: [rows, k] the teacher's top-k log-probabilities; indices: [rows, k] int64.
    The student's tail is summed off the top-k ids (never as 1 - sum q_i, which cancels to 0 when the student puts
    almost all its mass on them) and shifted by its own maximum, so a tiny q_tail neither underflows nor divides.
    """
    vocab, k = logits.shape[-1], indices.shape[-1]
    log_p = logprobs.float()
    # rounding (fp16 storage) can push the top-k mass a hair over 1: renormalise so that p_top + p_tail = 1
    log_p = log_p - log_p.exp().sum(-1, keepdim=True).clamp(min=1.0).log()
    p = log_p.exp()
    log_q = F.log_softmax(_wide(logits) / temp, dim=-1)
    log_q_top = log_q.gather(1, indices)
    kl = (torch.xlogy(p, p) - p * log_q_top).sum()
    if k < vocab:
        p_tail = (1 - p.sum(-1)).clamp(min=0)
        tail = log_q.scatter_(1, indices, float("-inf"))
        peak = tail.amax(-1, keepdim=True)
        ratio = tail.sub_(peak).exp_()  # q_j / (q_max off the top k), 0 on the top k
        mass = ratio.sum(-1)
        log_q_tail = peak.squeeze(-1) + mass.log()
        kl = kl + (torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail).sum()
        # off the top k: q_j - p_tail q_j / q_tail = (q_j / q_tail) (q_tail - p_tail)
        grad = ratio.mul_(((log_q_tail.exp() - p_tail) / mass)[:, None])
    else:
        grad = log_q.zero_()
    grad.scatter_(1, indices, log_q_top.exp() - p)
    return scale * temp * temp * kl, grad.mul_(scale * temp).to(logits.dtype)


def _reference_ce(student_logits: Tensor, input_ids: Tensor) -> Tensor:
    return F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def reference_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, input_ids: Tensor,
                                cfg: LossConfig) -> Tensor:
    """The same loss from whole logits [batch, seq, vocab]: the oracle that the fused version is tested against."""
    temp = cfg.temperature
    log_q = F.log_softmax(student_logits.float() / temp, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temp, dim=-1)
    loss = cfg.kl_weight * temp * temp * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    if cfg.ce_weight:
        loss = loss + cfg.ce_weight * _reference_ce(student_logits, input_ids)
    return loss


def reference_topk_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, input_ids: Tensor, k: int,
                                     cfg: LossConfig) -> Tensor:
    """:func:`topk_distillation_loss` from whole logits [batch, seq, vocab], with autograd: its test oracle."""
    temp = cfg.temperature
    log_q = F.log_softmax(student_logits.float() / temp, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temp, dim=-1)
    log_p_top, ids = log_p.topk(k, dim=-1)
    p_top = log_p_top.exp()
    kl = (p_top * (log_p_top - log_q.gather(-1, ids))).sum(-1)
    if k < log_q.shape[-1]:
        p_tail = (1 - p_top.sum(-1)).clamp(min=0)
        log_q_tail = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1)
        kl = kl + torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail
    loss = cfg.kl_weight * temp * temp * kl.mean()
    if cfg.ce_weight:
        loss = loss + cfg.ce_weight * _reference_ce(student_logits, input_ids)
    return loss
