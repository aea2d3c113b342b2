"""generate() on CUDA, the way a user calls it: the static cache with transformers' own compiled decode step
(inductor, CUDA graphs) gives the tokens of the eager growing cache, for the paper's mixer and the default one."""

from __future__ import annotations

import pytest
import torch
from test_generate import GREEDY
from test_hybrid import MIXED, left_padded, make_student, make_teacher
from test_window_recurrent import build, opened

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    """float32 arithmetic on both paths of every comparison here: TF32 could round them apart at a near-tie."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def cuda_batch(batch: int = 3, pads=(0, 4, 7)):
    """input_ids, attention_mask [batch, 10] on CUDA, row i left-padded by pads[i]."""
    ids, mask, _ = left_padded(batch=batch, length=10, pads=pads)
    return ids.cuda(), mask.cuda()


def student_with(mixer: str):
    teacher = make_teacher()
    if mixer == "discrete_mamba2":
        return make_student(teacher, MIXED)
    return opened(build(teacher, kept=MIXED))  # gates open: the recurrence contributes to every token


@pytest.mark.parametrize("mixer", ["discrete_mamba2", "window_recurrent"])
def test_compiled_static_generate_on_cuda_equals_the_eager_growing_cache(mixer):
    student = student_with(mixer).to("cuda")
    ids, mask = cuda_batch(batch=2, pads=(0, 4))
    growing = student.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    # transformers compiles the static decode step on CUDA by default (its CompileConfig)
    static = student.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **GREEDY)
    again = student.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **GREEDY)
    assert torch.equal(growing, static), mixer
    assert torch.equal(static, again), mixer  # the captured graph replays, not only its first run


@pytest.mark.parametrize("mixer", ["discrete_mamba2", "window_recurrent"])
def test_graph_decode_loop_samples_on_cuda(mixer):
    """Sampling in the captured loop (graph_decode=True): top-k 1 is transformers' greedy search token for token,
    and a seed gives the same draws again through the replayed graph (its random numbers advance per replay)."""
    student = student_with(mixer).to("cuda")
    ids, mask = cuda_batch()
    settings = dict(attention_mask=mask, max_new_tokens=24, pad_token_id=0, eos_token_id=5,
                    cache_implementation="static")
    greedy = student.generate(input_ids=ids, graph_decode=False, do_sample=False, **settings)
    top1 = student.generate(input_ids=ids, graph_decode=True, do_sample=True, top_k=1, **settings)
    draws = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        draws.append(student.generate(input_ids=ids, graph_decode=True, do_sample=True, temperature=1.5,
                                      **{**settings, "eos_token_id": None}))
    assert torch.equal(greedy, top1)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert len({tuple(row) for row in draws[0][:, 10:].tolist()}) == 3  # the rows draw apart


@pytest.mark.parametrize("stop_at", [None, 1, 2, 10])
def test_graph_decode_loop_streams_on_cuda_as_transformers_loop(stop_at):
    """A streamer through the captured loop: the warm-up steps' tokens, then one per replay, the same calls as
    transformers' loop makes (an end token in the warm-up, after it, or none)."""
    from test_graph_decode import Recorder

    student = student_with("window_recurrent").to("cuda")
    ids = torch.randint(1, 200, (1, 10), generator=torch.Generator().manual_seed(3)).cuda()
    settings = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, cache_implementation="static")
    free = student.generate(input_ids=ids, graph_decode=False, eos_token_id=None, **settings)[0, 10:]
    eos = None if stop_at is None else int(free[stop_at])
    runs = []
    for graph_decode in (False, None):
        recorder = Recorder()
        out = student.generate(input_ids=ids, graph_decode=graph_decode, eos_token_id=eos, streamer=recorder,
                               **settings)
        runs.append((out, recorder.calls))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


@pytest.mark.parametrize("loop", [None, "compiled"])
@pytest.mark.parametrize("mixer", ["discrete_mamba2", "window_recurrent"])
def test_graph_decode_loop_on_cuda_equals_transformers_loop(mixer, loop):
    """generate(cache_implementation="static") on CUDA runs the captured greedy loop (graph_decode.py) by default;
    graph_decode="compiled": inductor compiles the step's forward first, then the loop captures and replays it."""
    from radistill.hybrid.graph_decode import decode_plan

    student = student_with(mixer).to("cuda")
    ids, mask = cuda_batch()
    settings = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, cache_implementation="static")
    free = student.generate(input_ids=ids, attention_mask=mask, graph_decode=False, eos_token_id=None, **settings)
    eos = sorted({int(free[0, 13]), int(free[1, 20])})  # two rows finish early, one may not
    for stop in (None, eos):
        assert decode_plan(student, ids, {"attention_mask": mask, "eos_token_id": stop, **settings}, loop)
        ref = student.generate(input_ids=ids, attention_mask=mask, graph_decode=False, eos_token_id=stop,
                               **settings)
        got = student.generate(input_ids=ids, attention_mask=mask, eos_token_id=stop, graph_decode=loop,
                               **settings)
        assert torch.equal(ref, got), (mixer, stop)

