"""The device-side greedy loop behind generate(cache_implementation="static") gives transformers' greedy tokens
(left padding, end-of-sequence rows padded, early stop when every row finished) and leaves every other call to
transformers' generate(). On CPU the same loop runs without a CUDA graph (tests/test_generate_cuda.py: with it)."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from test_hybrid import MIXED, left_padded, make_student, make_teacher
from test_window_recurrent import build, opened

from radistill.hybrid.graph_decode import decode_plan
from radistill.utils.errors import RadistillError

STATIC = dict(cache_implementation="static", do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module", params=["discrete_mamba2", "window_recurrent"])
def student(request):
    teacher = make_teacher()
    return make_student(teacher, MIXED) if request.param == "discrete_mamba2" else opened(build(teacher, kept=MIXED))


def both(student, ids, mask, **kwargs):
    assert decode_plan(student, ids, {"attention_mask": mask, **STATIC, **kwargs}, True) is not None  # the loop runs
    ref = student.generate(input_ids=ids, attention_mask=mask, graph_decode=False, **STATIC, **kwargs)
    got = student.generate(input_ids=ids, attention_mask=mask, graph_decode=True, **STATIC, **kwargs)
    return ref, got


@pytest.mark.parametrize("eos", [None, 5, [7, 9]])
def test_greedy_tokens_equal_transformers_loop_with_left_padding(student, eos):
    ids, mask, _ = left_padded(batch=3, length=10, pads=(0, 4, 7))
    ref, got = both(student, ids, mask, max_new_tokens=12, eos_token_id=eos)
    assert ref.shape == (3, 22) and torch.equal(ref, got)


def test_rows_that_finish_are_padded_and_the_output_stops_with_the_last_row(student):
    ids, mask, _ = left_padded(batch=3, length=10, pads=(0, 4, 7))
    free = student.generate(input_ids=ids, attention_mask=mask, graph_decode=False, max_new_tokens=12,
                            eos_token_id=None, **STATIC)
    # each row's own 3rd, 2nd and 5th new token as end-of-sequence tokens: all rows finish, at different steps
    eos = sorted({int(free[0, 12]), int(free[1, 11]), int(free[2, 14])})
    ref, got = both(student, ids, mask, max_new_tokens=12, eos_token_id=eos)
    assert ref.shape[1] < 22, "every row finished early: transformers stops there"
    assert torch.equal(ref, got)
    ref, got = both(student, ids, mask, max_new_tokens=1, eos_token_id=eos)  # the prefill's token only
    assert ref.shape == (3, 11) and torch.equal(ref, got)


def test_calls_that_need_transformers_loop_are_left_to_it(student):
    ids = torch.randint(1, 200, (2, 6))
    plan = lambda requested=True, **kw: decode_plan(student, ids, {**STATIC, "max_new_tokens": 4, **kw}, requested)
    assert plan() is not None
    assert plan(requested=None) is None  # on CPU only when asked for
    assert plan(requested=False) is None
    assert plan(num_beams=2) is None
    assert plan(do_sample=True)["sampling"] == {"temperature": None, "top_k": None, "top_p": None}
    assert plan(do_sample=True, min_p=0.1) is None  # a warper the loop does not reproduce
    assert plan(repetition_penalty=1.3) is None and plan(output_scores=True, return_dict_in_generate=True) is None
    assert plan(logits_processor=[]) is None
    assert plan(streamer=object()) is None  # two rows: transformers' streamers take one (its own error)
    assert plan(cache_implementation=None) is None  # the growing cache: transformers' loop
    sampled = student.generate(input_ids=ids, do_sample=True, top_k=5, max_new_tokens=3, graph_decode=False,
                               pad_token_id=0, cache_implementation="static")
    assert sampled.shape == (2, 9)  # went through transformers' sampling


def test_sampling_with_top_k_1_is_the_greedy_search(student):
    """The loop's draw after top-k 1 can only be the argmax: every token equals transformers' greedy search
    (left padding, end tokens), which pins the warpers' order and the first token's draw."""
    ids, mask, _ = left_padded(batch=3, length=10, pads=(0, 4, 7))
    greedy = student.generate(input_ids=ids, attention_mask=mask, graph_decode=False, max_new_tokens=10,
                              eos_token_id=5, **STATIC)
    sampled = student.generate(input_ids=ids, attention_mask=mask, graph_decode=True, max_new_tokens=10,
                               eos_token_id=5, **{**STATIC, "do_sample": True, "top_k": 1, "temperature": 0.7})
    assert torch.equal(greedy, sampled)


def test_sampling_follows_the_seed(student):
    ids = torch.randint(1, 200, (2, 6), generator=torch.Generator().manual_seed(4))
    settings = dict(input_ids=ids, graph_decode=True, max_new_tokens=12, eos_token_id=None,
                    **{**STATIC, "do_sample": True, "temperature": 1.3})
    runs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        runs.append(student.generate(**settings))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(None, None, None), (0.7, 4, None), (1.5, None, 0.8),
                                                              (0.9, 6, 0.9)])
def test_the_draw_follows_the_warped_distribution(temperature, top_k, top_p):
    """The Picker's draws (argmax of p / Exp(1)) against the distribution written out from the warpers'
    definitions (temperature, then the k largest, then the smallest set above top-p): 40,000 draws at once."""
    from radistill.hybrid.graph_decode import Picker

    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.0, -0.5, -1.0, -3.0])
    scaled = logits / (temperature or 1.0)
    keep = torch.ones(8, dtype=torch.bool)
    if top_k:
        keep &= scaled >= scaled.topk(top_k).values[-1]
    probs = scaled.masked_fill(~keep, float("-inf")).softmax(-1)
    if top_p:
        ordered, order = probs.sort(descending=True)
        needed = (ordered.cumsum(0) - ordered) < top_p  # the tokens before the mass reaches top_p, and the one that does
        keep &= torch.zeros(8, dtype=torch.bool).scatter(0, order, needed)
        probs = scaled.masked_fill(~keep, float("-inf")).softmax(-1)
    torch.manual_seed(0)
    n = 40_000
    draws = Picker({"temperature": temperature, "top_k": top_k, "top_p": top_p})(
        logits.expand(n, 8), torch.zeros(n, 1, dtype=torch.long))
    frequencies = torch.bincount(draws, minlength=8) / n
    assert (frequencies[~keep] == 0).all()
    assert (frequencies - probs).abs().max() < 0.012  # ~5 standard errors at the worst cell


class Recorder:
    """A transformers streamer that keeps what it is handed."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.tolist())

    def end(self):
        self.calls.append("end")


