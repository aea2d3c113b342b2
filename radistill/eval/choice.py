"""Multiple-choice accuracy by log-likelihood (the KV probe's scoring, and the user's own JSONL tasks).

A choice's score is the summed log-probability of its tokens after the prompt (``radistill.probes.scoring``:
every choice of an item from one forward); the prediction is the argmax.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from radistill.eval.coverage import TaskResult
from radistill.probes.items import EncodedItem, ProbeItem, encode_items, load_jsonl
from radistill.probes.scoring import choice_logprobs, summarize


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def context_length(model) -> int | None:
    config = getattr(model.config, "text_config", None) or model.config
    return getattr(config, "max_position_embeddings", None)


@torch.inference_mode()
def single_token_logprobs(model, items: list[EncodedItem], batch_size: int = 16) -> list[torch.Tensor]:
    """``[choices]`` log-probs per item whose choices are one token each, all read off one forward of the prompt.

    The KV probe's values are single tokens for most tokenizers. ``choice_logprobs`` packs such items into one row
    for attention models, but for recurrent hybrids (flat packing) it runs the prompt once per choice; this path
    costs one prompt forward per item for any model. Rows are right-padded: a causal model's logits at the last
    real token do not depend on what follows.
    """
    device = model_device(model)
    scores: list[torch.Tensor] = [torch.empty(0)] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt_ids))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(items[i].prompt_ids) for i in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(items[i].prompt_ids)] = torch.tensor(items[i].prompt_ids)
            mask[row, : len(items[i].prompt_ids)] = 1
        lengths = mask.sum(1).to(device)
        hidden = model.get_decoder()(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                     use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(batch), device=device), lengths - 1]  # [batch, hidden]
        logprobs = torch.log_softmax(model.get_output_embeddings()(last).float(), dim=-1).cpu()  # [batch, vocab]
        for row, i in enumerate(batch):
            scores[i] = logprobs[row, [c[0] for c in items[i].choice_ids]]
    return scores


def choice_accuracy(model, tokenizer, items: list[ProbeItem], batch_size: int = 16) -> float:
    """Share of items whose right choice has the highest log-likelihood."""
    encoded = encode_items(tokenizer, items, max_length=context_length(model))
    if all(len(c) == 1 for item in encoded for c in item.choice_ids):
        scores = single_token_logprobs(model, encoded, batch_size)
    else:
        scores = choice_logprobs(model, encoded, batch_size)
    return summarize(scores, [item.answer for item in encoded]).accuracy


def jsonl_task(model, tokenizer, path: str | os.PathLike, group: str | None = None, batch_size: int = 16) -> TaskResult:
    """The user's own multiple-choice task (see :func:`radistill.probes.items.load_jsonl`), named after the file."""
    items = load_jsonl(path)
    accuracy = choice_accuracy(model, tokenizer, items, batch_size)
    return TaskResult(Path(path).stem, "acc", accuracy, group=group, samples=len(items))
