"""Gather-and-aggregate analysis of a scan's top heads: attention maps on KV-probe prompts and a label per head.

A head's attention probabilities are recomputed from its layer's input (captured in a clean forward):
``softmax(q_h · k_{kv(h)} * scale + causal)`` with the layer's own q/k projections, q/k norms (Qwen3) and rotary
embedding, so any attention implementation works. Two patterns are measured (G&A, arXiv 2504.18574):

- *aggregate*: from the question's last token, attention mass on the matching line's tokens
  (``key:value\\n``) — the head picks the answer's line out of the dictionary;
- *gather*: from each line's newline token, attention mass on its own line's key and value tokens — the head
  condenses a line into its newline.

``analysis.json`` (written by :func:`analyze`; read by the report)::

    {"model": str, "scan": str (path of the scan.json used),
     "probe": {"pairs": int, "samples": int, "seed": int},
     "min_mass": float,                      # a label needs at least this much mass
     "heads": [{
        "rank": int,                         # 1 = the scan's best head
        "layer": int, "head": int, "kv_head": int, "score": float,
        "label": "aggregate" | "gather" | "other",   # the larger pattern, if >= min_mass
        "aggregate_mass": float,             # last token -> matching line's tokens, mean over prompts
        "aggregate_newline_mass": float,     # last token -> matching line's newline token alone
        "aggregate_hit_rate": float,         # prompts whose most-attended line (from the last token) is the match
        "gather_mass": float,                # newline -> own line's key and value tokens, mean over lines, prompts
        "sink_mass": float,                  # last token -> first token
        "image": str                         # attention-map PNG, relative to analysis.json
     }, ...]}                                # in scan rank order
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from radistill.models.access import attention_of, model_layout
from radistill.probes.items import ProbeItem
from radistill.probes.kv import HEADER, QUESTION, KVProbeConfig, kv_items
from radistill.scan.result import ScanResult
from radistill.utils.errors import RadistillError
from radistill.utils.io import atomic_path, write_json_atomic

MIN_MASS = 0.3


@dataclass(frozen=True)
class PromptSpans:
    """Token indices of a KV prompt's parts; ``lines[i] = (key+value token indices, newline token index)``."""

    lines: tuple[tuple[tuple[int, ...], int], ...]
    target: int  # the line whose key the question asks for
    last: int  # the question's last token


@dataclass(frozen=True)
class HeadAnalysis:
    rank: int
    layer: int
    head: int
    kv_head: int
    score: float
    label: str
    aggregate_mass: float
    aggregate_newline_mass: float
    aggregate_hit_rate: float
    gather_mass: float
    sink_mass: float
    image: str


def prompt_spans(tokenizer, item: ProbeItem) -> tuple[list[int], PromptSpans]:
    """Token ids of a KV-probe prompt and where its lines lie (via the tokenizer's character offsets)."""
    prompt = item.prompt
    if not prompt.startswith(HEADER):
        raise RadistillError("analyze works on the KV-retrieval probe's prompts (they start with the dictionary header)")
    body, _, question = prompt[len(HEADER) :].partition(QUESTION.split("{")[0])
    try:
        encoding = tokenizer(prompt, return_offsets_mapping=True)
    except (NotImplementedError, ValueError) as exc:
        raise RadistillError("analyze needs a fast tokenizer (character offsets): this tokenizer has none") from exc
    starts = [start if end > start else -1 for start, end in encoding["offset_mapping"]]  # -1: special token
    lines, cursor = [], len(HEADER)
    for text in body.split("\n")[:-1]:
        end = cursor + len(text)  # the newline's character index
        tokens = [t for t, s in enumerate(starts) if cursor <= s <= end]
        if not tokens:
            raise RadistillError(f"no token starts inside the probe line {text!r}: the tokenizer merges across lines")
        newline = tokens[-1]
        lines.append((tuple(t for t in tokens if t != newline), newline))
        cursor = end + 1
    key = question.split("'")[0]  # the question reads: <key>' is
    keys = [line.split(":")[0] for line in body.split("\n")[:-1]]
    if key not in keys:
        raise RadistillError("could not find the question's key among the dictionary lines of a probe prompt")
    return list(encoding["input_ids"]), PromptSpans(tuple(lines), keys.index(key), len(starts) - 1)


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


