"""Tiny random-weight model configs ("debug presets") for tests and dry runs, plus paper-scale shapes.

``tiny_config("llama")`` builds in milliseconds on a CPU; ``shape_config("llama-3.2-1b")`` has a real
model's shapes (random weights are fine for timing and memory work).
"""

from __future__ import annotations

from radistill.utils.errors import RadistillError

_TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

SHAPES = {
    # Llama-3.2-1B: 16 layers x 32 heads, 8 KV heads, head_dim 64
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        tie_word_embeddings=True, rope_theta=500000.0,
    ),
    # Nanbeige4.1-3B: 32 layers x 20 heads, 4 KV heads, head_dim 128, untied, theta 7e7
    "nanbeige4.1-3b": dict(
        model_type="llama", vocab_size=166144, hidden_size=2560, intermediate_size=10496, num_hidden_layers=32,
        num_attention_heads=20, num_key_value_heads=4, head_dim=128, max_position_embeddings=262144,
        tie_word_embeddings=False, rope_theta=7e7,
    ),
}


def _config_class(model_type: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type).__class__
    except ValueError as exc:
        raise RadistillError(f"unknown model type '{model_type}'") from exc


def _build(model_type: str, fields: dict):
    fields = dict(fields)
    theta = fields.pop("rope_theta", 10000.0)
    config = _config_class(model_type)(**fields)
    config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    return config


def tiny_config(model_type: str = "llama", **overrides):
    """A tiny config of ``model_type`` (llama, qwen2, qwen3, mistral) with GQA; ``overrides`` win."""
    fields = {**_TINY, **overrides}
    if model_type == "qwen2":
        fields.setdefault("use_sliding_window", False)
    return _build(model_type, fields)


def shape_config(name: str, **overrides):
    """A config with the shapes of a named real model (see ``SHAPES``)."""
    if name not in SHAPES:
        raise RadistillError(f"unknown shape '{name}': choose from {', '.join(SHAPES)}")
    fields = {**SHAPES[name], **overrides}
    return _build(fields.pop("model_type"), fields)


def random_model(config, seed: int = 0, dtype=None):
    """A causal LM with random weights for ``config`` (seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
