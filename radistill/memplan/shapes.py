"""The models a plan is about, built on the meta device (no memory, no compute): the teacher and its student.

Parameter counts come from the real model classes, so every architecture transformers knows and every registered
mixer is counted exactly. :func:`profile_layer` runs one decoder layer forward (and backward) on meta tensors under
:class:`~radistill.memplan.measure.LiveTensors`, which sizes the activations the real code keeps, for any layer
type, without a formula per architecture.

Attention in these dry runs goes through :func:`flash_shaped_attention`: on CUDA (flash / memory-efficient SDPA,
no mask) and on CPU (SDPA's flash kernel for CPU) attention keeps q, k, v, its output and a float32 log-sum-exp per
query for backward -- never the [seq, seq] matrix. The meta device would otherwise take SDPA's math path and count
that matrix.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

from radistill.memplan.measure import LiveTensors
from radistill.models.access import layout_from_config
from radistill.utils.errors import RadistillError

DRY_RUN_ATTENTION = "radistill_dry_run"  # no "flash" in the name: transformers would look for a kernel


class _FlashShaped(torch.autograd.Function):
    """Attention with flash attention's memory behaviour and no arithmetic: out = empty, saves q, k, v, out, lse."""

    @staticmethod
    def forward(ctx, q, k, v):  # [B, H, T, hd], [B, KV, T, hd] x2
        out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])  # [B, T, H, hd] as the kernels lay it out
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def flash_shaped_attention(module, query, key, value, attention_mask, **kwargs):
    """An HF attention function (``[B, H, T, hd]`` in, ``([B, T, H, hd], None)`` out) for meta dry runs."""
    return _FlashShaped.apply(query, key, value), None


AttentionInterface.register(DRY_RUN_ATTENTION, flash_shaped_attention)


@dataclass(frozen=True)
class LayerProfile:
    """Bytes one decoder layer needs at a given [batch, seq] (all layers of a kind are alike).

    kept: what stays alive after its forward (tensors saved for backward + its output; only the output when no
    gradient is needed); forward_extra: the transient above ``kept`` during the forward; backward_extra: the
    transient above ``kept`` during its backward, the parameter gradients it has made by then excluded (they are
    counted as trainable state).
    """

    kept: int
    forward_extra: int
    backward_extra: int = 0


def _meta_model(config) -> nn.Module:
    # a copy: from_config records the attention implementation on the config, and a caller's real model that
    # shares the config object would then run the dry-run attention
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=DRY_RUN_ATTENTION)
    return model.eval()


