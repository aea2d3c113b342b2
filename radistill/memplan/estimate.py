"""Peak GPU bytes of each pipeline step under a given strategy, by part (weights, trainable state, activations,
teacher, logits, caches).

Numeric policy the estimates assume (and the plan prescribes): with ``dtype="bf16"`` trainable parameters have
fp32 master weights and fp32 gradients, the forward runs in bf16 (autocast keeps a bf16 copy of each trainable
weight), frozen parameters -- the teacher, a LoRA student's base weights -- are held in bf16 (stages 1/2 keep
only the modules they train on the GPU, the rest of the student waits in CPU memory); with ``dtype="fp32"``
everything is fp32 (the CPU tests). AdamW keeps two fp32 moments (8 B / parameter), an 8-bit AdamW 2 B. Gradients
are counted as held in full next to the activations (true from the second micro-batch of a step on), so estimates
are a little high for ``grad_accum = 1``.

Activations come from meta-device dry runs of the real layers (:mod:`radistill.memplan.shapes`); the rest is
arithmetic, each term commented where it is made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from radistill.memplan.shapes import Shapes
from radistill.utils.errors import RadistillError

GiB = 1 << 30
FUSED_LOSS_BUFFERS = 7  # stage 3's fused KL keeps, per chunk row: logits, teacher logits, log q, log p, p, grad, temp
# stage 3's top-k KL (stored teacher logits): logits, log q turned into the gradient in place, one temporary (logits/T,
# the CE's log-softmax, or the next chunk's logits while this chunk's are still referenced)
TOPK_LOSS_BUFFERS = 3
TOPK_ROW_BYTES = 24  # per chunk row and stored logit: int64 id, fp32 log p, p, log q at the id and its gradient
CE_LOSS_BUFFERS = 4  # finetune's chunked CE: logits, log-softmax, its gradient, the logits' gradient
SCORING_POSITIONS = 4096  # radistill.probes.scoring.LOGIT_CHUNK: scored positions per lm_head call
STAGE1_HEAD_CHUNK = 8  # radistill.distill.stages.HEAD_CHUNK: teacher heads whose [seq, seq] probs exist at once


@dataclass
class Breakdown:
    """Peak bytes of one step by part."""

    weights: int = 0  # the trained/served model's weights on the GPU
    trainable: int = 0  # gradients + optimizer states (+ bf16 working copies of fp32 master weights)
    activations: int = 0  # what the forward keeps for backward, plus the largest transient
    teacher: int = 0  # teacher weights, its forward's transient and the outputs kept for the student
    logits: int = 0  # logits and the loss's per-vocabulary buffers
    caches: int = 0  # KV / recurrent-state caches (eval), the scan's cached activations

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}

    @classmethod
    def from_dict(cls, data: dict) -> "Breakdown":
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass
class Strategy:
    """How a step is run; fields that do not apply to a step keep their defaults."""

    micro_batch: int = 1  # sequences per forward (gradient accumulation makes up the rest of the batch)
    trainable: str = "full"  # full | lora | recurrent (stage 1) | none (inference)
    optimizer: str = "adamw"  # adamw | adamw8bit | none
    checkpointing: bool = False  # activation checkpointing: keep each layer's input, recompute in backward
    layers_at_once: int = 0  # stages 1/2: decoder layers trained together (0 = all)
    teacher: str = "resident"  # resident (bf16 on the GPU) | streamed (from CPU memory, by module) | topk | none
    logits_chunk: int = 0  # tokens whose [tokens, vocab] logits exist at once (0 = all of them)
    prompt_chunk: int = 0  # scan: prompts whose clean activations are cached at once
    device: str = "gpu"  # build: gpu | cpu

    def describe(self) -> str:
        """The non-default choices, short (for the table)."""
        default = Strategy()
        parts = [f"micro-batch {self.micro_batch}"] if self.micro_batch > 1 or self.trainable != "none" else []
        labels = {
            "trainable": lambda v: f"train {v}", "optimizer": lambda v: v, "checkpointing": lambda v: "act. ckpt",
            "layers_at_once": lambda v: f"{v} layer{'s' if v > 1 else ''} at a time",
            "teacher": lambda v: f"teacher {v}", "logits_chunk": lambda v: f"logits {v} tok/chunk",
            "prompt_chunk": lambda v: f"{v} prompts/chunk", "device": lambda v: f"on {v}",
        }
        for name, label in labels.items():
            value = getattr(self, name)
            if value != getattr(default, name) and value not in ("none",):
                parts.append(label(value))
        return ", ".join(parts) or "as is"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Strategy":
        return cls(**data)


@dataclass
class Workload:
    """The shapes of the work (what the user asked for), independent of strategy."""

    seq_len: int = 2048
    batch_size: int = 8  # sequences per optimizer step and process, before gradient accumulation
    dtype: str = "bf16"  # bf16: mixed precision (see the module docstring); fp32: everything fp32
    lora_targets: str = "recurrent,kept-heads"
    lora_rank: int = 16
    probe_tokens: int = 256  # scan: tokens of the longest tree-packed probe row (20 pairs ~ 200-260 tokens)
    probe_samples: int = 64  # scan: probe prompts (radistill scan's --samples)
    # scan: distinct scored positions of a probe row (ProbeShape.scores). 21 is the most a KV probe of 20 pairs
    # (radistill scan's --pairs) can have: the prompt's last token, then one branch token per choice where the
    # tokenizer splits the values 0-99 into two digits; 1 where every value is one token (GPT-2, Llama 3)
    probe_scores: int = 21
    scan_rows: int = 256  # scan: (prompt, head) rows per forward
    calibration_batch: int = 8  # build: sequences of <= 256 tokens per calibration forward
    eval_batch: int = 8
    eval_context: int = 2048
    topk: int = 64  # teacher logits kept per position when precomputed (radistill distill's teacher_topk)

    def __post_init__(self):
        if self.dtype not in ("bf16", "fp32"):
            raise RadistillError(f"plan dtype {self.dtype!r}: use bf16 (GPU mixed precision) or fp32")

    @property
    def compute(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    @property
    def act_bytes(self) -> int:  # bytes per activation / frozen weight value
        return 2 if self.dtype == "bf16" else 4

    def to_dict(self) -> dict:
        return asdict(self)


def optimizer_bytes(optimizer: str) -> int:
    """Bytes of optimizer state per trainable parameter."""
    return {"adamw": 8, "adamw8bit": 2, "none": 0}[optimizer]


class Estimator:
    """Breakdowns of every step for one teacher/student pair (:class:`Shapes`) and :class:`Workload`."""

    def __init__(self, shapes: Shapes, work: Workload):
        self.s, self.w = shapes, work
        self.hidden = shapes.student_config.hidden_size
        self.vocab = shapes.student_config.vocab_size

    # ---- shared terms ----------------------------------------------------------------------------------------
    def _train_state(self, trained: int, frozen: int, optimizer: str) -> tuple[int, int]:
        """(weights, trainable state) bytes of ``trained`` parameters (fp32 master) and ``frozen`` ones."""
        w = self.w
        master = 4
        weights = trained * master + frozen * w.act_bytes
        working_copy = 2 if w.dtype == "bf16" else 0  # autocast's bf16 copy of each fp32 weight it uses
        return weights, trained * (4 + optimizer_bytes(optimizer) + working_copy)

    def _tokens(self, batch: int, seq: int | None = None) -> int:
        return batch * (seq or self.w.seq_len)

    def _stack(self, model, batch: int, params_grad: bool, checkpointing: bool, loss_buffers: int = 0) -> int:
        """Activations of a full forward + backward through every layer of ``model``.

        ``loss_buffers``: bytes of the loss's logits buffers. They exist before any layer's backward starts and are
        gone when it does, so a layer's own transient only counts where it is larger than them.
        """
        w, groups = self.w, self.s.layer_groups(model)
        profiles = [(self.s.profile(model, i, batch, w.seq_len, w.compute, params_grad, True), n) for i, n in groups]
        layers = sum(n for _, n in groups)
        boundary = self._tokens(batch) * self.hidden * w.act_bytes  # one [B, T, D] hidden state
        if checkpointing:  # every layer's input, plus one layer re-run in backward, which starts once the loss is done
            rerun = max(p.kept + max(p.forward_extra, p.backward_extra) for p, _ in profiles)
            return layers * boundary + max(0, rerun - loss_buffers)
        transient = max(0, max(max(p.forward_extra, p.backward_extra) for p, _ in profiles) - loss_buffers)
        # the embedding output (layer 0's input) and the final norm's output come on top of the layers' own
        return sum(p.kept * n for p, n in profiles) + 2 * boundary + transient

    def _teacher_forward(self, batch: int, seq: int | None = None) -> int:
        """Transient of a no-grad teacher forward beyond its weights: two hidden states + one layer's peak."""
        profile = self.s.profile(self.s.teacher, 0, batch, seq or self.w.seq_len, self.w.compute, False, False)
        return profile.kept + profile.forward_extra + self._tokens(batch, seq) * self.hidden * self.w.act_bytes

    def _teacher_weights(self) -> int:
        return self.s.params(self.s.teacher) * self.w.act_bytes

    def _head_params(self) -> int:
        return self.s.student.get_output_embeddings().weight.numel()

    # ---- steps -----------------------------------------------------------------------------------------------
    def scan(self, st: Strategy) -> Breakdown:
        """The fast scan of the teacher as ``radistill scan --gpu-memory`` plans it (zero ablation, every head of a
        layer a candidate row), on a probe of ``probe_samples`` rows, all ``probe_tokens`` long, that branch when
        their ``probe_scores`` scored positions are more than the prompt's last."""
        from radistill.memplan.scan import ProbeShape, scan_breakdown  # it imports this module

        w = self.w
        probe = ProbeShape(lengths=(w.probe_tokens,) * w.probe_samples, prompt=w.probe_tokens,
                           scores=w.probe_scores, branches=w.probe_scores > 1)
        return scan_breakdown(self.s, self.s.teacher, probe, st, w.compute, self.s.layout.num_heads)

    def build(self, st: Strategy) -> Breakdown:
        if st.device == "cpu":
            return Breakdown()
        w = self.w
        return Breakdown(
            weights=self.s.params(self.s.student) * w.act_bytes + sum(self.s.recurrent_params) * w.act_bytes,
            teacher=self._teacher_weights() + self._teacher_forward(w.calibration_batch, 256),
        )

    def layerwise(self, stage: int, st: Strategy) -> Breakdown:
        """Stages 1 and 2: each student layer against the teacher's, the teacher's layer inputs tapped.

        On the GPU is only what the trainer puts there (radistill.distill.stages.stage_modules): the block's trained
        modules in fp32 -- stage 1 its recurrent mixers, stage 2 its whole layers -- never the embeddings or LM head.
        The largest ``k`` layers stand for the block (an upper bound over the blocks).
        """
        w, s = self.w, self.s
        layers = s.layout.num_layers
        k = st.layers_at_once or layers
        student_layers = s.layers(s.student)
        layer_params = [s.params(layer) for layer in student_layers]
        if stage == 1:
            trained = sorted(s.recurrent_params, reverse=True)[:k]
            index = max(range(layers), key=lambda i: s.recurrent_params[i])
            heads = len(s.student_config.recurrent_heads(index))
            profile = s.mixing_profile(index, st.micro_batch, w.seq_len, w.compute)
            square = st.micro_batch * w.seq_len**2 * 4  # one fp32 [B, seq, seq] matrix
            # the fp32 differences of every head stay for backward; one chunk of teacher probabilities exists
            # while they are made, the mixer's backward transient after
            target = min(STAGE1_HEAD_CHUNK, heads) * square
            activations = profile.kept + heads * square + max(target, profile.backward_extra)
        else:
            trained = sorted(layer_params, reverse=True)[:k]
            activations = max(
                (p.kept + max(p.forward_extra, p.backward_extra) for p in
                 (s.profile(s.student, i, st.micro_batch, w.seq_len, w.compute, True, False)
                  for i, _ in s.layer_groups(s.student)))
            )
        weights, trainable = self._train_state(sum(trained), 0, st.optimizer)
        boundary = self._tokens(st.micro_batch) * self.hidden * w.act_bytes
        taps = (2 * k + 1) * boundary  # per tapped layer its input and normed input; outputs are next inputs
        # streamed: the trainer's offload hooks hold one module's weights at a time (stage 1 also one layer's
        # attention while it reads its q/k), of which embeddings + two layers is an upper bound
        if st.teacher == "streamed":
            teacher_weights = (s.teacher.get_input_embeddings().weight.numel()
                               + 2 * s.params(s.layers(s.teacher)[0])) * w.act_bytes
        else:
            teacher_weights = self._teacher_weights()
        # the teacher's forward is over before any student layer runs: the larger transient of the two counts
        activations = max(activations, self._teacher_forward(st.micro_batch))
        return Breakdown(weights=weights, trainable=trainable, activations=activations,
                         teacher=teacher_weights + taps)

    def _lora_or_full(self, st: Strategy):
        """(model whose layers run, trained params, frozen params, head trains?) for full or LoRA training."""
        total = self.s.params(self.s.student)
        if st.trainable == "lora":
            model = self.s.lora_student(self.w.lora_targets, self.w.lora_rank)
            adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
            return model, adapters, total, False
        return self.s.student, total, 0, True

    def _logits(self, st: Strategy, buffers: int, head_trains: bool) -> int:
        w = self.w
        rows = st.logits_chunk or self._tokens(st.micro_batch)
        head = self._head_params()
        extra = head * 4 if head_trains else 0  # the head's fp32 gradient, accumulated chunk by chunk
        extra += head * 2 if w.dtype == "bf16" and head_trains else 0  # bf16 copy of its fp32 master weight
        extra += self._tokens(st.micro_batch) * self.hidden * w.act_bytes  # d loss / d hidden
        return buffers * rows * self.vocab * 4 + extra

    def distill3(self, st: Strategy) -> Breakdown:
        model, trained, frozen, head_trains = self._lora_or_full(st)
        weights, trainable = self._train_state(trained, frozen, st.optimizer)
        boundary = self._tokens(st.micro_batch) * self.hidden * self.w.act_bytes
        topk = st.teacher == "topk"
        if topk:  # the micro-batch's stored fp16 log-probabilities and int32 ids, and one chunk's of them in fp32/int64
            rows = st.logits_chunk or self._tokens(st.micro_batch)
            teacher = (self._tokens(st.micro_batch) * (2 + 4) + rows * TOPK_ROW_BYTES) * self.w.topk
        else:  # its final hidden state waits for the student's forward
            teacher = self._teacher_weights() + boundary
        logits = self._logits(st, TOPK_LOSS_BUFFERS if topk else FUSED_LOSS_BUFFERS, head_trains)
        return Breakdown(
            weights=weights, trainable=trainable,
            activations=self._stack(model, st.micro_batch, st.trainable == "full", st.checkpointing, logits),
            teacher=teacher, logits=logits,
        )

    def topk_precompute(self, st: Strategy) -> int:
        """Peak bytes of the teacher pass that stores stage 3's top-k logits (radistill.distill.teacher_logits), run
        before stage 3 with the student off the GPU: the teacher, its forward at the micro-batch, and its logits
        ``logits_chunk`` rows at a time (the logits and the log-sum-exp's two temporaries)."""
        rows = st.logits_chunk or self._tokens(st.micro_batch)
        return self._teacher_weights() + self._teacher_forward(st.micro_batch) + 3 * rows * self.vocab * 4

    def finetune(self, st: Strategy) -> Breakdown:
        model, trained, frozen, head_trains = self._lora_or_full(st)
        weights, trainable = self._train_state(trained, frozen, st.optimizer)
        logits = self._logits(st, CE_LOSS_BUFFERS, head_trains)
        return Breakdown(
            weights=weights, trainable=trainable,
            activations=self._stack(model, st.micro_batch, st.trainable == "full", st.checkpointing, logits),
            logits=logits,
        )

    def eval(self, st: Strategy) -> Breakdown:
        from radistill.hybrid.memory import student_rows

        w = self.w
        row = student_rows(self.s.student_config, [w.eval_context], w.act_bytes)[0]
        cache = st.micro_batch * (row.kv_bytes + row.ssm_bytes + row.conv_bytes)
        profile = self.s.profile(self.s.student, 0, st.micro_batch, w.eval_context, w.compute, False, False)
        positions = min(st.micro_batch * w.eval_context, SCORING_POSITIONS)
        return Breakdown(
            weights=self.s.params(self.s.student) * w.act_bytes,
            activations=profile.kept + profile.forward_extra + self._tokens(st.micro_batch, w.eval_context)
            * self.hidden * w.act_bytes,
            logits=positions * self.vocab * 4 * 2,
            caches=cache,
        )


