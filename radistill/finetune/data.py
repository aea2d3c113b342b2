"""Fine-tuning data: prompt/answer pairs (loss on the answer only) or plain text (loss on every token).

``--data FILE``: a ``.jsonl`` whose records have ``prompt`` and ``answer`` is a teaching task; anything else is
text, read and packed by :class:`radistill.distill.data.PackedStream` (``.txt``, ``.txt.xz``, ``.jsonl`` with a
``text`` field, ``.parquet``, HF dataset ids). From Python, :func:`document_batches` trains on short documents held
in memory (one per row, loss on every token), e.g. statements a benchmark generates, and :func:`marked_batches` on
documents whose loss falls on marked pieces only (several answers in one document). :func:`with_replay` puts steps
of general text between a task's steps (``--replay TEXT --replay-share S``), against forgetting.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from radistill.utils.errors import RadistillError

IGNORE = -100  # label of positions that carry no loss (prompt, padding)


@dataclass(frozen=True)
class Pair:
    prompt: str
    answer: str


def is_pairs_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a JSONL file whose first record has ``prompt`` and ``answer``."""
    path = Path(path)
    if not path.name.endswith(".jsonl") or not path.is_file():
        return False
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                return isinstance(record, dict) and {"prompt", "answer"} <= set(record)
    return False


def load_pairs(path: str | os.PathLike) -> list[Pair]:
    """One ``{"prompt": ..., "answer": ...}`` object per line (the answer is appended to the prompt as is)."""
    pairs = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                pairs.append(Pair(str(record["prompt"]), str(record["answer"])))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise RadistillError(f"{path}:{number}: expected {{\"prompt\": ..., \"answer\": ...}} ({exc})") from exc
    if not pairs:
        raise RadistillError(f"{path} holds no prompt/answer pairs")
    return pairs


