"""``run_scan``: model id → probe → every head's ablation scores → ``scan.json`` (what ``radistill scan`` runs)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from radistill.models.access import load_model, model_layout, resolve_device, weights_fingerprint
from radistill.probes.items import EncodedItem, ProbeItem, encode_items, load_jsonl
from radistill.probes.kv import KVProbeConfig, kv_items
from radistill.scan import distributed
from radistill.scan.ablation import Head, check_ablation_name, head_means
from radistill.scan.fast import default_batch_size, fast_scan
from radistill.scan.naive import naive_scan
from radistill.scan.result import METRICS, ScanResult, rank_heads
from radistill.utils.errors import RadistillError
from radistill.utils.io import refuse_existing

MASKABLE_ATTENTION = ("sdpa", "eager")  # implementations that accept our 4D tree masks
SCAN_FILES = ("scan.json", "scan.csv", "heads.png")  # what ``ScanResult.save`` writes into ``out``
PROMPT_CHUNK = 256  # prompts whose clean activations the fast scan caches at once, unless a memory plan says less


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
    prompt_chunk: int = PROMPT_CHUNK,
    heads: Sequence[Head] | None = None,
    method: str = "fast",
    progress: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """Scan a loaded model on ``items``; ``heads`` defaults to every query head of every layer.

    ``batch_size``/``prompt_chunk``: the fast scan's (prompt, head) rows per forward and prompts cached at once.
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
                            prompt_chunk=prompt_chunk, progress=advance)
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
    gpu_memory: str | int | None = None,
    overwrite: bool = False,
) -> ScanResult:
    """Load ``model_id`` (HF id or local directory), scan all heads, write ``out`` (rank 0) and return the result.

    Under torchrun each rank loads the model on its own GPU and scans its share of the heads. With ``gpu_memory``
    (e.g. ``"24GiB"``) the fast scan is first planned for that much memory (:func:`fit_scan`). An ``out`` that
    already holds a scan's files is refused before anything is loaded, unless ``overwrite``.
    """
    if metric not in METRICS:  # fail before loading a model
        raise RadistillError(f"unknown metric '{metric}': use logprob or accuracy")
    if out is not None:
        refuse_existing([Path(out) / name for name in SCAN_FILES], overwrite)
    device = resolve_device(distributed.init_from_env() or device)
    probe_path = None if probe_file is None else str(probe_file)
    prompt_chunk = PROMPT_CHUNK
    if gpu_memory is not None and method != "fast":
        raise RadistillError("gpu_memory plans the fast scan; the naive reference scan has no memory plan")
    if gpu_memory is not None:
        batch_size, prompt_chunk = fit_scan(model_id, gpu_memory, pairs=pairs, samples=samples, seed=seed,
                                            probe_file=probe_path, ablation=ablation, batch_size=batch_size,
                                            device=device, dtype=dtype)
    model, tokenizer = load_model(model_id, dtype=dtype, device=device, attn_implementation="sdpa")
    items, probe = probe_items(tokenizer, pairs, samples, seed, probe_path)
    result = scan_model(model, tokenizer, str(model_id), items=items, probe=probe, metric=metric, ablation=ablation,
                        batch_size=batch_size, prompt_chunk=prompt_chunk, method=method, progress=progress)
    if out is not None and distributed.rank() == 0:
        result.save(out)
    return result


def fit_scan(model_id: str | os.PathLike, gpu_memory: str | int, *, pairs: int, samples: int, seed: int,
             probe_file: str | None, ablation: str, batch_size: int | None, device: str,
             dtype: str) -> tuple[int, int]:
    """Plan the fast scan of ``model_id`` for ``gpu_memory`` from its config and tokenizer (printed on rank 0),
    raise before loading the weights if it cannot fit, and return (rows per forward, prompts per chunk)."""
    from radistill.memplan.cli import print_plan
    from radistill.memplan.scan import (
        SCAN_ADVICE, describe_scan, load_config_and_tokenizer, model_dtype, plan_scan, require_step_fit,
    )

    config, tokenizer = load_config_and_tokenizer(model_id)
    items, _ = probe_items(tokenizer, pairs, samples, seed, probe_file)
    encoded = encode_items(tokenizer, items, max_length=getattr(config, "max_position_embeddings", None))
    plan = plan_scan(config, encoded, gpu_memory, batch_size=batch_size or default_batch_size(device),
                     prompt_chunk=PROMPT_CHUNK, dtype=model_dtype(dtype, device), ablation=ablation,
                     name=str(model_id))
    print_plan(plan, describe_scan)
    require_step_fit(plan, {"scan": SCAN_ADVICE}, describe_scan)
    chosen = plan.step("scan").strategy
    return chosen.micro_batch, chosen.prompt_chunk
