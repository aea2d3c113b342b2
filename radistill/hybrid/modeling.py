"""The head-level Transformer-SSM hybrid, in the order of HF's modeling_llama.

Inside each decoder layer the query heads split in two (``config.kept_heads[layer]``):

    hidden [B, T, D] ─ input_layernorm ─┬─ KeptHeadAttention (kept heads; q rows of those heads, k/v rows of
                                        │    their KV heads, RoPE, qk-norm/bias as the teacher)  -> [B, T, k, hd]
                                        └─ recurrent mixer (every other head) -> StaticNormalizer -> [B, T, r, hd]
                     cat + reorder into teacher head order [B, T, H, hd] -> teacher o_proj (all columns) -> + residual
                     -> post_attention_layernorm -> teacher MLP -> + residual

Layers may keep 0 (pure recurrent), some, or all heads (pure attention). Embeddings, norms, MLPs and ``lm_head``
are the teacher's. The non-attention heads are served by the mixers the config names (``config.mixer_groups``:
``mixer``, ``head_mixers`` groups, ``kept_mixer``), looked up in ``radistill.hybrid.mixers.MIXERS`` (contract:
radistill/hybrid/mixers/base.py, docs/hybrid.md "Writing a mixer"); this file knows nothing else about them.

transformers 5.17 calls the cache argument ``past_key_values``, 5.24 ``cache`` (5.17's name is an alias until
5.40): every forward here accepts both and returns the cache under the installed version's output field name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from radistill.hybrid.cache import HybridCache, HybridLayerCache
from radistill.hybrid.configuration import HybridConfig
from radistill.hybrid.mixers import MIXERS, MixerBank, RecurrentMixer, find_mixer, mixer_kwargs
from radistill.hybrid.normalizer import StaticNormalizer
from radistill.models.packing import document_resets
from radistill.utils.errors import RadistillError

# The output dataclasses' cache field: ``cache`` from transformers 5.24, ``past_key_values`` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(output):
    """The cache of a model output on either transformers version (``output.cache`` / ``output.past_key_values``)."""
    return getattr(output, CACHE_FIELD)


def _pick_cache(cache, past_key_values):
    """The cache under either of its names (5.24: ``cache``; 5.17: ``past_key_values``)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def mixer_class(name: str) -> type[RecurrentMixer]:
    """The registered recurrent mixer class called ``name``."""
    if find_mixer(name) is None:
        raise RadistillError(
            f"unsupported mixer '{name}': registered mixers are {', '.join(sorted(MIXERS)) or '(none)'}; pick one "
            "of them (--mixer), or register one (radistill.register_mixer, or a `radistill.mixers` entry point)"
        )
    return MIXERS[name]


def build_mixer(config: HybridConfig, name: str, settings: dict, heads: list[int],
                kv_groups: list[int] | None = None) -> RecurrentMixer:
    """A freshly initialised mixer ``name`` for the query ``heads`` of one layer (weights come from the
    checkpoint, or from ``MixerClass.from_attention`` at build time); ``kv_groups`` for a K/V-sharing mixer
    (default: the teacher's GQA sharing)."""
    cls = mixer_class(name)
    extra = {"kv_groups": config.kv_groups(heads) if kv_groups is None else kv_groups} if cls.shares_kv else {}
    return cls(hidden_size=config.hidden_size, num_heads=len(heads), head_dim=config.head_dim, **settings, **extra)


def build_mixers(config: HybridConfig, layer_idx: int) -> nn.Module | None:
    """The mixer of one layer's non-attention heads: the one mixer of its one group, a :class:`MixerBank` of
    several groups, or None (every head is attention)."""
    groups = [build_mixer(config, name, settings, heads, kv)
              for (name, settings, heads), kv in zip(config.mixer_groups(layer_idx), config.mixer_kv_groups(layer_idx))]
    if not groups:
        return None
    mixer = groups[0] if len(groups) == 1 else MixerBank(groups)
    # The mixer initialises itself; keep transformers' generic init (normal(0, 0.02) for every nn.Linear, ...)
    # from overwriting that when the model is built from a config.
    for module in mixer.modules():
        module._is_hf_initialized = True
    return mixer


