"""HF PEFT LoRA on a radistill student: add adapters to named linear layers, check they are used, merge them.

PEFT matches ``target_modules`` by name and skips names that match nothing without a word, and a forward that
reads a module's ``.weight`` directly (a fused kernel) bypasses that module's adapter. So :func:`add_lora` passes
exact module names and checks that exactly those became LoRA layers, and :func:`check_adapter_gradients` checks
after a backward that every adapter took part in it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from radistill.finetune.targets import DEFAULT_TARGETS, parse_targets, target_modules
from radistill.utils.errors import RadistillError


@dataclass
class LoraSpec:
    """LoRA settings: which groups (``targets``), rank, scaling ``alpha / rank``, dropout on the adapter input."""

    targets: str = DEFAULT_TARGETS
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0

    def __post_init__(self):
        self.targets = ",".join(parse_targets(self.targets))
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise RadistillError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1 (got {self.rank}, "
                                 f"{self.alpha}, {self.dropout})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LoraSpec":
        return cls(**data)


@dataclass
class LoraSummary:
    """What :func:`add_lora` did: the modules adapted per group and the parameter counts."""

    modules: dict[str, list[str]] = field(default_factory=dict)  # group -> full module names
    trainable_params: int = 0
    total_params: int = 0

    @property
    def module_count(self) -> int:
        return sum(len(v) for v in self.modules.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "module_count": self.module_count}


def add_lora(model: nn.Module, spec: LoraSpec, quiet: bool = False):
    """Wrap ``model`` (a student, changed in place) in a ``PeftModel`` with adapters on ``spec.targets``.

    Returns ``(peft_model, LoraSummary)``. Only adapter weights train; everything else is frozen. Raises if a
    target group matches nothing, or if PEFT adapted other modules than the ones named.
    """
    try:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer
    except ImportError as exc:
        raise RadistillError("LoRA needs HF PEFT: pip install 'radistill[lora]'") from exc

    if adapter_parameters(model):
        raise RadistillError("this model already has LoRA adapters: merge them (merge_lora) or unload them first")
    groups = target_modules(model, spec.targets)
    names = [n for group in groups.values() for n in group]
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names,
                        bias="none")
    peft_model = get_peft_model(model, config)
    prefix = "base_model.model."
    adapted = {n.removeprefix(prefix) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    if adapted != set(names):
        raise RadistillError(
            f"PEFT adapted {len(adapted)} modules but {len(names)} were asked for (missing: "
            f"{sorted(set(names) - adapted)[:5]}, unexpected: {sorted(adapted - set(names))[:5]}); this PEFT version "
            "matches module names differently: pin peft>=0.15 as in radistill[lora]"
        )
    summary = LoraSummary(
        modules=groups,
        trainable_params=sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in peft_model.parameters()),
    )
    if not quiet:
        from radistill.utils.console import console

        console.print(f"LoRA r={spec.rank} on {summary.module_count} modules "
                      f"({', '.join(f'{g}: {len(v)}' for g, v in groups.items())}): "
                      f"{summary.trainable_params:,} trainable of {summary.total_params:,} parameters")
    return peft_model, summary


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA adapter parameters of a model with adapters (what stage 3 / finetune optimise), by name."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def check_adapter_gradients(model: nn.Module) -> None:
    """Raise unless every adapter got a gradient in the last backward, and each module's ``lora_B`` a nonzero one.

    ``lora_B`` starts at zero, so at the first step ``lora_A``'s gradient is exactly zero while still computed:
    "not None" is the test for A, "nonzero" for B (B's gradient is zero only if the module's output never
    reaches the loss).
    """
    missing = []
    for name, p in adapter_parameters(model).items():
        if p.grad is None or ("lora_B" in name and not bool(p.grad.abs().sum() > 0)):
            missing.append(name.removeprefix("base_model.model.").split(".lora_")[0])
    if missing:
        unique = sorted(set(missing))
        raise RadistillError(
            f"{len(unique)} adapted module(s) got no gradient after a training step, e.g. {', '.join(unique[:4])}: "
            "their forward does not go through the module (a kernel reads its .weight directly) or their output "
            "does not reach the loss. Drop these targets, or route the forward through the module's __call__"
        )


def merge_lora(peft_model) -> nn.Module:
    """The plain student with the adapters merged into its weights (``W + (alpha / r) B A``)."""
    return peft_model.merge_and_unload()


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (a student with adapters injected, PEFT-wrapped or not) with every adapter merged and
    the LoRA layers replaced by plain ones; ``model`` itself is unchanged. For exporting a checkpoint mid-run
    (distill stage 3 with LoRA): ``merged_copy(student).save_pretrained(dir)``."""
    import copy

    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(model.get_base_model() if hasattr(model, "get_base_model") else model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent_name) if parent_name else merged, child, module.get_base_layer())
    return merged


def load_adapter(student: nn.Module, adapter_dir, trainable: bool = False):
    """``PeftModel.from_pretrained(student, adapter_dir)``: a saved adapter on its student. Only a local adapter in
    safetensors (``adapter_model.safetensors``, what ``radistill finetune`` writes): PEFT would otherwise fall back to
    unpickling ``adapter_model.bin``, which can run code."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise RadistillError(f"{adapter_dir} holds no adapter_model.safetensors: give the directory `radistill "
                             "finetune --out` wrote (a pickled adapter_model.bin is never loaded)")

    return PeftModel.from_pretrained(student, str(adapter_dir), is_trainable=trainable)


@torch.no_grad()
def adapter_norms(model: nn.Module) -> dict[str, float]:
    """Per adapted module: the Frobenius norm of ``B A`` (0 until it has trained): shows where LoRA changed most."""
    params = adapter_parameters(model)
    norms = {}
    for name, a in params.items():
        if "lora_A" in name:
            b = params[name.replace("lora_A", "lora_B")]
            norms[name.removeprefix("base_model.model.").split(".lora_")[0]] = float((b.float() @ a.float()).norm())
    return norms


__all__ = ["LoraSpec", "LoraSummary", "adapter_norms", "adapter_parameters", "add_lora", "check_adapter_gradients",
           "load_adapter", "merge_lora", "merged_copy"]