@pytest.mark.parametrize("stop", ["none", "first", "third", "last"])
def test_a_streamer_gets_what_transformers_loop_hands_it(student, stop):
    """One row with a streamer: the loop runs (each token read after its step) and the streamer is called as
    transformers' loop calls it -- the prompt, each new token, end -- also when an end token stops it."""
    ids = torch.randint(1, 200, (1, 9), generator=torch.Generator().manual_seed(2))
    free = student.generate(input_ids=ids, graph_decode=False, max_new_tokens=6, eos_token_id=None, **STATIC)[0, 9:]
    eos = {"none": None, "first": int(free[0]), "third": int(free[2]), "last": int(free[5])}[stop]
    assert decode_plan(student, ids, {**STATIC, "max_new_tokens": 6, "streamer": Recorder()}, True) is not None
    runs = []
    for graph_decode in (False, True):
        recorder = Recorder()
        out = student.generate(input_ids=ids, graph_decode=graph_decode, max_new_tokens=6, eos_token_id=eos,
                               streamer=recorder, **STATIC)
        runs.append((out, recorder.calls))
    (ref, ref_calls), (got, got_calls) = runs
    assert torch.equal(ref, got) and got_calls == ref_calls
    assert got_calls[0] == ids.tolist() and got_calls[-1] == "end" and len(got_calls) == 2 + got.shape[1] - 9


def test_a_streamer_that_raises_stops_the_loop(student):
    """An exception from the streamer ends generate() there, as in transformers' loop (how a server stops a
    stream whose client has gone)."""
    class Gone(Exception):
        pass

    class Leaving(Recorder):
        def put(self, value):
            if len(self.calls) == 3:
                raise Gone
            super().put(value)

    streamer = Leaving()
    with pytest.raises(Gone):
        student.generate(input_ids=torch.randint(1, 200, (1, 5)), graph_decode=True, max_new_tokens=8,
                         eos_token_id=None, streamer=streamer, **STATIC)
    assert len(streamer.calls) == 3  # the prompt and two tokens, no end


