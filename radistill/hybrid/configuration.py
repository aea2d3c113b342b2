"""Configuration of the head-level hybrid: the teacher's Llama-like fields plus, per layer, which heads stay attention.

A student layer splits the teacher's query heads into groups: ``kept_heads[layer]`` stay softmax attention with the
teacher's weights (or, with ``kept_mixer``, become heads of that registered mixer); each entry of ``head_mixers``
gives some other heads to a mixer of its own (e.g. sliding-window heads); every remaining head is a head of the
registered mixer ``mixer`` (settings in ``mixer_settings``). All head outputs, in teacher head order, go through
the teacher's ``o_proj``. A config without ``head_mixers`` / ``kept_mixer`` (every config written before they
existed) means what it always meant: kept heads are attention, all others ``mixer``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from radistill.models.access import HeadLayout
from radistill.utils.errors import RadistillError
from radistill.utils.io import write_text_atomic

MODEL_TYPE = "radistill_hybrid"

# A saved student names a tiny module of its own folder in config.json's auto_map, so that transformers, asked to load
# it without radistill imported, says what to install instead of "upgrade Transformers" (it does not know the
# model_type). The module runs no model code of its own: it imports radistill and re-exports its classes.
LOADER_MODULE = "modeling_radistill"
AUTO_MAP = {name: f"{LOADER_MODULE}.{cls}" for name, cls in (("AutoConfig", "HybridConfig"),
                                                              ("AutoModel", "HybridModel"),
                                                              ("AutoModelForCausalLM", "HybridForCausalLM"))}
INSTALL_HINT = ("this model is a radistill head-level hybrid student: pip install radistill, then `import radistill` "
                "before AutoModelForCausalLM.from_pretrained(path) (no trust_remote_code needed)")
LOADER_SOURCE = f'''"""Loads a radistill student with trust_remote_code=True. The model code is the radistill package's (a
pip-installed library); this file only imports it. Without trust_remote_code: `import radistill` first."""

try:
    import radistill.hybrid as _hybrid
except ImportError as exc:
    raise ImportError({INSTALL_HINT!r}) from exc

HybridConfig = _hybrid.HybridConfig
HybridModel = _hybrid.HybridModel
HybridForCausalLM = _hybrid.HybridForCausalLM
'''


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
    head_mixers: other head groups, each ``{"mixer": name, "settings": {...}, "heads": [[head ids] per layer]}``;
        their heads are neither kept nor ``mixer`` heads (None: no such group).
    kept_mixer: a registered mixer that serves the kept heads instead of the teacher's softmax attention (None:
        softmax attention with a KV cache); ``kept_mixer_settings`` its settings.
    private_kv: each kept query head has its own K/V projection (a copy of its GQA group's, free to diverge in
        training, and its own cached K/V) instead of sharing its group's with the group's other kept heads; with
        ``kept_mixer``, a mixer that shares K/V (``shares_kv``) gets one K/V per kept head likewise.
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
    head_mixers: list[dict[str, Any]] | None = None
    kept_mixer: str | None = None
    kept_mixer_settings: dict[str, Any] | None = None
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
        if self.kept_mixer is not None and self.kept_mixer_settings is None:
            self.kept_mixer_settings = {}
        if self.head_mixers is not None:
            self.head_mixers = [
                {"mixer": g.get("mixer"), "settings": dict(g.get("settings") or {}),
                 "heads": [sorted(int(h) for h in heads) for heads in g.get("heads") or []]}
                for g in self.head_mixers
            ]
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
        for index, group in enumerate(self.head_mixers or []):
            if not isinstance(group["mixer"], str) or len(group["heads"]) != self.num_hidden_layers:
                raise RadistillError(
                    f"head_mixers[{index}] must name a mixer and list head ids for each of the "
                    f"{self.num_hidden_layers} layers ([] where it has none), got {group}"
                )
        for layer in range(self.num_hidden_layers):
            groups = [self.kept_heads[layer]] + [g["heads"][layer] for g in self.head_mixers or []]
            taken = [h for heads in groups for h in heads]
            if len(set(taken)) != len(taken) or any(not 0 <= h < self.num_attention_heads for h in taken):
                raise RadistillError(
                    f"layer {layer}: the kept heads {groups[0]} and head_mixers heads {groups[1:]} must be distinct "
                    f"head ids in 0..{self.num_attention_heads - 1}: give each head to one group"
                )

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """config.json with the ``auto_map`` of the folder's loader module, and that module (``LOADER_SOURCE``)."""
        self.auto_map = dict(AUTO_MAP)
        # loaded through trust_remote_code, transformers would copy radistill's own source files in and repoint
        # auto_map at them; the loader module is the one this folder should name
        self._auto_class = None
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        write_text_atomic(Path(save_directory) / f"{LOADER_MODULE}.py", LOADER_SOURCE)

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
        """Query heads of ``layer`` that are not kept (served by ``mixer`` or a ``head_mixers`` group), ascending."""
        kept = set(self.kept_heads[layer])
        return [h for h in range(self.num_attention_heads) if h not in kept]

    def attention_heads(self, layer: int) -> list[int]:
        """Query heads of ``layer`` that are the teacher's softmax attention (with a KV cache), ascending."""
        return [] if self.kept_mixer is not None else list(self.kept_heads[layer])

    def mixer_groups(self, layer: int) -> list[tuple[str, dict[str, Any], list[int]]]:
        """``(mixer name, settings, query heads)`` of each non-empty mixer group of ``layer``: the kept heads if
        ``kept_mixer``, then each ``head_mixers`` group, then the remaining heads under ``mixer``."""
        groups = []
        if self.kept_mixer is not None:
            groups.append((self.kept_mixer, self.kept_mixer_settings, list(self.kept_heads[layer])))
        for group in self.head_mixers or []:
            groups.append((group["mixer"], group["settings"], list(group["heads"][layer])))
        taken = {h for _, _, heads in groups for h in heads} | set(self.kept_heads[layer])
        groups.append((self.mixer, self.mixer_settings, [h for h in range(self.num_attention_heads) if h not in taken]))
        return [g for g in groups if g[2]]

    def mixer_heads(self, layer: int) -> list[int]:
        """Query heads of ``layer`` served by mixers, in the order the layer's mixers output them (group order)."""
        return [h for _, _, heads in self.mixer_groups(layer) for h in heads]

    def kv_groups(self, heads: list[int]) -> list[int]:
        """Per query head in ``heads``, its teacher KV head numbered 0.. in order of first appearance (GQA)."""
        group = self.num_attention_heads // self.num_key_value_heads
        order = list(dict.fromkeys(h // group for h in heads))
        return [order.index(h // group) for h in heads]

    def kept_kv_heads(self, layer: int) -> list[int]:
        """KV heads of ``layer`` the student keeps (and caches): those of its attention heads, ascending."""
        group = self.num_attention_heads // self.num_key_value_heads
        return sorted({h // group for h in self.attention_heads(layer)})

    def kv_sources(self, layer: int) -> list[int]:
        """The teacher KV head behind each K/V projection (and cached K/V head) of ``layer``'s kept heads: its kept
        KV heads (shared per GQA group), or with ``private_kv`` one per kept query head, that head's KV head."""
        if not self.private_kv:
            return self.kept_kv_heads(layer)
        group = self.num_attention_heads // self.num_key_value_heads
        return [h // group for h in self.attention_heads(layer)]

    def mixer_kv_groups(self, layer: int) -> list[list[int]]:
        """Per mixer group of ``layer`` (``mixer_groups`` order), the ``kv_groups`` a K/V-sharing mixer gets: the
        teacher's GQA sharing, except the kept heads' mixer under ``private_kv`` (one K/V per head)."""
        return [list(range(len(heads))) if self.private_kv and self.kept_mixer is not None and index == 0
                else self.kv_groups(heads) for index, (_, _, heads) in enumerate(self.mixer_groups(layer))]

    @property
    def num_kept_heads(self) -> int:
        return sum(len(heads) for heads in self.kept_heads)


__all__ = ["AUTO_MAP", "HybridConfig", "INSTALL_HINT", "LOADER_MODULE", "MODEL_TYPE"]