@dataclass
class ServingLimits:
    """What fits next to the weights: the longest context at batch 1 and the largest batch at ``batch_context``."""

    weights_bytes: int
    kv_bytes_per_token: int  # per sequence
    state_bytes: int  # per sequence, independent of length (SSM + conv)
    prefill_bytes: int  # transient of a chunked prefill (one sequence, ``prefill_chunk`` tokens at a time)
    max_context_b1: int
    max_batch: int
    batch_context: int
    max_positions: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def serving_limits(shapes: Shapes, which: str, budget: int, dtype: str = "bf16", batch_context: int = 32768,
                   prefill_chunk: int = 2048) -> ServingLimits:
    """Serving limits of the ``teacher`` or the ``student`` in ``budget`` bytes (prefill in chunks)."""
    from radistill.hybrid.memory import student_rows, teacher_rows

    nbytes = 2 if dtype == "bf16" else 4
    model = shapes.teacher if which == "teacher" else shapes.student
    row = (teacher_rows(shapes.layout, [1], nbytes)[0] if which == "teacher"
           else student_rows(shapes.student_config, [1], nbytes)[0])
    weights = Shapes.params(model) * nbytes
    profile = shapes.profile(model, 0, 1, prefill_chunk, torch.bfloat16 if dtype == "bf16" else torch.float32,
                             False, False)
    hidden = shapes.student_config.hidden_size
    vocab = shapes.student_config.vocab_size
    prefill = profile.kept + profile.forward_extra + prefill_chunk * hidden * nbytes + vocab * 4  # last logits
    free = budget - weights - prefill
    state = row.ssm_bytes + row.conv_bytes
    per_token = row.kv_bytes
    if free <= state:
        return ServingLimits(weights, per_token, state, prefill, 0, 0, batch_context,
                             notes=["the weights alone do not fit"])
    context = (free - state) // per_token if per_token else 10**12
    batch = free // (per_token * batch_context + state)
    return ServingLimits(weights, per_token, state, prefill, int(context), int(batch), batch_context,
                         max_positions=getattr(shapes.student_config, "max_position_embeddings", None))


__all__ = ["Breakdown", "Estimator", "GiB", "ServingLimits", "Strategy", "Workload", "optimizer_bytes",
           "serving_limits"]
