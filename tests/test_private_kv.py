"""build --private-kv: each kept query head owns a copy of its GQA group's K/V projection (and its cached K/V)."""

from __future__ import annotations

import torch

from distill_helpers import tiny_teacher
from radistill.hybrid.build import convert, student_config
from radistill.hybrid.memory import student_rows


def _student(teacher, kept, private):
    return convert(teacher, student_config(teacher, kept, "discrete_mamba2", {"state_size": 8}, private_kv=private))


def test_all_heads_kept_is_the_teacher_in_both_modes():
    teacher = tiny_teacher()
    heads = teacher.config.num_attention_heads
    ids = torch.randint(0, teacher.config.vocab_size, (2, 11))
    with torch.no_grad():
        want = teacher(input_ids=ids).logits
        for private in (False, True):
            student = _student(teacher, [list(range(heads))] * teacher.config.num_hidden_layers, private).eval()
            torch.testing.assert_close(student(input_ids=ids, use_cache=False).logits, want, atol=1e-5, rtol=1e-4)


def test_private_copies_start_equal_to_shared_and_diverge_alone():
    teacher = tiny_teacher()
    group = teacher.config.num_attention_heads // teacher.config.num_key_value_heads
    kept = [[0, 1], [0, group]]  # layer 0: two heads of one group; layer 1: one head in each of two groups
    shared, private = _student(teacher, kept, False).eval(), _student(teacher, kept, True).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(private(input_ids=ids, use_cache=False).logits,
                                   shared(input_ids=ids, use_cache=False).logits, atol=1e-5, rtol=1e-4)
    attn = private.model.layers[0].self_attn.attention
    hd = attn.head_dim
    assert attn.k_proj.weight.shape[0] == 2 * hd
    assert shared.model.layers[0].self_attn.attention.k_proj.weight.shape[0] == hd
    torch.testing.assert_close(attn.k_proj.weight[:hd], attn.k_proj.weight[hd:])  # two copies of one KV head
    # a gradient through head 0 alone reaches only its own copy
    out = attn(private.model.layers[0].input_layernorm(private.model.embed_tokens(ids)),
               private.model.rotary_emb(private.model.embed_tokens(ids), torch.arange(9)[None]), None)[0]
    out[:, :, 0].sum().backward()
    assert attn.k_proj.weight.grad[:hd].abs().sum() > 0 and attn.k_proj.weight.grad[hd:].abs().sum() == 0
    # the cache holds K/V per kept query head
    cache_out = private(input_ids=ids, use_cache=True)
    from radistill.hybrid.modeling import output_cache
    assert output_cache(cache_out).layers[0].keys.shape[1] == 2
    assert output_cache(shared(input_ids=ids, use_cache=True)).layers[0].keys.shape[1] == 1


def test_memory_counts_kv_per_kept_head():
    teacher = tiny_teacher()
    group = teacher.config.num_attention_heads // teacher.config.num_key_value_heads
    kept = [[0, 1], [0, group]]
    cfg_shared = student_config(teacher, kept, "discrete_mamba2", {"state_size": 8})
    cfg_private = student_config(teacher, kept, "discrete_mamba2", {"state_size": 8}, private_kv=True)
    (shared,), (private,) = student_rows(cfg_shared, [128], 2), student_rows(cfg_private, [128], 2)
    assert private.kv_bytes * 3 == shared.kv_bytes * 4  # 4 cached K/V heads instead of 3


def test_static_cache_generate_with_private_kv_matches_the_growing_cache():
    """generate()'s static HybridCache sizes its K/V buffers per kept query head when the heads own their K/V."""
    teacher = tiny_teacher()
    group = teacher.config.num_attention_heads // teacher.config.num_key_value_heads
    student = _student(teacher, [[0, 1], [0, group]], True).eval()
    torch.manual_seed(0)
    ids = torch.randint(3, teacher.config.vocab_size, (2, 7))
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        growing = student.generate(input_ids=ids, **greedy)
        static = student.generate(input_ids=ids, cache_implementation="static", **greedy)
    assert torch.equal(growing, static)


def test_private_kv_in_the_kept_mixer_slot():
    """--kept-mixer window with --private-kv: the window mixer serving the kept heads gets one K/V per head (its
    kv_groups), the same function as shared K/V at build, its state and the memory rows count K/V per head."""
    from radistill.hybrid.build import convert

    teacher = tiny_teacher()
    group = teacher.config.num_attention_heads // teacher.config.num_key_value_heads
    kept = [[0, 1], [0, group]]

    def config(private):
        return student_config(teacher, kept, "discrete_mamba2", {"state_size": 8}, kept_mixer="window",
                              kept_mixer_settings={"window": 4}, private_kv=private)

    shared, private = convert(teacher, config(False)).eval(), convert(teacher, config(True)).eval()
    assert config(True).mixer_kv_groups(0)[0] == [0, 1] and config(False).mixer_kv_groups(0)[0] == [0, 0]
    window = private.model.layers[0].self_attn.recurrent.groups[0]
    assert window.num_kv_heads == 2 and shared.model.layers[0].self_attn.recurrent.groups[0].num_kv_heads == 1
    ids = torch.randint(3, teacher.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(private(input_ids=ids, use_cache=False).logits,
                                   shared(input_ids=ids, use_cache=False).logits, atol=1e-5, rtol=1e-4)
    (row_shared,), (row_private,) = student_rows(config(False), [128], 2), student_rows(config(True), [128], 2)
    assert row_shared.kv_bytes == row_private.kv_bytes == 0  # no softmax heads, no growing cache
    assert row_private.ssm_bytes + row_private.conv_bytes > row_shared.ssm_bytes + row_shared.conv_bytes
