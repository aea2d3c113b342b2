"""Sliding-window teachers (Mistral; Qwen2 with use_sliding_window): the kept heads attend over the window, the cache
keeps only the window, and the memory accounting counts only the window."""

from __future__ import annotations

import pytest
import torch
from test_hybrid import MIXED, left_padded, make_student, make_teacher

from radistill.hybrid import HybridCache, output_cache
from radistill.hybrid.memory import attention_windows, measure_cache_bytes, memory_rows, student_rows
from radistill.models.presets import tiny_config

WINDOW = 4
LENGTH = 16  # four windows
EVERY_HEAD = [[0, 1, 2, 3]] * 4


def mistral(**overrides):
    return make_teacher("mistral", sliding_window=WINDOW, **overrides)


def prefill(student, ids, mask, positions, prompt: int, cache=None):
    """(logits, cache) of the first ``prompt`` tokens, into ``cache`` (None: the model makes a growing one)."""
    out = student(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], position_ids=positions[:, :prompt],
                  cache=cache, use_cache=True)
    return out.logits, output_cache(out)


def step_through(student, cache, ids, mask, positions, start: int) -> torch.Tensor:
    """Logits of one cached decode step per token from ``start`` on."""
    steps = []
    for t in range(start, ids.shape[1]):
        out = student(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                      position_ids=positions[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [("mistral", {"sliding_window": WINDOW}),
     ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 0})],
)
def test_keeping_every_head_reproduces_a_sliding_window_teacher(model_type, overrides):
    teacher = make_teacher(model_type, num_hidden_layers=2, **overrides)
    student = make_student(teacher, EVERY_HEAD[:2])
    assert student.config.sliding_window == WINDOW
    ids, mask, positions = left_padded(length=LENGTH, pads=(0, 3, 6))
    unwindowed = make_teacher(model_type, num_hidden_layers=2, **{**overrides, "sliding_window": None})
    with torch.no_grad():
        expected = teacher(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        full_attention = unwindowed(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (full_attention - expected)[real].abs().max() > 1e-2  # the window matters at this length
    assert (got - expected)[real].abs().max() <= 1e-5


@pytest.mark.parametrize("prompt", [2, WINDOW - 1, 9])  # prompts inside the window, at its edge, beyond it
def test_cached_decoding_beyond_the_window_equals_full_forward(prompt):
    student = make_student(mistral(), MIXED)
    ids, mask, positions = left_padded(length=LENGTH, pads=(0, 3, 7))
    with torch.no_grad():
        full = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        logits, cache = prefill(student, ids, mask, positions, prompt)
        stepped = torch.cat([logits, step_through(student, cache, ids, mask, positions, prompt)], dim=1)
    real = mask.bool()
    assert (stepped - full)[real].abs().max() <= 1e-4
    assert cache.get_seq_length() == LENGTH


@pytest.mark.parametrize("prompt", [2, WINDOW - 1, 9])
def test_static_sliding_cache_decodes_like_the_full_forward(prompt):
    student = make_student(mistral(), MIXED)
    ids, mask, positions = left_padded(length=LENGTH, pads=(0, 5))
    ids, mask, positions = ids[:2], mask[:2], positions[:2]
    real = mask.bool()
    with torch.no_grad():
        full = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        # static from the start, and static once a growing cache has taken the prompt (what benchmarks/decode.py
        # does): inside the window, at its edge, and once it slides
        _, static = prefill(student, ids, mask, positions, prompt, HybridCache(student.config, max_length=LENGTH))
        _, growing = prefill(student, ids, mask, positions, prompt)
        for cache in (static, growing.make_static(LENGTH)):
            stepped = step_through(student, cache, ids, mask, positions, prompt)
            assert (stepped - full[:, prompt:])[real[:, prompt:]].abs().max() <= 1e-4
            assert cache.layers[0].keys.shape[-2] == WINDOW  # the static buffer spans the window, not LENGTH


def test_generate_beyond_the_window_with_and_without_the_cache():
    student = make_student(mistral(), MIXED)
    ids, mask, _ = left_padded(batch=2, length=6, pads=(0, 2))
    kwargs = dict(max_new_tokens=LENGTH, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = student.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(cached, student.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs))
    beams = student.generate(input_ids=ids, attention_mask=mask, num_beams=2, **kwargs)  # reorders the cache
    assert beams.shape == cached.shape


def test_cache_keeps_only_the_window():
    student = make_student(mistral(), MIXED)
    ids = torch.randint(1, 256, (2, LENGTH))
    held = []
    with torch.no_grad():
        out = student(input_ids=ids[:, :1], use_cache=True)
        for t in range(1, LENGTH):
            out = student(input_ids=ids[:, t : t + 1], cache=output_cache(out), use_cache=True)
            held.append(output_cache(out).layers[0].keys.shape[-2])
    assert held == [min(t + 1, WINDOW - 1) for t in range(1, LENGTH)]  # the next token brings the window's last
    cache = output_cache(out)
    assert [None if layer.keys is None else layer.keys.shape[-2] for layer in cache.layers] == [WINDOW - 1, None,
                                                                                                WINDOW - 1, WINDOW - 1]
    assert cache.is_sliding == [True, False, True, True]  # the layer without kept heads holds no keys at all


def test_memory_accounting_counts_the_window():
    student = make_student(mistral(), MIXED)
    for length in (WINDOW - 2, LENGTH):
        measured = measure_cache_bytes(student, length=length, batch_size=2)
        (row,) = student_rows(student.config, [length], nbytes=4)
        assert measured["kv"] == row.kv_bytes, length
    short, long = student_rows(student.config, [WINDOW - 1, 10 * LENGTH], nbytes=2)
    assert short.kv_bytes == long.kv_bytes  # nothing beyond the window is held
    teacher = tiny_config("mistral", sliding_window=WINDOW)
    rows = memory_rows(teacher, [8, 4096], "bf16", keep=2, state_size=8)
    assert len({r.kv_bytes for r in rows if r.model == "teacher"}) == 1
    assert len({r.kv_bytes for r in rows if r.model.startswith("student")}) == 1
    built = memory_rows(student.config, [8, 4096], "bf16")
    assert len({r.kv_bytes for r in built if r.model.startswith("teacher")}) == 1


def test_attention_windows_per_layer():
    assert attention_windows(tiny_config("llama")) == [None] * 3
    assert attention_windows(tiny_config("mistral", sliding_window=WINDOW)) == [WINDOW] * 3
    assert attention_windows(tiny_config("qwen2", use_sliding_window=False, sliding_window=WINDOW)) == [None] * 3
    qwen2 = tiny_config("qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    assert attention_windows(qwen2) == [None, WINDOW, WINDOW]


def test_student_of_a_qwen2_teacher_whose_layers_attend_fully_has_no_window():
    teacher = make_teacher("qwen2", num_hidden_layers=2, use_sliding_window=True, sliding_window=WINDOW,
                           max_window_layers=2)
    assert attention_windows(teacher.config) == [None, None]
    student = make_student(teacher, EVERY_HEAD[:2])
    ids = torch.randint(1, 256, (2, LENGTH))
    with torch.no_grad():
        assert (student(input_ids=ids).logits - teacher(input_ids=ids).logits).abs().max() <= 1e-5
