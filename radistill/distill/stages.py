"""The three MOHAWK stages as *objectives*: given a micro-batch of token ids, run forward and backward.

An objective owns which student parameters train (``units``: groups clipped independently — one per layer in
stages 1/2, where layers are independent problems, one for the whole model in stage 3) and how their gradients
are made. It knows nothing of optimisers, schedules or checkpoints (``trainer.py``).

Stages 1 and 2 take the teacher's per-layer inputs from forward hooks on a normal teacher forward, so they
see exactly what the teacher's layers saw (masks and RoPE included) and each layer gets its own backward,
so only one layer's activations are alive at a time. The teacher forward stops after the last layer an objective
trains (a block of layers needs no teacher layer above it). Layers are independent problems there, so they can be
trained a block at a time (:func:`layer_blocks`) with the same result; :func:`stage_modules` names the part of the
student a block needs on the GPU. With ``teacher_offload`` the teacher's weights stay in CPU memory and reach the GPU
one module at a time (:func:`stream_teacher`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from radistill.distill.losses import (
    distillation_loss, hidden_alignment_loss, matrix_orientation_loss, topk_distillation_loss,
)
from radistill.distill.parallel import gradient_sync
from radistill.distill.recipe import StageConfig, trainable_parts
from radistill.finetune.lora import adapter_parameters
from radistill.hybrid.mixers.base import mixer_kwargs
from radistill.models.access import decoder_layers, hidden_input, layout_from_config
from radistill.models.attention import attention_probs
from radistill.models.packing import document_ids, document_resets
from radistill.utils.errors import RadistillError

HEAD_CHUNK = 8  # teacher heads whose [seq, seq] probabilities are materialised at once in stage 1


def student_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a student (a hybrid, or any HF decoder with ``base.layers``)."""
    layers = getattr(getattr(model, model.base_model_prefix, None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise RadistillError(
            f"{type(model).__name__} has no decoder layers at `model.layers`: is it a radistill student?"
        )
    return layers


# --- which parameters train -------------------------------------------------------------------------------
def layer_parameters(layer: nn.Module, trainable: str) -> list[nn.Parameter]:
    """``all``: the whole decoder layer; ``mixer``: its token mixer (attention + recurrent heads + o_proj);
    ``recurrent``: only its recurrent heads (empty for a layer without any); ``lora``: its LoRA adapters (the
    trainer adds them first); or a comma-separated list of parts (:data:`radistill.distill.recipe.PARTS`):
    ``recurrent``, ``kept-heads`` (their q/k/v projections), ``o-proj``, ``mlp``, ``norms`` (the layer's two)."""
    parts = trainable_parts(trainable)
    if parts is not None:
        return _unique([p for part in parts for p in _layer_part(layer, part)])
    if trainable == "all":
        return list(layer.parameters())
    if trainable == "lora":
        return list(adapter_parameters(layer).values())
    mixer = layer.self_attn
    if trainable == "mixer":
        return list(mixer.parameters())
    recurrent = getattr(mixer, "recurrent", None)
    return [] if recurrent is None else list(recurrent.parameters())


def _layer_part(layer: nn.Module, part: str) -> list[nn.Parameter]:
    mixer = layer.self_attn
    modules = {
        "recurrent": [getattr(mixer, "recurrent", None)],
        "kept-heads": [getattr(mixer, "attention", None), _kept_mixer(mixer)],
        "o-proj": [getattr(mixer, "o_proj", None)],
        "mlp": [getattr(layer, "mlp", None)],
        "norms": [getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)],
    }.get(part, [])
    return [p for m in modules if m is not None for p in m.parameters()]


def _kept_mixer(mixer: nn.Module) -> nn.Module | None:
    """The mixer serving a layer's kept heads (``--kept-mixer``): the first group of its mixers, or None. It is part of
    ``recurrent`` too (every mixer head is), and of ``kept-heads`` since those are its heads."""
    if not getattr(mixer, "kept_mixer_heads", None) or mixer.recurrent is None:
        return None
    groups = getattr(mixer.recurrent, "groups", None)  # a MixerBank when the layer also has other mixer heads
    return mixer.recurrent if groups is None else groups[0]


def _unique(params: list[nn.Parameter]) -> list[nn.Parameter]:
    return list({id(p): p for p in params}.values())


def model_parameters(model: nn.Module, trainable: str) -> list[nn.Parameter]:
    """As :func:`layer_parameters` over every layer; parts also name the model's own ``embeddings``, ``lm-head`` and
    (with ``norms``) the final norm (stage 3: stages 1/2 never run them). Tied embeddings and LM head are one
    parameter, trained when either is named."""
    if trainable == "all":
        return list(model.parameters())
    params = [p for layer in student_layers(model) for p in layer_parameters(layer, trainable)]
    parts = trainable_parts(trainable) or ()
    base = getattr(model, model.base_model_prefix)
    extra = {"embeddings": model.get_input_embeddings(), "lm-head": model.get_output_embeddings(),
             "norms": getattr(base, "norm", None)}
    params += [p for part in parts if extra.get(part) is not None for p in extra[part].parameters()]
    return _unique(params)


def trained_layers(stage: int, student: nn.Module, trainable: str) -> list[int]:
    """Stages 1/2: the layers in which ``trainable`` selects parameters. Stage 1 also needs recurrent heads: a layer
    whose heads are all kept has no mixing matrix to orient."""
    trained = [i for i, layer in enumerate(student_layers(student))
               if layer_parameters(layer, trainable)
               and (stage != 1 or getattr(layer.self_attn, "recurrent", None) is not None)]
    if not trained:
        raise RadistillError(
            f"stage {stage}: trainable '{trainable}' selects no parameters in any layer; use trainable 'all' or 'mixer'"
        )
    return trained


def layer_blocks(layers: list[int], size: int | None) -> list[list[int]]:
    """``layers`` cut into consecutive blocks of ``size`` (the last may be smaller); None: one block of all."""
    size = size or len(layers)
    return [layers[start : start + size] for start in range(0, len(layers), size)]


def trained_module(stage: int, layer: nn.Module, trainable: str) -> nn.Module:
    """The part of ``layer`` that stage 1/2 runs and trains. Stage 2 runs the whole decoder layer. Stage 1 reads only
    the recurrent heads' mixing matrices, so it needs only the module holding the trained parameters
    (``recurrent``: the recurrent mixer; ``mixer``: the token mixer; ``all``: the layer)."""
    if stage == 2 or trainable == "all":
        return layer
    if trainable == "mixer":
        return layer.self_attn
    return layer.self_attn.recurrent


def stage_modules(stage: int, student: nn.Module, layers: list[int], trainable: str) -> list[nn.Module]:
    """All of the student that stage 1/2's objective over ``layers`` runs, i.e. what must be on the GPU: each
    layer's :func:`trained_module` and the base model's parameter-free children (the rotary embedding, from which the
    hybrid makes its layers' RoPE). Embeddings, final norm and LM head are never used by these stages."""
    base = getattr(student, student.base_model_prefix)
    all_layers = student_layers(student)
    helpers = [child for child in base.children() if next(child.parameters(), None) is None]
    return [trained_module(stage, all_layers[i], trainable) for i in layers] + helpers


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute each decoder layer's forward in its backward (transformers' per-layer checkpointing, non-reentrant:
    frozen embeddings and LoRA need no input gradients), or stop doing so."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise RadistillError(f"{type(model).__name__} does not support activation checkpointing; set "
                             "activation_checkpointing: false")
    if enabled:
        from radistill.finetune.train import enable_checkpointing

        enable_checkpointing(model)
        return
    if hasattr(model, "activation_checkpointing_disable"):  # transformers >= 5.24
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    # enabling also hooked the input embeddings to make their output require grad; disabling leaves that hook
    model.disable_input_require_grads()


