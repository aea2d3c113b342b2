"""The hybrid cache: key/values of the kept KV heads only, plus each layer's recurrent-mixer state.

Per decoder layer one :class:`HybridLayerCache` holds

- ``keys`` / ``values`` ``[batch, kept_kv_heads, seen, head_dim]`` for the KV heads of the layer's kept query heads
  (GQA: one entry per kept KV head, shared by its kept query heads); ``None`` in layers without kept heads;
- ``state``: the mixer's state dict (``mixer.empty_state(...)``, e.g. ``{"conv": ..., "ssm": ...}``), advanced in
  place by the mixer; ``None`` in layers without recurrent heads;
- ``seen_tokens``: how many positions (padding included) the layer has consumed, which is what masks need.

Keys/values grow by concatenation (like transformers' ``DynamicCache``), or, after ``make_static(max_length)``,
live in preallocated ``[batch, kept_kv_heads, max_length, head_dim]`` buffers written at a device-side position
(like ``StaticCache``): fixed shapes and addresses, so a decode step can be captured in a CUDA graph. Unwritten
slots are then excluded by the attention mask (sized ``max_length``), never read as keys.

:class:`HybridCache` subclasses transformers' ``Cache`` so that ``generate()`` and the mask helpers accept it, but
overrides everything that would look into ``CacheLayerMixin`` internals: the layer objects here are our own and
the same code runs on transformers 5.17 and 5.24. The model creates the cache itself on the first ``use_cache``
forward (``_supports_default_dynamic_cache`` is False, as for Mamba-style models), so ``generate()`` never builds
a ``DynamicCache`` for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache

from radistill.utils.errors import RadistillError


class HybridLayerCache:
    """One decoder layer's cache entries (see the module docstring)."""

    # Attributes transformers' ``Cache`` reads off its layers.
    is_sliding = False
    is_croppable = False  # a recurrent state cannot be rolled back to an earlier position
    supports_early_init = False

    def __init__(self, max_length: int | None = None):
        self.max_length = max_length  # None: growing keys/values; int: static buffers of this length
        self.keys: torch.Tensor | None = None  # [batch, kept_kv_heads, seen or max_length, head_dim]
        self.values: torch.Tensor | None = None  # [batch, kept_kv_heads, seen or max_length, head_dim]
        self.position: torch.Tensor | None = None  # static: next slot to write, a 0-d device tensor
        self.state: dict[str, torch.Tensor] | None = None
        self.seen_tokens = 0
        self.is_initialized = False

    @property
    def is_compileable(self) -> bool:
        """Static buffers only. transformers' mask helpers read this too: for a one-token query over a static
        buffer they must build a real mask (unwritten slots) instead of leaving SDPA unmasked."""
        return self.max_length is not None

    def __repr__(self) -> str:
        return (
            f"HybridLayerCache(seen={self.seen_tokens}, kv={None if self.keys is None else tuple(self.keys.shape)}, "
            f"state={None if self.state is None else {k: tuple(v.shape) for k, v in self.state.items()}})"
        )

    # ---- writes (called by the layer's mixer block) --------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[batch, kept_kv_heads, new, head_dim]`` keys/values; return all of them (past + new; static:
        the whole buffers)."""
        self.is_initialized = True
        if self.max_length is None:
            if self.keys is None:
                self.keys, self.values = key_states, value_states
            else:
                self.keys = torch.cat([self.keys, key_states], dim=-2)
                self.values = torch.cat([self.values, value_states], dim=-2)
            return self.keys, self.values

        new = key_states.shape[-2]
        if self.seen_tokens + new > self.max_length:
            raise RadistillError(
                f"the static hybrid cache holds {self.max_length} positions and is full ({self.seen_tokens} seen, "
                f"{new} new): make it static with a larger max_length"
            )
        if self.keys is None:
            batch, heads, _, head_dim = key_states.shape
            self.keys = key_states.new_zeros(batch, heads, self.max_length, head_dim)
            self.values = value_states.new_zeros(batch, heads, self.max_length, head_dim)
            self.position = torch.zeros((), dtype=torch.long, device=key_states.device)
        slots = self.position + torch.arange(new, device=key_states.device)
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        self.position.add_(new)
        return self.keys, self.values

    def make_static(self, max_length: int) -> None:
        """Move keys/values into preallocated buffers of ``max_length`` positions (see the module docstring)."""
        if max_length < self.seen_tokens:
            raise RadistillError(f"max_length {max_length} is below the {self.seen_tokens} positions already cached")
        self.max_length = max_length
        if self.keys is not None:
            batch, heads, held, head_dim = self.keys.shape
            keys = self.keys.new_zeros(batch, heads, max_length, head_dim)
            values = self.values.new_zeros(batch, heads, max_length, head_dim)
            keys[:, :, :held], values[:, :, :held] = self.keys[:, :, :held], self.values[:, :, :held]
            self.keys, self.values = keys, values
            self.position = torch.tensor(held, dtype=torch.long, device=keys.device)

    def mixer_state(self, make_empty: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The mixer state, created by ``make_empty()`` (the mixer's ``empty_state``) on first use."""
        if self.state is None:
            self.state = make_empty()
            self.is_initialized = True
        return self.state

    def advance(self, num_tokens: int) -> None:
        self.seen_tokens += num_tokens

    # ---- what transformers' Cache asks of a layer ---------------------------------------------------------------

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the mask for ``query_length`` new tokens: every past position stays (static:
        the whole buffer, whose unwritten slots the causal mask excludes)."""
        if self.max_length is not None:
            return self.max_length, 0
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.max_length is None else self.max_length

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds (for byte counting and device moves)."""
        held = [t for t in (self.keys, self.values) if t is not None]
        return held + list((self.state or {}).values())

    def reset(self) -> None:
        self.keys = self.values = self.state = self.position = None
        self.seen_tokens = 0
        self.is_initialized = False

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to the batch dimension (dim 0) of every tensor; mixer states are rewritten in place so that a
        mixer holding a reference to the dict sees the change."""
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)
        if self.state is not None:
            for name, tensor in list(self.state.items()):
                self.state[name] = fn(tensor)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise RadistillError(
                "the hybrid cache cannot be cropped: recurrent states cannot be rolled back to an earlier position; "
                "use a decoding method without rollback (no assisted/speculative decoding)"
            )

    def offload(self) -> None:
        """Offloading is not supported; transformers only calls this when ``offloading=True``."""

    def prefetch(self) -> None:
        """See :meth:`offload`."""


class HybridCache(Cache):
    """The cache of a :class:`~radistill.hybrid.modeling.HybridForCausalLM` (see the module docstring).

    ``HybridCache(config)`` is empty; tensors appear on the first forward, with that forward's batch size,
    device and dtype. ``HybridCache(config, max_length=n)`` (or ``make_static(n)`` later) keeps keys/values in
    static buffers of ``n`` positions.
    """

    def __init__(self, config, max_length: int | None = None):
        # Which layers get keys/values or a state follows from what the layers write (nothing where they have none).
        super().__init__(layers=[HybridLayerCache(max_length) for _ in range(config.num_hidden_layers)])

    def make_static(self, max_length: int) -> HybridCache:
        """Static keys/values of ``max_length`` positions from now on (e.g. after a prefill); returns self."""
        for layer in self.layers:
            layer.make_static(max_length)
        return self

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.layers[layer_idx or 0].get_seq_length()

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.layers[layer_idx or 0].get_max_length()

    @property
    def is_compileable(self) -> bool:
        return all(layer.is_compileable for layer in self.layers)

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            held = layer.tensors()
            if held:
                return held[0].shape[0]
        return -1

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by kind: ``{"kv": ..., <state name>: ..., "total": ...}`` (state names from the mixer)."""
        sizes: dict[str, int] = {"kv": 0}
        for layer in self.layers:
            for t in (layer.keys, layer.values):
                if t is not None:  # static buffers count whole: that memory is held
                    sizes["kv"] += t.numel() * t.element_size()
            for name, t in (layer.state or {}).items():
                sizes[name] = sizes.get(name, 0) + t.numel() * t.element_size()
        sizes["total"] = sum(sizes.values())
        return sizes


__all__ = ["HybridCache", "HybridLayerCache"]