def test_padding_between_tokens_is_refused(student):
    ids = torch.randint(1, 200, (1, 6))
    mask = torch.tensor([[1, 1, 0, 1, 1, 1]])
    with pytest.raises(RadistillError, match="padding between real tokens"):
        student.generate(input_ids=ids, attention_mask=mask, graph_decode=True, max_new_tokens=3, **STATIC)


def test_the_compiled_step_gives_the_same_tokens(student, monkeypatch):
    """graph_decode="compiled": the step's forward compiled (fullgraph, static shapes) before the loop runs it; here
    with a backend that needs no C++ compiler (the GPU runs inductor). Compiled once per model, kept outside its
    modules (the state dict is unchanged)."""
    from radistill.hybrid import graph_decode

    monkeypatch.setattr(graph_decode, "STEP_BACKEND", "aot_eager")
    student.__dict__.pop("_radistill_compiled_steps", None)
    keys = set(student.state_dict())
    ids, mask, _ = left_padded(batch=3, length=10, pads=(0, 4, 7))
    ref = student.generate(input_ids=ids, attention_mask=mask, graph_decode=False, max_new_tokens=8, **STATIC)
    for _ in range(2):  # the second call reuses the compiled forward
        got = student.generate(input_ids=ids, attention_mask=mask, graph_decode="compiled", max_new_tokens=8,
                               **STATIC)
        assert torch.equal(ref, got)
    # a prompt one token shorter lands in the same cache-length bucket (the compiled shapes), and still agrees
    ref = student.generate(input_ids=ids[:, 1:], attention_mask=mask[:, 1:], graph_decode=False, max_new_tokens=8,
                           **STATIC)
    got = student.generate(input_ids=ids[:, 1:], attention_mask=mask[:, 1:], graph_decode="compiled",
                           max_new_tokens=8, **STATIC)
    assert torch.equal(ref, got)
    assert list(student._radistill_compiled_steps) == ["aot_eager"] and set(student.state_dict()) == keys
    with pytest.raises(RadistillError, match="graph_decode must be"):
        student.generate(input_ids=ids, graph_decode="fast", max_new_tokens=2, **STATIC)


CPP_TOOLCHAIN = bool(shutil.which("c++") or shutil.which("g++")) and \
    (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()


def inductor_compiles_on_cpu() -> bool:
    """Whether this machine's toolchain builds inductor's CPU code at all (a two-operator function)."""
    try:
        torch.compile(lambda x: x * 2 + 1, backend="inductor")(torch.ones(3))
        return True
    except Exception:  # noqa: BLE001 (a toolchain problem of the machine, not of the code under test)
        return False


@pytest.mark.skipif(not CPP_TOOLCHAIN, reason="inductor's CPU code needs a C++ compiler and Python's headers")
def test_the_inductor_compiled_step_gives_the_same_tokens(student):
    """The loop's real backend, inductor, lowers the step (on CPU its C++ code; on CUDA its Triton kernels, tested in
    tests/test_generate_cuda.py) and gives the same tokens."""
    from radistill.hybrid import graph_decode

    if not inductor_compiles_on_cpu():
        pytest.skip("inductor cannot build CPU code on this machine (toolchain)")
    assert graph_decode.STEP_BACKEND == "inductor"
    student.__dict__.pop("_radistill_compiled_steps", None)
    ids, mask, _ = left_padded(batch=3, length=10, pads=(0, 4, 7))
    ref = student.generate(input_ids=ids, attention_mask=mask, graph_decode=False, max_new_tokens=12, **STATIC)
    got = student.generate(input_ids=ids, attention_mask=mask, graph_decode="compiled", max_new_tokens=12, **STATIC)
    assert torch.equal(ref, got)


def test_sampling_benchmark_quick(tmp_path):
    """benchmarks/sampling.py runs on CPU: every row (the teacher; each hybrid through transformers' loop and its
    captured loop, which the script checks each row takes) gets a rate in every cell."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "sampling.json"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "sampling.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["loop"] for r in result["rows"]] == ["transformers"] + ["transformers", "captured"] * 2
    assert all(c["tokens_per_s"] > 0 for r in result["rows"] for c in r["cells"].values())
    assert "| captured |" in out.with_suffix(".md").read_text()