def may_sync() -> bool:
    """Whether this forward may read device values on the host: not while dynamo traces it (a graph break) nor while
    a CUDA graph captures it (a sync is illegal there; ``benchmarks/decode.py`` captures eager steps)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def refuse_inner_padding(attention_mask: torch.Tensor | None, new_tokens: int | None = None) -> bool:
    """Raise if a 2D ``attention_mask`` [B, past+T] has padding between real tokens of a row; return whether it has
    any padding at all (False for None or a mask that is not 2D), or with ``new_tokens`` = T, whether its last T
    columns have (the only ones the recurrent heads read: the cache holds real tokens only).

    Left padding (before a row's first token) and right padding (after its last) are fine: the recurrent heads skip
    padded positions and causality keeps trailing pads from reaching real tokens. Padding *between* tokens is not:
    the cached path skips those positions in the conv window while a full forward's conv reads them as zeros, so the
    two would disagree (reported 44.7 apart in logits) and neither is what the text means."""
    if attention_mask is None or attention_mask.ndim != 2 or bool(attention_mask.all()):
        return False
    real = attention_mask.bool()
    started = real.int().cummax(dim=-1).values.bool()  # a real token at or before this column
    later = real.flip(-1).int().cummax(dim=-1).values.flip(-1).bool()  # a real token at or after it
    inner = ~real & started & later
    columns = real if new_tokens is None else real[:, -new_tokens:]
    # one host read for both answers: a second would wait for the device once more
    has_inner, padded = torch.stack([inner.any(), ~columns.all()]).tolist()
    if has_inner:
        row = int(inner.any(dim=-1).nonzero()[0])
        raise RadistillError(
            f"attention_mask row {row} has padding between real tokens (column {int(inner[row].nonzero()[0])}): the "
            "hybrid's recurrent heads support left padding (and trailing padding in a full forward) only; remove "
            "the gaps or pad on the left"
        )
    return padded


class KeptHeadAttention(nn.Module):
    """Softmax attention of one layer's kept query heads: their q rows, the k/v rows of just their KV heads."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_ids = list(config.kept_heads[layer_idx])  # teacher query head ids, ascending
        self.kv_head_ids = config.kv_sources(layer_idx)  # teacher KV head ids, ascending (private_kv: one per head)
        self.num_heads = len(self.head_ids)
        self.num_kv_heads = len(self.kv_head_ids)
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        # Which kept KV head each kept query head reads. When every kept KV head serves the same number of kept
        # query heads, the usual GQA broadcast applies (queries are grouped by KV head since both are ascending);
        # otherwise (e.g. heads {0, 1, 5} with groups of 4) K/V are gathered per query head.
        group = config.num_attention_heads // config.num_key_value_heads
        self._kv_of_head = list(range(self.num_heads)) if config.private_kv else \
            [self.kv_head_ids.index(h // group) for h in self.head_ids]
        if len(set(Counter(self._kv_of_head).values())) == 1:
            self.num_key_value_groups = self.num_heads // self.num_kv_heads
            self.kv_index = None
        else:
            self.num_key_value_groups = 1
            self.register_buffer("kv_index", torch.empty(self.num_heads, dtype=torch.long), persistent=False)
            self.init_buffers()

        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        if config.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def init_buffers(self) -> None:
        """(Re)compute the non-persistent index buffer (also after from_pretrained built the module on meta)."""
        if self.kv_index is not None:
            init.copy_(self.kv_index, torch.tensor(self._kv_of_head, dtype=torch.long))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        layer_cache: HybridLayerCache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [B, T, D] -> (per-head output [B, T, kept, head_dim], attention weights or None)."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape)  # [B, T, kept, hd]
        key_states = self.k_proj(hidden_states).view(hidden_shape)  # [B, T, kept_kv, hd]
        value_states = self.v_proj(hidden_states).view(hidden_shape)  # [B, T, kept_kv, hd]
        if self.q_norm is not None:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states = query_states.transpose(1, 2)  # [B, kept, T, hd]
        key_states = key_states.transpose(1, 2)  # [B, kept_kv, T, hd]
        value_states = value_states.transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if layer_cache is not None:
            key_states, value_states = layer_cache.update(key_states, value_states)  # [B, kept_kv, past+T, hd]
        if self.kv_index is not None:
            key_states = key_states.index_select(1, self.kv_index)  # [B, kept, past+T, hd]
            value_states = value_states.index_select(1, self.kv_index)

        attention_interface: Callable = eager_attention_forward
        if self.config._attn_implementation != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]

        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.config.sliding_window,
            **kwargs,
        )
        return attn_output, attn_weights  # [B, T, kept, hd]


class HybridMixer(nn.Module):
    """A decoder layer's token mixer (``layer.self_attn``): kept attention heads + recurrent heads -> ``o_proj``.

    Public attributes (what distillation and evaluation use): ``kept_heads`` / ``recurrent_heads`` (teacher query
    head ids), ``attention`` (:class:`KeptHeadAttention` or None), ``recurrent`` (the mixer or None),
    ``normalizer`` (:class:`StaticNormalizer` or None), ``o_proj`` (the teacher's, all columns).
    """

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.kept_heads = config.attention_heads(layer_idx)  # softmax attention heads
        self.recurrent_heads = config.mixer_heads(layer_idx)  # mixer heads, in the mixer's output order
        # with a kept mixer, the kept heads are the mixer's first group (``mixer_groups`` order)
        self.kept_mixer_heads = list(config.kept_heads[layer_idx]) if config.kept_mixer is not None else []

        self.attention = KeptHeadAttention(config, layer_idx) if self.kept_heads else None
        if self.recurrent_heads:
            self.recurrent = build_mixers(config, layer_idx)
            self.normalizer = StaticNormalizer(len(self.recurrent_heads), config.head_dim)
        else:
            self.recurrent = self.normalizer = None
        self.o_proj = nn.Linear(
            config.num_attention_heads * config.head_dim, config.hidden_size, bias=config.o_proj_bias
        )

        # Head outputs come out as [kept heads..., recurrent heads...]; `head_order[h]` is where teacher head h sits
        # in that concatenation, so one index_select restores the teacher order that o_proj's columns expect.
        concatenated = self.kept_heads + self.recurrent_heads
        self._head_order = [concatenated.index(h) for h in range(config.num_attention_heads)]
        self.register_buffer("head_order", torch.empty(len(self._head_order), dtype=torch.long), persistent=False)
        # and the inverse, per part: where each kept / recurrent head goes in teacher order (`teacher_order`)
        self.register_buffer("kept_index", torch.empty(len(self.kept_heads), dtype=torch.long), persistent=False)
        self.register_buffer("recurrent_index", torch.empty(len(self.recurrent_heads), dtype=torch.long),
                             persistent=False)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the non-persistent index buffers (also after from_pretrained built the module on meta)."""
        init.copy_(self.head_order, torch.tensor(self._head_order, dtype=torch.long))
        init.copy_(self.kept_index, torch.tensor(self.kept_heads, dtype=torch.long))
        init.copy_(self.recurrent_index, torch.tensor(self.recurrent_heads, dtype=torch.long))

    def teacher_order(self, kept: torch.Tensor, recurrent: torch.Tensor) -> torch.Tensor:
        """kept [B, T, k, hd], recurrent [B, T, r, hd] -> [B, T, H, hd] in teacher head order, each part written once
        into its slots (``teacher_order_reference``, a concatenation then a gather, moves every head twice)."""
        heads = kept.new_empty(*kept.shape[:2], len(self._head_order), kept.shape[-1])
        heads.index_copy_(2, self.kept_index, kept)
        return heads.index_copy_(2, self.recurrent_index, recurrent.to(kept.dtype))

    def teacher_order_reference(self, kept: torch.Tensor, recurrent: torch.Tensor) -> torch.Tensor:
        """The plain version of :meth:`teacher_order` (what the tests compare it with)."""
        return torch.cat([kept, recurrent], dim=2).index_select(2, self.head_order)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        document_reset: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [B, T, D] (normed) -> (mixer output [B, T, D], kept heads' attention weights or None).

        attention_mask: the attention mask as the model prepares it (``HybridModel.layer_kwargs``);
        padding_mask: [B, T] (1 = token, 0 = padding) for the recurrent heads, so padding never enters a state;
        document_reset: [B, T] bool, packed documents: the recurrent state restarts where it is True.
        """
        batch, seq_len, _ = hidden_states.shape
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None

        parts, attn_weights = [], None
        if self.attention is not None:
            if position_embeddings is None:
                raise RadistillError(
                    f"layer {self.layer_idx} has attention heads and needs position_embeddings (cos, sin); get them "
                    "with `model.model.layer_kwargs(hidden_states, attention_mask)`"
                )
            attended, attn_weights = self.attention(
                hidden_states, position_embeddings, attention_mask, layer_cache, **kwargs
            )  # [B, T, kept, hd]
            parts.append(attended)
        if self.recurrent is not None:
            state, fresh = None, False
            if layer_cache is not None:
                fresh = layer_cache.state is None  # made here for this call: nothing has written to it yet
                state = layer_cache.mixer_state(
                    lambda: self.recurrent.empty_state(batch, hidden_states.device, hidden_states.dtype)
                )
            recurrent, _ = self.recurrent(hidden_states, attention_mask=padding_mask, state=state,
                                          **mixer_kwargs(self.recurrent, position_embeddings, document_reset, fresh))
            parts.append(self.normalizer(recurrent))
        if layer_cache is not None:
            layer_cache.advance(seq_len)

        heads = parts[0] if len(parts) == 1 else self.teacher_order(*parts)
        output = self.o_proj(heads.reshape(batch, seq_len, -1))  # [B, T, H, hd] -> [B, T, D]
        return output, attn_weights


class HybridDecoderLayer(GradientCheckpointingLayer):
    """Teacher decoder layer with :class:`HybridMixer` as ``self_attn``; callable standalone (see ``layer_kwargs``)."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.layer_idx = layer_idx
        self.self_attn = HybridMixer(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridCache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        padding_mask: torch.Tensor | None = None,
        past_key_values: HybridCache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """hidden_states [B, T, D] -> [B, T, D]. Masks and RoPE: ``HybridModel.layer_kwargs``."""
        cache = _pick_cache(cache, past_key_values)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            padding_mask=padding_mask,
            cache=cache,
            position_ids=position_ids,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class HybridPreTrainedModel(PreTrainedModel):
    config: HybridConfig
    config_class = HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # Recurrent states cannot be rolled back: generate() refuses assisted decoding instead of producing garbage.
    _is_stateful = True
    _can_record_outputs = {"hidden_states": HybridDecoderLayer}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (HybridMixer, KeptHeadAttention)):
            module.init_buffers()
        elif isinstance(module, StaticNormalizer):
            module.reset_statistics()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: HybridForCausalLM._prepare_cache_for_generation builds a
        # HybridCache (and the model makes one itself on a use_cache forward without a cache).
        return False


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [HybridDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        # whether any layer has softmax heads (then masks are built): fixed with the layers, asked every step
        self.has_attention_heads = any(config.attention_heads(i) for i in range(config.num_hidden_layers))
        self.post_init()

    def layer_kwargs(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridCache | None = None,
    ) -> dict:
        """What every decoder layer needs besides its hidden states, for the whole model or one layer standalone.

        inputs_embeds [B, T, D] (only shape, dtype, device are read); attention_mask [B, past+T] (1 = token) or
        None; position_ids [B or 1, T] or None (then past..past+T-1). Returns ``{"attention_mask": prepared mask
        for the attention implementation, "padding_mask": [B, T] or None, "position_ids", "position_embeddings":
        (cos, sin)}`` and, for packed documents, ``"document_reset"`` [B, T] -- call ``layer(hidden_states, **kwargs)``.

        Packed documents: position ids that restart (without an attention mask or a cache, transformers' rule) make
        the kept heads' mask block-diagonal (transformers' masking utils) and reset the recurrent heads' state at
        each document start, so every document is computed as if alone (radistill/models/packing.py).
        """
        seq_len = inputs_embeds.shape[1]
        # only positions a caller gives can restart (packed documents); checking them costs a device sync
        may_pack = position_ids is not None and attention_mask is None and cache is None
        if position_ids is None:
            # `past` is an int, or for a static cache a 0-d device tensor: added, not passed to arange, so a compiled
            # step does not specialise on it
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(seq_len, device=inputs_embeds.device) + past).unsqueeze(0)

        masks = self.masks(inputs_embeds, attention_mask, cache, position_ids)
        out = {
            "attention_mask": masks["attention"],
            "padding_mask": masks["padding"],
            "position_ids": position_ids,
            "position_embeddings": self.rotary_emb(inputs_embeds, position_ids=position_ids),
        }
        if may_pack:
            positions = position_ids.expand(inputs_embeds.shape[0], -1)
            if find_packed_sequence_indices(positions) is not None:  # transformers' rule, so the masks agree
                out["document_reset"] = document_resets(positions)
        return out

    def masks(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | dict | None,
        cache: HybridCache | None,
        position_ids: torch.Tensor | None,
    ) -> dict:
        """``{"attention": the kept heads' mask as the attention implementation wants it (or None), "padding": [B, T]
        (1 = token) for the recurrent heads, or None}`` for ``inputs_embeds`` [B, T, ...] (only shape, dtype and
        device are read). ``attention_mask`` is a 2D [B, past+T] mask, an already prepared 4D mask (then no padding
        is known), or such a dict already (what ``generate`` prepares ahead of a compiled step), returned as is."""
        if isinstance(attention_mask, dict):
            return attention_mask
        causal_mask = None
        if self.has_attention_heads:
            make_mask = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
            # Positional on purpose: the 4th parameter is `past_key_values` in 5.17 and `cache` in 5.24.
            causal_mask = make_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)
        padding_mask = None
        if attention_mask is not None and attention_mask.ndim == 2:
            padding_mask = attention_mask[:, -inputs_embeds.shape[1] :]  # the new tokens' columns
        return {"attention": causal_mask, "padding": padding_mask}

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: HybridCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = _pick_cache(cache, past_key_values)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if self.gradient_checkpointing and self.training:
            use_cache = False
        if cache is not None and not isinstance(cache, HybridCache):
            # A generic transformers cache (e.g. a DynamicCache a caller made) cannot hold mixer states.
            if cache.get_seq_length() > 0:
                raise RadistillError(
                    f"got a filled {type(cache).__name__}; the hybrid model needs its own cache: pass "
                    "radistill.hybrid.HybridCache(model.config) or let the model create one (use_cache=True)"
                )
            cache = None
            use_cache = True
        if use_cache and cache is None:
            cache = HybridCache(self.config)
        padded = True
        if may_sync():  # checks that read device values stay out of compiled and captured decode steps
            if cache is not None:
                cache.place(inputs_embeds.device)
                cache.check_room(inputs_embeds.shape[1])
            if not isinstance(attention_mask, dict):
                padded = refuse_inner_padding(attention_mask, new_tokens=inputs_embeds.shape[1])

        layer_kwargs = self.layer_kwargs(inputs_embeds, attention_mask, position_ids, cache)
        if not padded:
            # The check above read the mask anyway: when the new tokens are all real (no padding at all, or a decode
            # step after a left-padded prompt), the recurrent heads skip their masking: they read only the new
            # tokens' columns, and on all-ones columns it is a no-op costing a few kernels per layer (masked fills,
            # the conv state's top-k and sort, the window ring's read-back).
            layer_kwargs["padding_mask"] = None
        hidden_states = inputs_embeds
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(hidden_states, cache=cache, use_cache=use_cache, **layer_kwargs, **kwargs)

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache})


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # A one-token step on a static HybridCache traces as one graph (tests/test_generate.py checks fullgraph=True).
    _can_compile_fullgraph = True

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode=None, batch_size: int = 1,
        max_cache_length: int | None = None, *args, **kwargs,
    ) -> None:
        """generate()'s cache: a :class:`HybridCache`, static (``max_length`` positions) for
        ``cache_implementation="static"``, growing for None/"dynamic"; a cache passed in is used as it is.

        A static cache makes ``generate`` compile the decode step (transformers' auto-compile: the cache reports
        ``is_compileable``, and the model runs on an accelerator): one graph, with CUDA graphs under its default
        ``reduce-overhead`` mode. Other cache implementations (quantized, offloaded) hold key/values only and are
        refused."""
        name = CACHE_FIELD  # where generate() looks for it: `cache` from 5.24, `past_key_values` before
        passed = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        implementation = generation_config.cache_implementation
        if passed is not None:
            if implementation is not None:
                raise ValueError("pass either `cache_implementation` or a cache object to generate(), not both")
            passed._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        if implementation in (None, "dynamic"):
            model_kwargs[name] = HybridCache(self.config)
            return
        if implementation != "static":
            raise RadistillError(
                f"cache_implementation={implementation!r} is not supported by the hybrid model: use 'static' (fixed "
                "buffers; generate compiles the decode step) or 'dynamic' (the default growing cache)"
            )
        length = max(max_cache_length or 0, getattr(generation_config, "max_cache_len", None) or 0)
        # as transformers does for its StaticCache: never shrink between calls, so a compiled step's shapes stay
        length = max(length, getattr(self, "_previous_max_cache_length", -1))
        self._previous_max_cache_length = length
        model_kwargs[name] = HybridCache(self.config, max_length=length)

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, *args, **kwargs) -> dict:
        """What generate() calls, outside the compiled step, to prepare a step's masks for a static cache: both the
        kept heads' mask and the recurrent heads' padding columns (transformers' own version would drop the latter:
        a 4D mask says nothing the recurrent heads can use), which a one-token decode step needs not: None there.
        The cache comes as ``cache`` (5.24) or
        ``past_key_values`` (5.17). On the first step a padded prompt must be left-padded: a generated token after
        trailing padding would be padding in the middle of the sequence."""
        cache = kwargs.get("cache", kwargs.get("past_key_values", args[0] if args else None))
        if attention_mask is not None and attention_mask.ndim == 2 and kwargs.get("is_first_iteration", False):
            refuse_inner_padding(torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], -1))
        masks = self.model.masks(inputs_embeds, attention_mask, cache, kwargs.get("position_ids"))
        if not kwargs.get("is_first_iteration", False) and inputs_embeds.shape[1] == 1:
            # A decode step: generate feeds one generated token, always real (it never feeds padding after the
            # prompt, and the first step refused padding that a token would follow), so the recurrent heads need no
            # padding column. Its masking would be a no-op that costs kernels every token: the conv state's top-k
            # and sort (~15% of a compiled 1B-shaped decode step on the H200 at batch 16, 8k context), masked
            # fills, the window ring's read-back. Decided from the call, not the mask: no host read. The prefill
            # (each chunk of a chunked one too) keeps its padding columns.
            masks["padding"] = None
        elif masks["padding"] is not None:
            # A copy with standard strides: the slice's row stride is the growing 2D mask's length, which changes
            # every token. transformers 5.17 passes the slice on as it is; 5.24 calls `.contiguous()`, which keeps
            # it at batch 1 (a size-1 dim's stride does not count). The compiled step would see a new stride per
            # token: dynamo recompiles with a symbolic stride and CUDA graph trees record one graph per value.
            masks["padding"] = masks["padding"].clone(memory_format=torch.contiguous_format)
        return masks

    def generate(self, inputs: torch.Tensor | None = None, *args, graph_decode: bool | str | None = None, **kwargs):
        """transformers' generate(); with ``cache_implementation="static"`` on CUDA, a greedy call that needs nothing
        else of transformers' loop (no beams, processors, stopping criteria, scores; a streamer is served) runs the
        same search with its decode step replayed as a CUDA graph and no per-token host work
        (radistill/hybrid/graph_decode.py, same tokens). ``graph_decode=False`` always takes transformers' loop;
        ``True`` also runs the loop on CPU, and samples in it (temperature, top-k, top-p); ``"compiled"``: as True,
        with the step's forward compiled by inductor before the capture (a one-off compile per shape; fused kernels
        in the replayed graph)."""
        if graph_decode not in (None, True, False, "compiled"):
            raise RadistillError(f"graph_decode must be None, True, False or 'compiled', got {graph_decode!r}")
        from radistill.hybrid.graph_decode import decode_plan, loop_generate

        plan = None if args else decode_plan(self, inputs, kwargs, graph_decode)
        if plan is None:
            return super().generate(inputs, *args, **kwargs)
        return loop_generate(self, **plan)

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: HybridCache | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [B, T, vocab] (or the last ``logits_to_keep`` positions); the cache comes back under
        ``CACHE_FIELD``."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return output if return_dict is not False else output.to_tuple()


__all__ = [
    "CACHE_FIELD",
    "HybridDecoderLayer",
    "HybridForCausalLM",
    "HybridMixer",
    "HybridModel",
    "HybridPreTrainedModel",
    "KeptHeadAttention",
    "build_mixer",
    "build_mixers",
    "mixer_class",
    "output_cache",
]