def hypothetical_kept_heads(config, keep: int) -> list[list[int]]:
    """``keep`` heads spread over the layers, each in its own KV group where possible: the most KV heads cached
    (an upper bound on the cache a real selection of ``keep`` heads has; parameter counts hardly depend on it)."""
    layout = layout_from_config(config)
    if not 0 <= keep <= layout.total_heads:
        raise RadistillError(f"--keep {keep} is out of range: the teacher has {layout.total_heads} heads")
    kept: list[list[int]] = [[] for _ in range(layout.num_layers)]
    order = [(j % layout.num_kv_heads) * layout.group_size + j // layout.num_kv_heads for j in range(layout.num_heads)]
    for j in range(keep):
        layer, rank = j % layout.num_layers, j // layout.num_layers
        kept[layer].append(order[rank])
    return [sorted(h) for h in kept]


def teacher_config_of(student_config):
    """A teacher-shaped config from a student's (``radistill_hybrid``) config: same fields, every head attention."""
    c = student_config
    return AutoConfig.for_model(
        c.teacher_model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, attention_bias=c.attention_bias,
        tie_word_embeddings=c.tie_word_embeddings, max_position_embeddings=c.max_position_embeddings,
        rope_parameters=c.rope_parameters,
    )


class Shapes:
    """Meta teacher and student of one plan; layer profiles are cached per (layer kind, shape, mode)."""

    def __init__(self, config, keep: int | None = None, state_size: int | None = None, mixer: str = "discrete_mamba2"):
        import radistill.hybrid.auto  # noqa: F401  (registers the hybrid classes with the Auto factories)
        from radistill.hybrid.build import student_config

        if getattr(config, "model_type", None) == "radistill_hybrid":
            if keep is not None or state_size is not None:
                raise RadistillError("--keep/--state-size describe a student yet to be built; this is a built "
                                     "student whose config already says both: drop them, or pass its teacher")
            self.student_config, self.teacher_config = config, teacher_config_of(config)
            self.teacher = _meta_model(self.teacher_config)
        else:
            if keep is None:
                raise RadistillError("planning from a teacher needs the student's kept heads: pass --keep K")
            self.teacher_config = config
            self.teacher = _meta_model(config)
            settings = {} if state_size is None else {"state_size": state_size}
            self.student_config = student_config(self.teacher, hypothetical_kept_heads(config, keep), mixer, settings)
        self.student = _meta_model(self.student_config)
        self.layout = layout_from_config(self.teacher_config)
        self._profiles: dict[tuple, LayerProfile] = {}
        self._lora_students: dict[tuple[str, int], nn.Module] = {}

    # ---- parameter counts ------------------------------------------------------------------------------------
    @staticmethod
    def params(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    @functools.cached_property
    def recurrent_params(self) -> list[int]:
        """Per student layer: parameters of its recurrent mixer (what stage 1 trains)."""
        return [0 if layer.self_attn.recurrent is None else self.params(layer.self_attn.recurrent)
                for layer in self.layers(self.student)]

    def lora_student(self, targets: str, rank: int) -> nn.Module:
        """A meta copy of the student with LoRA adapters (for its adapter count and its activations)."""
        from radistill.finetune.lora import LoraSpec, add_lora

        if (targets, rank) not in self._lora_students:
            spec = LoraSpec(targets=targets, rank=rank)
            peft_model, _ = add_lora(copy.deepcopy(self.student), spec, quiet=True)
            self._lora_students[targets, rank] = peft_model.get_base_model()
        return self._lora_students[targets, rank]

    # ---- activations -----------------------------------------------------------------------------------------
    def layer_groups(self, model: nn.Module) -> list[tuple[int, int]]:
        """(representative layer index, how many layers are like it): layers alike in shape profile alike."""
        counts: dict[tuple, list[int]] = {}
        for i, layer in enumerate(self.layers(model)):
            key = tuple((n, tuple(p.shape), p.requires_grad) for n, p in layer.named_parameters())
            counts.setdefault(key, []).append(i)
        return [(idx[0], len(idx)) for idx in counts.values()]

    def profile(self, model: nn.Module, index: int, batch: int, seq: int, dtype: torch.dtype, params_grad: bool,
                input_grad: bool) -> LayerProfile:
        """Dry-run layer ``index`` of ``model`` on meta tensors [batch, seq, hidden] in ``dtype``.

        params_grad: the layer's own weights train (else they are frozen; LoRA adapters, present in a LoRA model,
        always train); input_grad: gradients flow back to the layer's input (every layer but a stage-2 one).
        """
        key = (id(model), index, batch, seq, dtype, params_grad, input_grad)
        if key not in self._profiles:
            self._profiles[key] = _profile(model, index, batch, seq, dtype, params_grad, input_grad)
        return self._profiles[key]

    def mixing_profile(self, index: int, batch: int, seq: int, dtype: torch.dtype) -> LayerProfile:
        """Stage 1: the recurrent mixer of student layer ``index`` materialising its [batch, heads, seq, seq]
        mixing matrix, mixer weights trained, input detached (the teacher's)."""
        key = ("mixing", index, batch, seq, dtype)
        if key not in self._profiles:
            mixer = self.layers(self.student)[index].self_attn.recurrent
            mixer.to(dtype)
            self._profiles[key] = _run(mixer.mixing_matrix, batch, seq, self.student_config.hidden_size, dtype,
                                       False, _trainable(mixer, True))
        return self._profiles[key]


def _trainable(module: nn.Module, params_grad: bool) -> dict[nn.Parameter, bool]:
    """requires_grad of each parameter for a dry run: LoRA adapters always, the rest if ``params_grad``."""
    return {p: params_grad or "lora_" in name for name, p in module.named_parameters()}


def _profile(model, index, batch, seq, dtype, params_grad, input_grad) -> LayerProfile:
    layer = model.model.layers[index].to(dtype)
    rotary = model.model.rotary_emb
    positions = torch.arange(seq, device="meta")[None]

    def forward(hidden):
        cos_sin = rotary(hidden, position_ids=positions)
        out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
        return out[0] if isinstance(out, tuple) else out

    return _run(forward, batch, seq, model.config.hidden_size, dtype, input_grad, _trainable(layer, params_grad))


def _run(forward, batch: int, seq: int, hidden_size: int, dtype: torch.dtype, input_grad: bool,
         trainable: dict[nn.Parameter, bool]) -> LayerProfile:
    """Forward (+ backward when anything trains) of ``forward`` on meta input [batch, seq, hidden]."""
    before = {p: p.requires_grad for p in trainable}
    for p, flag in trainable.items():
        p.requires_grad_(flag)
    grad = input_grad or any(trainable.values())
    hidden = torch.empty(batch, seq, hidden_size, device="meta", dtype=dtype, requires_grad=input_grad)
    trained = [p for p, flag in trainable.items() if flag]

    def grad_bytes() -> int:
        return sum(p.grad.numel() * p.grad.element_size() for p in trained if p.grad is not None)

    try:
        with torch.set_grad_enabled(grad), LiveTensors(exclude=grad_bytes) as live:
            out = forward(hidden)
            kept = live.live
            forward_extra = live.peak - kept
            backward_extra = 0
            if grad:
                live.reset_peak()
                out.backward(torch.empty_like(out))
                backward_extra = max(0, live.peak - kept)
            del out
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)
            p.grad = None
    return LayerProfile(kept, forward_extra, backward_extra)


__all__ = ["DRY_RUN_ATTENTION", "LayerProfile", "Shapes", "flash_shaped_attention", "hypothetical_kept_heads",
           "teacher_config_of"]
