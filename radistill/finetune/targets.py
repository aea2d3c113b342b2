"""Which linear layers of a student get LoRA adapters, by name: the restricted set or every linear layer.

Groups (comma-separated on the command line, e.g. ``recurrent,kept-heads``):

- ``recurrent``: every ``nn.Linear`` inside a layer's recurrent mixer (``self_attn.recurrent``; DiscreteMamba2:
  ``in_proj``, which makes x, B, C, the gate z and the decay). Found by module type, not by name, so another
  registered mixer needs no change here.
- ``kept-heads``: the kept attention heads' projections (``self_attn.attention.{q,k,v}_proj``).
- ``o-proj``: the shared output projection of every layer (``self_attn.o_proj``).
- ``mlp``: the MLPs' linear layers.
- ``all``: every linear layer except the LM head (PEFT's ``all-linear``, the usual LoRA).

``DEFAULT_TARGETS`` = ``recurrent,kept-heads``: the heads that changed from the teacher, and the ones that retrieve.
Only ``nn.Linear`` layers are ever targeted: the mixer's depthwise conv reads ``conv1d.weight`` directly in its
forward (see hybrid/mixers/discrete_mamba2.py), so an adapter on it would never be used.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from radistill.utils.errors import RadistillError

DEFAULT_TARGETS = "recurrent,kept-heads"


def _inside(attribute: str) -> Callable[[nn.Module], list[tuple[str, nn.Module]]]:
    """A group = the linear layers inside ``layer.<attribute>`` (dotted), for every decoder layer that has it."""

    def modules_of(layer: nn.Module) -> list[tuple[str, nn.Module]]:
        owner = layer
        for part in attribute.split("."):
            owner = getattr(owner, part, None)
            if owner is None:
                return []
        return [(f"{attribute}.{name}" if name else attribute, m) for name, m in owner.named_modules()
                if isinstance(m, nn.Linear)]

    return modules_of


GROUPS: dict[str, Callable[[nn.Module], list[tuple[str, nn.Module]]]] = {
    "recurrent": _inside("self_attn.recurrent"),
    "kept-heads": _inside("self_attn.attention"),
    "o-proj": _inside("self_attn.o_proj"),
    "mlp": _inside("mlp"),
}
ALL = "all"


def parse_targets(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"recurrent,kept-heads"`` -> ``("recurrent", "kept-heads")``, checked; ``all`` stands alone."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    known = (*GROUPS, ALL)
    bad = [n for n in names if n not in known]
    if not names or bad:
        raise RadistillError(
            f"--lora-targets {spec!r}: {'unknown group ' + ', '.join(bad) if bad else 'names no group'}; choose from "
            f"{', '.join(known)} (comma-separated; default {DEFAULT_TARGETS})"
        )
    if ALL in names and len(names) > 1:
        raise RadistillError(f"--lora-targets {spec!r}: 'all' already covers every linear layer; give it alone")
    return tuple(dict.fromkeys(names))


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise RadistillError(
            f"{type(model).__name__} has no decoder layers at `model.layers`: pass a radistill student"
        )
    return layers


def target_modules(model: nn.Module, targets: str | tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, list[str]]:
    """Group -> full module names (as ``model.named_modules()`` spells them) of the linear layers to adapt.

    Raises if a group matches nothing in this model (PEFT would silently adapt fewer modules than asked for).
    """
    groups = parse_targets(targets)
    prefix = getattr(model, "base_model_prefix", "model")
    if groups == (ALL,):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
        if not names:
            raise RadistillError(f"--lora-targets all: {type(model).__name__} has no linear layers besides its LM head")
        return {ALL: names}
    found: dict[str, list[str]] = {}
    for group in groups:
        found[group] = [f"{prefix}.layers.{i}.{name}" for i, layer in enumerate(_decoder_layers(model))
                        for name, _ in GROUPS[group](layer)]
        if not found[group]:
            why = {
                "recurrent": "it has no recurrent heads (a teacher, or a student that keeps every head)",
                "kept-heads": "it keeps no attention heads",
            }.get(group, "it has no such layers")
            raise RadistillError(
                f"--lora-targets {group} matches no module of this {type(model).__name__}: {why}; pick other groups "
                f"({', '.join((*GROUPS, ALL))})"
            )
    return found


def linear_lora_parameters(model: nn.Module, names: list[str], rank: int) -> int:
    """Adapter parameters LoRA of ``rank`` adds to these linear layers: ``rank * (in + out)`` each."""
    modules = dict(model.named_modules())
    return sum(rank * (modules[n].in_features + modules[n].out_features) for n in names)


__all__ = ["ALL", "DEFAULT_TARGETS", "GROUPS", "linear_lora_parameters", "parse_targets", "target_modules"]
