"""The mixer slot: the contract between the hybrid layer and whatever replaces a group of its attention heads.

A mixer serves some query heads of one decoder layer: it reads the layer's normed hidden states and returns one
``head_dim`` output per head, which the layer puts in teacher head order in front of the teacher's ``o_proj``.
The hybrid layer, the cache, the build, the memory accounting and distillation use a mixer only through what is
written here (docs/hybrid.md, "Writing a mixer"); register a class with :func:`radistill.register_mixer`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from radistill.utils.errors import RadistillError


class RecurrentMixer(nn.Module, ABC):
    """Some heads of one layer: normed hidden states in, per-head outputs (before ``o_proj``) out.

    Construction. ``cls(hidden_size, num_heads, head_dim, **settings)`` builds a fresh mixer (e.g. before loading
    a checkpoint into it); ``cls.from_attention(...)`` builds one from the teacher heads it replaces. ``settings``
    are JSON values (they are stored in the student's config.json), the same for ``__init__``, ``from_attention``
    and ``state_bytes``; ``self.settings`` holds them with every default filled in. ``reset_parameters()``
    re-applies the mixer's own (non-random) initialisation; a mixer initialises itself (transformers' generic init
    is kept off its modules).

    Class attributes the hybrid layer reads (all optional, defaults below):

    - ``needs_positions``: ``forward`` and ``mixing_matrix`` also get ``position_embeddings=(cos, sin)``, each
      ``[batch or 1, seq, head_dim]``, the teacher's RoPE at each token's position (left padding shifts them).
    - ``supports_reset``: ``forward`` and ``mixing_matrix`` take ``reset=[batch, seq] bool`` (packed documents,
      ``data.packing: documents``): nothing crosses a document start. A mixer without it is refused for packing.
    - ``shares_kv``: the mixer keeps the teacher's GQA sharing: ``__init__`` and ``from_attention`` also get
      ``kv_groups`` (per head, which of the heads' distinct teacher KV heads it reads, numbered 0.. in order of
      first appearance) and ``state_bytes`` gets ``kv_heads`` (how many distinct KV heads).
    - ``has_half_lives``: ``set_half_lives`` / ``half_lives`` work (the build sets a per-head decay from the
      teacher's attention distance); otherwise the build leaves the mixer as ``from_attention`` made it.
    - ``calibrate_normalizer``: the build fits the static normaliser on this mixer's heads (a mixer whose fresh
      output already is the teacher head's, e.g. a windowed softmax, sets False and keeps the identity).
    - ``knows_fresh_state``: ``forward`` also takes ``fresh=True`` when its state was made by ``empty_state`` for
      this very call (the cache knows that without reading the device): nothing has been written to it, so a mixer
      whose state is costly to lay out (the window's ring and sinks) may skip reading it.

    Optional methods for a normaliser on one *part* of the mixer (``window_recurrent``'s recurrence): with
    ``part_output(hidden_states, attention_mask, **keywords)`` -> [batch, seq, heads, head_dim] (that part alone)
    and ``calibrate_part(student, teacher)`` (``ChannelMoments`` of part_output and of the replaced teacher heads
    on the calibration tokens), the build and ``stages.1.recalibrate`` fit it (radistill/hybrid/calibrate.py).
    """

    needs_positions: bool = False
    supports_reset: bool = False
    shares_kv: bool = False
    has_half_lives: bool = False
    calibrate_normalizer: bool = True
    knows_fresh_state: bool = False

    num_heads: int  # heads this mixer serves in this layer
    head_dim: int  # = teacher head_dim (their o_proj columns are kept)

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, **settings: Any):
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.settings = settings

    @abstractmethod
    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, state: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """hidden_states [batch, seq, hidden]; attention_mask [batch, seq] (1 = token, 0 = padding) or None;
        state: the dict from empty_state() or a previous call, or None (start empty, keep nothing);
        ``position_embeddings`` keyword if ``needs_positions``; ``reset`` keyword [batch, seq] bool if
        ``supports_reset`` and the input packs documents: where True a new document starts, and nothing from before
        it (state, past inputs) reaches it or anything after it.
        Returns (y [batch, seq, heads, head_dim], state'). With a state, its tensors are advanced in place (the
        cache holds the dict as-is; it may reorder its batch dimension between calls) and the dict is returned.
        Padding never changes the state, and the output at a padded position is never read. Calling once on a
        sequence and calling on consecutive pieces of it with one state give the same outputs (chunked prefill,
        decoding)."""

    def mixing_matrix(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """[batch, heads, seq, seq]: M with y_t = sum_s M[t, s] v_s for the mixer's value stream v (before any
        gate or skip), what MOHAWK stage 1 aligns with the teacher's attention probabilities (the same optional
        ``position_embeddings`` / ``reset`` keywords as ``forward``). Optional: a mixer without one cannot use
        stage 1 (stage 2 and 3 need only ``forward``)."""
        raise NotImplementedError(f"{type(self).__name__} has no mixing matrix: distil it without stage 1")

    @abstractmethod
    def empty_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, Tensor]:
        """The state of ``batch_size`` sequences that have seen nothing: {name: tensor with batch first}."""

    @classmethod
    @abstractmethod
    def from_attention(
        cls, hidden_size: int, q_weight: Tensor, k_weight: Tensor, v_weight: Tensor,
        q_bias: Tensor | None = None, k_bias: Tensor | None = None, v_bias: Tensor | None = None,
        q_norm_weight: Tensor | None = None, k_norm_weight: Tensor | None = None, **settings: Any,
    ) -> RecurrentMixer:
        """A mixer made from the teacher heads it replaces. q/k/v_weight [heads, head_dim, hidden] of the replaced
        query heads (k/v: the rows of each head's GQA KV head, repeated per query head), biases [heads, head_dim]
        or None, q/k_norm_weight [head_dim] the teacher's per-head RMSNorm (Qwen3) or None (a mixer may ignore
        them); settings = the mixer's config (plus ``kv_groups`` if ``shares_kv``). Parameters take q_weight's
        device and dtype."""

    @staticmethod
    @abstractmethod
    def state_bytes(num_heads: int, head_dim: int, dtype_bytes: int, **settings: Any) -> dict[str, int]:
        """Bytes of one sequence's state by part, as empty_state allocates it, e.g. {"ssm": ..., "conv": ...};
        independent of the sequence length (that is what makes the heads cheap)."""

    @classmethod
    def teacher_settings(cls, *, attention_bias: bool, qk_norm: bool, rms_norm_eps: float) -> dict[str, Any]:
        """Settings the build fills in from the teacher's architecture (user settings win); none by default."""
        return {}

    def set_half_lives(self, half_lives: Tensor) -> None:
        """Set each head's initial memory [heads] in tokens (the build sets it from the teacher's attention
        distance when ``has_half_lives``)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-head half-life: build with half_lives='fixed'")

    def half_lives(self) -> Tensor:
        """[heads] each head's initial half-life in tokens (see set_half_lives)."""
        raise NotImplementedError(f"{type(self).__name__} has no per-head half-life")

    def normalized_heads(self) -> list[bool]:
        """Per head, whether the build fits the static normaliser on it (``calibrate_normalizer``)."""
        return [self.calibrate_normalizer] * self.num_heads


def mixer_kwargs(
    mixer: nn.Module, position_embeddings: tuple[Tensor, Tensor] | None, reset: Tensor | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """The optional keywords a mixer's forward / mixing_matrix takes: ``position_embeddings`` if it needs them,
    ``reset`` [B, T] bool when documents are packed (a mixer that cannot reset its state is refused then), ``fresh``
    (forward only) when the state was just made and the mixer ``knows_fresh_state``."""
    kwargs = {"position_embeddings": position_embeddings} if getattr(mixer, "needs_positions", False) else {}
    if fresh and getattr(mixer, "knows_fresh_state", False):
        kwargs["fresh"] = True
    if reset is not None:
        if not getattr(mixer, "supports_reset", False):
            raise RadistillError(f"mixer {type(mixer).__name__} cannot restart at document starts "
                                 "(supports_reset): train it with data.packing: concat")
        kwargs["reset"] = reset
    return kwargs