# --- teacher taps -----------------------------------------------------------------------------------------
@dataclass
class LayerTap:
    """What one teacher layer saw and produced in the last forward."""

    layer_input: Tensor | None = None  # [batch, seq, hidden]
    kwargs: dict | None = None  # position_embeddings, attention_mask, position_ids as the layer got them
    output: Tensor | None = None  # [batch, seq, hidden]


class _TeacherDone(Exception):
    """Raised by the last tapped layer's hook: the layers above it and the final norm are not needed."""


@contextlib.contextmanager
def teacher_taps(teacher: nn.Module, layers: list[int], stop: bool = False):
    """Hooks that fill one :class:`LayerTap` per layer in ``layers`` on every teacher forward. ``stop``: end the
    forward right after the last of them (run it with :func:`_run_teacher`, which expects that)."""
    taps = {i: LayerTap() for i in layers}
    last = max(layers, default=None) if stop else None
    handles = []
    all_layers = decoder_layers(teacher)

    for i, tap in taps.items():
        def pre(module, args, kwargs, tap=tap):
            tap.layer_input = hidden_input(args, kwargs)
            names = ("position_embeddings", "attention_mask", "position_ids")
            tap.kwargs = {k: kwargs[k] for k in names if k in kwargs}

        def post(module, args, kwargs, output, tap=tap, done=i == last):
            tap.output = output[0] if isinstance(output, tuple) else output
            if done:
                raise _TeacherDone

        handles.append(all_layers[i].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(all_layers[i].register_forward_hook(post, with_kwargs=True))
    try:
        yield taps
    finally:
        for handle in handles:
            handle.remove()


def stream_teacher(teacher: nn.Module, device: str) -> Callable[[], None]:
    """Keep ``teacher``'s weights in CPU memory and run its base model on ``device``: accelerate's offload hooks move
    each module's own weights there for its forward and drop them after, so the device holds one module's weights at
    a time (the teacher's outputs, and so the taps, are on ``device``). The LM head, which stages 1/2 never run, stays
    in CPU memory. Returns the function that removes the hooks and gives the teacher back its own parameters (tied
    weights stay tied), in CPU memory."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    teacher.to("cpu")
    base = getattr(teacher, teacher.base_model_prefix)
    # the hooks hold the same CPU tensors (no copy); removing them would make new parameters of those tensors,
    # breaking ties between modules (a tied LM head would then be copied to the device twice)
    own = [(module, name, param) for module in base.modules() for name, param in module.named_parameters(recurse=False)]
    cpu_offload(base, execution_device=torch.device(device))

    def restore() -> None:
        remove_hook_from_module(base, recurse=True)
        for module, name, param in own:
            setattr(module, name, param)

    return restore


@contextlib.contextmanager
def _weights_on_device(module: nn.Module):
    """The weights under ``module`` of a streamed teacher (:func:`stream_teacher`) on its execution device while they
    are read outside any forward; nothing to do for a teacher that is not streamed."""
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for sub in module.modules():
            stack.enter_context(align_module_device(sub))
        yield


def attention_input(layer: nn.Module, tap: LayerTap) -> Tensor:
    """The normed input the teacher ``layer``'s self_attn got in the tapped forward, ``[batch, seq, hidden]``.

    Made again from the layer's input rather than caught by a hook on ``self_attn``: dynamo does not guard on hooks
    of modules inside a compiled layer (``skip_nnmodule_hook_guards``), so such a hook, added after the layer's first
    compiled forward, would silently never run."""
    with torch.no_grad(), _weights_on_device(layer.input_layernorm):
        return layer.input_layernorm(tap.layer_input)


def _run_teacher(teacher: nn.Module, input_ids: Tensor, position_ids: Tensor | None = None) -> None:
    with torch.no_grad(), contextlib.suppress(_TeacherDone):
        getattr(teacher, teacher.base_model_prefix)(input_ids=input_ids, position_ids=position_ids, use_cache=False)


# --- objectives -------------------------------------------------------------------------------------------
class Objective:
    """Forward + backward of one micro-batch; ``units`` name the independently clipped parameter groups."""

    stage: int
    student: nn.Module  # the model the units belong to (stage 3 under FSDP2: a sharded copy of the student)
    units: dict[str, list[nn.Parameter]]
    unit_count: int  # units across all ranks (stage 1/2 layers are spread over ranks)
    position_ids: Tensor | None = None  # the current batch's (stages 1/2 read them in batch_context)

    def step(self, input_ids: Tensor, scale: float, sync: bool = True,
             teacher_topk: tuple[Tensor, Tensor] | None = None, position_ids: Tensor | None = None) -> Tensor:
        """Accumulate ``scale`` x the loss gradient into ``.grad``; return the (unscaled) loss summed over units,
        detached, on the device (reading it would wait for the GPU: the trainer does so once per optimizer step).
        ``teacher_topk``: stage 3 only, the batch's stored teacher top-k (log-probabilities [batch, seq, k], token ids
        [batch, seq, k]; ``radistill/distill/teacher_logits.py``), used instead of running the teacher.
        ``position_ids`` [batch, seq]: documents packed with their own positions (``data.packing: documents``), which
        teacher and student both get, so both keep attention and state inside each document; None: 0..seq-1."""
        raise NotImplementedError


class _LayerwiseObjective(Objective):
    """Stages 1 and 2: each of ``layers`` is trained against the teacher on its own, with the teacher's input.

    ``block``: the layers being trained now across all ranks (default: every trained layer); ``layers`` is this
    rank's share of them. Losses are averaged over the block's layers.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: list[int], cfg: StageConfig,
                 block: list[int] | None = None):
        self.student = student
        self.student_base = getattr(student, student.base_model_prefix)
        self.student_layers = student_layers(student)
        self.teacher = teacher
        trained = trained_layers(self.stage, student, cfg.trainable)
        scope = trained if block is None else [i for i in block if i in trained]
        self.unit_count = len(scope)
        self.layers = [i for i in layers if i in scope]
        self.units = {f"layer{i}": layer_parameters(self.student_layers[i], cfg.trainable) for i in self.layers}

    def step(self, input_ids: Tensor, scale: float, sync: bool = True, teacher_topk=None,
             position_ids: Tensor | None = None) -> Tensor:
        total = torch.zeros((), device=input_ids.device)
        if not self.layers:  # a rank without a layer in this block: nothing to compute
            return total
        with teacher_taps(self.teacher, self.layers, stop=True) as taps:
            _run_teacher(self.teacher, input_ids, position_ids)
        self.position_ids = position_ids
        context = self.batch_context(taps[self.layers[0]])
        for i in self.layers:
            loss = self.layer_loss(i, taps[i], context)
            (loss * scale).backward()
            total += loss.detach()
        return total

    def batch_context(self, tap: LayerTap):
        """Whatever every layer's loss needs from this batch, made once (see ``HiddenAlignment``)."""
        return None

    def layer_loss(self, index: int, tap: LayerTap, context) -> Tensor:
        raise NotImplementedError


