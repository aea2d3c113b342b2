"""The fast scan equals the naive scan (fp32, tiny random models), also split across 2 gloo processes."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from radistill.models.access import model_layout
from radistill.models.presets import random_model, tiny_config
from radistill.probes.items import EncodedItem
from radistill.scan.ablation import head_means
from radistill.scan.fast import fast_scan
from radistill.scan.naive import naive_scan
from test_probes_scoring import random_items

ALL_HEADS = [(layer, head) for layer in range(3) for head in range(4)]


@pytest.fixture(autouse=True, scope="module")
def _flush_denormals():
    """Tiny random models with mean ablation produce denormal floats, which are ~30x slower on x86 CPUs."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def assert_same(fast, naive_baseline, naive_heads):
    assert fast.baseline.accuracy == pytest.approx(naive_baseline.accuracy, abs=1e-6)
    assert fast.baseline.logprob == pytest.approx(naive_baseline.logprob, abs=1e-5)
    assert set(fast.heads) == set(naive_heads)
    for head, want in naive_heads.items():
        assert fast.heads[head].accuracy == pytest.approx(want.accuracy, abs=1e-6), head
        assert fast.heads[head].logprob == pytest.approx(want.logprob, abs=1e-5), head


@pytest.mark.parametrize(
    "arch, ablation",
    [("llama", "zero"), ("qwen2", "zero"), ("qwen3", "zero"), ("mistral", "zero"), ("llama", "mean"), ("qwen3", "mean")],
)
def test_fast_equals_naive(arch, ablation):
    model = random_model(tiny_config(arch), seed=1)
    items = random_items(count=4, seed=2)  # multi-token choices with shared first tokens
    means = head_means(model, items) if ablation == "mean" else None
    # small batches and chunks: micro-batches that span several prompts, heads and both prompt chunks
    fast = fast_scan(model, items, ALL_HEADS, ablation=ablation, means=means, batch_size=5, prompt_chunk=3)
    baseline, heads = naive_scan(model, items, ALL_HEADS, ablation=ablation, means=means)
    assert_same(fast, baseline, heads)
    spread = max(abs(m.logprob - baseline.logprob) for m in heads.values())
    assert spread > 1e-3  # ablations change the scores, so equality is not vacuous


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_fast_equals_naive_with_single_token_choices(implementation):
    """The causal-only path: SDPA runs without a 4D mask, eager with one."""
    model = random_model(tiny_config("qwen3"), seed=7)
    model.set_attn_implementation(implementation)
    items = random_items(count=5, seed=8, max_choice_tokens=1)
    fast = fast_scan(model, items, ALL_HEADS, batch_size=7)
    baseline, heads = naive_scan(model, items, ALL_HEADS)
    assert_same(fast, baseline, heads)


def test_fast_scan_gqa_model_with_one_kv_head_and_head_subset():
    model = random_model(tiny_config("llama", num_attention_heads=4, num_key_value_heads=1), seed=3)
    assert model_layout(model).group_size == 4
    items = random_items(count=4, seed=4)
    heads = [(2, 3), (0, 1)]
    fast = fast_scan(model, items, heads, batch_size=3)
    baseline, naive = naive_scan(model, items, heads)
    assert_same(fast, baseline, naive)



def test_fast_scan_reads_each_scored_position_once():
    """KV-probe-like items (20 one-token values): one LM head row per (prompt, head), not one per choice."""
    model = random_model(tiny_config("llama"), seed=9)
    items = [EncodedItem(tuple(range(30 + i, 36 + 2 * i)), tuple((100 + k,) for k in range(20)), 3 * i)
             for i in range(4)]
    heads = [(0, 1), (1, 3), (2, 0)]
    calls: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        fast = fast_scan(model, items, heads, batch_size=5)
    finally:
        hook.remove()
    assert fast.stats.scored_positions == len(items) * len(heads)
    assert sum(calls) == len(items) * (1 + len(heads))  # the clean forward, then every ablated row
    baseline, naive = naive_scan(model, items, heads)
    assert_same(fast, baseline, naive)

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = random_model(tiny_config("qwen2"), seed=5)
        result = fast_scan(model, random_items(count=4, seed=6), ALL_HEADS, batch_size=4)
        torch.save({"baseline": result.baseline, "heads": result.heads}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_agree_with_one_process(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    single = fast_scan(random_model(tiny_config("qwen2"), seed=5), random_items(count=4, seed=6), ALL_HEADS)
    for rank in range(2):
        gathered = torch.load(f"{out}.{rank}", weights_only=False)
        assert set(gathered["heads"]) == set(ALL_HEADS)  # every rank holds every head after the gather
        for head in ALL_HEADS:
            assert gathered["heads"][head].logprob == pytest.approx(single.heads[head].logprob, abs=1e-5)
            assert gathered["heads"][head].accuracy == pytest.approx(single.heads[head].accuracy, abs=1e-6)
