"""The recurrent-mixer slot: what the hybrid layer knows about its recurrent heads (docs/design.md)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn


class RecurrentMixer(nn.Module, ABC):
    """The recurrent heads of one layer: normed hidden states in, per-head outputs (before o_proj) out.

    Built as ``cls(hidden_size, num_heads, head_dim, **settings)`` (fresh, e.g. before loading a checkpoint) or by
    ``cls.from_attention(...)`` (from the teacher heads it replaces); ``settings`` are JSON values, the same for
    ``__init__``, ``from_attention`` and ``state_bytes``, and ``self.settings`` holds them with defaults filled in.
    ``reset_parameters()`` re-applies the mixer's own (non-random) initialisation.
    """

    num_heads: int  # recurrent heads in this layer
    head_dim: int  # = teacher head_dim (their o_proj columns are kept)

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, **settings: Any):
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.settings = settings

    @abstractmethod
    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, state: dict[str, Tensor] | None = None,
        reset: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """hidden_states [batch, seq, hidden]; attention_mask [batch, seq] (1 = token, 0 = padding) or None;
        state: a MixerState from empty_state() or a previous call, or None (start from zeros, keep nothing);
        reset: [batch, seq] bool or None, packed documents: where True a new document starts and nothing from
        before it (state, conv inputs) reaches it or anything after it.
        Returns (y [batch, seq, heads, head_dim], state'). With a state, it is advanced in place and returned.
        Padding never changes the state."""

    @abstractmethod
    def mixing_matrix(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                      reset: Tensor | None = None) -> Tensor:
        """[batch, heads, seq, seq]: M with y_t = sum_s M[t, s] x_s (before gate and D skip): MOHAWK stage 1."""

    @abstractmethod
    def empty_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, Tensor]:
        """The zero state of ``batch_size`` sequences."""

    @classmethod
    @abstractmethod
    def from_attention(
        cls, hidden_size: int, q_weight: Tensor, k_weight: Tensor, v_weight: Tensor,
        q_bias: Tensor | None = None, k_bias: Tensor | None = None, v_bias: Tensor | None = None, **settings: Any,
    ) -> RecurrentMixer:
        """q/k/v_weight [heads, head_dim, hidden] of the replaced query heads (k/v: the rows of each head's GQA
        KV head, repeated per query head); settings = the mixer's config (state_size, conv_width, ...)."""

    @staticmethod
    @abstractmethod
    def state_bytes(num_heads: int, head_dim: int, dtype_bytes: int, **settings: Any) -> dict[str, int]:
        """Bytes of one sequence's state by part, e.g. {"ssm": ..., "conv": ...}."""

    def set_half_lives(self, half_lives: Tensor) -> None:
        """Set each head's initial memory [heads] in tokens (the build sets it from the teacher's attention
        distance); mixers without a per-head decay keep the default, which raises here."""
        raise NotImplementedError(f"{type(self).__name__} has no per-head half-life: build with half_lives='fixed'")

    def half_lives(self) -> Tensor:
        """[heads] each head's initial half-life in tokens (see set_half_lives)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-head half-life")
