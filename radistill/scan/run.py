"""``run_scan``: model id → probe → every head's ablation scores → ``scan.json`` (what ``radistill scan`` runs)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from radistill.models.access import load_model, model_layout, weights_fingerprint
from radistill.probes.items import EncodedItem, ProbeItem, encode_items, load_jsonl
from radistill.probes.kv import KVProbeConfig, kv_items
from radistill.scan import distributed
from radistill.scan.ablation import Head, check_ablation_name, head_means
from radistill.scan.fast import fast_scan
from radistill.scan.naive import naive_scan
from radistill.scan.result import METRICS, ScanResult, rank_heads
from radistill.utils.errors import RadistillError

MASKABLE_ATTENTION = ("sdpa", "eager")  # implementations that accept our 4D tree masks


def probe_items(tokenizer, pairs: int, samples: int, seed: int, probe_file: str | None) -> tuple[list[ProbeItem], dict]:
    """The probe's items and the settings recorded in scan.json."""
    if probe_file is not None:
        items = load_jsonl(probe_file)
        return items, {"kind": "jsonl", "path": str(probe_file)}
    config = KVProbeConfig(pairs=pairs, samples=samples, seed=seed)
    return kv_items(tokenizer, config), {"kind": "kv", **config.to_dict()}


def check_sliding_window(model, encoded: Sequence[EncodedItem]) -> None:
    """Raise before any compute if an item outgrows a sliding attention window (the scan's masks are full-causal)."""
    config = getattr(model.config, "text_config", None) or model.config
    longest = max(item.max_length for item in encoded)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and longest > window:
        raise RadistillError(
            f"the longest probe item is {longest} tokens but the model attends over a sliding window of {window}: "
            "use fewer pairs (--pairs) or a shorter probe"
        )


def scan_model(
    model,
    tokenizer,
    model_id: str,
    *,
    items: Sequence[ProbeItem],
    probe: dict,
    metric: str = "logprob",
    ablation: str = "zero",
    batch_size: int | None = None,
    heads: Sequence[Head] | None = None,
    method: str = "fast",
    progress: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """Scan a loaded model on ``items``; ``heads`` defaults to every query head of every layer.

    ``progress(advance, total)`` is called as (head, item) evaluations complete.
    """
    if metric not in METRICS:
        raise RadistillError(f"unknown metric '{metric}': use logprob or accuracy")
    check_ablation_name(ablation)
    if method not in ("fast", "naive"):
        raise RadistillError(f"unknown scan method '{method}': use fast or naive")
    implementation = getattr(model.config, "_attn_implementation", "sdpa")
    if method == "fast" and implementation not in MASKABLE_ATTENTION:
        raise RadistillError(
            f"the fast scan needs attention that takes 4D masks, not '{implementation}': load the model with "
            "attn_implementation='sdpa'"
        )
    layout = model_layout(model)
    encoded = encode_items(tokenizer, list(items), max_length=layout.max_positions)
    check_sliding_window(model, encoded)  # (encode_items checked the context length)
    heads = [(l, h) for l in range(layout.num_layers) for h in range(layout.num_heads)] if heads is None else list(heads)
    for layer, head in heads:
        layout.check_head(layer, head)
    means = head_means(model, encoded) if ablation == "mean" else None
    total = len(heads) * len(encoded)
    advance = None if progress is None else (lambda n: progress(n, total))
    if method == "fast":
        outcome = fast_scan(model, encoded, heads, ablation=ablation, means=means, batch_size=batch_size,
                            progress=advance)
        baseline, ablated = outcome.baseline, outcome.heads
    else:
        baseline, ablated = naive_scan(model, encoded, heads, ablation=ablation, means=means, progress=advance)
    base = {"accuracy": baseline.accuracy, "logprob": baseline.logprob}
    drops = {head: {"accuracy": m.accuracy, "logprob": m.logprob} for head, m in ablated.items()}
    ranked = rank_heads(layout, base, drops, metric)
    probe = {**probe, "items": len(encoded), "max_tokens": max(e.max_length for e in encoded)}
    return ScanResult(
        model=model_id, fingerprint=weights_fingerprint(model), layout=layout, probe=probe, metric=metric,
        ablation=ablation, baseline=base, heads=ranked,
    )


def run_scan(
    model_id: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    pairs: int = 20,
    samples: int = 64,
    metric: str = "logprob",
    ablation: str = "zero",
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int | None = None,
    probe_file: str | os.PathLike | None = None,
    method: str = "fast",
    progress: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """Load ``model_id`` (HF id or local directory), scan all heads, write ``out`` (rank 0) and return the result.

    Under torchrun each rank loads the model on its own GPU and scans its share of the heads.
    """
    if metric not in METRICS:  # fail before loading a model
        raise RadistillError(f"unknown metric '{metric}': use logprob or accuracy")
    device = distributed.init_from_env() or device
    model, tokenizer = load_model(model_id, dtype=dtype, device=device, attn_implementation="sdpa")
    items, probe = probe_items(tokenizer, pairs, samples, seed, None if probe_file is None else str(probe_file))
    result = scan_model(model, tokenizer, str(model_id), items=items, probe=probe, metric=metric, ablation=ablation,
                        batch_size=batch_size, method=method, progress=progress)
    if out is not None and distributed.rank() == 0:
        result.save(out)
    return result
