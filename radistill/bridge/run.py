"""``radistill bridge``: train a bridge on ``kv-outside`` and report KV accuracy by pairs, before and after.

Writes into ``out``: ``bridge.safetensors`` + ``bridge_config.json`` (the adapter, :func:`load_bridge`),
``bridge_results.json`` (accuracy by pairs with and without the bridge, trainable parameters, training tokens,
the chunk autoencoder's round-trip accuracy), and ``chunk_ae/`` for a ``chunk-ae:K`` source.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from radistill.utils.errors import RadistillError
from radistill.utils.io import refuse_existing, write_json_atomic

TASKS = ("kv-outside",)
RESULTS_NAME = "bridge_results.json"


@dataclass
class BridgeRunConfig:
    student: str
    source: str
    out: str
    task: str = "kv-outside"
    steps: int = 200
    pairs: list[int] = field(default_factory=lambda: [2, 4, 8])
    heads: str | None = None  # "L.H,...": which heads (a plain teacher's; default: a student's kept heads)
    full_width_every: int = 0  # > 0: the full-width baseline instead
    lr: float = 3e-3
    batch: int = 16
    train_samples: int = 512  # items per pairs count to train on
    eval_samples: int = 64  # held-out items per pairs count
    ae_steps: int = 300  # chunk-ae:K: autoencoder training steps
    seed: int = 0
    device: str = "auto"
    dtype: str = "fp32"
    overwrite: bool = False


def check(config: BridgeRunConfig) -> None:
    """Every bad value found before anything loads."""
    from radistill.bridge.sources import parse_source

    if config.task not in TASKS:
        raise RadistillError(f"--task {config.task!r} is not a bridge task: choose one of {', '.join(TASKS)}")
    parse_source(config.source)
    for name in ("steps", "batch", "train_samples", "eval_samples"):
        if getattr(config, name) < 1:
            raise RadistillError(f"--{name.replace('_', '-')} must be at least 1")
    if config.ae_steps < 0 or config.full_width_every < 0:
        raise RadistillError("--ae-steps and --full-width-every must not be negative")
    if config.full_width_every and config.heads:
        raise RadistillError("--heads picks kept heads to bridge; --full-width-every bridges whole layers: give one")
    if not config.pairs or any(p < 1 for p in config.pairs):
        raise RadistillError("--pairs must list whole numbers >= 1, e.g. 2,4,8")
    if config.lr <= 0:
        raise RadistillError("--lr must be positive")
    if not Path(config.student).exists():
        raise RadistillError(f"{config.student} does not exist: give a student (or teacher) directory")


def heads_per_layer(spec: str, layout: dict) -> list[list[int]]:
    """``"8.3,0.6"`` -> per-layer lists of query heads, checked against the model."""
    from radistill.hybrid.build import parse_heads
    from radistill.models.access import HeadLayout

    hl = HeadLayout("", layout["num_layers"], layout["num_heads"], layout["num_heads"], layout["head_dim"],
                    layout["hidden_size"])
    heads: list[list[int]] = [[] for _ in range(layout["num_layers"])]
    for layer, head in parse_heads(spec, hl):
        heads[layer].append(head)
    return heads


def load_source(config: BridgeRunConfig, tokenizer, train_items, eval_items, device, log) -> tuple[object, dict]:
    """The frozen source and what to report about it."""
    from radistill.bridge.sources import ChunkSource, HiddenStateSource, parse_source

    kind, model_id, value = parse_source(config.source)
    if kind == "model":
        from radistill.models.access import load_model

        source_model, source_tokenizer = load_model(model_id, dtype=torch.float32, device=str(device))
        if source_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise RadistillError(f"source {model_id} has another tokenizer than the student: the kv-outside task "
                                 "feeds both the same token ids")
        return HiddenStateSource(source_model, value), {"kind": "model", "model": model_id, "layer": value}
    from radistill.bridge.chunk_ae import (ChunkAEConfig, ChunkAutoencoder, chunk_batches, round_trip_accuracy,
                                           train_chunk_ae)

    torch.manual_seed(config.seed)
    ae = ChunkAutoencoder(ChunkAEConfig(vocab_size=len(tokenizer), chunk=value,
                                        pad_token_id=tokenizer.pad_token_id or 0)).to(device)
    train_chunks = chunk_batches([it.source_ids for it in train_items], ae)
    eval_chunks = chunk_batches([it.source_ids for it in eval_items], ae).to(device)
    losses = train_chunk_ae(ae, train_chunks, steps=config.ae_steps, seed=config.seed)
    accuracy = round_trip_accuracy(ae, eval_chunks)
    log(f"chunk autoencoder K={value}: round-trip token accuracy {accuracy:.4f} (held-out dictionaries)")
    ae.save(Path(config.out) / "chunk_ae")
    return ChunkSource(ae), {"kind": "chunk-ae", "chunk": value, "ae_steps": config.ae_steps,
                             "ae_final_loss": losses[-1] if losses else None, "round_trip_accuracy": accuracy,
                             "ae_parameters": sum(p.numel() for p in ae.parameters())}


def run_bridge(config: BridgeRunConfig, log=print) -> dict:
    from radistill.bridge.module import CONFIG_NAME, WEIGHTS_NAME, _layout, make_bridge
    from radistill.bridge.task import outside_items
    from radistill.bridge.train import accuracy, train_bridge
    from radistill.models.access import load_model

    check(config)
    out = Path(config.out)
    refuse_existing([out / WEIGHTS_NAME, out / CONFIG_NAME, out / RESULTS_NAME, out / "chunk_ae"], config.overwrite)
    model, tokenizer = load_model(config.student, dtype=torch.float32 if config.dtype == "fp32" else config.dtype,
                                  device=config.device)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    layout = _layout(model)
    heads = heads_per_layer(config.heads, layout) if config.heads else None

    train_items, eval_items = [], {}
    for i, pairs in enumerate(config.pairs):
        train_items += outside_items(tokenizer, pairs, config.train_samples, seed=config.seed * 1000 + i)
        eval_items[pairs] = outside_items(tokenizer, pairs, config.eval_samples, seed=config.seed * 1000 + 500 + i)
    held_out = [it for items in eval_items.values() for it in items]
    source, source_info = load_source(config, tokenizer, train_items, held_out, device, log)

    before = {p: accuracy(model, None, None, items, pad_id=pad_id) for p, items in eval_items.items()}
    bridge = make_bridge(model, d_aug=source.d_aug, heads=heads, every=config.full_width_every, aligned=False,
                         source=config.source).to(device)
    closed = {p: accuracy(model, bridge, source, items, pad_id=pad_id) for p, items in eval_items.items()}
    if closed != before:  # a closed gate adds exactly zero: anything else is a bug, not a result
        raise RuntimeError(f"the untrained bridge changed the model's answers: {before} vs {closed}")
    torch.manual_seed(config.seed)
    history = train_bridge(model, bridge, source, train_items, steps=config.steps, batch=config.batch, lr=config.lr,
                           seed=config.seed, pad_id=pad_id, log=log)
    after = {p: accuracy(model, bridge, source, items, pad_id=pad_id) for p, items in eval_items.items()}
    bridge.save(out)
    result = {
        "config": asdict(config),
        "bridge": bridge.config.kind,
        "bridged_heads": sum(len(h) for h in bridge.config.heads) if bridge.config.kind == "kept-head" else None,
        "bridged_layers": getattr(bridge, "layers", None),
        "trainable_parameters": bridge.trainable_parameters(),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "training_tokens": history["tokens"],
        "final_loss": sum(history["losses"][-10:]) / len(history["losses"][-10:]),
        "source": source_info,
        "d_aug": source.d_aug,
        "chance": {p: 1 / p for p in config.pairs},
        "accuracy_without_bridge": before,
        "accuracy_with_bridge": after,
    }
    write_json_atomic(out / RESULTS_NAME, result)
    bridge.detach()
    return result
