"""Choice log-probabilities of multiple-choice items: every choice of an item from one forward.

*Tree packing* (the default for attention models): an item with a prompt of ``P`` tokens and choices
``c¹ … cᴷ`` becomes ONE sequence::

    p_0 … p_{P-1} | c¹_0 … c¹_{n₁-2} | c²_0 … c²_{n₂-2} | …

i.e. every choice's tokens but its last, packed after the prompt. A choice token sees the prompt and the
earlier tokens of its own choice only (a tree-shaped 4D mask) and takes the position it would have right
after the prompt, so each choice's log-prob equals the one from its own forward. ``log p(cᵏ_0)`` is read at
the prompt's last position (shared by all choices), ``log p(cᵏ_j)`` at ``cᵏ_{j-1}``. Single-token choices add
no tokens at all. The sequence ends at its last scored position: nothing after it is computed.

*Flat packing* (for models that cannot take a 4D mask, e.g. recurrent hybrids): one row per (item, choice),
``prompt + choice[:-1]`` with a plain 2D padding mask.

Logits are computed once per distinct scored position of a row, however many choice tokens are read there: in a
tree-packed row single-token choices all read the prompt's last position, so such an item costs one ``[vocab]``
row of logits, not one per choice.

Scores are summed log-probs per choice; :func:`summarize` turns them into accuracy (argmax = answer) and the
continuous metric: the answer's log-prob normalised over the choices (``log_softmax(scores)[answer]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from radistill.probes.items import EncodedItem
from radistill.utils.errors import RadistillError

PAD_SEGMENT = -1
LOGIT_CHUNK = 4096  # scored positions per lm_head call: bounds the [rows, vocab] logits in memory


@dataclass
class PackedBatch:
    """A batch of packed sequences (right-padded) and where each choice token is scored.

    Rows are sequences; in tree packing row ``r`` is item ``r``, in flat packing it is one (item, choice).
    """

    input_ids: Tensor  # [rows, seq]
    position_ids: Tensor  # [rows, seq]
    segments: Tensor  # [rows, seq]: 0 prompt, k+1 choice k's packed tokens, -1 padding
    lengths: Tensor  # [rows] real tokens per row
    score_pos: Tensor  # [rows, scores] position whose next-token distribution is scored (0 where invalid)
    score_target: Tensor  # [rows, scores] the token scored there
    score_choice: Tensor  # [rows, scores] which choice of the row's item it belongs to
    score_valid: Tensor  # [rows, scores] bool
    row_item: Tensor  # [rows] item of each row
    answer: Tensor  # [items]
    choice_valid: Tensor  # [items, choices] bool: item has this many choices
    tree: bool

    @property
    def num_items(self) -> int:
        return self.answer.shape[0]

    @property
    def positions_per_row(self) -> Tensor:
        """``[rows]`` distinct scored positions per row: the rows of logits each row sends through the LM head."""
        pos = self.score_pos.masked_fill(~self.score_valid, -1).sort(dim=1).values
        first = torch.ones_like(pos, dtype=torch.bool)
        first[:, 1:] = pos[:, 1:] != pos[:, :-1]
        return (first & (pos >= 0)).sum(1)

    @property
    def causal_only(self) -> bool:
        """True when no row has branch tokens (all choices single-token): a plain causal mask is then exact,
        because right padding never precedes a real token, so attention kernels may skip the 4D mask."""
        return bool((self.segments <= 0).all())

    def attention_mask(self, dtype: torch.dtype, rows: Tensor | None = None, seq: int | None = None) -> Tensor:
        """Tree: additive ``[rows, 1, seq, seq]`` mask (0 = attend, dtype min = blocked), usable by both eager
        and SDPA attention. Flat: ``[rows, seq]`` with 1 for tokens, 0 for padding.

        ``rows`` selects (and may repeat) rows; ``seq`` truncates to the first ``seq`` positions.
        """
        segments = self.segments if rows is None else self.segments[rows]
        if seq is not None:
            segments = segments[:, :seq]
        if not self.tree:
            return (segments != PAD_SEGMENT).long()
        length = segments.shape[1]
        index = torch.arange(length, device=segments.device)
        causal = index[None, :] <= index[:, None]  # [seq_q, seq_k]
        seg_q, seg_k = segments[:, :, None], segments[:, None, :]
        allowed = causal & (seg_k != PAD_SEGMENT) & ((seg_k == 0) | (seg_k == seg_q))
        # a padding query sees only itself, so no softmax row is empty (empty rows give NaN in SDPA)
        allowed |= torch.eye(length, dtype=torch.bool, device=segments.device)
        blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=segments.device)
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=segments.device), blocked)[:, None]

    def to(self, device) -> "PackedBatch":
        fields = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return PackedBatch(**fields)


def pack(items: Sequence[EncodedItem], tree: bool = True) -> PackedBatch:
    """Pack items into one right-padded batch (see the module docstring for the layout)."""
    rows: list[tuple[list[int], list[int], list[int], list[tuple[int, int, int]], int]] = []
    for item_index, item in enumerate(items):
        prompt = list(item.prompt_ids)
        if not prompt:
            raise RadistillError(f"probe item {item_index} has an empty prompt: every item needs prompt text")
        if tree:
            ids, pos, seg, scores = list(prompt), list(range(len(prompt))), [0] * len(prompt), []
            for k, choice in enumerate(item.choice_ids):
                scores.append((len(prompt) - 1, choice[0], k))
                for j in range(1, len(choice)):
                    scores.append((len(ids), choice[j], k))  # read at the packed copy of choice[j-1]
                    ids.append(choice[j - 1])
                    pos.append(len(prompt) + j - 1)
                    seg.append(k + 1)
            rows.append((ids, pos, seg, scores, item_index))
        else:
            for k, choice in enumerate(item.choice_ids):
                ids = prompt + list(choice[:-1])
                scores = [(len(prompt) - 1 + j, token, k) for j, token in enumerate(choice)]
                rows.append((ids, list(range(len(ids))), [0] * len(ids), scores, item_index))
    seq = max(len(r[0]) for r in rows)
    width = max(len(r[3]) for r in rows)
    n = len(rows)
    input_ids = torch.zeros(n, seq, dtype=torch.long)
    position_ids = torch.zeros(n, seq, dtype=torch.long)
    segments = torch.full((n, seq), PAD_SEGMENT, dtype=torch.long)
    score = torch.zeros(3, n, width, dtype=torch.long)
    score_valid = torch.zeros(n, width, dtype=torch.bool)
    for r, (ids, pos, seg, scores, _) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        position_ids[r, : len(ids)] = torch.tensor(pos)
        position_ids[r, len(ids) :] = torch.arange(len(pos), len(pos) + seq - len(ids))  # any valid position
        segments[r, : len(ids)] = torch.tensor(seg)
        score[:, r, : len(scores)] = torch.tensor(scores).T
        score_valid[r, : len(scores)] = True
    max_choices = max(len(item.choice_ids) for item in items)
    choice_valid = torch.zeros(len(items), max_choices, dtype=torch.bool)
    for i, item in enumerate(items):
        choice_valid[i, : len(item.choice_ids)] = True
    return PackedBatch(
        input_ids=input_ids, position_ids=position_ids, segments=segments,
        lengths=torch.tensor([len(r[0]) for r in rows]), score_pos=score[0], score_target=score[1],
        score_choice=score[2], score_valid=score_valid, row_item=torch.tensor([r[4] for r in rows]),
        answer=torch.tensor([item.answer for item in items]), choice_valid=choice_valid, tree=tree,
    )


def row_choice_logprobs(
    hidden: Tensor, packed: PackedBatch, rows: Tensor, logits_fn: Callable[[Tensor], Tensor]
) -> Tensor:
    """Summed log-probs per choice from final hidden states, computing logits only where scored, once per position.

    hidden ``[R, seq, dim]`` are the final (pre-lm_head) states of packed rows ``rows`` ``[R]`` (indices into
    ``packed``, repeats allowed); ``logits_fn`` maps ``[M, dim]`` to ``[M, vocab]``.
    Returns ``[R, choices]``: each row's contribution to its item's choices (0 where it scores nothing).
    """
    valid = packed.score_valid[rows]  # [R, scores]
    r, s = valid.nonzero(as_tuple=True)
    source = rows[r]
    targets = packed.score_target[source, s]
    # distinct (hidden row, position) pairs: a repeated packed row is a different forward (the fast scan ablates
    # another head in each copy), so positions are shared within a row of ``hidden`` only
    seq = hidden.shape[1]
    keys, read = torch.unique(r * seq + packed.score_pos[source, s], return_inverse=True)
    states = hidden[keys // seq, keys % seq]  # [positions, dim]
    token_lp = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    for i in range(0, len(keys), LOGIT_CHUNK):
        logprobs = torch.log_softmax(logits_fn(states[i : i + LOGIT_CHUNK]).float(), dim=-1)
        here = (read >= i) & (read < i + LOGIT_CHUNK)
        token_lp[here] = logprobs[read[here] - i, targets[here]]
    out = torch.zeros(len(rows), packed.choice_valid.shape[1], dtype=torch.float32, device=hidden.device)
    out.index_put_((r, packed.score_choice[source, s]), token_lp, accumulate=True)
    return out


def item_choice_logprobs(row_scores: Tensor, packed: PackedBatch) -> Tensor:
    """``[rows, choices]`` row contributions of ALL packed rows → ``[items, choices]``, ``-inf`` for missing choices."""
    if packed.tree:
        items = row_scores
    else:
        items = torch.zeros(packed.num_items, row_scores.shape[1], device=row_scores.device)
        items.index_add_(0, packed.row_item.to(row_scores.device), row_scores)
    return items.masked_fill(~packed.choice_valid.to(items.device), float("-inf"))


def choice_metrics(scores: Tensor, answer: Tensor) -> tuple[Tensor, Tensor]:
    """Per item: (correct ``[...]`` float 0/1, the answer's log-prob normalised over choices ``[...]``).

    ``scores`` ``[..., choices]`` (``-inf`` for absent choices); ``answer`` ``[...]``.
    """
    answer = answer.to(scores.device)
    correct = (scores.argmax(-1) == answer).float()
    normalised = torch.log_softmax(scores, dim=-1).gather(-1, answer[..., None])[..., 0]
    return correct, normalised


@dataclass(frozen=True)
class ChoiceMetrics:
    accuracy: float  # fraction of items whose best-scored choice is the answer
    logprob: float  # mean over items of log_softmax(choice scores)[answer] (<= 0; 0 = certain and right)
    items: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(scores: Sequence[Tensor], answers: Sequence[int]) -> ChoiceMetrics:
    """Accuracy and mean normalised log-prob of the answers, from :func:`choice_logprobs`' output."""
    if len(scores) != len(answers) or not scores:
        raise RadistillError(f"summarize got {len(scores)} score rows for {len(answers)} answers")
    width = max(len(s) for s in scores)
    padded = torch.full((len(scores), width), float("-inf"))
    for i, s in enumerate(scores):
        padded[i, : len(s)] = s.float().cpu()
    correct, normalised = choice_metrics(padded, torch.tensor(list(answers)))
    return ChoiceMetrics(correct.mean().item(), normalised.mean().item(), len(scores))


def _uses_tree(model, packing: str) -> bool:
    if packing not in ("auto", "tree", "flat"):
        raise RadistillError(f"unknown packing '{packing}': use auto, tree or flat")
    if packing == "auto":
        # recurrent mixers read a 2D padding mask and cannot follow a tree of branches
        return getattr(model.config, "model_type", "") != "radistill_hybrid"
    return packing == "tree"


def forward_hidden(model, packed: PackedBatch) -> Tensor:
    """Final hidden states ``[rows, seq, dim]`` (after the final norm) of a packed batch."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    dtype = next(model.parameters()).dtype
    # causal-only batches: the model builds its own causal mask (and SDPA may use its fastest kernel)
    mask = None if packed.tree and packed.causal_only else packed.attention_mask(dtype)
    out = base(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids, use_cache=False)
    return out.last_hidden_state


@torch.inference_mode()
def choice_logprobs(
    model, items: Sequence[EncodedItem], batch_size: int = 8, packing: str = "auto"
) -> list[Tensor]:
    """Summed log-prob of every choice of every item, ``[num_choices]`` float32 per item, in input order.

    One forward per ``batch_size`` items (tree packing), logits only at scored positions, once per position.
    ``packing``: ``"tree"``, ``"flat"`` (one row per choice, for models without 4D masks) or
    ``"auto"`` (tree unless the model is a radistill hybrid).
    """
    if batch_size < 1:
        raise RadistillError("--batch-size must be at least 1")
    tree = _uses_tree(model, packing)
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    order = sorted(range(len(items)), key=lambda i: items[i].max_length)  # similar lengths share a batch
    results: list[Tensor | None] = [None] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        packed = pack([items[i] for i in chunk], tree=tree).to(device)
        hidden = forward_hidden(model, packed)
        rows = torch.arange(hidden.shape[0], device=device)
        scores = item_choice_logprobs(row_choice_logprobs(hidden, packed, rows, head), packed).cpu()
        for local, index in enumerate(chunk):
            results[index] = scores[local, : len(items[index].choice_ids)]
    return results


@torch.inference_mode()
def naive_choice_logprobs(model, items: Sequence[EncodedItem]) -> list[Tensor]:
    """Reference: one full forward per (item, choice) on ``prompt + choice``, logits everywhere."""
    device = next(model.parameters()).device
    results = []
    for item in items:
        scores = []
        for choice in item.choice_ids:
            ids = torch.tensor([list(item.prompt_ids) + list(choice)], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0].float()
            start = len(item.prompt_ids) - 1
            lp = torch.log_softmax(logits[start : start + len(choice)], dim=-1)
            scores.append(lp.gather(-1, torch.tensor(choice, device=device)[:, None]).sum())
        results.append(torch.stack(scores).cpu())
    return results
