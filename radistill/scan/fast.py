"""The fast scan: the naive scan's numbers at a small fraction of its cost.

1. One clean forward per chunk of prompts (tree-packed, every choice scored from that one forward; see
   :mod:`radistill.probes.scoring`) caches, per layer ``l``: its input hidden states ``h_l``, the attention
   output ``a_l`` and the ``o_proj`` input ``z_l`` ``[batch, seq, heads * head_dim]``.
2. Ablating head ``h`` of layer ``l`` changes only ``a_l``: ``a_l' = a_l + (r - z_l[h]) W_o[:, h]ᵀ`` with ``r``
   the replacement (0 or the head's mean), so layer ``l``'s attention is never recomputed; the layer runs with
   its attention swapped for that fixed output (its own residual/norm/MLP code runs), then layers ``l+1 .. L-1``
   run as they are, with the model's rotary embedding and the tree mask.
3. Rows of the batch are (prompt, head) pairs: many heads × prompts per forward; each micro-batch is cut at its
   longest row (packed rows end at their last scored position), and logits are computed only at the scored
   positions, once per position however many choices read it.
4. Under ``torchrun`` (torch.distributed initialised) heads are split across ranks and the results gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from radistill.models.access import decoder_layers, model_layout
from radistill.probes.items import EncodedItem
from radistill.probes.scoring import ChoiceMetrics, PackedBatch, choice_metrics, pack, row_choice_logprobs
from radistill.scan import distributed
from radistill.scan.ablation import Head, check_ablation, replacement


@dataclass
class FastScanStats:
    """Work done, for FLOP accounting (tokens counted with padding, i.e. as computed)."""

    layer_tokens: int = 0  # Σ over decoder-layer calls of rows × seq
    attention_pairs: int = 0  # Σ over decoder-layer calls that compute attention of rows × causal (q, k) pairs
    mlp_only_tokens: int = 0  # Σ rows × seq of ablated layers (their attention reused, only MLP recomputed)
    scored_positions: int = 0  # positions sent through lm_head
    forwards: int = 0  # batched tail forwards

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FastScanResult:
    baseline: ChoiceMetrics
    heads: dict[Head, ChoiceMetrics]
    stats: FastScanStats = field(default_factory=FastScanStats)


@dataclass
class _CleanCache:
    """Clean activations of one chunk of packed prompts, per layer ``[batch, seq, dim]``."""

    hidden_in: list[Tensor]
    attn_out: list[Tensor]
    o_input: list[Tensor]  # [batch, seq, heads * head_dim]
    cos_sin: tuple[Tensor, Tensor]  # [batch, seq, head_dim] each
    correct: Tensor  # [batch] clean accuracy per item
    logprob: Tensor  # [batch] clean normalised log-prob per item


class _FixedAttention(nn.Module):
    """Stands in for a layer's ``self_attn`` and returns a precomputed output."""

    def __init__(self, output: Tensor):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output, None


@contextmanager
def _attention_replaced(layer: nn.Module, output: Tensor) -> Iterator[None]:
    original = layer.self_attn
    layer.self_attn = _FixedAttention(output)
    try:
        yield
    finally:
        layer.self_attn = original


def _run_layer(layer, hidden: Tensor, mask: Tensor | None, position_ids: Tensor, cos_sin) -> Tensor:
    # no cache argument at all: its name differs between transformers 5.17 and 5.24
    out = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=cos_sin, use_cache=False)
    return out[0] if isinstance(out, tuple) else out


