"""The hybrid cache: key/values of the kept KV heads only, plus each layer's recurrent-mixer state.

Per decoder layer one :class:`HybridLayerCache` holds

- ``keys`` / ``values`` ``[batch, kept_kv_heads, held, head_dim]`` for the KV heads of the layer's softmax attention
  heads (``config.attention_heads``: the kept heads, unless a ``kept_mixer`` serves them; GQA: one entry per kept KV
  head, shared by its kept query heads); ``None`` in layers without attention heads;
- ``state``: the mixer's state dict (``mixer.empty_state(...)``, e.g. ``{"conv": ..., "ssm": ...}``), advanced in
  place by the mixer; ``None`` in layers without recurrent heads;
- ``seen_tokens``: how many positions (padding included) the layer has consumed, which is what masks need. While
  growing it is a Python int; once static it lives in a 0-d device tensor (``position``) advanced in place, so a
  compiled decode step neither guards on a changing Python number (a recompile per token) nor syncs to read it.

The mixer's SSM state is float32 whatever the model's dtype (its ``empty_state`` decides): the scan accumulates in
float32, and re-rounding the state to bf16 after every one-token step compounds (docs/hybrid.md, "State precision":
15% relative error after 2,000 steps at a 1,024-token half-life, 0.8% in float32). The conv window holds past
*inputs*, exact in the model's dtype, so it stays there.

Keys/values live in one of transformers' cache layers, the one a teacher layer of the same kind would use:
``DynamicLayer`` (grows by concatenation), or after ``make_static(max_length)`` ``StaticLayer`` (preallocated
``[batch, kept_kv_heads, max_length, head_dim]`` buffers written at a device-side position: fixed shapes and
addresses, so a decode step can be captured in a CUDA graph; unwritten slots are excluded by the attention mask,
sized ``max_length``). With a sliding window (Mistral; ``config.sliding_window``) the layers are
``DynamicSlidingWindowLayer`` / ``StaticSlidingWindowLayer``: only the last ``sliding_window - 1`` positions are
kept between steps (the ``sliding_window``-th is the token being decoded), and the mask sizes follow.

:class:`HybridCache` subclasses transformers' ``Cache`` so that ``generate()`` and the mask helpers accept it; its
layer objects are our own (a KV layer is one attribute of them, the recurrent state another), and they use only
what the four transformers layers offer alike in 5.17 and 5.24. The model creates the cache itself on the first
``use_cache`` forward (``_supports_default_dynamic_cache`` is False, as for Mamba-style models), so ``generate()``
never builds a ``DynamicCache`` for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)

from radistill.utils.errors import RadistillError


class HybridLayerCache:
    """One decoder layer's cache entries (see the module docstring).

    ``attention``: whether the layer has kept heads (otherwise it never holds keys/values); ``max_length``: None for
    growing keys/values, or the static buffers' length; ``sliding_window``: the attention window, or None.
    """

    # Attributes transformers' ``Cache`` reads off its layers.
    is_croppable = False  # a recurrent state cannot be rolled back to an earlier position
    supports_early_init = False

    def __init__(self, max_length: int | None = None, sliding_window: int | None = None, attention: bool = True):
        self.max_length = max_length
        self.sliding_window = sliding_window
        self.attention = attention
        self.kv: CacheLayerMixin | None = self._kv_layer()
        self.state: dict[str, torch.Tensor] | None = None
        self._seen = 0  # growing: the count; static: the count at make_static time, `position` takes over
        self.position: torch.Tensor | None = None if max_length is None else torch.zeros((), dtype=torch.long)
        self.is_initialized = False

    @property
    def seen_tokens(self) -> int:
        """Positions consumed so far, as a Python int (static: read from the device, so not inside a decode step)."""
        return self._seen if self.position is None else int(self.position)

    def place(self, device: torch.device) -> None:
        """Static: put ``position`` on the model's device and fix its address, before any step is compiled."""
        if self.position is not None and self.position.device != device:
            self.position = self.position.to(device)
        if self.position is not None and not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.position)

    def _kv_layer(self) -> CacheLayerMixin | None:
        """An empty transformers layer for this layer's keys/values, of the kind ``max_length`` and the window ask."""
        if not self.attention:
            return None
        if self.max_length is None:
            return DynamicLayer() if self.sliding_window is None else DynamicSlidingWindowLayer(self.sliding_window)
        if self.sliding_window is None:
            return StaticLayer(self.max_length)
        return StaticSlidingWindowLayer(self.max_length, self.sliding_window)

    @property
    def is_sliding(self) -> bool:
        return self.kv is not None and self.sliding_window is not None

    @property
    def keys(self) -> torch.Tensor | None:
        """[batch, kept_kv_heads, held, head_dim]: every position so far (static: the whole buffer), or with a
        sliding window the last ``sliding_window - 1`` (static: a ``min(sliding_window, max_length)`` buffer)."""
        return self.kv.keys if self.kv is not None and self.kv.is_initialized else None

    @property
    def values(self) -> torch.Tensor | None:
        """Same layout as :attr:`keys`."""
        return self.kv.values if self.kv is not None and self.kv.is_initialized else None

    @property
    def is_compileable(self) -> bool:
        """Static buffers only. transformers' mask helpers read this too: for a one-token query over a static
        buffer they must build a real mask (unwritten slots) instead of leaving SDPA unmasked."""
        return self.max_length is not None

    def __repr__(self) -> str:
        kv = None if self.keys is None else tuple(self.keys.shape)
        state = None if self.state is None else {k: tuple(v.shape) for k, v in self.state.items()}
        return f"HybridLayerCache(seen={self.seen_tokens}, window={self.sliding_window}, kv={kv}, state={state})"

    # ---- writes (called by the layer's mixer block) --------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``[batch, kept_kv_heads, new, head_dim]`` keys/values; return those this step attends over (past +
        new; static: the whole buffers; sliding: the past the window still reaches + new)."""
        if self.kv is None:
            raise RadistillError("this layer has no kept attention heads, so its cache holds no keys/values")
        self.is_initialized = True
        return self.kv.update(key_states, value_states)

    def check_room(self, new: int) -> None:
        """Raise if ``new`` more positions do not fit a static cache (called outside compiled steps only: it reads
        the device-side position)."""
        if self.max_length is not None and self.kv is not None and self.seen_tokens + new > self.max_length:
            raise RadistillError(
                f"the static hybrid cache holds {self.max_length} positions and is full ({self.seen_tokens} seen, "
                f"{new} new): make it static with a larger max_length"
            )

    def make_static(self, max_length: int) -> None:
        """Move growing keys/values into preallocated buffers of ``max_length`` positions (module docstring)."""
        if self.max_length is not None:
            raise RadistillError("the cache is static already: call make_static once, on a growing cache")
        if max_length < self.seen_tokens:
            raise RadistillError(f"max_length {max_length} is below the {self.seen_tokens} positions already cached")
        seen = self.seen_tokens
        growing, self.max_length = self.kv, max_length
        device = next((t.device for t in self.tensors()), torch.device("cpu"))
        self.position = torch.full((), seen, dtype=torch.long, device=device)
        self.kv = self._kv_layer()
        if growing is None or not growing.is_initialized:
            return
        self.kv.lazy_initialization(growing.keys, growing.values)
        held, slots = growing.keys.shape[-2], self.kv.max_cache_len
        # A full sliding buffer rolls left and writes the new token into its last slot, so the held positions go
        # right-aligned; otherwise the next write goes to slot `held`.
        start = slots - held if seen >= slots else 0
        self.kv.keys[:, :, start : start + held].copy_(growing.keys)
        self.kv.values[:, :, start : start + held].copy_(growing.values)
        self.kv.cumulative_length.fill_(start + held)
        if isinstance(self.kv, StaticSlidingWindowLayer):
            self.kv.cumulative_length_int = seen

    def mixer_state(self, make_empty: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The mixer state, created by ``make_empty()`` (the mixer's ``empty_state``) on first use."""
        if self.state is None:
            self.state = make_empty()
            self.is_initialized = True
            # fixed addresses, which a CUDA graph of the decode step replays on (not markable while tracing)
            if self.max_length is not None and not torch.compiler.is_compiling():
                for tensor in self.state.values():
                    torch._dynamo.mark_static_address(tensor)
        return self.state

    def advance(self, num_tokens: int) -> None:
        if self.position is None:
            self._seen += num_tokens
        else:
            self.position.add_(num_tokens)  # in place: the address a captured step reads stays the same

    # ---- what transformers' Cache asks of a layer ---------------------------------------------------------------

    def get_seq_length(self) -> int | torch.Tensor:
        """Growing: an int. Static: the 0-d device tensor (as transformers' ``StaticLayer`` answers), which the
        mask helpers and position ids use without leaving the device."""
        return self._seen if self.position is None else self.position

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the mask for ``query_length`` new tokens, as the keys/values layer sizes it
        (static: the whole buffer, whose unwritten slots the causal mask excludes; sliding: the window's span). A
        layer without kept heads answers as a growing full-attention layer would."""
        if self.kv is None:
            return self._seen + query_length, 0
        return self.kv.get_mask_sizes(query_length)

    def get_max_length(self) -> int:
        """Positions the cache takes before it refuses more: -1 (no limit) while growing, else ``max_length``."""
        return -1 if self.max_length is None else self.max_length

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds (for byte counting and device moves)."""
        held = [t for t in (self.keys, self.values) if t is not None]
        return held + list((self.state or {}).values())

    def reset(self) -> None:
        self.kv = self._kv_layer()
        self.state = None
        self._seen = 0
        if self.position is not None:
            self.position.zero_()
        self.is_initialized = False

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to the batch dimension (dim 0) of every tensor; mixer states are rewritten in place so that a
        mixer holding a reference to the dict sees the change."""
        def apply(tensor: torch.Tensor) -> torch.Tensor:
            mapped = fn(tensor)
            if self.max_length is not None and mapped.shape == tensor.shape:
                return tensor.copy_(mapped)  # static: keep the addresses a compiled step was traced on
            return mapped

        if self.keys is not None:
            self.kv.keys, self.kv.values = apply(self.kv.keys), apply(self.kv.values)
        if self.state is not None:
            for name, tensor in list(self.state.items()):
                self.state[name] = apply(tensor)

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
    static buffers of ``n`` positions. Layers with attention heads use ``config.sliding_window`` (None: full attention).
    """

    def __init__(self, config, max_length: int | None = None):
        window = getattr(config, "sliding_window", None)
        # Keys/values only where heads really are softmax attention (``attention_heads``): kept heads that a
        # ``kept_mixer`` serves keep their state in the mixer's, like any other mixer head.
        attention = [bool(config.attention_heads(i)) for i in range(config.num_hidden_layers)]
        super().__init__(layers=[HybridLayerCache(max_length, window, attention=a) for a in attention])
        # Every layer with attention heads has the same window and has seen the same tokens, so any of them sizes the
        # masks of all; layers without them hold no keys/values to size anything by.
        self._mask_layer = next((i for i, a in enumerate(attention) if a), 0)

    @property
    def max_length(self) -> int | None:
        """The static buffers' length, or None while growing."""
        return self.layers[0].max_length

    def make_static(self, max_length: int) -> HybridCache:
        """Static keys/values of ``max_length`` positions from now on (e.g. after a prefill); returns self."""
        for layer in self.layers:
            layer.make_static(max_length)
        return self

    def get_seq_length(self, layer_idx: int | None = 0) -> int | torch.Tensor:
        """Positions consumed: an int while growing, a 0-d device tensor once static (see the layer's)."""
        return self.layers[layer_idx or 0].get_seq_length()

    def place(self, device: torch.device) -> None:
        """Static: move the position counters to ``device`` with fixed addresses (before a step is compiled)."""
        for layer in self.layers:
            layer.place(device)

    def check_room(self, new: int) -> None:
        """Raise a clear error when ``new`` positions do not fit a static cache (outside compiled steps)."""
        self.layers[self._mask_layer].check_room(new)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """The mask sizes of the attention layers, whichever ``layer_idx`` transformers' mask helper picked."""
        return self.layers[self._mask_layer].get_mask_sizes(query_length)

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
