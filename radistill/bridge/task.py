"""The ``kv-outside`` task: the KV dictionary is given ONLY to the source; the model sees just the question.

    source (outside text):  Memorize the following dictionary:\\nscallops:84\\n...
    model's own input:      <bos>\\nThe value of the key 'scallops' is

Items reuse the KV probe's words, values and per-tokenizer spacing (:mod:`radistill.probes.kv`), so the value
tokens are the ones the model would write in the in-context probe. Accuracy is multiple choice over the
dictionary's values (sum of the choice's token log-probs, as the probe scores it); chance is 1 / pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from radistill.probes import kv
from radistill.utils.errors import RadistillError


@dataclass
class OutsideItem:
    source_ids: list[int]  # the dictionary, for the source only
    prompt_ids: list[int]  # the question, the model's own context
    choice_ids: list[list[int]]  # each value's tokens after the prompt
    target: int


def outside_items(tokenizer, pairs: int, samples: int, seed: int) -> list[OutsideItem]:
    if not 1 <= pairs <= kv.MAX_PAIRS:
        raise RadistillError(f"--pairs values must be between 1 and {kv.MAX_PAIRS}")
    prefix = kv.value_prefix(tokenizer)
    candidates = kv.value_range(tokenizer, prefix)
    prompt_end, value_start = kv.spacing(tokenizer, prefix)
    if pairs > len(candidates):
        raise RadistillError(f"--pairs must be at most {len(candidates)} for this tokenizer")
    rng = random.Random(seed)
    vocabulary = kv.words()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    items = []
    for _ in range(samples):
        keys = rng.sample(vocabulary, pairs)
        values = rng.sample(candidates, pairs)
        target = rng.randrange(pairs)
        source = kv.HEADER + "".join(f"{k}:{v}\n" for k, v in zip(keys, values))
        prompt = kv.QUESTION.format(key=keys[target]) + prompt_end
        prompt_ids = bos + tokenizer(prompt, add_special_tokens=False).input_ids
        full = [tokenizer(prompt + f"{value_start}{v}", add_special_tokens=False).input_ids for v in values]
        choices = [ids[len(prompt_ids) - len(bos):] for ids in full]
        items.append(OutsideItem(bos + tokenizer(source, add_special_tokens=False).input_ids, prompt_ids,
                                 choices, target))
    return items


def pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``rows`` -> (ids [B, L], mask [B, L] True = real). Right padding is safe for a causal model:
    no real position reads a later pad."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return ids, mask
