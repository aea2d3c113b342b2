"""generate() on the hybrid: the static cache (and its compiled decode step) gives the eager growing cache's tokens;
the SSM state stays float32 in a bf16 model; padding between tokens is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from test_hybrid import MIXED, left_padded, make_student, make_teacher
from test_mixers import HIDDEN, attention_weights
from transformers.generation import CompileConfig

from radistill.hybrid import HybridCache, output_cache
from radistill.hybrid.modeling import CACHE_FIELD
from radistill.hybrid.mixers import DiscreteMamba2
from radistill.utils.errors import RadistillError

GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)


def eager_compile_config() -> CompileConfig:
    """transformers compiles generate()'s decode step only on accelerators unless told otherwise; the eager backend
    traces the whole step (fullgraph: any graph break is an error) without needing a C++ toolchain."""
    config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    config._compile_all_devices = True
    return config


def assert_compiled_static_generate_equals_growing(student) -> None:
    """generate() with the static cache, its decode step compiled whole by dynamo (fullgraph, eager backend), gives
    the eager growing cache's greedy tokens on a left-padded batch, and the step did go through dynamo."""
    from torch._dynamo.utils import counters

    ids, mask, _ = left_padded(batch=2, length=10, pads=(0, 4))
    growing = student.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    torch._dynamo.reset()
    counters.clear()
    compiled = student.generate(input_ids=ids, attention_mask=mask, cache_implementation="static",
                                compile_config=eager_compile_config(), **GREEDY)
    assert torch.equal(growing, compiled) and counters["stats"]["unique_graphs"] >= 1


@pytest.fixture(scope="module")
def student():
    return make_student(make_teacher(), MIXED)


def test_static_and_compiled_generate_match_the_growing_cache_with_left_padding(student):
    from torch._dynamo.utils import counters

    ids, mask, _ = left_padded(batch=2, length=10, pads=(0, 4))
    growing = student.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    static = student.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **GREEDY)
    assert torch.equal(growing, static)

    torch._dynamo.reset()
    counters.clear()
    compiled = student.generate(input_ids=ids, attention_mask=mask, cache_implementation="static",
                                compile_config=eager_compile_config(), **GREEDY)
    assert torch.equal(growing, compiled)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the decode step did go through dynamo, as one graph (fullgraph=True)
    # a second call with the same shapes reuses it: no per-token recompiles (the position lives on the device)
    again = student.generate(input_ids=ids, attention_mask=mask, cache_implementation="static",
                             compile_config=eager_compile_config(), **GREEDY)
    assert torch.equal(growing, again) and counters["stats"]["unique_graphs"] == graphs
    # the padded row alone (no padding at all) gives the same continuation
    alone = student.generate(input_ids=ids[1:, 4:], cache_implementation="static", **GREEDY)
    assert torch.equal(alone[0, 6:], growing[1, 10:])


def _layout(value, name: str = "") -> list:
    """(name, shape, stride, dtype) of every tensor in a compiled step's keyword arguments (dicts included)."""
    if isinstance(value, torch.Tensor):
        return [(name, tuple(value.shape), value.stride(), value.dtype)]
    if isinstance(value, dict):
        return [item for key, v in value.items() for item in _layout(v, f"{name}.{key}")]
    return []


