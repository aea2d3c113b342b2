"""Configuration of the head-level hybrid: the teacher's Llama-like fields plus, per layer, which heads stay attention.

A student layer splits the teacher's query heads in two: ``kept_heads[layer]`` stay softmax attention with the
teacher's weights, every other head is a recurrent head of the registered mixer ``mixer`` (settings in
``mixer_settings``). All head outputs, in teacher head order, go through the teacher's ``o_proj``.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from radistill.models.access import HeadLayout
from radistill.utils.errors import RadistillError

MODEL_TYPE = "radistill_hybrid"


@strict
class HybridConfig(PreTrainedConfig):
    r"""
    The teacher's architecture fields (named as in ``LlamaConfig``) and the hybrid's own:

    attention_bias: q/k/v projections have biases (Llama with ``attention_bias``, Qwen2).
    o_proj_bias: ``o_proj`` has a bias (Llama with ``attention_bias``; Qwen2 has none there).
    qk_norm: per-head RMSNorm on queries and keys before RoPE (Qwen3).
    sliding_window: one attention window for every layer (Mistral), or None.
    teacher_model_type: the teacher's ``model_type`` (``llama``, ``qwen2``, ``qwen3``, ``mistral``, ...).
    kept_heads: per layer, the ascending query head ids that stay softmax attention (``[]``: pure recurrent layer).
    mixer: name of the recurrent mixer in ``radistill.hybrid.mixers.MIXERS``.
    mixer_settings: keyword settings of that mixer (``state_size``, ``conv_width``, ...), as in its
        ``from_attention`` / ``state_bytes``.
    private_kv: each kept query head has its own K/V projection (a copy of its GQA group's, free to diverge in
        training, and its own cached K/V) instead of sharing its group's with the group's other kept heads.
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    o_proj_bias: bool = False
    qk_norm: bool = False
    mlp_bias: bool = False
    attention_dropout: int | float = 0.0
    sliding_window: int | None = None
    teacher_model_type: str = "llama"
    kept_heads: list[list[int]] | None = None
    mixer: str = "discrete_mamba2"
    mixer_settings: dict[str, Any] | None = None
    private_kv: bool = False

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.kept_heads is None:
            self.kept_heads = [[] for _ in range(self.num_hidden_layers)]
        self.kept_heads = [sorted(int(h) for h in heads) for heads in self.kept_heads]
        if self.mixer_settings is None:
            self.mixer_settings = {}
        super().__post_init__(**kwargs)
        self._check_heads()

    def _check_heads(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise RadistillError(
                f"{self.num_attention_heads} query heads do not split into {self.num_key_value_heads} KV groups: "
                "fix num_key_value_heads in the config"
            )
        if len(self.kept_heads) != self.num_hidden_layers:
            raise RadistillError(
                f"kept_heads lists {len(self.kept_heads)} layers but the model has {self.num_hidden_layers}: give one "
                "list of query head ids per layer ([] for a layer without attention heads)"
            )
        for layer, heads in enumerate(self.kept_heads):
            bad = [h for h in heads if not 0 <= h < self.num_attention_heads]
            if bad or len(set(heads)) != len(heads):
                raise RadistillError(
                    f"kept_heads[{layer}] = {heads} is invalid: head ids must be distinct and in "
                    f"0..{self.num_attention_heads - 1}"
                )

    # ---- derived head bookkeeping (not serialised) -------------------------------------------------------------

    @property
    def layout(self) -> HeadLayout:
        """The teacher's head layout (what the scan and ``access`` speak)."""
        return HeadLayout(
            model_type=self.teacher_model_type,
            num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            num_kv_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_size=self.hidden_size,
            max_positions=self.max_position_embeddings,
        )

    def recurrent_heads(self, layer: int) -> list[int]:
        """Query heads of ``layer`` that are recurrent, ascending."""
        kept = set(self.kept_heads[layer])
        return [h for h in range(self.num_attention_heads) if h not in kept]

    def kept_kv_heads(self, layer: int) -> list[int]:
        """KV heads of ``layer`` the student keeps (and caches): those of its kept query heads, ascending."""
        group = self.num_attention_heads // self.num_key_value_heads
        return sorted({h // group for h in self.kept_heads[layer]})

    def kv_sources(self, layer: int) -> list[int]:
        """The teacher KV head behind each K/V projection (and cached K/V head) of ``layer``'s kept heads: its kept
        KV heads (shared per GQA group), or with ``private_kv`` one per kept query head, that head's KV head."""
        if not self.private_kv:
            return self.kept_kv_heads(layer)
        group = self.num_attention_heads // self.num_key_value_heads
        return [h // group for h in self.kept_heads[layer]]

    @property
    def num_kept_heads(self) -> int:
        return sum(len(heads) for heads in self.kept_heads)


__all__ = ["HybridConfig", "MODEL_TYPE"]
