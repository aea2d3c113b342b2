"""The head-level Transformer-SSM hybrid, in the order of HF's modeling_llama.

Inside each decoder layer the query heads split in two (``config.kept_heads[layer]``):

    hidden [B, T, D] ─ input_layernorm ─┬─ KeptHeadAttention (kept heads; q rows of those heads, k/v rows of
                                        │    their KV heads, RoPE, qk-norm/bias as the teacher)  -> [B, T, k, hd]
                                        └─ recurrent mixer (every other head) -> StaticNormalizer -> [B, T, r, hd]
                     cat + reorder into teacher head order [B, T, H, hd] -> teacher o_proj (all columns) -> + residual
                     -> post_attention_layernorm -> teacher MLP -> + residual

Layers may keep 0 (pure recurrent), some, or all heads (pure attention). Embeddings, norms, MLPs and ``lm_head``
are the teacher's. The recurrent mixer is whatever ``config.mixer`` names in ``radistill.hybrid.mixers.MIXERS``
(contract: docs/design.md, "The recurrent-mixer slot"); this file knows nothing else about it.

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
from radistill.hybrid.mixers import MIXERS, RecurrentMixer
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
    if name not in MIXERS:
        raise RadistillError(
            f"unsupported mixer '{name}': registered mixers are {', '.join(sorted(MIXERS)) or '(none)'}; pick one "
            "of them (--mixer), or register a new one in radistill/hybrid/mixers/__init__.py"
        )
    return MIXERS[name]


def build_recurrent(config: HybridConfig, num_heads: int) -> RecurrentMixer:
    """A freshly initialised mixer for ``num_heads`` recurrent heads of one layer (weights come from the
    checkpoint, or from ``MixerClass.from_attention`` at build time)."""
    mixer = mixer_class(config.mixer)(
        hidden_size=config.hidden_size, num_heads=num_heads, head_dim=config.head_dim, **config.mixer_settings
    )
    # The mixer initialises itself; keep transformers' generic init (normal(0, 0.02) for every nn.Linear, ...)
    # from overwriting that when the model is built from a config.
    for module in mixer.modules():
        module._is_hf_initialized = True
    return mixer


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
        self.kept_heads = list(config.kept_heads[layer_idx])
        self.recurrent_heads = config.recurrent_heads(layer_idx)

        self.attention = KeptHeadAttention(config, layer_idx) if self.kept_heads else None
        if self.recurrent_heads:
            self.recurrent = build_recurrent(config, len(self.recurrent_heads))
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
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the non-persistent ``head_order`` (also after from_pretrained built the module on meta)."""
        init.copy_(self.head_order, torch.tensor(self._head_order, dtype=torch.long))

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
            state = None
            if layer_cache is not None:
                state = layer_cache.mixer_state(
                    lambda: self.recurrent.empty_state(batch, hidden_states.device, hidden_states.dtype)
                )
            reset = {} if document_reset is None else {"reset": document_reset}
            recurrent, _ = self.recurrent(hidden_states, attention_mask=padding_mask, state=state, **reset)
            parts.append(self.normalizer(recurrent))
        if layer_cache is not None:
            layer_cache.advance(seq_len)

        heads = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2).index_select(2, self.head_order)
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
        # generate() must not build a DynamicCache: the model creates its HybridCache on the first forward.
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
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + seq_len, device=inputs_embeds.device).unsqueeze(0)

        causal_mask = None
        if any(self.config.kept_heads):
            make_mask = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
            # Positional on purpose: the 4th parameter is `past_key_values` in 5.17 and `cache` in 5.24.
            causal_mask = make_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)

        padding_mask = None
        if attention_mask is not None and attention_mask.ndim == 2:
            padding_mask = attention_mask[:, -seq_len:]  # the new tokens' columns

        out = {
            "attention_mask": causal_mask,
            "padding_mask": padding_mask,
            "position_ids": position_ids,
            "position_embeddings": self.rotary_emb(inputs_embeds, position_ids=position_ids),
        }
        if may_pack:
            positions = position_ids.expand(inputs_embeds.shape[0], -1)
            if find_packed_sequence_indices(positions) is not None:  # transformers' rule, so the masks agree
                out["document_reset"] = document_resets(positions)
        return out

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

        layer_kwargs = self.layer_kwargs(inputs_embeds, attention_mask, position_ids, cache)
        hidden_states = inputs_embeds
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(hidden_states, cache=cache, use_cache=use_cache, **layer_kwargs, **kwargs)

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache})


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

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
    "build_recurrent",
    "mixer_class",
    "output_cache",
]
