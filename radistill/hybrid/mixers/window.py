"""Sliding-window softmax heads: the teacher's own heads, each query seeing only the last ``window`` tokens.

Training-free: ``from_attention`` copies the replaced heads' Q/K/V rows (biases, Qwen3's qk-norm) and the layer
gives them the teacher's RoPE, so at every position within ``window`` tokens of the start a window head *is* the
teacher head, and later it is the teacher head renormalised over its last ``window`` keys. Its state is constant:
the K/V of the last ``window`` real tokens per KV head (GQA: one K/V per teacher KV head, shared by its query
heads as in the teacher). On teacher-19m, keeping the scan's top 3 heads as full attention and windowing every
other head at 16 tokens keeps KV retrieval at 40 pairs at 1.00 without any training (docs/hybrid.md).

Window convention (Mistral's, as ``sliding_window`` in transformers): query t attends to the real tokens
t - window + 1 .. t (padding does not count and is never attended). The state holds the last ``window`` real
tokens in a ring of ``window`` slots: a one-token decode step writes its token over the oldest slot (``scatter_``
at the row's ring position ``next % window``, a device tensor), then reads the whole ring with the empty slots
masked. That step has fixed shapes and no host reads, so a static-cache decode step compiles as one graph and a
CUDA graph can capture it (tests/test_window_mixer.py). Any other call (a prefill, a chunk of several tokens,
packed documents) unrolls the ring into token order and takes the banded path (all queries in chunks against their
own band of keys, two batched matmuls), then lays the ring out again from slot 0. The blockwise path (blocks of
``block_size`` queries in a Python loop) is the reference, and serves inputs with padding between real tokens.

Attention sinks (``sink`` S > 0, StreamingLLM's and DuoAttention's streaming heads): a query also sees the first S
real tokens of its document, however far back. Pretrained models park much of their attention on the first tokens;
a window that drops them renormalises that mass onto its W tokens and breaks the model: SmolLM2-135M with its top 14
heads kept and every other head windowed at 16 tokens reads held-out prose at perplexity 1,479, at 42.9 with S = 4
(teacher 15.4; benchmarks/results/window-smollm2-sinks-cpu.md, docs/hybrid.md).
The state then also holds those S tokens' K/V ("sink_k", "sink_v") and the document's real-token count ("seen"). A
sink token still inside the window counts once: the window rule takes it, the sink rule only keys outside the
window. In a prefill with a state the keys are laid out [sink slots, ring, new tokens] in token order, the sink
slots the ring still holds marked empty and moved first, so the window rule and real-token counts read as without a
state (``_combined``).

Shapes: B batch, T new tokens, H query heads, G distinct KV heads, P head_dim, W window, S sink, L = past + T.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from radistill.hybrid.mixers.base import RecurrentMixer
from radistill.utils.errors import RadistillError


# the sinks `radistill build` gives new window heads (StreamingLLM's choice). The class default stays 0 so that a
# student saved before sinks existed (its config has no "sink") loads as it was built.
DEFAULT_SINK = 4


def _plain_mask(window: int, sink: int, first: int, chunks: int, device: torch.device) -> Tensor:
    """[chunks, 1, C, S + sink] bool, True where :meth:`WindowAttention._plain_band` hides a score: chunks first ..
    first + chunks - 1 of C = max(W, 16) queries, each against its band of S = C + W - 1 keys (from W - 1 before the
    chunk) and the first ``sink`` tokens. Hidden: a band key outside the query's last W tokens or before the first
    token, a sink within the query's window (the band has it). The same for every layer of a prefill, so it is made
    once per shape and kept (a handful of small tensors; each new one is ~12 launches a layer would repeat),
    except while compiling, where it is part of the graph."""
    if torch.compiler.is_compiling():
        return _make_plain_mask(window, sink, first, chunks, device)
    # only the first chunk has keys before the first token, and only queries before W + sink - 1 have a sink in
    # their window: from the chunk past both on, every chunk's pattern is the same
    settled = max(1, -(-(window + sink - 1) // max(window, 16)))
    return _cached_plain_mask(window, sink, min(first, settled), chunks, torch.device(device))


@functools.lru_cache(maxsize=32)
def _cached_plain_mask(window: int, sink: int, first: int, chunks: int, device: torch.device) -> Tensor:
    # made outside inference mode even when first asked for inside it (a served or evaluated model): an inference
    # tensor could not be saved for backward by a later training forward of the same shape
    with torch.inference_mode(False):
        return _make_plain_mask(window, sink, first, chunks, device)


def _make_plain_mask(window: int, sink: int, first: int, chunks: int, device: torch.device) -> Tensor:
    C = max(window, 16)
    S = C + window - 1
    query = (first + torch.arange(chunks, device=device))[:, None, None] * C + torch.arange(C, device=device)[:, None]
    key = query - torch.arange(C, device=device)[:, None] - (window - 1) + torch.arange(S, device=device)  # [n', C, S]
    hidden = (key < 0) | (key > query) | (query - key >= window)
    if sink:
        hidden = torch.cat([hidden, query - torch.arange(sink, device=device) < window], dim=-1)
    return hidden[:, None]


class WindowAttention(RecurrentMixer):
    """num_heads softmax heads over a sliding window of ``window`` tokens (module docstring).

    settings: window (tokens a query sees, itself included), sink (the first tokens of each document every query also
    sees; 0: none), bias / qk_norm / rms_norm_eps (the teacher's, filled in by the build), block_size (queries per
    block of the blockwise forward; memory O(block * (block + window)), O(block * L) with sinks).
    """

    needs_positions = True
    supports_reset = True  # packed documents: a window never reaches back across a document start
    shares_kv = True
    calibrate_normalizer = False  # its fresh output is the teacher head's over the window: nothing to correct
    knows_fresh_state = True  # a first prefill skips the empty ring and sinks (_first_prefill)

    def __init__(
        self, hidden_size: int, num_heads: int, head_dim: int, window: int = 16, bias: bool = False,
        qk_norm: bool = False, rms_norm_eps: float = 1e-6, block_size: int = 256, sink: int = 0,
        kv_groups: list[int] | None = None,
    ):
        super().__init__(hidden_size, num_heads, head_dim, window=window, bias=bias, qk_norm=qk_norm,
                         rms_norm_eps=rms_norm_eps, block_size=block_size, sink=sink)
        if window < 1 or block_size < 1 or sink < 0:
            raise RadistillError("the window mixer needs window >= 1, block_size >= 1 and sink >= 0, got "
                                 f"{window}, {block_size}, {sink}")
        kv_groups = list(range(num_heads)) if kv_groups is None else [int(g) for g in kv_groups]
        distinct = list(dict.fromkeys(kv_groups))
        if len(kv_groups) != num_heads or distinct != list(range(len(distinct))):
            raise RadistillError(f"kv_groups {kv_groups} must give each of the {num_heads} heads its KV head, "
                                 "numbered 0, 1, ... in order of first appearance")
        self.window, self.block_size, self.sink, self.kv_groups = window, block_size, int(sink), kv_groups
        self.num_kv_heads = len(distinct)
        # (KV head, query heads reading it) in head order when each KV head's query heads are adjacent (always so
        # in a built student: heads ascend, and so do their KV heads): the decode step then widens K/V per head by
        # views alone, with no index tensor to copy to the device (a CUDA graph could not capture that copy)
        runs = [(g, kv_groups.count(g)) for g in distinct]
        adjacent = [g for g, n in runs for _ in range(n)] == kv_groups
        self._runs = runs if adjacent else None
        # the decode step's grouped form: query heads per KV head when every KV head has as many, adjacent (0: none)
        self._group_size = runs[0][1] if adjacent and len({n for _, n in runs}) == 1 else 0
        self._group_indices: dict[torch.device, Tensor] = {}  # _group_index's, per device
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * head_dim, bias=bias)
        self.q_norm = LlamaRMSNorm(head_dim, eps=rms_norm_eps) if qk_norm else None
        self.k_norm = LlamaRMSNorm(head_dim, eps=rms_norm_eps) if qk_norm else None

    @classmethod
    def teacher_settings(cls, *, attention_bias: bool, qk_norm: bool, rms_norm_eps: float) -> dict:
        return {"bias": attention_bias, "qk_norm": qk_norm, "rms_norm_eps": rms_norm_eps}

    def reset_parameters(self) -> None:
        """nn.Linear's random init (a fresh window mixer is meant to be made by from_attention)."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            proj.reset_parameters()

    # ---- the computation ------------------------------------------------------------------------------------------

    def _qkv(self, hidden_states: Tensor, position_embeddings) -> tuple[Tensor, Tensor, Tensor]:
        """-> q [B, H, T, P], k/v [B, G, T, P], RoPE applied to q and k."""
        if position_embeddings is None:
            raise RadistillError("the window mixer needs position_embeddings (cos, sin) for RoPE: call it through the "
                                 "hybrid layer, or pass the teacher's rotary embedding of the positions")
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v.transpose(1, 2)

    def _blocks(self, q: Tensor, keys: Tensor, valid: Tensor, past: int, documents: Tensor | None = None):
        """Yield (start, end, lo, probs [B, H, end - start, past + end - lo]): the attention of queries start..end-1
        (new-token indices) over keys lo..past+end-1 (combined indices). keys [B, G, L, P]; valid [B, L] bool;
        documents [B, L] int (packed documents: each position's document number) or None."""
        W, T = self.window, q.shape[2]
        count = valid.long().cumsum(1)  # [B, L]: real tokens up to and including each position
        rank = self._ranks(valid, count, documents)
        # keys older than window-1 positions plus every padding position can never be in a window (sinks can be
        # anywhere before: then every key). Meta tensors, as memplan profiles a layer's shapes, hold no values:
        # count no padding there, the profile passes no mask.
        if self.sink:
            reach = keys.shape[2]
        else:
            reach = W - 1 + (0 if valid.is_meta else int((~valid).sum(1).max()))
        index = self._group_index(q.device)
        scale = self.head_dim**-0.5
        for start in range(0, T, self.block_size):
            end = min(T, start + self.block_size)
            lo = max(0, past + start - reach)
            k = keys[:, :, lo : past + end].index_select(1, index)  # [B, H, Lb, P]
            scores = torch.matmul(q[:, :, start:end].float(), k.float().transpose(-1, -2)) * scale
            queries = torch.arange(past + start, past + end, device=q.device)
            allowed = self._window_mask(valid, count, documents, queries, torch.arange(lo, past + end, device=q.device),
                                        rank)  # [B, Tb, Lb]
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no real key yet: zeros
            yield start, end, lo, probs

    def _window_mask(self, valid: Tensor, count: Tensor, documents: Tensor | None, query_at: Tensor,
                     key_at: Tensor, rank: Tensor | None = None, part: str = "all") -> Tensor:
        """:meth:`_rule` for queries sharing their keys: valid [B, L] bool, count [B, L] (real tokens up to each
        position), documents [B, L] or None, rank [B, L] (:meth:`_ranks`); query_at [..., Q] and key_at [..., K]
        combined indices in 0..L-1 -> [B, ..., Q, K] bool."""
        def of_query(values):
            return None if values is None else values[:, query_at][..., :, None]

        def of_key(values):
            return None if values is None else values[:, key_at][..., None, :]

        return self._rule(query_at[..., :, None], key_at[..., None, :], of_query(count), of_key(count),
                          of_key(valid), of_key(rank), of_query(documents), of_key(documents), part)

    def _rule(self, q_at: Tensor, k_at: Tensor, q_count: Tensor, k_count: Tensor, k_valid: Tensor,
              k_rank: Tensor | None, q_doc: Tensor | None, k_doc: Tensor | None, part: str = "all") -> Tensor:
        """The window rule, one place for every path (broadcastable tensors of positions, real-token counts, key
        validity, key ranks, documents): a key at or before the query, a real token, in the query's document, and
        among the query's last W real tokens or one of its document's first ``sink`` real tokens. ``part``: "all"
        (either), "window" (the last W only), "sink" (sinks outside the window only: what the banded path adds to
        its band, so that no key counts twice)."""
        allowed = (k_at <= q_at) & k_valid
        near = q_count - k_count < self.window
        if part == "window" or not self.sink:
            allowed = allowed & near
        else:
            first = k_rank <= self.sink
            allowed = allowed & ((near | first) if part == "all" else (first & ~near))
        if q_doc is not None:  # a query sees only keys of its own document
            allowed = allowed & (q_doc == k_doc)
        return allowed

    def _ranks(self, valid: Tensor, count: Tensor, documents: Tensor | None) -> Tensor | None:
        """[B, L]: each position's real tokens within its document, itself included (the sink rule's "first S");
        None without sinks (nothing reads it)."""
        if not self.sink:
            return None
        if documents is None:
            return count
        starts = torch.ones_like(valid)
        starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
        # real tokens before each document's start, carried forward over the document (counts never decrease)
        before = torch.where(starts, count - valid.long(), torch.zeros_like(count)).cummax(1).values
        return count - before

    def _blockwise(self, q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, past: int,
                   documents: Tensor | None) -> Tensor:
        """The reference path, any padding: queries in blocks of ``block_size`` over every key a window could reach
        (:meth:`_blocks`). q [B, H, T, P]; keys/values [B, G, L, P]; valid [B, L] -> y [B, H, T, P]."""
        index = self._group_index(q.device)
        out = []
        for start, end, lo, probs in self._blocks(q, keys, valid, past, documents):
            out.append(torch.matmul(probs.to(values.dtype), values[:, :, lo : past + end].index_select(1, index)))
        return torch.cat(out, dim=2)

    def _banded(self, q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, past: int,
                documents: Tensor | None, budget: int = 1 << 28) -> Tensor:
        """The window as a band, all queries at once: queries in chunks of C = max(W, 16), each chunk against the
        S = C + W - 1 keys from W - 1 before its first query to its last (one gather), two batched matmuls over the
        chunks: O(T * S) work and memory where the blockwise path launches ~15 kernels per block of queries (at 32k
        tokens, 128 blocks per layer: a host-bound prefill). Chunks go in groups that hold at most ``budget`` bytes
        at once (scores, gathered keys and values). Same numbers as :meth:`_blockwise` (fp32 scores, the same
        masks) when padding only precedes each row's real tokens: then the last W real tokens up to t lie within
        t - W + 1 .. t.
        q [B, H, T, P]; keys/values [B, G, L, P], L = past + T; valid [B, L]; documents [B, L] or None
        -> y [B, H, T, P]."""
        W = self.window
        B, H, T, P = q.shape
        L = keys.shape[2]
        C = max(W, 16)
        S = C + W - 1
        n = -(-T // C)
        device = q.device
        index = self._group_index(device)
        # real tokens up to and including each position [B, L], and ranks: only the window rule of packed documents
        # reads them (without documents the band and the sinks are fixed patterns on the real keys, below)
        count = None if documents is None else valid.long().cumsum(1)
        rank = None if documents is None else self._ranks(valid, count, documents)
        # bytes one chunk holds at once: fp32 scores and probabilities, its gathered keys (and their fp32 copy) and
        # values, per query head; with sinks also their scores and, with packed documents, each query's own sink
        # keys and values (without, a row's queries share theirs)
        per_query_sinks = self.sink * P * (4 + 2 * keys.element_size()) if documents is not None else 0
        per_chunk = B * H * (2 * C * S * 4 + S * P * (4 + 2 * keys.element_size())
                             + C * (self.sink * 2 * 4 + per_query_sinks))
        group = max(1, min(n, budget // per_chunk))
        # Without packed documents, between a real key and a later query every position is real (padding only
        # precedes real tokens on this path), so "among the query's last W real tokens" is "at most W - 1 positions
        # back": in the chunk layout query c sees band keys c .. c + W - 1, the same [C, S] pattern in every chunk.
        # The mask is then that band and which keys are real: a few operators instead of the rule's ~25 per group.
        if documents is None:
            offset = torch.arange(S, device=device)[None, :] - torch.arange(C, device=device)[:, None]  # [C, S]
            band = (offset >= 0) & (offset < W)
        out = []
        for first in range(0, n, group):
            chunks = min(group, n - first)
            # combined indices: chunk i's queries past + i*C + (0..C-1), its keys from past + i*C - (W - 1)
            base = past + (first + torch.arange(chunks, device=device)) * C  # [n']
            query_index = base[:, None] + torch.arange(C, device=device)  # [n', C]
            key_index = base[:, None] - (W - 1) + torch.arange(S, device=device)  # [n', S]
            key_ok = (key_index >= 0) & (key_index < L)
            key_at, query_at = key_index.clamp(0, L - 1), query_index.clamp(max=L - 1)
            k = keys[:, :, key_at].index_select(1, index)  # [B, G, n', S, P] -> [B, H, n', S, P]
            v = values[:, :, key_at].index_select(1, index)
            lo, hi = first * C, min(T, (first + chunks) * C)
            qc = q[:, :, lo:hi]
            if hi - lo < chunks * C:  # the last chunk's missing queries: zeros, cut off below
                qc = torch.nn.functional.pad(qc, (0, 0, 0, chunks * C - (hi - lo)))
            qc = qc.reshape(B, H, chunks, C, P)
            scores = torch.matmul(qc.float(), k.float().transpose(-1, -2)) * self.head_dim**-0.5  # [B, H, n', C, S]
            # key_ok: the band's positions before the first token or after the last are not keys (their clamped
            # indices would repeat a real one)
            if documents is None:  # [B, n', C, S]: the fixed band on real keys (band's docstring)
                real_key = valid.gather(1, key_at.reshape(1, -1).expand(B, -1)).view(B, chunks, S) & key_ok
                allowed = band & real_key[:, :, None, :]
            else:  # packed documents: the window rule itself (a document start cuts the band)
                allowed = self._window_mask(valid, count, documents, query_at, key_at, rank, part="window")
                allowed = allowed & key_ok[:, None, :]
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
            if self.sink:  # one softmax over the band and each query's sinks outside it
                sink_scores, sink_values = self._sink_keys(qc, keys, values, valid, count, rank, documents, query_at,
                                                           index)
                scores = torch.cat([scores, sink_scores], dim=-1)
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no real key yet: zeros
            if self.sink:
                probs, sink_probs = probs.split([S, self.sink], dim=-1)
            y = torch.matmul(probs.to(v.dtype), v)  # [B, H, n', C, P]
            if self.sink:
                y = y + torch.matmul(sink_probs.to(v.dtype).unsqueeze(-2), sink_values).squeeze(-2)
            out.append(y.reshape(B, H, chunks * C, P)[:, :, : hi - lo])
        return torch.cat(out, dim=2)

    def _plain_band(self, q: Tensor, k: Tensor, v: Tensor, budget: int = 1 << 28) -> Tensor:
        """The window (and sinks) of a call where every token is real, with no past and no packed documents (a first
        prefill, an uncached forward): :meth:`_banded`'s chunks without anything that call needs. With no padding
        and no ring the band of chunk i is the W - 1 keys before it and its own, so K/V padded by W - 1 zero rows in
        front are cut into the chunks' bands by ``unfold`` (a view, no gather), a KV head's query heads read its band
        without a copy when they are adjacent and equally many (every layer of a built student), the mask is a fixed
        pattern made once per shape (:func:`_plain_mask`) and the sinks are the first S keys, in the band's softmax
        and product. A window layer's forward in a 64-token prefill: 97 aten operators against 167 through
        :meth:`_banded` (each a host launch on a GPU, where a short prefill waits for the host). Every query sees
        itself, so no row is empty (no NaN to clear). Same numbers as :meth:`_blockwise` (fp32 scores, the same
        keys). q [B, H, T, P]; k/v [B, G, T, P] -> y [B, H, T, P]."""
        W, sink = self.window, min(self.sink, k.shape[2])
        B, H, T, P = q.shape
        C = max(W, 16)
        S = C + W - 1
        n = -(-T // C)
        device = q.device
        # D heads of bands, r query heads on each: the KV heads (their query heads adjacent and equally many: every
        # layer of a built student) or one per query head (K/V widened by an index)
        D, r = (k.shape[1], self._group_size) if self._group_size else (H, 1)
        if not self._group_size:
            index = self._group_index(device)
            k, v = k.index_select(1, index), v.index_select(1, index)
        # K/V rows: W - 1 zeros, the T tokens, zeros to the last chunk's end; chunk i's band is rows iC .. iC + S - 1
        k_rows = torch.nn.functional.pad(k, (0, 0, W - 1, n * C - T))
        v_rows = torch.nn.functional.pad(v, (0, 0, W - 1, n * C - T))
        # queries [B, D, n, r, C, P]: a chunk's r * C queries of one band in one matrix
        q = torch.nn.functional.pad(q, (0, 0, 0, n * C - T)).reshape(B, D, r, n, C, P).transpose(2, 3)
        if sink:
            sink_k = k[:, :, :sink].float().transpose(-1, -2)  # [B, D, P, sink]
            sink_v = v[:, :, None, :sink]  # [B, D, 1, sink, P]
        per_chunk = B * H * (2 * C * (S + sink) * 4 + S * P * (4 + 2 * k.element_size()))
        group = max(1, min(n, budget // per_chunk))
        scale = self.head_dim**-0.5
        out = []
        for first in range(0, n, group):
            chunks = min(group, n - first)
            rows = slice(first * C, (first + chunks - 1) * C + S)
            keys = k_rows[:, :, rows].unfold(2, S, C)  # [B, D, n', P, S]: a view
            values = v_rows[:, :, rows].unfold(2, S, C).transpose(-1, -2)  # [B, D, n', S, P]
            queries = q[:, :, first : first + chunks].reshape(B, D, chunks, r * C, P).float()
            scores = torch.matmul(queries, keys.float())  # [B, D, n', r C, S]
            if sink:  # the first S keys after the band: one softmax over both, one product with their values
                sink_scores = torch.matmul(queries.view(B, D, chunks * r * C, P), sink_k)
                scores = torch.cat([scores, sink_scores.view(B, D, chunks, r * C, sink)], dim=-1)
                values = torch.cat([values, sink_v.expand(B, D, chunks, sink, P)], dim=-2)  # [B, D, n', S + sink, P]
            hidden = _plain_mask(W, sink, first, chunks, device)  # [n', 1, C, S + sink]
            scores = (scores * scale).view(B, D, chunks, r, C, S + sink).masked_fill(hidden, float("-inf"))
            probs = torch.softmax(scores, dim=-1).view(B, D, chunks, r * C, S + sink)
            y = torch.matmul(probs.to(values.dtype), values)  # [B, D, n', r C, P]
            out.append(y.view(B, D, chunks, r, C, P).transpose(2, 3).reshape(B, H, chunks * C, P))
        y = out[0] if len(out) == 1 else torch.cat(out, dim=2)
        return y[:, :, :T]

    def _sink_keys(self, qc: Tensor, keys: Tensor, values: Tensor, valid: Tensor, count: Tensor | None,
                   rank: Tensor | None, documents: Tensor | None, query_at: Tensor,
                   index: Tensor) -> tuple[Tensor, Tensor]:
        """The banded path's sink part: each query against its document's first ``sink`` real tokens that are not
        in its window. With no padding between real tokens (the banded path's condition) those lie at the first real
        position of the query's document and after: one set per row when there are no packed documents (the first
        real position is the number of padding positions), one per query otherwise (its position - rank + 1).
        qc [B, H, n', C, P] queries at combined indices query_at [n', C]; keys/values [B, G, L, P]; valid [B, L];
        count/rank/documents [B, L] (None without documents); index [H] each query head's KV head -> (scores
        [B, H, n', C, sink], -inf where the rule says no; values [B, H, n', C or 1, sink, P])."""
        B, G, L, P = keys.shape
        if documents is None:  # [B, 1, 1]: every query of a row shares its sinks
            first = (~valid).sum(1)[:, None, None]
        else:  # [B, n', C]: the first real position of each query's document
            first = query_at - rank[:, query_at] + 1
        at = (first[..., None] + torch.arange(self.sink, device=keys.device)).clamp(0, L - 1)  # [B, *, *, sink]
        flat = at.reshape(B, -1)

        def take(x: Tensor) -> Tensor:  # [B, G, L, P] -> [B, H, *, *, sink, P]
            picked = x.gather(2, flat[:, None, :, None].expand(B, G, flat.shape[1], P))
            return picked.view(B, G, *at.shape[1:], P).index_select(1, index)

        def of_key(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.gather(1, flat).view(at.shape)

        def of_query(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[:, query_at][..., None]

        if documents is None:  # the rule without documents (see _banded): a real sink key W or more positions back
            unclamped = first[..., None] + torch.arange(self.sink, device=keys.device)  # [B, 1, 1, sink]
            allowed = of_key(valid) & (unclamped < L) & (query_at[..., None] - unclamped >= self.window)
        else:
            allowed = self._rule(query_at[..., None], at, of_query(count), of_key(count), of_key(valid),
                                 of_key(rank), of_query(documents), of_key(documents), part="sink")  # [B, n', C, sink]
        k = take(keys)  # broadcast over the queries of a row when they share their sinks
        scores = torch.matmul(qc.float().unsqueeze(-2), k.float().transpose(-1, -2)).squeeze(-2) * self.head_dim**-0.5
        return scores.masked_fill(~allowed[:, None], float("-inf")), take(values)

    def _group_index(self, device: torch.device) -> Tensor:
        """[H] each query head's KV head, on ``device``, made once per device: building it from the list on every
        call is a host-to-device copy, which on CUDA waits for the device (the host could no longer run ahead of
        the kernels it launched: in a prefill, once per layer)."""
        device = torch.device(device)
        cached = self._group_indices.get(device)
        if cached is None:
            with torch.inference_mode(False):  # a later training forward saves it for backward (see _cached_plain_mask)
                cached = self._group_indices[device] = torch.as_tensor(self.kv_groups, device=device)
        return cached

    def _per_head(self, kv: Tensor) -> Tensor:
        """[B, G, ...] per KV head -> [B, H, ...] per query head (``kv_groups``)."""
        if self._runs is None:
            return kv.index_select(1, self._group_index(kv.device))
        return torch.cat([kv[:, g : g + 1].expand(-1, n, *kv.shape[2:]) for g, n in self._runs], dim=1)

    def _combined(self, k, v, attention_mask, state):
        B, T = k.shape[0], k.shape[2]
        real = torch.ones(B, T, dtype=torch.bool, device=k.device) if attention_mask is None \
            else attention_mask[:, -T:].bool()
        if state is None:
            return k, v, real, 0
        # the ring in token order: from the oldest slot (next % W; when not full, the empty slots come first)
        order = (state["next"][:, None] + torch.arange(self.window, device=k.device)) % self.window  # [B, W]
        gather = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        keys = [state["k"].gather(2, gather).to(k.dtype), k]
        values = [state["v"].gather(2, gather).to(v.dtype), v]
        valid = [state["valid"].gather(1, order).bool(), real]
        if not self.sink:
            return torch.cat(keys, dim=2), torch.cat(values, dim=2), torch.cat(valid, dim=1), self.window
        # before the ring, the sink slots not also in it (slot j holds the document's token j; the ring holds its
        # last min(seen, W) tokens): slots j < seen - W, put last so that padding still only precedes real tokens and
        # the first real keys are the document's first tokens
        S = self.sink
        held = (state["seen"] - self.window).clamp(0, S)  # [B]
        order = (held[:, None] + torch.arange(S, device=k.device)) % S  # [B, S]: empty or duplicated slots first
        gather = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        keys.insert(0, state["sink_k"].gather(2, gather).to(k.dtype))
        values.insert(0, state["sink_v"].gather(2, gather).to(v.dtype))
        valid.insert(0, torch.arange(S, device=k.device) >= (S - held)[:, None])
        return torch.cat(keys, dim=2), torch.cat(values, dim=2), torch.cat(valid, dim=1), S + self.window

    @staticmethod
    def _documents(reset: Tensor | None, past: int) -> Tensor | None:
        """[B, past + T] int: each position's document (past positions: the first), from reset [B, T] or None."""
        if reset is None:
            return None
        T = reset.shape[1]
        return torch.cat([reset.new_zeros(reset.shape[0], past), reset[:, -T:]], dim=1).int().cumsum(1)

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, state: dict[str, Tensor] | None = None,
        position_embeddings: tuple[Tensor, Tensor] | None = None, reset: Tensor | None = None, fresh: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """hidden_states [B, T, hidden]; attention_mask [B, T] (or [B, past + T]), 1 = token; state from
        empty_state() or None; position_embeddings (cos, sin) [B or 1, T, P]; reset [B, T] bool (a packed document
        starts there) or None; fresh: ``state`` was made by empty_state() for this call (``knows_fresh_state``).
        -> (y [B, T, H, P], state)."""
        q, k, v = self._qkv(hidden_states, position_embeddings)
        T = hidden_states.shape[1]
        if state is not None and reset is None and T == 1:
            return self._step(q, k, v, attention_mask, state), state
        if fresh and state is not None and attention_mask is None and reset is None and T >= max(self.window,
                                                                                                 self.sink):
            return self._first_prefill(q, k, v, state), state
        if state is None and attention_mask is None and reset is None:  # every token real, no past: the plain band
            return self._plain_band(q, k, v).transpose(1, 2), None
        keys, values, valid, past = self._combined(k, v, attention_mask, state)
        documents = self._documents(reset, past)
        # padding only before each row's real tokens (always so for generate's left padding and the ring, whose
        # empty slots come first): the banded path; inner padding stretches a window over more positions than the
        # band holds, so it takes the blockwise path. No mask: every new token is real and _combined puts the state's
        # empty slots first, so there is nothing to check and no host read (which on CUDA would wait for the device).
        plain = attention_mask is None or valid.is_meta
        banded = plain or bool((valid[:, 1:] >= valid[:, :-1]).all())
        y = (self._banded if banded else self._blockwise)(q, keys, values, valid, past, documents)
        y = y.transpose(1, 2) * valid[:, past:, None, None].to(y.dtype)  # [B, T, H, P]; padded positions: 0
        if state is not None:  # keep the last W real tokens in slots 0.., in token order; the ring goes on from there
            if documents is not None:  # of the last document only: the next tokens continue it
                valid = valid & (documents == documents[:, -1:])
            later = valid.flip(1).long().cumsum(1).flip(1)  # [B, L]: real tokens at or after each position
            kept = valid & (later <= self.window)
            count = kept.sum(1)  # [B] <= W
            self._store(keys, values, kept, state, "k", "v")
            state["valid"].copy_(torch.arange(self.window, device=valid.device) < count[:, None])
            state["next"].copy_(count)
            if self.sink:
                self._keep_sinks(keys, values, valid, documents, past, state)
        return y, state

    def _first_prefill(self, q: Tensor, k: Tensor, v: Tensor, state: dict[str, Tensor]) -> Tensor:
        """A prefill into a state empty_state() just made, every token real, at least max(W, S) of them: what the
        general path computes, without laying out the empty ring and sink slots before the keys nor searching the
        combined keys for what to keep (about a third of the window's operators in a prefill, each a host launch on
        a GPU). The keys are the new tokens alone; the ring takes their last W in token order (the oldest in slot 0,
        so ``next`` = W), the sinks their first S, ``seen`` = T. q [B, H, T, P]; k/v [B, G, T, P] -> y [B, T, H, P]."""
        T, W = q.shape[2], self.window
        y = self._plain_band(q, k, v).transpose(1, 2)
        state["k"].copy_(k[:, :, T - W :])
        state["v"].copy_(v[:, :, T - W :])
        state["valid"].fill_(1)
        state["next"].fill_(W)
        if self.sink:
            state["sink_k"].copy_(k[:, :, : self.sink])
            state["sink_v"].copy_(v[:, :, : self.sink])
            state["seen"].fill_(T)
        return y

    def _keep_sinks(self, keys: Tensor, values: Tensor, valid: Tensor, documents: Tensor | None, past: int,
                    state: dict[str, Tensor]) -> None:
        """After a multi-token call: the last document's first ``sink`` real tokens into the sink slots (in the
        combined keys they are its first real ones, :meth:`_combined`) and its real-token count into "seen". keys/
        values [B, G, L, P]; valid [B, L] already restricted to the last document."""
        self._store(keys, values, valid & (valid.long().cumsum(1) <= self.sink), state, "sink_k", "sink_v")
        new_real = valid[:, past:].sum(1)  # the last document's new real tokens
        # still the state's document (no reset among the new tokens): its count goes on
        continued = torch.ones_like(new_real, dtype=torch.bool) if documents is None else documents[:, -1] == 0
        state["seen"].copy_(torch.where(continued, state["seen"] + new_real, new_real))

    def _store(self, keys: Tensor, values: Tensor, chosen: Tensor, state: dict[str, Tensor], k_name: str,
               v_name: str) -> None:
        """Copy the K/V at the ``chosen`` positions ([B, L] bool, at most as many per row as the slots), in token
        order, into the slots of ``state[k_name]`` / ``state[v_name]`` ([B, G, n, P]) from slot 0; the slots after
        them get other positions' K/V, which the caller marks empty. keys/values [B, G, L, P]."""
        slots, length = state[k_name].shape[2], chosen.shape[1]
        position = torch.arange(length, device=chosen.device)
        # chosen positions first, in token order, then the rest
        order = torch.where(chosen, position, position + length).argsort(dim=1)[:, :slots]  # [B, n]
        gather = order[:, None, :, None].expand(-1, self.num_kv_heads, -1, self.head_dim)
        state[k_name].copy_(keys.gather(2, gather))
        state[v_name].copy_(values.gather(2, gather))

    @staticmethod
    def _write_where(state: dict[str, Tensor], new: tuple[tuple[str, Tensor], ...], at: Tensor, write: Tensor) -> None:
        """For each (name, tensor [B, G, 1, P]) of ``new``: into ``state[name]`` at slot ``at`` ([B, G, 1, P] indices),
        in rows where ``write`` [B] holds; other rows write the slot's own content back (fixed shapes, no host
        read: a CUDA graph can capture it)."""
        for name, tensor in new:
            old = state[name].gather(2, at)
            state[name].scatter_(2, at, torch.where(write[:, None, None, None], tensor.to(old.dtype), old))

    def _step(self, q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None, state: dict[str, Tensor]) -> Tensor:
        """One token per row: q [B, H, 1, P], k/v [B, G, 1, P] -> y [B, 1, H, P]; the ring advanced in place.

        The row's token goes into slot ``next % W`` (the oldest, or the first empty one), by ``scatter_`` at that
        device-side index; a padding token writes the slot's own content back and leaves ``next`` alone. The query
        then reads every filled slot: the last W real tokens, its own included, the same keys the blockwise path
        gives it (in ring order rather than token order, which a softmax does not see). When every KV head serves as
        many adjacent query heads (every layer without kept heads in a built student) the queries are viewed as
        [B, G, n, P] against the ring's [B, G, S + W, P], so no per-head copy of K/V is made each token."""
        B, G, _, P = k.shape
        slot = (state["next"] % self.window)[:, None]  # [B, 1]
        at = slot[:, None, :, None].expand(B, G, 1, P)
        real = None if attention_mask is None else attention_mask[:, -1].bool()
        if self.sink:  # the document's token number seen goes into sink slot seen while seen < sink
            seen = state["seen"]
            write = seen < self.sink if real is None else (seen < self.sink) & real
            sink_at = seen.clamp(max=self.sink - 1)[:, None, None, None].expand(B, G, 1, P)
            self._write_where(state, (("sink_k", k), ("sink_v", v)), sink_at, write)
            seen.add_(1 if real is None else real.long())
        if real is None:  # every token real (a decode step): no read-back of the slots a padding token would keep
            for name, new in (("k", k), ("v", v)):
                state[name].scatter_(2, at, new.to(state[name].dtype))
            state["valid"].scatter_(1, slot, 1.0)
            state["next"].add_(1)
        else:
            self._write_where(state, (("k", k), ("v", v)), at, real)
            filled = state["valid"].gather(1, slot)
            state["valid"].scatter_(1, slot, torch.where(real[:, None], torch.ones_like(filled), filled))
            state["next"].add_(real.long())
        keys, values, filled = state["k"], state["v"], state["valid"].bool()  # [B, G, W, P], [B, W]
        if self.sink:  # the sink slots the ring no longer holds (j < seen - W), before the ring: [B, G, S + W, P]
            keys = torch.cat([state["sink_k"], keys], dim=2)
            values = torch.cat([state["sink_v"], values], dim=2)
            held = torch.arange(self.sink, device=k.device) < (state["seen"] - self.window)[:, None]
            filled = torch.cat([held, filled], dim=1)
        H = self.num_heads
        if self._group_size:  # each KV head's query heads adjacent and equally many: read K/V once per KV head
            q = q.reshape(B, G, self._group_size, P)  # [B, G, n, P]: heads are grouped by KV head (a view)
        else:  # K/V widened to one per query head
            keys, values = self._per_head(keys), self._per_head(values)  # [B, H, S + W, P]
        scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * self.head_dim**-0.5  # [B, G|H, n|1, S+W]
        scores = scores.masked_fill(~filled[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # nothing real yet: zeros
        y = torch.matmul(probs.to(values.dtype), values).reshape(B, H, 1, P).transpose(1, 2)  # [B, 1, H, P]
        return y if real is None else y * real[:, None, None, None].to(y.dtype)

    def mixing_matrix(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None,
        position_embeddings: tuple[Tensor, Tensor] | None = None, reset: Tensor | None = None,
    ) -> Tensor:
        """[B, H, T, T]: the banded softmax y_t = sum_s M[t, s] v_s (rows of padded queries 0; with reset [B, T],
        entries across a document start 0)."""
        q, k, _ = self._qkv(hidden_states, position_embeddings)
        _, _, valid, _ = self._combined(k, k, attention_mask, None)
        B, H, T, _ = q.shape
        matrix = q.new_zeros(B, H, T, T, dtype=torch.float32)
        for start, end, lo, probs in self._blocks(q, k, valid, 0, self._documents(reset, 0)):
            matrix[:, :, start:end, lo:end] = probs
        return (matrix * valid[:, None, :, None]).to(q.dtype)

    def empty_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, Tensor]:
        """{"k", "v": [B, G, W, P] the last W real tokens' keys (RoPE applied) and values in a ring of W slots,
        "valid": [B, W] which slots are filled, "next": [B] int64 the ring position of the next write (mod W)}; with
        sinks also "sink_k", "sink_v": [B, G, S, P] the document's first S tokens' and "seen": [B] int64 its real
        tokens so far."""
        shape = (batch_size, self.num_kv_heads, self.window, self.head_dim)
        state = {"k": torch.zeros(shape, device=device, dtype=dtype),
                 "v": torch.zeros(shape, device=device, dtype=dtype),
                 "valid": torch.zeros(batch_size, self.window, device=device, dtype=dtype),
                 "next": torch.zeros(batch_size, device=device, dtype=torch.long)}
        if self.sink:
            sinks = (batch_size, self.num_kv_heads, self.sink, self.head_dim)
            state.update({"sink_k": torch.zeros(sinks, device=device, dtype=dtype),
                          "sink_v": torch.zeros(sinks, device=device, dtype=dtype),
                          "seen": torch.zeros(batch_size, device=device, dtype=torch.long)})
        return state

    @staticmethod
    def state_bytes(num_heads: int, head_dim: int, dtype_bytes: int, window: int = 16, sink: int = 0,
                    kv_heads: int | None = None, **_: object) -> dict[str, int]:
        """K and V of ``window`` + ``sink`` tokens per KV head (``kv_heads``, default one per head), the slots' mask,
        the ring position and with sinks the document's count (one int64 each)."""
        kv = num_heads if kv_heads is None else kv_heads
        return {"window": 2 * kv * (window + sink) * head_dim * dtype_bytes + window * dtype_bytes + 8
                + (8 if sink else 0)}

    @classmethod
    def from_attention(
        cls, hidden_size: int, q_weight: Tensor, k_weight: Tensor, v_weight: Tensor,
        q_bias: Tensor | None = None, k_bias: Tensor | None = None, v_bias: Tensor | None = None,
        q_norm_weight: Tensor | None = None, k_norm_weight: Tensor | None = None,
        kv_groups: list[int] | None = None, **settings: object,
    ) -> WindowAttention:
        """The replaced heads exactly (base contract); K/V rows are taken once per KV group in ``kv_groups``."""
        H, P, D = q_weight.shape
        if D != hidden_size or k_weight.shape != q_weight.shape or v_weight.shape != q_weight.shape:
            raise RadistillError(f"q/k/v weights {tuple(q_weight.shape)}, {tuple(k_weight.shape)}, "
                                 f"{tuple(v_weight.shape)} must all be [heads, head_dim, hidden={hidden_size}]")
        settings.setdefault("bias", q_bias is not None)
        settings.setdefault("qk_norm", q_norm_weight is not None)
        mixer = cls(hidden_size, H, P, kv_groups=kv_groups, **settings).to(device=q_weight.device,
                                                                         dtype=q_weight.dtype)
        first = [mixer.kv_groups.index(g) for g in range(mixer.num_kv_heads)]
        for head, g in enumerate(mixer.kv_groups):
            same = torch.equal(k_weight[head], k_weight[first[g]]) and torch.equal(v_weight[head], v_weight[first[g]])
            if not same:
                raise RadistillError(f"heads {first[g]} and {head} share KV group {g} but have different K/V rows: "
                                     "kv_groups must follow the teacher's GQA groups")
        with torch.no_grad():
            mixer.q_proj.weight.copy_(q_weight.reshape(H * P, D))
            mixer.k_proj.weight.copy_(k_weight[first].reshape(-1, D))
            mixer.v_proj.weight.copy_(v_weight[first].reshape(-1, D))
            if mixer.q_proj.bias is not None:
                for proj, bias, rows in ((mixer.q_proj, q_bias, list(range(H))), (mixer.k_proj, k_bias, first),
                                         (mixer.v_proj, v_bias, first)):
                    proj.bias.copy_(bias[rows].reshape(-1) if bias is not None else 0.0)
            if mixer.q_norm is not None:
                if q_norm_weight is None or k_norm_weight is None:
                    raise RadistillError("qk_norm is set but no q/k_norm_weight was given: pass the teacher's")
                mixer.q_norm.weight.copy_(q_norm_weight)
                mixer.k_norm.weight.copy_(k_norm_weight)
        return mixer


__all__ = ["DEFAULT_SINK", "WindowAttention"]
