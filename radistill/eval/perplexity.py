"""Perplexity on a text file (``.txt``, ``.txt.xz``, ``.txt.gz``), in windows of the model's context.

Every token but the first is predicted exactly once. By default the windows are packed end to end (overlapping by
the one token whose successor a window predicts first); with a smaller ``stride`` they overlap more and each
window scores only its last ``stride`` tokens, so every prediction sees at least ``seq_len - stride`` tokens of
context (the usual sliding-window perplexity).

Logits are never made for a whole window: the decoder's final states go through the LM head ``LOGIT_CHUNK``
scored positions at a time, each chunk's cross-entropy summed in fp64 before the next is made (a 166k vocabulary
at a 2048-token window and batch 4 would otherwise hold 5 GiB of fp32 logits).
"""

from __future__ import annotations

import gzip
import lzma
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from radistill.eval.choice import context_length, model_device
from radistill.eval.coverage import TaskResult
from radistill.utils.errors import RadistillError

CHARS_PER_TOKEN = 8  # generous: read enough characters to reach max_tokens without tokenising the whole file
LOGIT_CHUNK = 1024  # scored positions per LM head call: bounds the [positions, vocab] logits and their loss


@dataclass(frozen=True)
class PerplexityConfig:
    path: str
    seq_len: int | None = None  # None: the model's context (max_position_embeddings)
    stride: int | None = None  # new targets per window; None: seq_len - 1 (packed windows)
    max_tokens: int = 65536

    def to_dict(self) -> dict:
        return asdict(self)


def read_text(path: str | os.PathLike, max_chars: int | None = None) -> str:
    """The first ``max_chars`` characters of a plain, xz- or gzip-compressed UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise RadistillError(f"text file {path} does not exist: pass a .txt, .txt.xz or .txt.gz file")
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        text = handle.read(max_chars if max_chars is not None else -1)
    if not text.strip():
        raise RadistillError(f"text file {path} is empty")
    return text


def window_spans(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` per window: it reads tokens ``[begin, end)`` and scores targets ``[first, end)``.

    Each window scores the next ``stride`` targets (at most ``seq_len - 1``: a window of ``seq_len`` tokens makes
    ``seq_len - 1`` predictions) and reads as much context before them as fits.
    """
    if not 0 < stride < seq_len:
        raise RadistillError(f"perplexity stride {stride} must be between 1 and the window length - 1 ({seq_len - 1})")
    spans, first = [], 1
    while first < num_tokens:
        end = min(first + stride, num_tokens)
        spans.append((max(0, end - seq_len), end, first))
        first = end
    return spans


def window_batch(ids: torch.Tensor, batch: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [len(batch), widest window]: the windows ``(begin, end, first)`` of ``ids``,
    right-padded with 0s."""
    width = max(end - begin for begin, end, _ in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for r, (begin, end, _) in enumerate(batch):
        input_ids[r, : end - begin] = ids[begin:end]
        mask[r, : end - begin] = 1
    return input_ids, mask


def window_nll(decoder, head, ids: torch.Tensor, batch: list[tuple[int, int, int]], device) -> float:
    """Summed next-token NLL of one batch of windows (``window_spans``), in fp64.

    A function of its own so that its final states and last logits chunk are freed before the next batch's forward.
    """
    input_ids, mask = window_batch(ids, batch)
    hidden = decoder(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
    # every scored (row, position) of the batch, flattened: the state at p predicts token p + 1
    rows = torch.cat([torch.full((end - first,), r) for r, (_, end, first) in enumerate(batch)]).to(device)
    positions = torch.cat([torch.arange(first - 1, end - 1) - begin for begin, end, first in batch]).to(device)
    targets = torch.cat([ids[first:end] for _, end, first in batch]).to(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(targets), LOGIT_CHUNK):
        chunk = slice(i, i + LOGIT_CHUNK)
        logits = head(hidden[rows[chunk], positions[chunk]]).float()
        total += torch.nn.functional.cross_entropy(logits, targets[chunk], reduction="none").double().sum()
    return float(total)


@torch.no_grad()
def perplexity(model, tokenizer, config: PerplexityConfig, batch_size: int = 8) -> TaskResult:
    """exp(mean next-token NLL) over the first ``config.max_tokens`` tokens of the file."""
    seq_len = config.seq_len or context_length(model)
    if not seq_len:
        raise RadistillError("the model's config names no context length: pass --seq-len")
    text = read_text(config.path, config.max_tokens * CHARS_PER_TOKEN)
    ids = torch.tensor(tokenizer(text).input_ids[: config.max_tokens])
    if len(ids) < 2:
        raise RadistillError(f"{config.path} holds fewer than 2 tokens: perplexity needs more text")
    spans = window_spans(len(ids), seq_len, config.stride or seq_len - 1)
    device = model_device(model)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    total_nll = 0.0
    for start in range(0, len(spans), batch_size):
        total_nll += window_nll(decoder, head, ids, spans[start : start + batch_size], device)
    total_targets = len(ids) - 1  # window_spans scores every token but the first once
    value = math.exp(total_nll / total_targets)
    return TaskResult("ppl", "perplexity", value, higher_is_better=False, samples=total_targets)
