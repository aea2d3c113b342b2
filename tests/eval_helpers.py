"""Models whose evaluation results are known by construction, shared by the evaluation tests."""

from __future__ import annotations

import torch
from torch import nn

from radistill.models.presets import random_model, tiny_config


class ConstantLogits(nn.Module):
    """An lm_head that ignores its input: the same logits at every position, favouring ``token``."""

    def __init__(self, vocab: int, token: int | None):
        super().__init__()
        logits = torch.zeros(vocab)
        if token is not None:
            logits[token] = 20.0
        self.register_buffer("logits", logits)

    def forward(self, hidden):  # [..., hidden] -> [..., vocab]
        return self.logits.expand(*hidden.shape[:-1], -1).to(hidden.dtype)


def constant_model(tokenizer, token: int | None):
    """A tiny Llama whose every next-token distribution is the same, peaked at ``token`` (None: uniform)."""
    model = random_model(tiny_config("llama", vocab_size=len(tokenizer)))
    model.lm_head = ConstantLogits(len(tokenizer), token)
    return model
