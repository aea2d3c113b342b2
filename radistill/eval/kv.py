"""KV retrieval at several dictionary sizes, scored two ways.

*Log-likelihood* (``kv_ret``, the paper's KV-Ret): multiple choice over the dictionary's values. *Greedy generation*
(``kv_ret_gen``): the model writes the value itself and must match it exactly. A distilled hybrid can rank the
right value first among the dictionary's values yet still not produce it, so the second number catches gaps the
first hides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from radistill.eval.choice import choice_accuracy, context_length, model_device
from radistill.eval.coverage import RETRIEVAL, TaskResult
from radistill.probes.items import ProbeItem, encode_items
from radistill.probes.kv import KVProbeConfig, kv_items


@dataclass(frozen=True)
class KVEvalConfig:
    pairs: tuple[int, ...] = (5, 10, 20, 40)
    samples: int = 64
    seed: int = 1234  # not the scan's default (0): heads are not ranked on the items they are judged on
    generate: bool = True

    def to_dict(self) -> dict:
        return {**asdict(self), "pairs": list(self.pairs)}


def answer_text(item: ProbeItem) -> str:
    return item.choices[item.answer].strip()


def parse_generated(text: str) -> str:
    """The model's answer: its first line, without surrounding space or a closing full stop."""
    return text.split("\n")[0].strip().rstrip(".")


@torch.no_grad()
def greedy_exact_match(model, tokenizer, items: list[ProbeItem], batch_size: int = 16) -> float:
    """Share of items whose greedy continuation (a few tokens, cut at the first newline) is the right answer.

    Prompts are left-padded into batches, as a serving stack would batch them.
    """
    encoded = encode_items(tokenizer, items, max_length=context_length(model))
    new_tokens = max(len(c) for e in encoded for c in e.choice_ids) + 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model_device(model)
    order = sorted(range(len(items)), key=lambda i: len(encoded[i].prompt_ids))
    correct = 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(encoded[i].prompt_ids) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, i in enumerate(batch):
            ids = encoded[i].prompt_ids
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            mask[r, width - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
            do_sample=False, pad_token_id=pad,
        )
        texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        correct += sum(parse_generated(t) == answer_text(items[i]) for t, i in zip(texts, batch))
    return correct / len(items)


def kv_retrieval(model, tokenizer, config: KVEvalConfig = KVEvalConfig(), batch_size: int = 16) -> list[TaskResult]:
    """``kv_ret@N`` (and ``kv_ret_gen@N``) per dictionary size N, then their means ``kv_ret`` (retrieval group)
    and ``kv_ret_gen``."""
    per_size: list[TaskResult] = []
    for pairs in config.pairs:
        items = kv_items(tokenizer, KVProbeConfig(pairs=pairs, samples=config.samples, seed=config.seed))
        per_size.append(TaskResult(f"kv_ret@{pairs}", "acc", choice_accuracy(model, tokenizer, items, batch_size),
                                   samples=len(items)))
        if config.generate:
            value = greedy_exact_match(model, tokenizer, items, batch_size)
            per_size.append(TaskResult(f"kv_ret_gen@{pairs}", "exact_match", value, samples=len(items)))
    means = []
    for name, metric, group in (("kv_ret", "acc", RETRIEVAL), ("kv_ret_gen", "exact_match", None)):
        values = [t.value for t in per_size if t.name.startswith(name + "@")]
        if values:
            means.append(TaskResult(name, metric, sum(values) / len(values), group=group,
                                    samples=config.samples * len(values)))
    return means + per_size