class _Tail:
    """The pieces of a Llama-like causal LM the fast scan drives directly."""

    def __init__(self, model):
        self.layers = decoder_layers(model)
        self.layout = model_layout(model)
        decoder = model.get_decoder()
        self.norm = decoder.norm
        self.rotary = decoder.rotary_emb
        self.embed = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        # SDPA applies causality itself when given no mask (eager would not): then causal-only batches skip the
        # 4D mask, which lets SDPA pick its flash kernel and native GQA
        self.kernel_causal = getattr(model.config, "_attn_implementation", None) == "sdpa"

    def mask(self, packed: PackedBatch, rows: Tensor | None = None, seq: int | None = None) -> Tensor | None:
        if self.kernel_causal and packed.causal_only:
            return None
        return packed.attention_mask(self.dtype, rows=rows, seq=seq)

    def clean(self, packed: PackedBatch) -> _CleanCache:
        hidden = self.embed(packed.input_ids)
        cos_sin = self.rotary(hidden, packed.position_ids)
        mask = self.mask(packed)
        hidden_in, attn_out, o_input = [], [], []
        for layer in self.layers:
            hooks = [
                layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: o_input.append(args[0])),
                layer.self_attn.register_forward_hook(lambda m, args, out: attn_out.append(out[0])),
            ]
            try:
                hidden_in.append(hidden)
                hidden = _run_layer(layer, hidden, mask, packed.position_ids, cos_sin)
            finally:
                for hook in hooks:
                    hook.remove()
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        correct, logprob = self._metrics(self.norm(hidden), packed, rows)
        return _CleanCache(hidden_in, attn_out, o_input, cos_sin, correct, logprob)

    def ablated(
        self, cache: _CleanCache, packed: PackedBatch, layer: int, rows: Tensor, heads: Tensor,
        ablation: str, means: Tensor | None, stats: FastScanStats,
    ) -> tuple[Tensor, Tensor]:
        """Per-row (correct, normalised log-prob) ``[R]`` with ``heads[r]`` of ``layer`` ablated for item ``rows[r]``."""
        seq = int(packed.lengths[rows].max())
        count, hd = len(rows), self.layout.head_dim
        z = cache.o_input[layer][rows, :seq].view(count, seq, self.layout.num_heads, hd)
        z_head = z[torch.arange(count, device=z.device), :, heads]  # [R, seq, head_dim]
        fill = replacement(ablation, means, layer, heads)
        fill = fill.to(z.dtype) if isinstance(fill, Tensor) else fill
        weight = self.layers[layer].self_attn.o_proj.weight.view(-1, self.layout.num_heads, hd)[:, heads]  # [dim, R, hd]
        attn = cache.attn_out[layer][rows, :seq] + torch.einsum("rtk,drk->rtd", fill - z_head, weight)
        mask = self.mask(packed, rows, seq)
        position_ids = packed.position_ids[rows, :seq]
        cos_sin = tuple(t[rows, :seq] for t in cache.cos_sin)
        hidden = cache.hidden_in[layer][rows, :seq]
        with _attention_replaced(self.layers[layer], attn):
            hidden = _run_layer(self.layers[layer], hidden, mask, position_ids, cos_sin)
        for later in self.layers[layer + 1 :]:
            hidden = _run_layer(later, hidden, mask, position_ids, cos_sin)
        tokens, tail = count * seq, len(self.layers) - layer - 1
        stats.mlp_only_tokens += tokens
        stats.layer_tokens += tokens * (tail + 1)
        stats.attention_pairs += count * seq * (seq + 1) // 2 * tail
        stats.scored_positions += int(packed.positions_per_row[rows].sum())
        stats.forwards += 1
        return self._metrics(self.norm(hidden), packed, rows)

    def _metrics(self, final: Tensor, packed: PackedBatch, rows: Tensor) -> tuple[Tensor, Tensor]:
        scores = row_choice_logprobs(final, packed, rows, self.lm_head)
        scores = scores.masked_fill(~packed.choice_valid[rows], float("-inf"))  # tree packing: row = item
        return choice_metrics(scores, packed.answer[rows])


def default_batch_size(device: torch.device | str) -> int:
    """(prompt, head) rows per forward: large on GPU to fill the matmuls, small on CPU."""
    return 256 if str(device).startswith("cuda") else 32


@torch.inference_mode()
def fast_scan(
    model,
    items: Sequence[EncodedItem],
    heads: Sequence[Head],
    ablation: str = "zero",
    means: Tensor | None = None,
    batch_size: int | None = None,
    prompt_chunk: int = 256,
    progress: Callable[[int], None] | None = None,
) -> FastScanResult:
    """Clean metrics and metrics with each of ``heads`` ablated on its own, over ``items``.

    ``batch_size``: (prompt, head) rows per forward (default: :func:`default_batch_size`); ``prompt_chunk``:
    prompts whose clean activations are cached at once (memory: 3 × layers × chunk × seq × hidden values).
    ``progress(n)`` is called with the number of (head, item) evaluations done, scaled to the whole run under
    torchrun. Under torch.distributed each rank scans its share of ``heads``; every rank returns all results.
    """
    check_ablation(ablation, means)
    tail = _Tail(model)
    for layer, head in heads:
        tail.layout.check_head(layer, head)
    batch_size = batch_size or default_batch_size(tail.device)
    local = distributed.shard(list(heads))
    by_layer: dict[int, list[int]] = {}
    for layer, head in local:
        by_layer.setdefault(layer, []).append(head)
    sums = {head: torch.zeros(2, device=tail.device) for head in local}  # (correct, logprob) summed over items
    clean_sum = torch.zeros(2, device=tail.device)
    stats = FastScanStats()
    order = sorted(range(len(items)), key=lambda i: items[i].max_length)  # short rows together: less padding
    for start in range(0, len(order), prompt_chunk):
        packed = pack([items[i] for i in order[start : start + prompt_chunk]]).to(tail.device)
        cache = tail.clean(packed)
        clean_sum += torch.stack([cache.correct.sum(), cache.logprob.sum()])
        for layer, layer_heads in by_layer.items():
            # rows prompt-major (prompts sorted by length): a micro-batch spans few prompts, so little padding
            rows = torch.arange(packed.num_items, device=tail.device).repeat_interleave(len(layer_heads))
            head_ids = torch.tensor(layer_heads, device=tail.device).repeat(packed.num_items)
            for i in range(0, len(rows), batch_size):
                r, h = rows[i : i + batch_size], head_ids[i : i + batch_size]
                correct, logprob = tail.ablated(cache, packed, layer, r, h, ablation, means, stats)
                for head in h.unique().tolist():
                    pick = h == head
                    sums[(layer, head)] += torch.stack([correct[pick].sum(), logprob[pick].sum()])
                if progress is not None:
                    progress(len(r) * distributed.world_size())
        del cache
    sums = distributed.gather_dict({head: tuple(v.tolist()) for head, v in sums.items()})
    n = len(items)
    return FastScanResult(
        baseline=ChoiceMetrics(clean_sum[0].item() / n, clean_sum[1].item() / n, n),
        heads={head: ChoiceMetrics(c / n, lp / n, n) for head, (c, lp) in sums.items()},
        stats=stats,
    )
