"""Where a bridge's memory comes from: another model's hidden states at a layer, or a chunk autoencoder.

A source turns token ids [B, L] (``mask`` [B, L], True = real) into ``(memory [B, M, d_aug], memory_mask [B, M])``.
Sources are frozen: only the bridge trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from radistill.utils.errors import RadistillError


def parse_source(spec: str) -> tuple[str, str, int]:
    """``MODEL@LAYER`` -> ("model", MODEL, LAYER); ``chunk-ae:K`` -> ("chunk-ae", "", K)."""
    if spec.startswith("chunk-ae:"):
        k = spec.split(":", 1)[1]
        if not k.isdigit() or int(k) < 1:
            raise RadistillError(f"--source {spec!r}: chunk-ae:K needs a whole number K >= 1 (tokens per vector)")
        return "chunk-ae", "", int(k)
    model, sep, layer = spec.rpartition("@")
    if not sep or not model or not layer.lstrip("-").isdigit():
        raise RadistillError(f"--source {spec!r}: give MODEL@LAYER (another model's hidden states after LAYER "
                             "decoder layers, 0 = embeddings) or chunk-ae:K")
    return "model", model, int(layer)


@dataclass
class HiddenStateSource:
    """Hidden states of ``model`` after ``layer`` decoder layers (``hidden_states[layer]``; 0 = embeddings)."""

    model: nn.Module
    layer: int

    def __post_init__(self):
        n = self.model.config.num_hidden_layers
        if not -n - 1 <= self.layer <= n:
            raise RadistillError(f"source layer {self.layer} is out of range: the source model has {n} layers "
                                 f"(hidden states 0..{n})")
        self.model.requires_grad_(False).eval()

    @property
    def d_aug(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        out = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        return out.hidden_states[self.layer], mask


@dataclass
class ChunkSource:
    """One chunk autoencoder latent per K tokens."""

    ae: nn.Module

    def __post_init__(self):
        self.ae.requires_grad_(False).eval()

    @property
    def d_aug(self) -> int:
        return self.ae.config.d_latent

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ae.encode(ids, mask)