def encode_pair(tokenizer, pair: Pair, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are the ids on the answer's tokens and IGNORE on the prompt's."""
    prompt = tokenizer(pair.prompt).input_ids
    whole = tokenizer(pair.prompt + pair.answer).input_ids
    if whole[: len(prompt)] != prompt:  # a token merged across the boundary: encode the answer on its own
        whole = prompt + tokenizer(pair.answer, add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        whole = whole + [tokenizer.eos_token_id]  # teaches the model to stop after the answer
    if len(whole) > max_length:
        raise RadistillError(f"a prompt/answer pair is {len(whole)} tokens, over --seq-len {max_length}: raise "
                             "--seq-len or shorten the pair")
    return whole, [IGNORE] * len(prompt) + whole[len(prompt):]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``{"input_ids", "attention_mask", "labels"}`` [batch, longest]."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (row_ids, row_labels) in enumerate(rows):
        ids[r, : len(row_ids)] = torch.tensor(row_ids)
        labels[r, : len(row_labels)] = torch.tensor(row_labels)
        mask[r, : len(row_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_marked(tokenizer, pieces: Sequence[tuple[str, bool]], max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a text made of ``(piece, scored)`` pieces: the loss on the scored pieces' tokens only
    (and on the closing EOS when the last piece is scored), e.g. several questions in one document, each answer
    a target and everything else context.

    Each piece's tokens are those the whole text so far gives after the previous pieces' (as :func:`encode_pair`
    does for its answer); where a token merges across a boundary the piece is encoded on its own instead.
    """
    ids: list[int] = []
    labels: list[int] = []
    text = ""
    for piece, scored in pieces:
        text += piece
        whole = tokenizer(text).input_ids
        if whole[: len(ids)] != ids:
            whole = ids + tokenizer(piece, add_special_tokens=False).input_ids
        new = whole[len(ids):]
        labels += new if scored else [IGNORE] * len(new)
        ids = whole
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
        labels = labels + [tokenizer.eos_token_id if pieces and pieces[-1][1] else IGNORE]
    if len(ids) > max_length:
        raise RadistillError(f"a document is {len(ids)} tokens, over --seq-len {max_length}: raise --seq-len or "
                             "shorten it")
    if all(label == IGNORE for label in labels):
        raise RadistillError("a document has no scored piece: mark at least one piece (piece, True)")
    return ids, labels


def _shuffled(encoded: list[tuple[list[int], list[int]]], tokenizer, batch_size: int, seed: int
              ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches of encoded rows (a new order every epoch)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rng = random.Random(seed)
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        size = min(batch_size, len(order))  # fewer rows than a batch: every batch is all of them
        for start in range(0, len(order) - size + 1, size):
            yield collate([encoded[i] for i in order[start : start + size]], pad)


def pair_batches(tokenizer, pairs: list[Pair], batch_size: int, max_length: int, seed: int = 0
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches of pairs (a new order every epoch)."""
    return _shuffled([encode_pair(tokenizer, p, max_length) for p in pairs], tokenizer, batch_size, seed)


def marked_batches(tokenizer, documents: list[Sequence[tuple[str, bool]]], batch_size: int, max_length: int,
                   seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches of documents given as ``(piece, scored)`` pieces (:func:`encode_marked`), one per
    row, the loss on the scored pieces only."""
    if not documents:
        raise RadistillError("marked_batches: no documents to train on")
    return _shuffled([encode_marked(tokenizer, d, max_length) for d in documents], tokenizer, batch_size, seed)


def document_batches(tokenizer, texts: list[str], batch_size: int, max_length: int, seed: int = 0
                     ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches of in-memory documents, one per row (right-padded), loss on every token.

    Short documents are not packed: each starts its own row after the tokenizer's beginning-of-text token, as a
    question about it would at evaluation, and ends with EOS. A document is a pair with an empty prompt, so the
    loss and the checks are :func:`pair_batches`'s.
    """
    if not texts:
        raise RadistillError("document_batches: no documents to train on")
    return pair_batches(tokenizer, [Pair("", text) for text in texts], batch_size, max_length, seed)


def text_batches(tokenizer, source: str, batch_size: int, seq_len: int, seed: int = 0, heldout_docs: int = 0
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Endless packed text batches (every token is a target; documents are separated by EOS). ``heldout_docs``:
    documents left out as radistill's evaluations hold them out (``DataConfig``'s rule; 0: train on all)."""
    from radistill.distill.data import PackedStream
    from radistill.distill.recipe import DataConfig

    stream = PackedStream(DataConfig(source=source, heldout_docs=heldout_docs), tokenizer, seq_len, seed=seed)
    while True:
        ids = stream.next_batch(batch_size)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def replay_batches(tokenizer, source: str, batch_size: int, seq_len: int, seed: int = 0
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """Packed text for :func:`with_replay`, without the documents radistill's evaluations hold out
    (``DataConfig``'s rule), so that perplexity measured on the same text stays clean."""
    from radistill.distill.recipe import DataConfig

    return text_batches(tokenizer, source, batch_size, seq_len, seed, heldout_docs=DataConfig().heldout_docs)


def with_replay(task: Iterator[dict[str, torch.Tensor]], replay: Iterator[dict[str, torch.Tensor]], share: float,
                seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Each step's batch from ``replay`` with probability ``share`` (one fixed draw per ``seed``), else from ``task``.

    Rehearsal: a narrow task (a few hundred statements, one list format) trained alone pulls the whole model toward
    it and the rest is forgotten -- on teacher-19m's student every learning run without it raised held-out
    perplexity from ~37 to 100-3,500 (benchmarks/results/lora_learning-cpu-*.md). Steps of general text between the
    task's steps keep the model's language modelling in the loss. Whole steps rather than mixed rows: the two
    streams have different lengths and loss masks, and each batch keeps its own."""
    if not 0.0 <= share < 1.0:
        raise RadistillError(f"the replay share must be in [0, 1) (got {share}): it is the fraction of steps on "
                             "general text, the rest train the task")
    draw = random.Random(seed)
    while True:
        yield next(replay) if draw.random() < share else next(task)


def batches(tokenizer, source: str, batch_size: int, seq_len: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Pairs or text batches, by what ``source`` holds (module docstring)."""
    if is_pairs_file(source):
        return pair_batches(tokenizer, load_pairs(source), batch_size, seq_len, seed)
    return text_batches(tokenizer, source, batch_size, seq_len, seed)


__all__ = ["IGNORE", "Pair", "batches", "collate", "document_batches", "encode_marked", "encode_pair", "is_pairs_file",
           "load_pairs", "marked_batches", "pair_batches", "replay_batches", "text_batches",
           "with_replay"]
