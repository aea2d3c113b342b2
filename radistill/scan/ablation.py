"""Head ablation: replace one query head's slice of the ``o_proj`` input.

*Zero* ablation sets the slice to 0 — the same as zeroing the head's columns of ``o_proj.weight`` (what the
public Gather-and-Aggregate code does), but reversible and weight-free. *Mean* ablation replaces it by the
head's mean output over the probe's prompt tokens in the clean model (:func:`head_means`), which keeps the
residual stream's typical offset and measures only the loss of the head's token-specific information.
K/V are untouched either way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from radistill.models.access import HeadLayout, decoder_layers, model_layout
from radistill.probes.items import EncodedItem
from radistill.probes.scoring import forward_hidden, pack
from radistill.utils.errors import RadistillError

ABLATIONS = ("zero", "mean")
Head = tuple[int, int]  # (layer, query head)


def check_ablation_name(ablation: str) -> None:
    if ablation not in ABLATIONS:
        raise RadistillError(f"unknown ablation '{ablation}': use zero or mean")


def check_ablation(ablation: str, means: Tensor | None) -> None:
    check_ablation_name(ablation)
    if ablation == "mean" and means is None:
        raise RadistillError("mean ablation needs the heads' clean means: pass means=head_means(model, items)")


def replacement(ablation: str, means: Tensor | None, layer: int, heads: Tensor) -> Tensor | float:
    """What replaces the ablated slices of ``heads`` ``[R]`` in ``layer``: 0, or their means ``[R, 1, head_dim]``."""
    if ablation == "zero":
        return 0.0
    return means[layer].to(heads.device)[heads][:, None, :]


@contextmanager
def ablate_heads(
    model, heads: Sequence[tuple[int, int]], ablation: str = "zero", means: Tensor | None = None
) -> Iterator[None]:
    """Within the block, the given ``(layer, head)`` query heads are ablated (forward pre-hooks on ``o_proj``).

    ``means`` ``[layers, heads, head_dim]`` from :func:`head_means`, needed for ``ablation="mean"``.
    """
    check_ablation(ablation, means)
    layout = model_layout(model)
    layers = decoder_layers(model)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        layout.check_head(layer, head)
        by_layer.setdefault(layer, []).append(head)
    handles = [
        layers[layer].self_attn.o_proj.register_forward_pre_hook(_slice_hook(layout, layer, hs, ablation, means))
        for layer, hs in by_layer.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _slice_hook(layout: HeadLayout, layer: int, heads: list[int], ablation: str, means: Tensor | None):
    def hook(module, args):
        x = args[0].clone()  # [batch, seq, heads * head_dim]
        for head in heads:
            sl = layout.o_proj_slice(head)
            x[..., sl] = 0.0 if ablation == "zero" else means[layer, head].to(x)
        return (x, *args[1:])

    return hook


@torch.inference_mode()
def head_means(model, items: Sequence[EncodedItem], batch_size: int = 8) -> Tensor:
    """Each head's mean ``o_proj``-input slice over all prompt tokens of ``items`` (clean model).

    Returns ``[layers, heads, head_dim]`` float32. Prompt tokens only (no choice tokens), so the naive and
    fast scans — which lay choices out differently — use the same means.
    """
    layout = model_layout(model)
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    sums = torch.zeros(layout.num_layers, layout.num_heads, layout.head_dim, device=device)
    count = 0
    mask: list[Tensor] = []

    def capture(layer: int):
        def hook(module, args):
            x = args[0].float().view(*args[0].shape[:2], layout.num_heads, layout.head_dim)
            sums[layer] += (x * mask[0][:, :, None, None]).sum((0, 1))

        return hook

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(capture(i)) for i, layer in enumerate(layers)]
    try:
        for start in range(0, len(items), batch_size):
            prompts = [EncodedItem(it.prompt_ids, (it.prompt_ids[-1:],), 0) for it in items[start : start + batch_size]]
            packed = pack(prompts).to(device)  # single-token dummy choices: the rows are exactly the prompts
            mask[:] = [(packed.segments == 0).float()]
            count += int(mask[0].sum())
            forward_hidden(model, packed)
    finally:
        for handle in handles:
            handle.remove()
    return sums / count
