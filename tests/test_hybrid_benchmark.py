"""benchmarks/decode.py: its static decode step (what it captures in a CUDA graph) continues prompts like eager
decoding, and (GPU) the captured graph replays that step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"


@pytest.fixture(scope="module")
def decode():
    spec = importlib.util.spec_from_file_location("decode_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_static_step_matches_eager_for_teacher_and_hybrid(decode):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = decode.make_models(quick=True, device="cpu", dtype=torch.float32, state_sizes=[8])
        for model in models.values():
            assert decode.check_static_step(model, batch=2, length=24, device="cpu")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.gpu
def test_cuda_graph_replays_the_static_step(decode):
    """The captured step replays what the eager static step computes (capture records, it does not run)."""
    models = decode.make_models(quick=True, device="cuda", dtype=torch.float32, state_sizes=[8])
    for name, model in models.items():
        runs = []
        for graphed in (False, True):
            torch.manual_seed(0)
            logits, cache = decode.prefill(model, 2, 64, "cuda")
            decoder = decode.StaticDecoder(model, decode.static_cache(model, cache, 96), logits, 64, 96)
            if graphed:
                decoder.capture(warmup=3)
            else:
                for _ in range(3):
                    decoder.step()
            tokens = []
            for _ in range(8):
                decoder.run()
                tokens.append(decoder.token.clone())
            runs.append(torch.cat(tokens, dim=1))
            assert int(decoder.position[0]) == 64 + 3 + 8, name
        # fp32, same kernels: the tokens agree (allowing a rare argmax near-tie of random weights)
        assert (runs[0] == runs[1]).float().mean() >= 0.9, name
