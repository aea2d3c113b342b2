"""The hybrid model: teacher equivalence, cache == full forward (left padding), save/load, generate, K=0, GQA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import radistill  # noqa: F401  (Auto-class registration)
from radistill.hybrid import HybridCache, HybridConfig, HybridForCausalLM, output_cache
from radistill.hybrid.build import convert, student_config
from radistill.hybrid.memory import measure_cache_bytes, student_rows
from radistill.models.presets import random_model, tiny_config
from radistill.utils.errors import RadistillError

# tiny presets: 4 query heads in 2 KV groups ({0, 1} -> KV 0, {2, 3} -> KV 1), head_dim 16.
# Layer 0 keeps {0, 1, 3}: KV heads 0 and 1 serve 2 and 1 kept heads (the gathered, non-uniform GQA path);
# layer 1 is pure recurrent; layer 2 keeps one head; layer 3 keeps every head (no recurrent part).
MIXED = [[0, 1, 3], [], [2], [0, 1, 2, 3]]
SETTINGS = {"state_size": 8, "chunk_size": 4}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (biases and norm weights included, which HF's init leaves at 0 / 1)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * 0.1
        param.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return model.eval()


def make_teacher(model_type: str = "llama", **overrides):
    overrides.setdefault("num_hidden_layers", 4)
    return randomize(random_model(tiny_config(model_type, **overrides)))


@torch.no_grad()
def make_student(teacher, kept, settings=SETTINGS) -> HybridForCausalLM:
    """A student via the build path (weights copied, mixers from_attention) with random normaliser statistics."""
    student = convert(teacher, student_config(teacher, kept, "discrete_mamba2", settings))
    generator = torch.Generator().manual_seed(1)
    for layer in student.model.layers:
        norm = layer.self_attn.normalizer
        if norm is not None:
            for name in ("student_mean", "teacher_mean"):
                getattr(norm, name).copy_(torch.randn(norm.student_mean.shape, generator=generator) * 0.1)
            for name in ("student_std", "teacher_std"):
                getattr(norm, name).copy_(torch.rand(norm.student_std.shape, generator=generator) + 0.5)
    return student.eval()


def left_padded(batch: int = 3, length: int = 12, pads=(0, 3, 7), vocab: int = 256):
    """input_ids, attention_mask [batch, length] with ``pads[i]`` left pad positions in row i, and position ids."""
    ids = torch.randint(1, vocab, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pads[:batch]):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, positions


def chunked_logits(model, ids, mask, positions, chunks):
    """Logits [batch, sum(chunks), vocab] of ``ids`` fed in consecutive pieces of ``chunks`` tokens through one
    cache (chunked prefill, then decode steps where a piece is one token), and the cache left."""
    from radistill.hybrid import output_cache

    cache, steps, start = None, [], 0
    with torch.no_grad():
        for size in chunks:
            end = start + size
            out = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end],
                        position_ids=positions[:, start:end], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache, start = output_cache(out), end
    return torch.cat(steps, 1), cache


def assert_generate_is_the_uncached_greedy_continuation(student, prompt: int, new_tokens: int) -> None:
    """``generate`` (its cache) writes the tokens that full forwards over the growing text pick greedily."""
    ids = torch.randint(1, 256, (1, prompt))
    with torch.no_grad():
        generated = student.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        tokens = ids
        for _ in range(new_tokens):
            tokens = torch.cat([tokens, student(input_ids=tokens).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, tokens)


def assert_pieces_equal_the_full_forward(student, chunks) -> None:
    """A left-padded batch of 14 tokens fed in ``chunks`` through one cache gives the full forward's logits at every
    real position, and the cache has counted all 14."""
    from radistill.hybrid import HybridCache

    ids, mask, positions = left_padded(length=14)
    with torch.no_grad():
        full = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    chunked, cache = chunked_logits(student, ids, mask, positions, chunks)
    assert isinstance(cache, HybridCache) and cache.get_seq_length() == 14
    assert (chunked - full)[mask.bool()].abs().max() <= 1e-4


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [("llama", {}), ("llama", {"tie_word_embeddings": True, "attention_bias": True, "num_key_value_heads": 4}),
     ("qwen2", {}), ("qwen3", {}), ("mistral", {"sliding_window": 6})],
)
def test_keeping_every_head_reproduces_the_teacher(model_type, overrides):
    teacher = make_teacher(model_type, num_hidden_layers=2, **overrides)
    student = make_student(teacher, [[0, 1, 2, 3]] * 2)
    ids, mask, positions = left_padded()
    with torch.no_grad():
        expected = teacher(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (got - expected)[real].abs().max() <= 1e-5


def test_student_config_reads_the_teacher_architecture():
    qwen2 = student_config(make_teacher("qwen2", num_hidden_layers=1), [[0]], "discrete_mamba2")
    assert qwen2.attention_bias and not qwen2.o_proj_bias and not qwen2.qk_norm
    qwen3 = student_config(make_teacher("qwen3", num_hidden_layers=1), [[0]], "discrete_mamba2")
    assert qwen3.qk_norm and qwen3.teacher_model_type == "qwen3"
    llama3 = make_teacher("llama", num_hidden_layers=1)
    llama3.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}
    config = student_config(llama3, [[0]], "discrete_mamba2")
    assert config.rope_parameters["rope_type"] == "llama3"


@pytest.mark.parametrize(
    ("model_type", "overrides"), [("llama", {}), ("qwen3", {}), ("mistral", {"sliding_window": 5})]
)
def test_cached_decoding_equals_full_forward_with_left_padding(model_type, overrides):
    teacher = make_teacher(model_type, **overrides)
    student = make_student(teacher, MIXED)
    ids, mask, positions = left_padded(length=14)
    prompt = 9
    with torch.no_grad():
        full = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = student(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], position_ids=positions[:, :prompt],
                      use_cache=True)
        steps, cache = [out.logits], output_cache(out)
        assert isinstance(cache, HybridCache)
        for t in range(prompt, ids.shape[1]):
            out = student(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                          position_ids=positions[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    stepped = torch.cat(steps, dim=1)
    real = mask.bool()
    assert (stepped - full)[real].abs().max() <= 1e-4
    assert cache.get_seq_length() == ids.shape[1]
    # Only the kept KV heads are cached, nothing where a layer keeps no head.
    kv_shapes = [None if layer.keys is None else layer.keys.shape[1] for layer in cache.layers]
    assert kv_shapes == [2, None, 1, 2]
    assert cache.layers[3].state is None and cache.layers[1].state is not None


def test_static_cache_decodes_like_the_growing_one():
    student = make_student(make_teacher(), MIXED)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = student(input_ids=ids).logits
        # prefill with the growing cache, then static buffers (what benchmarks/decode.py does before CUDA graphs)
        out = student(input_ids=ids[:, :8], use_cache=True)
        cache = output_cache(out).make_static(16)
        # and a cache that is static from the start
        static = HybridCache(student.config, max_length=16)
        student(input_ids=ids[:, :8], cache=static, use_cache=True)
        for t in range(8, 12):
            position = torch.full((2, 1), t)
            # an explicit 4D mask over the whole buffer, as a captured decode step passes it
            mask = (torch.arange(16) <= t).view(1, 1, 1, 16).expand(2, 1, 1, 16)
            step = student(input_ids=ids[:, t : t + 1], position_ids=position, attention_mask=mask, cache=cache,
                           use_cache=True).logits
            other = student(input_ids=ids[:, t : t + 1], cache=static, use_cache=True).logits
            assert (step[:, -1] - full[:, t]).abs().max() <= 1e-4
            assert (other[:, -1] - full[:, t]).abs().max() <= 1e-4
    assert cache.layers[0].keys.shape == (2, 2, 16, 16) and int(cache.layers[0].kv.cumulative_length) == 12
    with pytest.raises(RadistillError, match="is full"):
        student(input_ids=torch.randint(0, 256, (2, 5)), cache=static, use_cache=True)


def test_padding_does_not_leak_into_states():
    teacher = make_teacher()
    student = make_student(teacher, MIXED)
    ids, mask, positions = left_padded(length=12, pads=(0, 5))
    with torch.no_grad():
        batched = student(input_ids=ids[:2], attention_mask=mask[:2], position_ids=positions[:2], use_cache=True)
        alone = student(input_ids=ids[1:2, 5:], use_cache=True)
        # a different padding content must change nothing either
        noisy = ids[:2].clone()
        noisy[1, :5] = torch.randint(1, 256, (5,))
        other = student(input_ids=noisy, attention_mask=mask[:2], position_ids=positions[:2])
    assert (batched.logits[1, 5:] - alone.logits[0]).abs().max() <= 1e-4
    assert (batched.logits[1, 5:] - other.logits[1, 5:]).abs().max() <= 1e-5
    for padded_layer, alone_layer in zip(output_cache(batched).layers, output_cache(alone).layers):
        for name, state in (padded_layer.state or {}).items():
            assert torch.allclose(state[1], alone_layer.state[name][0], atol=1e-4)


def test_generate_greedy_left_padded_batch_matches_single_rows_and_no_cache():
    student = make_student(make_teacher(), MIXED)
    student.generation_config.pad_token_id = 0
    ids, mask, _ = left_padded(batch=2, length=10, pads=(0, 4))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    batched = student.generate(input_ids=ids, attention_mask=mask, **kwargs)
    uncached = student.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    alone = student.generate(input_ids=ids[1:, 4:], attention_mask=mask[1:, 4:], **kwargs)
    assert torch.equal(batched, uncached)
    assert torch.equal(batched[1, 10:], alone[0, 6:])


def test_generate_sampling_runs_on_a_left_padded_batch():
    student = make_student(make_teacher(), MIXED)
    ids, mask, _ = left_padded(batch=3, length=8, pads=(0, 2, 5))
    torch.manual_seed(3)
    out = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=20,
                           temperature=0.8, pad_token_id=0, eos_token_id=None)
    assert out.shape == (3, 13)
    beams = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2,
                             num_return_sequences=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert beams.shape == (6, 11)


def test_pure_recurrent_student_k0():
    student = make_student(make_teacher(), [[]] * 4)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        full = student(input_ids=ids).logits
        out = student(input_ids=ids[:, :5], use_cache=True)
        for t in range(5, 9):
            out = student(input_ids=ids[:, t : t + 1], cache=output_cache(out), use_cache=True)
    assert (out.logits[:, -1] - full[:, -1]).abs().max() <= 1e-4
    assert all(layer.keys is None for layer in output_cache(out).layers)
    assert all(layer.self_attn.attention is None for layer in student.model.layers)
    assert student.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (2, 12)


def test_save_load_round_trip(tmp_path):
    teacher = make_teacher("qwen2")
    student = make_student(teacher, MIXED)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, HybridForCausalLM) and isinstance(loaded.config, HybridConfig)
    assert loaded.config.kept_heads == MIXED and loaded.config.mixer_settings["state_size"] == 8
    ids, mask, positions = left_padded()
    with torch.no_grad():
        a = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        b = loaded(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(a, b)


def test_layers_run_standalone_with_layer_kwargs():
    student = make_student(make_teacher(), MIXED)
    ids, mask, positions = left_padded()
    with torch.no_grad():
        out = student(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        hidden = out.hidden_states[2]  # input of layer 2
        kwargs = student.model.layer_kwargs(hidden, attention_mask=mask, position_ids=positions)
        again = student.model.layers[2](hidden, **kwargs)
        block = student.model.layers[1].self_attn
        normed = student.model.layers[1].input_layernorm(out.hidden_states[1])
        matrix = block.recurrent.mixing_matrix(normed, attention_mask=mask)
    assert torch.allclose(again, out.hidden_states[3], atol=1e-6)
    assert block.attention is None and block.kept_heads == [] and block.recurrent_heads == [0, 1, 2, 3]
    assert matrix.shape == (3, 4, 12, 12)
    layer0 = student.model.layers[0].self_attn
    assert layer0.kept_heads == [0, 1, 3] and layer0.recurrent_heads == [2] and layer0.o_proj.in_features == 64


def test_training_backward_with_gradient_checkpointing():
    student = make_student(make_teacher(), MIXED)
    # 5.24 renamed gradient_checkpointing_enable (5.17) to activation_checkpointing_enable
    enable = getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable
    enable()
    assert student.model.layers[0].gradient_checkpointing
    student.train()
    ids = torch.randint(0, 256, (2, 10))
    loss = student(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in student.model.layers[1].self_attn.recurrent.parameters()]
    assert all(g is not None for g in grads) and torch.isfinite(loss)
    assert all(b.grad is None for b in student.buffers())  # the normaliser is not trained


def test_past_key_values_alias_is_accepted():
    student = make_student(make_teacher(), MIXED)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        first = student(input_ids=ids[:, :5], use_cache=True)
        via_alias = student(input_ids=ids[:, 5:], past_key_values=output_cache(first), use_cache=True).logits
        full = student(input_ids=ids).logits
    assert (via_alias[:, -1] - full[:, -1]).abs().max() <= 1e-4


def state_bytes_match_the_accounting(student, lengths=(20, 60)) -> dict[int, dict[str, int]]:
    """The cache of a float32 prefill of each length, measured, against radistill.memory's rows: KV, the mixers'
    states (every part but conv) and conv equal. Returns the measured bytes by length."""
    sizes = {n: measure_cache_bytes(student, n, batch_size=2) for n in lengths}
    for length, measured in sizes.items():
        conv = sum(v for k, v in measured.items() if k == "conv" or k.endswith(".conv"))
        state = measured["total"] - measured["kv"] - conv
        (row,) = student_rows(student.config, [length], nbytes=4)
        assert measured["kv"] == row.kv_bytes and state == row.ssm_bytes and conv == row.conv_bytes
    return sizes


def test_cache_bytes_match_the_memory_accounting():
    student = make_student(make_teacher(), MIXED)
    measured = measure_cache_bytes(student, length=20, batch_size=2)
    (row,) = student_rows(student.config, [20], nbytes=4)
    assert measured["kv"] == row.kv_bytes
    assert measured["ssm"] == row.ssm_bytes and measured["conv"] == row.conv_bytes


def test_unknown_mixer_and_bad_heads_are_clear_errors():
    with pytest.raises(RadistillError, match="unsupported mixer 'mamba9'"):
        HybridForCausalLM(HybridConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=64,
                                       num_attention_heads=4, vocab_size=32, mixer="mamba9"))
    with pytest.raises(RadistillError, match="kept_heads\\[0\\]"):
        HybridConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, kept_heads=[[4]])


@pytest.mark.gpu
def test_measured_cuda_cache_bytes_match_memory():
    from radistill.hybrid.memory import memory_rows

    student = make_student(make_teacher(), MIXED).to("cuda", torch.bfloat16)
    measured = measure_cache_bytes(student, length=512, batch_size=4)
    (row,) = [r for r in memory_rows(student.config, [512], dtype="bf16") if r.model.startswith("student")]
    # the SSM state is held at float32 (twice the bf16 convention of the memory rows), KV and conv at bf16
    assert (measured["kv"], measured["ssm"], measured["conv"]) == (row.kv_bytes, 2 * row.ssm_bytes, row.conv_bytes)
    expected = row.kv_bytes + 2 * row.ssm_bytes + row.conv_bytes
    # what the allocator holds for the cache: the same bytes, up to its 512-byte block rounding per tensor
    assert abs(measured["allocated"] - expected) <= 0.02 * expected + 16 * 512