class MatrixOrientation(_LayerwiseObjective):
    """Stage 1: each recurrent head's mixing matrix vs the teacher head's causal attention probabilities."""

    stage = 1

    def __init__(self, student, teacher, layers, cfg, block=None):
        super().__init__(student, teacher, layers, cfg, block)
        self.group_size = layout_from_config(teacher.config).group_size
        self.teacher_layers = decoder_layers(teacher)

    def batch_context(self, tap: LayerTap) -> dict:
        """Packed documents: which document each token is in (teacher attention stays inside it) and where the
        recurrent state resets; both None for one stretch of positions."""
        if self.position_ids is None:
            return {"documents": None, "reset": None}
        return {"documents": document_ids(self.position_ids), "reset": document_resets(self.position_ids)}

    def layer_loss(self, index: int, tap: LayerTap, context: dict) -> Tensor:
        mixer = self.student_layers[index].self_attn
        heads = list(mixer.recurrent_heads)
        attn_input = attention_input(self.teacher_layers[index], tap)
        student = mixer.recurrent.mixing_matrix(
            attn_input, **mixer_kwargs(mixer.recurrent, tap.kwargs.get("position_embeddings"), context["reset"]))
        teacher_attn = self.teacher_layers[index].self_attn
        total, start = 0.0, 0
        with _weights_on_device(teacher_attn):  # attention_probs reads the q/k weights, not through a forward
            targets = attention_probs(teacher_attn, attn_input, tap.kwargs["position_embeddings"], heads,
                                      self.group_size, HEAD_CHUNK, documents=context["documents"])
            for target in targets:  # the head-weighted mean of per-chunk means
                size = target.shape[1]
                total = total + matrix_orientation_loss(student[:, start : start + size], target) * size
                start += size
        return total / len(heads)


