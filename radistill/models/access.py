"""What radistill knows about a teacher's architecture: one place, used by scan, build and distill.

A *Llama-like* decoder is any HF causal LM whose decoder layers live in ``model.model.layers`` and whose
attention has ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` with the usual head-major layout
(Llama-2/3.x, Qwen2/2.5, Qwen3, Mistral, Nanbeige, ...). Query head ``h`` reads rows
``h*head_dim:(h+1)*head_dim`` of ``q_proj`` and writes the same columns of ``o_proj``'s input; it shares
key/value head ``h // (num_heads // num_kv_heads)`` with the rest of its GQA group.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from radistill.utils.errors import RadistillError


class UnsupportedModelError(RadistillError):
    """The model loads, but is not a decoder radistill can take apart head by head."""


class ModelLoadError(RadistillError):
    """The model id or path cannot be loaded at all."""


@dataclass(frozen=True)
class HeadLayout:
    """Head bookkeeping of a Llama-like decoder (all counts per layer unless named otherwise)."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    max_positions: int | None = None

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without GQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def total_heads(self) -> int:
        return self.num_layers * self.num_heads

    def kv_head(self, head: int) -> int:
        return head // self.group_size

    def query_heads_of(self, kv_head: int) -> list[int]:
        return list(range(kv_head * self.group_size, (kv_head + 1) * self.group_size))

    def o_proj_slice(self, head: int) -> slice:
        """Columns of ``o_proj.weight`` (= positions of the ``o_proj`` input) that belong to ``head``."""
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def check_head(self, layer: int, head: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise RadistillError(
                f"layer {layer} is out of range: this {self.model_type} model has layers 0..{self.num_layers - 1}"
            )
        if not 0 <= head < self.num_heads:
            raise RadistillError(
                f"head {head} (layer {layer}) is out of range: this {self.model_type} model has query heads "
                f"0..{self.num_heads - 1} per layer"
            )

    def to_dict(self) -> dict:
        return asdict(self)


SUPPORTED = "Llama-like attention decoders (Llama, Qwen2/2.5/3, Mistral and models built like them)"


def require_attention(config) -> None:
    """Raise :class:`UnsupportedModelError` for a config without attention heads (Mamba, RWKV, ...), before its
    weights are loaded: transformers would otherwise fail on the attention implementation asked for."""
    inner = getattr(config, "text_config", None) or config
    if not getattr(inner, "num_attention_heads", None):
        model_type = getattr(inner, "model_type", type(inner).__name__)
        architectures = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
        raise UnsupportedModelError(
            f"'{model_type}' ({architectures}) is not supported: it has no attention heads to scan or keep. "
            f"radistill handles {SUPPORTED}"
        )


def layout_from_config(config) -> HeadLayout:
    """Read the head layout off an HF config (no weights needed)."""
    config = getattr(config, "text_config", None) or config
    model_type = getattr(config, "model_type", type(config).__name__)
    missing = [k for k in ("num_hidden_layers", "num_attention_heads", "hidden_size") if not hasattr(config, k)]
    if missing:
        raise UnsupportedModelError(
            f"'{model_type}' configs lack {', '.join(missing)}: radistill handles Llama-like decoders "
            "(Llama, Qwen2/2.5/3, Mistral and models built like them)"
        )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if heads % kv_heads:
        raise UnsupportedModelError(f"'{model_type}': {heads} query heads do not split into {kv_heads} KV groups")
    return HeadLayout(
        model_type=model_type,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        max_positions=getattr(config, "max_position_embeddings", None),
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-like causal LM, checked for the projections radistill needs."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    name = type(model).__name__
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(
            f"{name} has no `model.layers`: radistill handles Llama-like decoders whose layers are "
            "`model.model.layers[i].self_attn.{q,k,v,o}_proj` (Llama, Qwen2/2.5/3, Mistral, ...)"
        )
    attn = getattr(layers[0], "self_attn", None)
    missing = [p for p in ("q_proj", "k_proj", "v_proj", "o_proj") if not isinstance(getattr(attn, p, None), nn.Linear)]
    if attn is None or missing:
        raise UnsupportedModelError(
            f"{name}: its layers' attention lacks separate {', '.join(missing) or 'self_attn'} linear layers "
            "(fused QKV or a different attention design); radistill needs `self_attn.{q,k,v,o}_proj`"
        )
    return layers


def hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer or attention module was called with, from a forward pre-hook's
    ``(args, kwargs)`` (transformers passes them by keyword, older or custom code positionally)."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def attention_of(model: nn.Module, layer: int) -> nn.Module:
    return decoder_layers(model)[layer].self_attn


def model_layout(model: nn.Module) -> HeadLayout:
    """Layout of a loaded model, with its weights checked against the config's head counts."""
    layers = decoder_layers(model)
    layout = layout_from_config(model.config)
    attn = layers[0].self_attn
    q_out, o_in = attn.q_proj.out_features, attn.o_proj.in_features
    kv_out = attn.k_proj.out_features
    if q_out != layout.num_heads * layout.head_dim or o_in != q_out:
        raise UnsupportedModelError(
            f"{type(model).__name__}: q_proj has {q_out} outputs and o_proj {o_in} inputs, expected "
            f"{layout.num_heads} heads x {layout.head_dim} = {layout.num_heads * layout.head_dim}"
        )
    if kv_out != layout.num_kv_heads * layout.head_dim:
        raise UnsupportedModelError(
            f"{type(model).__name__}: k_proj has {kv_out} outputs, expected {layout.num_kv_heads} KV heads x "
            f"{layout.head_dim}"
        )
    return layout


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise RadistillError(f"unknown dtype '{dtype}': use one of fp32, bf16, fp16, auto")
    return table[dtype]


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RadistillError(f"--device {device} was asked for, but torch sees no CUDA device; use --device cpu")
    return device


GGUF_SEPARATOR = "::"


def gguf_source(model_id: str | os.PathLike) -> tuple[str, str] | None:
    """``(directory or hub id, file name)`` when ``model_id`` names a GGUF file, else ``None``.

    Two spellings: a path ending in ``.gguf`` (``models/smollm2.Q4_1.gguf``) and ``DIR::FILE.gguf`` (a hub
    repo or directory plus the file in it, the two arguments of transformers' ``gguf_file=``).
    """
    text = str(model_id)
    if GGUF_SEPARATOR in text:
        where, _, name = text.rpartition(GGUF_SEPARATOR)
        if not name.lower().endswith(".gguf") or not where:
            raise ModelLoadError(f"'{text}': the DIR::FILE form is for GGUF files, e.g. 'models::smollm2.Q4_1.gguf'")
        return where, name
    if text.lower().endswith(".gguf"):
        path = Path(text)
        return str(path.parent), path.name
    return None


def _pretrained_args(model_id: str | os.PathLike) -> tuple[str, dict]:
    """What ``from_pretrained`` takes for ``model_id``: the id/directory and, for GGUF, ``gguf_file``.

    transformers reads a GGUF file's config, tokenizer and (dequantised) weights itself; it needs the
    ``gguf`` package for that, which is an optional extra here, so its absence gets a one-line error.
    """
    source = gguf_source(model_id)
    if source is None:
        return str(model_id), {}
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise ModelLoadError(f"'{model_id}' is a GGUF file; reading it needs the gguf package: "
                             "pip install radistill[gguf]")
    where, name = source
    if Path(where).is_dir() and not (Path(where) / name).is_file():
        raise ModelLoadError(f"'{model_id}': there is no GGUF file '{name}' in {where}")
    return where, {"gguf_file": name}


def load_config(model_id: str | os.PathLike):
    """The HF config of a model id, local directory or GGUF file, or a clear error."""
    from transformers import AutoConfig

    where, extra = _pretrained_args(model_id)
    try:
        config = AutoConfig.from_pretrained(where, **extra)
    except Exception as exc:  # transformers raises OSError, ValueError, HFValidationError, ...
        raise ModelLoadError(_load_hint(model_id, exc)) from exc
    if extra:
        # A GGUF config is named after the file's general.name ("Smollm2 135M ..."); records (scan results,
        # selection.json, plans) should name what loads it again.
        config._name_or_path = str(model_id)
    return config


def load_tokenizer(model_id: str | os.PathLike):
    """The tokenizer of a model id, local directory or GGUF file (read from the file's metadata)."""
    from transformers import AutoTokenizer

    where, extra = _pretrained_args(model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    except Exception as exc:  # transformers raises OSError, ValueError, ... for a missing or broken tokenizer
        raise ModelLoadError(f"'{model_id}' has no usable tokenizer: {exc}") from exc
    if extra:
        tokenizer.name_or_path = str(model_id)
    return tokenizer


def _load_hint(model_id, exc: Exception) -> str:
    where = Path(str(model_id))
    if gguf_source(model_id) is not None:
        return f"could not read the GGUF file '{model_id}': {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if where.exists() and where.is_dir() and not (where / "config.json").exists():
        return f"'{model_id}' is a directory without config.json: point at a saved HF model directory"
    if where.exists():
        return f"could not load '{model_id}': {exc}"
    return (
        f"could not load '{model_id}': it is not a local directory and the hub could not provide it "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Pass a local path, or set "
        "HF_HOME to a cache that holds the model when offline"
    )


def load_model(
    model_id: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    attn_implementation: str | None = None,
):
    """Load a causal LM and its tokenizer from an HF id, local directory or GGUF file (see :func:`gguf_source`).

    A GGUF file is dequantised by transformers to ``dtype`` (a Q4 file loads as a plain float model).
    Returns ``(model, tokenizer)``, the model in eval mode on ``device``. Raises :class:`ModelLoadError`
    when nothing can be loaded and :class:`UnsupportedModelError` when the model is not Llama-like.
    """
    # A student directory loads through the Auto classes because radistill/__init__.py registers the hybrid with
    # them, and it runs before any radistill module; this ground module does not import the hybrid wing.
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    config = load_config(model_id)
    where, kwargs = _pretrained_args(model_id)
    kwargs["dtype"] = torch_dtype
    if "gguf_file" not in kwargs:
        # safetensors only: a pickled pytorch_model.bin could run code when unpickled, so it is never loaded
        kwargs["use_safetensors"] = True
    if attn_implementation:
        require_attention(config)
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(where, config=config, **kwargs)
    except Exception as exc:
        raise ModelLoadError(_load_hint(model_id, exc)) from exc
    if "gguf_file" in kwargs:
        model.config._name_or_path = str(model_id)
    tokenizer = load_tokenizer(model_id)
    model.to(device).eval()
    return model, tokenizer


def weights_fingerprint(model: nn.Module, sample: int = 4096) -> str:
    """A short, cheap fingerprint of the weights: sha256 over names, shapes and a strided sample of values.

    Two different checkpoints of one architecture get different fingerprints; it is not a full content hash.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        values = flat[::step][:sample].float().cpu().numpy().tobytes()
        digest.update(json.dumps([name, list(param.shape), str(param.dtype)]).encode())
        digest.update(values)
    return digest.hexdigest()[:16]
