"""Write a Llama HF model and its byte-level BPE tokenizer as an unquantised GGUF file.

Reading GGUF is transformers' job (``from_pretrained(dir, gguf_file=...)``, reached through
:func:`radistill.models.access.load_model`). This writer exists so tests and ``--quick`` benchmarks can make a
small GGUF teacher without llama.cpp: it writes what llama.cpp's ``convert_hf_to_gguf.py`` writes for a Llama
(the same metadata keys, tensor names from ``gguf``'s own name map, and q/k rows permuted to GGML's rotary
layout, which transformers' reader permutes back). Only F32/F16 tensors: no quantisation.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from radistill.utils.errors import RadistillError


def _require_gguf():
    try:
        import gguf
    except ImportError as exc:
        raise RadistillError("writing GGUF files needs the gguf package: pip install radistill[gguf]") from exc
    return gguf


def _ggml_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows ``[heads*head_dim, in]`` from HF's rotate-half order to GGML's interleaved pairs.

    Same as llama.cpp's ``LlamaModel.permute``; transformers' GGUF reader applies the inverse.
    """
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` (a ``LlamaForCausalLM``) and ``tokenizer`` (byte-level BPE, ``tokenizer.json`` style)
    to ``path`` as a GGUF file of ``dtype`` (fp32 or fp16) tensors. Refuses to overwrite an existing file."""
    gguf = _require_gguf()
    import numpy as np

    from radistill.utils.io import atomic_path

    config = model.config
    if config.model_type != "llama":
        raise RadistillError(f"write_gguf writes Llama models only, not '{config.model_type}'")
    if dtype not in (torch.float32, torch.float16):
        raise RadistillError(f"write_gguf writes fp32 or fp16 tensors, not {dtype}")
    path = Path(path)
    if path.exists():
        raise RadistillError(f"'{path}' exists; not overwriting it")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else None
    import json

    spec = json.loads(spec) if spec else {}
    if spec.get("model", {}).get("type") != "BPE":
        raise RadistillError("write_gguf needs a byte-level BPE tokenizer (tokenizer.json with a BPE model)")

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = set(tokenizer.all_special_ids)
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(str(getattr(config, "_name_or_path", "") or "llama"))
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(len(tokens))
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == torch.float32 else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                                for i in range(len(tokens))])
        writer.add_token_merges(merges)
        for name in ("bos", "eos", "pad", "unk"):
            token_id = getattr(tokenizer, f"{name}_token_id", None)
            if token_id is not None:
                getattr(writer, f"add_{name}_token_id")(token_id)
        writer.add_add_bos_token(False)

        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        for key, tensor in model.state_dict().items():
            if tied and key == "lm_head.weight":
                continue  # llama.cpp omits the output matrix of a tied model; the reader ties it back
            target = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise RadistillError(f"write_gguf: no GGUF name for tensor '{key}'")
            tensor = tensor.detach().float().cpu()
            if key.endswith("q_proj.weight"):
                tensor = _ggml_rotary(tensor, heads)
            elif key.endswith("k_proj.weight"):
                tensor = _ggml_rotary(tensor, kv_heads)
            # GGML keeps norms and other 1-D tensors in fp32 even in an F16 file.
            array = tensor.numpy().astype(np.float16 if dtype == torch.float16 and tensor.ndim > 1 else np.float32)
            writer.add_tensor(target, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
