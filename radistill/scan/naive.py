"""The naive reference scan: per head, a hook and a separate full forward per item and per choice.

Slow (heads × items × choices forwards, logits at every position) but obviously right: the fast scan
(:mod:`radistill.scan.fast`) is tested against it, and the benchmark times it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from radistill.probes.items import EncodedItem
from radistill.probes.scoring import ChoiceMetrics, naive_choice_logprobs, summarize
from radistill.scan.ablation import Head, ablate_heads, check_ablation


def naive_scan(
    model,
    items: Sequence[EncodedItem],
    heads: Sequence[Head],
    ablation: str = "zero",
    means: Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[ChoiceMetrics, dict[Head, ChoiceMetrics]]:
    """``(clean metrics, {(layer, head): metrics with that head ablated})``; ``progress(n)``: (head, item) pairs done."""
    check_ablation(ablation, means)
    answers = [item.answer for item in items]
    baseline = summarize(naive_choice_logprobs(model, items), answers)
    results = {}
    for head in heads:
        with ablate_heads(model, [head], ablation, means):
            results[tuple(head)] = summarize(naive_choice_logprobs(model, items), answers)
        if progress is not None:
            progress(len(items))
    return baseline, results