class HiddenAlignment(_LayerwiseObjective):
    """Stage 2: the student layer's output vs the teacher layer's, both given the teacher layer's input."""

    stage = 2

    def batch_context(self, tap: LayerTap) -> dict:
        """The layers' keyword arguments (mask, RoPE). The hybrid builds them itself (its kept-head attention may use
        another attention implementation than the teacher); a plain HF student takes the teacher's."""
        make_kwargs = getattr(self.student_base, "layer_kwargs", None)
        if make_kwargs is None:
            return tap.kwargs
        return make_kwargs(tap.layer_input, position_ids=self.position_ids)

    def layer_loss(self, index: int, tap: LayerTap, context: dict) -> Tensor:
        out = self.student_layers[index](tap.layer_input.detach(), **context)
        out = out[0] if isinstance(out, tuple) else out
        return hidden_alignment_loss(out, tap.output)


class _DistillationModule(nn.Module):
    """Student + frozen teacher -> stage-3 loss, as one module so DDP / FSDP2 see the whole student forward (FSDP2's
    root gathers the embeddings and the LM head, whose weight the loss reads, for it)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: StageConfig, compile_loss: bool = False):
        super().__init__()
        self.student = student
        self._teacher = (teacher,)  # a tuple hides it from DDP and FSDP2 (no broadcast, buckets or sharding)
        self.loss_cfg = cfg.loss
        self.compile_loss = compile_loss

    def forward(self, input_ids: Tensor, teacher_topk: tuple[Tensor, Tensor] | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        if teacher_topk is not None:  # stored teacher logits: the teacher does not run (it is off the device)
            student_hidden = final_hidden(self.student, input_ids, position_ids)
            return topk_distillation_loss(student_hidden, head_weight(self.student), *teacher_topk, input_ids,
                                          self.loss_cfg, self.compile_loss)
        teacher = self._teacher[0]
        with torch.no_grad():
            teacher_hidden = final_hidden(teacher, input_ids, position_ids)
        student_hidden = final_hidden(self.student, input_ids, position_ids)
        return distillation_loss(
            student_hidden, head_weight(self.student), teacher_hidden, head_weight(teacher), input_ids,
            self.loss_cfg, self.compile_loss,
        )


def final_hidden(model: nn.Module, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """[batch, seq, hidden]: the final-norm output that the LM head reads (``position_ids``: see Objective.step)."""
    base = getattr(model, model.base_model_prefix)
    return base(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state


def head_weight(model: nn.Module) -> Tensor:
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise RadistillError(f"{type(model).__name__}'s LM head has a bias; stage 3 supports bias-free heads only")
    return head.weight


class Distillation(Objective):
    """Stage 3: KL(teacher || student) on next-token distributions (+ optional CE), all layers together."""

    stage = 3
    unit_count = 1

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: StageConfig,
                 wrap: Callable[[nn.Module], nn.Module] | None = None, compile_loss: bool = False):
        inner = _DistillationModule(student, teacher, cfg, compile_loss)
        self.module = inner if wrap is None else wrap(inner)
        self.student = inner.student
        # read after wrapping: FSDP2 replaces the parameters by sharded ones
        params = model_parameters(self.student, cfg.trainable)
        if not params:
            raise RadistillError(f"stage 3: trainable '{cfg.trainable}' selects no parameters; use 'all'")
        self.units = {"model": params}

    def step(self, input_ids: Tensor, scale: float, sync: bool = True,
             teacher_topk: tuple[Tensor, Tensor] | None = None, position_ids: Tensor | None = None) -> Tensor:
        with gradient_sync(self.module, sync):
            loss = self.module(input_ids, teacher_topk, position_ids)
            (loss * scale).backward()
        return loss.detach()


def make_objective(stage: int, student: nn.Module, teacher: nn.Module, cfg: StageConfig, layers: list[int],
                   wrap: Callable[[nn.Module], nn.Module] | None = None, block: list[int] | None = None,
                   compile_loss: bool = False) -> Objective:
    """The objective of ``stage``; ``layers`` are this rank's layers of ``block`` (stages 1/2; default block: every
    trained layer), ``wrap`` spreads stage 3's module over the ranks (DDP or FSDP2, ``parallel.py``),
    ``compile_loss`` fuses stage 3's per-chunk loss arithmetic with torch.compile (CUDA; ``losses.py``)."""
    if stage == 1:
        return MatrixOrientation(student, teacher, layers, cfg, block)
    if stage == 2:
        return HiddenAlignment(student, teacher, layers, cfg, block)
    return Distillation(student, teacher, cfg, wrap, compile_loss)