def test_static_decode_steps_get_one_input_layout_and_one_compiled_graph(student, monkeypatch):
    """Every decode step hands the compiled forward tensors of the same shapes and strides, so dynamo builds one
    graph (a changing stride makes it recompile with a symbolic size, and CUDA graph trees then record one graph per
    token position). Batch 1 with a left-padded prompt: generate keeps the 2D mask, whose last column (the
    recurrent heads' padding) is a slice of a mask that grows every token."""
    compiled_graphs = []

    def counting_backend(graph_module, example_inputs):
        compiled_graphs.append(len(example_inputs))
        return graph_module.forward

    config = CompileConfig(backend=counting_backend, fullgraph=True, mode=None)
    config._compile_all_devices = True
    layouts = []
    compiled_call = student.get_compiled_call

    def recording_compiled_call(compile_config):
        step = compiled_call(compile_config)

        def record(**kwargs):
            layouts.append(tuple(item for key in sorted(kwargs) for item in _layout(kwargs[key], key)))
            return step(**kwargs)
        return record

    monkeypatch.setattr(student, "get_compiled_call", recording_compiled_call)
    ids = torch.randint(1, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    settings = {**GREEDY, "max_new_tokens": 20}
    torch._dynamo.reset()
    compiled = student.generate(input_ids=ids, attention_mask=mask, cache_implementation="static",
                                compile_config=config, **settings)
    assert len(layouts) == 19  # the prefill runs eagerly, the other 19 tokens through the compiled step
    assert len(set(layouts)) == 1, sorted(set(layouts) - {layouts[0]})
    assert len(compiled_graphs) == 1
    growing = student.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(compiled, growing)


def test_generate_accepts_a_static_cache_object_and_refuses_other_implementations(student):
    ids = torch.randint(1, 256, (1, 8))
    growing = student.generate(input_ids=ids, **GREEDY)
    cache = HybridCache(student.config, max_length=16)
    mine = student.generate(input_ids=ids, **{CACHE_FIELD: cache}, **GREEDY)
    assert torch.equal(growing, mine)
    assert int(cache.get_seq_length()) == 8 + 6 - 1  # the last token is returned, never fed back
    with pytest.raises(RadistillError, match="cache_implementation='quantized' is not supported"):
        student.generate(input_ids=ids, cache_implementation="quantized", **GREEDY)


def test_decode_step_traces_as_one_graph():
    """One static decode step under torch.compile(fullgraph=True): no .item(), no branch on tensor values."""
    student = make_student(make_teacher(), MIXED)
    ids = torch.randint(1, 256, (2, 9))
    with torch.no_grad():
        cache = HybridCache(student.config, max_length=12)
        student(input_ids=ids[:, :8], cache=cache, use_cache=True)
        reference = copy.deepcopy(cache)
        want = student(input_ids=ids[:, 8:], cache=reference, use_cache=True).logits
        step = torch.compile(student, backend="aot_eager", fullgraph=True)
        got = step(input_ids=ids[:, 8:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert int(cache.get_seq_length()) == 9


def test_ssm_state_stays_float32_in_a_bf16_model_and_long_decoding_stays_accurate():
    (q, k, v), _ = attention_weights(dtype=torch.float64)
    exact = DiscreteMamba2.from_attention(HIDDEN, q, k, v, state_size=8, min_half_life=1024, max_half_life=1024)
    mixer = copy.deepcopy(exact).to(torch.bfloat16)
    steps = 800
    u = torch.randn(1, steps, HIDDEN, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        reference, _ = exact(u.double())
        tail = slice(steps - 200, steps)

        def decode(state):
            outputs = [mixer(u[:, t : t + 1], state=state)[0] for t in range(steps)]
            y = torch.cat(outputs, dim=1).double()
            return float((y[:, tail] - reference[:, tail]).norm() / reference[:, tail].norm())

        state = mixer.empty_state(1, "cpu", torch.bfloat16)
        assert state["ssm"].dtype == torch.float32
        kept_wide = decode(state)
        rounded = mixer.empty_state(1, "cpu", torch.bfloat16)
        rounded["ssm"] = rounded["ssm"].to(torch.bfloat16)  # what the cache held before: re-rounded every token
        kept_bf16 = decode(rounded)
        full = float((mixer(u)[0].double()[:, tail] - reference[:, tail]).norm() / reference[:, tail].norm())
    # measured: float32 state 0.5% (as the bf16 full forward), a bf16 state 4% here and growing with the steps
    assert kept_wide < 0.015 and kept_wide < 2 * full + 1e-3
    assert kept_bf16 > 2 * kept_wide

    # and the model's cache holds it so
    student = make_student(make_teacher(), MIXED).to(torch.bfloat16)
    out = student(input_ids=torch.randint(1, 256, (1, 5)), use_cache=True)
    states = [layer.state for layer in output_cache(out).layers if layer.state is not None]
    assert states and all(s["ssm"].dtype == torch.float32 and s["conv"].dtype == torch.bfloat16 for s in states)


def test_padding_between_tokens_is_refused_left_and_trailing_padding_work(student):
    ids = torch.randint(1, 256, (2, 8))
    inner = torch.ones(2, 8, dtype=torch.long)
    inner[1, 3:5] = 0
    with pytest.raises(RadistillError, match="row 1 has padding between real tokens \\(column 3\\)"):
        student(input_ids=ids, attention_mask=inner)
    trailing = torch.ones(2, 8, dtype=torch.long)
    trailing[1, 6:] = 0
    with torch.no_grad():
        full = student(input_ids=ids, attention_mask=trailing).logits
        alone = student(input_ids=ids[1:, :6]).logits
    torch.testing.assert_close(full[1, :6], alone[0], rtol=1e-4, atol=1e-4)
    # generating after trailing padding would put the pads between tokens
    with pytest.raises(RadistillError, match="padding between real tokens"):
        student.generate(input_ids=ids, attention_mask=trailing, cache_implementation="static", **GREEDY)
    with pytest.raises(RadistillError, match="padding between real tokens"):
        student.generate(input_ids=ids, attention_mask=trailing, **GREEDY)


def test_teacher_order_scatter_equals_the_concatenate_and_gather_reference():
    student = make_student(make_teacher(), MIXED)
    mixer = student.model.layers[0].self_attn  # kept {0, 1, 3}, recurrent {2}
    kept = torch.randn(2, 5, 3, 16, dtype=torch.float64, requires_grad=True)
    recurrent = torch.randn(2, 5, 1, 16, dtype=torch.float64, requires_grad=True)
    mixer.double()
    got, want = mixer.teacher_order(kept, recurrent), mixer.teacher_order_reference(kept, recurrent)
    assert torch.equal(got, want)
    probe = torch.randn(got.shape, dtype=torch.float64)
    grads = torch.autograd.grad((got * probe).sum(), (kept, recurrent))
    wants = torch.autograd.grad((want * probe).sum(), (kept, recurrent))
    assert all(torch.equal(a, b) for a, b in zip(grads, wants))


def random_normalizer(seed: int):
    """A StaticNormalizer over 3 heads x 16 channels with seeded random statistics, and the generator (for inputs)."""
    from radistill.hybrid.normalizer import StaticNormalizer

    norm = StaticNormalizer(3, 16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("student_mean", "teacher_mean"):
            getattr(norm, name).copy_(torch.randn(3, 16, generator=g))
        for name in ("student_std", "teacher_std"):
            getattr(norm, name).copy_(torch.rand(3, 16, generator=g) + 0.5)
    return norm, g


def test_bf16_normalizer_fast_path_equals_the_float32_reference():
    norm, g = random_normalizer(seed=0)
    norm = norm.to(torch.bfloat16)
    y = (torch.randn(4, 257, 3, 16, generator=g) * 3).to(torch.bfloat16)
    fast, reference = norm(y), norm.forward_reference(y)
    assert fast.dtype == torch.bfloat16
    # one rounding of the same fp32 value either way (CPU and CUDA compute 16-bit addcmul in fp32)
    assert (fast.float() - reference.float()).abs().max() <= 2**-7 * reference.float().abs().max()


def test_float32_normalizer_is_the_reference_and_reuses_its_affine_until_a_statistic_changes():
    """float32: the reference's y.float() is y itself, so forward applies the map directly; scale and shift are
    computed once and reused until a statistic changes (any write, a reset, a load). float64 keeps the reference
    path."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    norm, g = random_normalizer(seed=1)
    y = torch.randn(2, 33, 3, 16, generator=g) * 3
    with Count():
        fast = norm(y)
    assert torch.equal(fast, norm.forward_reference(y))
    assert Count.ops == 4  # clamp_min, div, addcmul (shift), addcmul (the map)
    Count.ops = 0
    with Count():
        again = norm(y)
    assert torch.equal(again, fast) and Count.ops == 1  # the statistics did not change: only the map runs

    # every way the statistics change is seen: an in-place edit, reset_statistics, load_state_dict
    def same_as_reference():
        out = norm(y)
        assert torch.equal(out, norm.forward_reference(y))
        return out

    with torch.no_grad():
        norm.teacher_std[0, 0] += 1.0
    edited = same_as_reference()
    assert not torch.equal(edited, fast)
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    norm.reset_statistics(torch.tensor([True, False, False]))
    assert not torch.equal(same_as_reference(), edited)
    norm.load_state_dict(state)
    assert torch.equal(same_as_reference(), edited)
    norm.reset_statistics()
    assert torch.equal(same_as_reference(), y)
    norm.load_state_dict(state)
    with torch.inference_mode():  # results made in inference mode are not reused outside it (autograd needs them)
        norm(y)
    y_grad = y.clone().requires_grad_(True)
    norm(y_grad).sum().backward()
    assert y_grad.grad is not None
    norm64 = norm.double()
    torch.testing.assert_close(norm64(y.double()), norm64.forward_reference(y.double()), rtol=0, atol=0)


def test_static_cache_beam_search_and_sampled_returns_match_the_growing_cache(student):
    """Beam search reorders the cache every step; a static cache does it in place (fixed addresses)."""
    ids, mask, _ = left_padded(batch=2, length=10, pads=(0, 4))
    for kwargs in (dict(num_beams=2), dict(do_sample=True, top_k=5, num_return_sequences=2)):
        outputs = []
        for implementation in (None, "static"):
            torch.manual_seed(0)
            outputs.append(student.generate(input_ids=ids, attention_mask=mask, cache_implementation=implementation,
                                            **{**GREEDY, "max_new_tokens": 4, **kwargs}))
        assert torch.equal(*outputs)


def test_static_generate_with_a_sliding_window_teacher():
    windowed = make_student(make_teacher("mistral", sliding_window=6), MIXED)
    ids, mask, _ = left_padded(batch=2, length=10, pads=(0, 4))
    growing = windowed.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    static = windowed.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **GREEDY)
    assert torch.equal(growing, static)


def test_recurrent_heads_skip_masking_when_the_mask_has_no_padding(student):
    """The eager forward reads the 2D mask once for its padding check; with no padding there, the recurrent heads
    get no mask (their masking work would be a no-op) and the logits are those of the masked computation."""
    seen = []
    mixers = [layer.self_attn.recurrent for layer in student.model.layers if layer.self_attn.recurrent is not None]
    hooks = [m.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs.get("attention_mask")),
                                         with_kwargs=True) for m in mixers]
    try:
        ids = torch.randint(1, 256, (2, 8), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            plain = student(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            assert len(seen) == len(mixers) and all(mask is None for mask in seen)
            seen.clear()
            mask = torch.ones_like(ids)
            mask[1, :2] = 0
            padded = student(input_ids=ids, attention_mask=mask).logits
            assert len(seen) == len(mixers) and all(torch.equal(m, mask) for m in seen)
            # the layers run with the all-ones mask handed to the recurrent heads give the same logits
            hidden = student.model.embed_tokens(ids)
            kwargs = student.model.layer_kwargs(hidden, torch.ones_like(ids))
            assert kwargs["padding_mask"] is not None
            seen.clear()
            for layer in student.model.layers:
                hidden = layer(hidden, **kwargs)
            assert all(m is not None for m in seen)
            masked = student.lm_head(student.model.norm(hidden))
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(masked, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[0], plain[0], rtol=1e-5, atol=1e-5)