@torch.inference_mode()
def head_attention(model, input_ids: Sequence[int], heads: Sequence[tuple[int, int]]) -> dict[tuple[int, int], Tensor]:
    """Attention probabilities ``[seq_q, seq_k]`` (float32) of each ``(layer, head)`` on one sequence."""
    layout = model_layout(model)
    captured: dict[int, tuple[Tensor, tuple[Tensor, Tensor]]] = {}

    def capture(layer: int):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            captured[layer] = (hidden, kwargs["position_embeddings"])

        return hook

    handles = [attention_of(model, layer).register_forward_pre_hook(capture(layer), with_kwargs=True)
               for layer in sorted({l for l, _ in heads})]
    try:
        device = next(model.parameters()).device
        model(input_ids=torch.tensor([list(input_ids)], device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for layer, head in heads:
        attn = attention_of(model, layer)
        hidden, (cos, sin) = captured[layer]  # [1, seq, dim], [1, seq, head_dim]
        q = attn.q_proj(hidden).view(*hidden.shape[:2], -1, layout.head_dim)  # [1, seq, heads, head_dim]
        k = attn.k_proj(hidden).view(*hidden.shape[:2], -1, layout.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q[0, :, head].float(), k[0, :, layout.kv_head(head)].float()  # [seq, head_dim]
        cos, sin = cos[0].float(), sin[0].float()
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        scale = getattr(attn, "scaling", layout.head_dim ** -0.5)
        scores = (q @ k.T) * scale
        seq = scores.shape[0]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=scores.device).tril()
        result[(layer, head)] = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).cpu()
    return result


def pattern_numbers(probs: Tensor, spans: PromptSpans) -> dict[str, float]:
    """Aggregate/gather numbers of one head on one prompt, from its attention ``[seq, seq]``."""
    row = probs[spans.last]
    line_mass = torch.stack([row[list(tokens) + [newline]].sum() for tokens, newline in spans.lines])
    target_tokens, target_newline = spans.lines[spans.target]
    gather = torch.stack([probs[newline, list(tokens)].sum() for tokens, newline in spans.lines])
    return {
        "aggregate_mass": line_mass[spans.target].item(),
        "aggregate_newline_mass": row[target_newline].item(),
        "aggregate_hit_rate": float(line_mass.argmax().item() == spans.target),
        "gather_mass": gather.mean().item(),
        "sink_mass": row[0].item(),
    }


def label(numbers: dict[str, float], min_mass: float = MIN_MASS) -> str:
    aggregate, gather = numbers["aggregate_mass"], numbers["gather_mass"]
    if max(aggregate, gather) < min_mass:
        return "other"
    return "aggregate" if aggregate >= gather else "gather"


def analyze(
    model, tokenizer, scan: ScanResult, out_dir: str | os.PathLike, *, top: int = 8, pairs: int | None = None,
    samples: int = 8, seed: int | None = None, scan_path: str = "",
) -> list[HeadAnalysis]:
    """Analyse the scan's ``top`` heads on fresh KV prompts; writes ``analysis.json`` and one PNG per head."""
    if top < 1:
        raise RadistillError("--top must be at least 1")
    layout = model_layout(model)
    if (layout.num_layers, layout.num_heads) != (scan.layout.num_layers, scan.layout.num_heads):
        raise RadistillError(
            f"the scan is of a {scan.layout.num_layers}x{scan.layout.num_heads} model but this model is "
            f"{layout.num_layers}x{layout.num_heads}: pass the scan made for this model"
        )
    pairs = pairs or scan.probe.get("pairs", 20)
    seed = scan.probe.get("seed", 0) + 1 if seed is None else seed  # fresh prompts, not the scan's own
    config = KVProbeConfig(pairs=pairs, samples=samples, seed=seed)
    prompts = [prompt_spans(tokenizer, item) for item in kv_items(tokenizer, config)]
    ranked = scan.top(top)
    heads = [(h.layer, h.head) for h in ranked]
    totals = {head: {} for head in heads}
    first: dict[tuple[int, int], Tensor] = {}
    for index, (ids, spans) in enumerate(prompts):
        for head, probs in head_attention(model, ids, heads).items():
            for key, value in pattern_numbers(probs, spans).items():
                totals[head][key] = totals[head].get(key, 0.0) + value / len(prompts)
            if index == 0:
                first[head] = probs
    out = Path(out_dir)
    results = []
    for rank, scored in enumerate(ranked, start=1):
        head = (scored.layer, scored.head)
        image = f"attention_L{scored.layer}_H{scored.head}.png"
        numbers = totals[head]
        results.append(HeadAnalysis(rank, scored.layer, scored.head, scored.kv_head, scored.score, label(numbers),
                                    **numbers, image=image))
        _plot(first[head], prompts[0][1], results[-1], out / image)
    write_json_atomic(out / "analysis.json", {
        "model": scan.model, "scan": scan_path, "probe": {"pairs": pairs, "samples": samples, "seed": seed},
        "min_mass": MIN_MASS, "heads": [asdict(r) for r in results],
    })
    return results


def _plot(probs: Tensor, spans: PromptSpans, result: HeadAnalysis, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(probs.numpy() ** 0.5, cmap="magma", aspect="auto")  # sqrt: small masses stay visible
    tokens, newline = spans.lines[spans.target]
    for column in (*tokens, newline):
        ax.axvline(column, color="cyan", linewidth=0.4, alpha=0.6)
    newlines = [line[1] for line in spans.lines]
    ax.scatter(newlines, newlines, s=6, color="lime", label="newline tokens")
    ax.set_xlabel("key position (cyan: the queried line)")
    ax.set_ylabel("query position")
    ax.set_title(f"L{result.layer}H{result.head} (rank {result.rank}): {result.label} — "
                 f"agg {result.aggregate_mass:.2f}, gather {result.gather_mass:.2f}", fontsize=9)
    ax.legend(loc="lower left", fontsize=7)
    fig.colorbar(image, ax=ax, label="sqrt(attention probability)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
