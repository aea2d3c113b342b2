"""Teacher vs hybrids through ``model.generate()``, each at its best transformers setting, in one process.

Models: a Llama-3.2-1B-shaped teacher with random bf16 weights (SDPA) and one head-level hybrid per ``--mixers``
entry, each keeping the paper's 10 heads as attention (benchmarks/decode.py's PAPER_HEADS) and replacing every other
head by the mixer: ``discrete_mamba2`` (state ``--state-size``) and the default ``window_recurrent`` (window
``--window`` softmax attention + gated DiscreteMamba2 of state ``--state-size``). Weights are random: speed does not
depend on them. All generate greedily with ``cache_implementation="static"``, so transformers compiles their decode
step (its default ``CompileConfig``: inductor, ``reduce-overhead`` = CUDA graphs) -- the teacher on transformers'
``StaticCache``, the hybrids on their static ``HybridCache``. Prefill is what ``generate`` runs eagerly (no compile),
the hybrids' scan through fla's chunked kernel when installed.

Measured, in this order (the most asked-for first; ``--time-limit`` stops cleanly between parts, see run_parts):
1. decode tokens/s at 8k, batch 1 then 16: ``generate`` of ``--new-tokens`` tokens minus ``generate`` of 1 token
   (same prompt; both after an untimed warm-up that compiles), i.e. batch x (new - 1) / time difference;
2. prefill: one ``model(ids, use_cache=True, logits_to_keep=1)`` (what generate's prefill runs), median of 3 after a
   warm-up, batch 1 at 2k and 8k; for each hybrid also with its scan on the plain-PyTorch chunked path
   (``RADISTILL_SSD_TORCH_BELOW``, radistill/ops/ssd) instead of fla's kernels: does that cut the host-bound short
   prefill?
3. decode at 32k (batch 1, 16), prefill 32k batch 1 and 8k batch 16, the long generation (32k prompt + 256 new
   tokens at batch 1: time to first token and tokens/s; the hybrids also through their graph loop), greedy
   agreement of the default hybrid's static compiled cache vs the eager growing cache (bf16: a rare near-tie may
   flip, so the fraction is reported, not asserted);
   Each hybrid's decode cells are measured twice: through transformers' loop (as above) and through the hybrid's
   own generate() default on CUDA, the captured greedy loop (radistill/hybrid/graph_decode.py; "graph loop" rows;
   ``--no-graph-loop`` leaves them out);
4. ``--profile`` (last): torch.profiler of one decode step at 8k batch 16 (the compiled CUDA-graph step when the
   profiler sees its kernels, else eager) and one 2k batch-1 prefill, per model: the top 15 device kernels by
   total time, kernel count, launch calls, device time vs wall time -> ``<out>-profile.{json,md}``.

Bandwidth bound and ceiling, per decode cell: the bytes one step must read -- every weight once (``weight_bytes``:
the real parameters), and per sequence the cache a real batch-1 prefill of that length leaves (``cache_nbytes`` of
the model's own cache: the teacher's KV, the hybrid's kept-head KV plus its recurrent state, window ring and conv
window at the dtypes the cache really holds; the SSM state and conv window count twice, read and rewritten). The
static caches of the timed generate hold ``--new-tokens`` + 8 positions more than the prompt (<1% at 8k).
``bound`` = bandwidth / bytes x batch; ``ceiling`` = teacher bytes / hybrid bytes = the ratio of the two bounds: the
hybrid/teacher decode ratio once both steps are bandwidth-bound (a step cannot beat reading its bytes once). A
measured ratio above it means the teacher runs further below its bound than the hybrid (as at batch 16, where the
teacher's attention over the KV is far from the bandwidth bound), not that the bytes were miscounted.

Rows are written (JSON and markdown) as they are measured, so a timeout keeps what was done.

    python benchmarks/generate.py --time-limit 400 --profile   # one H200 -> benchmarks/results/generate.{json,md}
                                                               #   and generate-profile.{json,md}
    python benchmarks/generate.py --quick --profile --out /tmp/generate-quick.json   # CPU smoke run (tiny shapes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode import PAPER_HEADS, QUICK_HEADS, _fla_version, describe, make_models, sync, weight_bytes  # noqa: E402
from transformers.generation import CompileConfig  # noqa: E402

from radistill.hybrid.build import convert, student_config  # noqa: E402
from radistill.hybrid.memory import cache_nbytes, memory_rows, takes_window, with_build_defaults  # noqa: E402
from radistill.hybrid.mixers import find_mixer  # noqa: E402
from radistill.hybrid.modeling import output_cache  # noqa: E402
from radistill.ops.ssd import TORCH_BELOW_ENV  # noqa: E402
from radistill.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
H200_BANDWIDTH = 4.8e12  # bytes/s, the H200's HBM3e peak


def prompt(model, batch: int, length: int, device: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (batch, length), generator=generator).to(device)


@torch.no_grad()
def generate(model, ids: torch.Tensor, new_tokens: int, compile_config, static: bool = True,
             cache_length: int | None = None) -> tuple[float, torch.Tensor]:
    """Seconds of one greedy ``generate`` of exactly ``new_tokens`` tokens, and its output ids. ``cache_length``:
    the static cache's length (transformers' ``max_cache_len``), so calls of one prompt length share compiled
    shapes whatever their number of new tokens."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                  pad_token_id=0)
    if static:
        kwargs.update(cache_implementation="static", compile_config=compile_config, max_cache_len=cache_length)
    device = str(ids.device)
    sync(device)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    sync(device)
    return time.perf_counter() - start, out


@torch.no_grad()
def prefill_timings(model, ids: torch.Tensor, device: str, repeat: int = 3) -> tuple[float, float]:
    """Median seconds of one prefill forward of ``ids`` [batch, length] after a warm-up: (until the device finished,
    until the forward *returned*). When the second is close to the first, the prefill is bound by the host launching
    kernels, not by the device running them."""
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    times, returned = [], []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        returned.append(time.perf_counter() - start)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), statistics.median(returned)


def time_prefill(model, batch: int, length: int, device: str, repeat: int = 3, host: list | None = None) -> float:
    """Median seconds of one prefill forward of a ``batch`` x ``length`` prompt; ``host``, if given, gets the median
    seconds until the forward returned (:func:`prefill_timings`)."""
    total, returned = prefill_timings(model, prompt(model, batch, length, device), device, repeat)
    if host is not None:
        host.append(returned)
    return total


class StepInputs:
    """Records the (name, shape, stride, dtype) of every tensor the compiled decode step is called with (dicts of
    masks included), by wrapping ``model.get_compiled_call``. One layout over a whole generate is what lets the step
    stay one graph (one CUDA graph); a new stride or shape per token makes dynamo recompile with symbolic sizes and
    CUDA graph trees record a graph per distinct size."""

    def __init__(self, model):
        self.model, self.layouts = model, set()

    @staticmethod
    def layout(value, name: str = "") -> list:
        if isinstance(value, torch.Tensor):
            return [(name, tuple(value.shape), value.stride(), str(value.dtype))]
        if isinstance(value, dict):
            return [item for key, v in value.items() for item in StepInputs.layout(v, f"{name}.{key}")]
        return []

    def __enter__(self):
        original = self.model.get_compiled_call

        def recording(compile_config):
            step = original(compile_config)

            def record(**kwargs):
                self.layouts.add(tuple(item for key in sorted(kwargs) for item in self.layout(kwargs[key], key)))
                return step(**kwargs)
            return record
        self.model.get_compiled_call = recording
        return self

    def __exit__(self, *exc):
        del self.model.get_compiled_call  # the instance attribute: the class method shows through again


def model_label(mixer: str, heads: int, state_size: int, window: int, sink: int = 0) -> str:
    return (f"hybrid {mixer} K={heads} N={state_size}" + (f" W={window}" if takes_window(mixer) else "")
            + (f" S={sink}" if sink else ""))


def make_generate_models(quick: bool, device: str, dtype: torch.dtype, mixers: list[str], state_size: int,
                         window: int) -> dict[str, torch.nn.Module]:
    """The teacher (decode.py's random Llama-3.2-1B shape) and one hybrid per mixer, built by radistill's build path
    with the same kept heads (and the build's defaults: window heads get its attention sinks, ``S`` in the label)."""
    (teacher,) = make_models(quick, device, dtype, []).values()
    heads = QUICK_HEADS if quick else PAPER_HEADS
    kept = [sorted(h for l, h in heads if l == layer) for layer in range(teacher.config.num_hidden_layers)]
    models = {"teacher": teacher}
    for mixer in mixers:
        settings = with_build_defaults(mixer, {"state_size": state_size}
                                       | ({"window": window} if takes_window(mixer) else {}))
        models[model_label(mixer, len(heads), state_size, window, settings.get("sink", 0))] = convert(
            teacher, student_config(teacher, kept, mixer, settings)).eval()
    return models


@torch.no_grad()
def sequence_cache_bytes(model, length: int, device: str) -> dict[str, int]:
    """Bytes per sequence of the model's own cache after a real batch-1 prefill of ``length`` tokens, by kind
    (``cache_nbytes``: ``kv``, the mixer's state parts, ``total``), at the dtypes the cache holds."""
    out = model(input_ids=prompt(model, 1, length, device), use_cache=True, logits_to_keep=1)
    sizes = cache_nbytes(output_cache(out))
    del out
    return sizes


def config_bytes(model, length: int, dtype: str) -> dict[str, int]:
    """radistill.memory's per-sequence bytes for the model's config at ``dtype`` (every part at that dtype: the
    measured cache holds the SSM state at float32, so in bf16 its SSM part is twice this), to check the measured
    bytes against: ``{"kv", "state" (SSM and rings), "conv"}``."""
    rows = memory_rows(model.config, [length], dtype)
    (row,) = [r for r in rows if r.model == "teacher" or r.model.startswith("student")]
    return {"kv": row.kv_bytes, "state": row.ssm_bytes, "conv": row.conv_bytes}


def step_bytes(model, per_sequence: dict[str, int], batch: int) -> int:
    """Bytes one decode step must move: every weight once, per sequence the KV and the window rings (``window.*``:
    read whole, one slot written) once, and every other recurrent state part (SSM state, conv window: rewritten
    whole each step) twice, read and written."""
    once = sum(v for k, v in per_sequence.items() if k == "kv" or k.startswith("window."))
    rewritten = per_sequence["total"] - once
    return weight_bytes(model) + batch * (once + 2 * rewritten)


def decode_cell(model, ids, new_tokens, compile_config, cache_length) -> dict:
    from torch._dynamo.utils import counters

    batch = ids.shape[0]
    graphs_before = int(counters["stats"]["unique_graphs"])
    with StepInputs(model) as inputs:  # the untimed warm-up only: recording costs host time per step
        generate(model, ids, new_tokens, compile_config, cache_length=cache_length)  # warm-up: compiles, captures
    first, _ = generate(model, ids, 1, compile_config, cache_length=cache_length)
    total, _ = generate(model, ids, new_tokens, compile_config, cache_length=cache_length)
    rate = batch * (new_tokens - 1) / max(total - first, 1e-9)
    # graphs dynamo has built so far in the process: 0 would mean the decode step ran uncompiled; per cell, more
    # than one new graph or more than one step-input layout means per-token recompiles / re-recorded CUDA graphs
    return {"tokens_per_s": rate, "generate_s": total, "first_token_s": first,
            "dynamo_graphs_so_far": int(counters["stats"]["unique_graphs"]),
            "dynamo_graphs_this_cell": int(counters["stats"]["unique_graphs"]) - graphs_before,
            "step_input_layouts": len(inputs.layouts)}


def difference_rate(model, ids, new_tokens: int, kwargs: dict, repeat: int = 3, first_token: bool = True) -> dict:
    """Decode tokens/s of ``model.generate(input_ids=ids, max_new_tokens=n, **kwargs)`` (every call must make exactly
    n tokens: no end token): batch x (new - short) / (time(new) - time(short)), ``short`` = new / 4 tokens. Both
    calls prefill (and capture) alike, so the difference is ``new - short`` decode steps. (Against a 1-token call,
    which captures nothing and allocates a cache of another length, the difference also held the capture and an
    allocation: the first H200 run read 100% of the bandwidth bound at 8k batch 1.) Every length runs once untimed
    first (first-use kernels, cuBLAS handles, its cache's allocation), then the median of ``repeat`` calls each;
    with ``first_token`` also a 1-token call (the prefill and first token), ``first_token_s``."""
    def timed(n: int) -> float:
        sync(str(ids.device))
        start = time.perf_counter()
        out = model.generate(input_ids=ids, max_new_tokens=n, **kwargs)
        sync(str(ids.device))
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - start

    short = max(2, new_tokens // 4)
    lengths = ((1,) if first_token else ()) + (short, new_tokens)
    for n in lengths:
        timed(n)
    times = dict(zip(lengths, (statistics.median(timed(n) for _ in range(repeat)) for n in lengths)))
    at_short, total = times[short], times[new_tokens]
    # a prefill whose run-to-run spread exceeds the decode's time leaves no difference to read: not measured
    rate = ids.shape[0] * (new_tokens - short) / (total - at_short) if total > at_short else None
    return {"tokens_per_s": rate, "generate_s": total, **({"first_token_s": times[1]} if first_token else {}),
            "short_tokens": short, "short_generate_s": at_short, "repeat": repeat}


def graph_decode_cell(model, ids, new_tokens, force: bool = False, repeat: int = 3, compiled: bool = False) -> dict:
    """A decode cell through the hybrid's own greedy loop: ``generate(cache_implementation="static")`` as a user
    calls it on CUDA, whose decode step replays as a CUDA graph (radistill/hybrid/graph_decode.py). Each call
    captures its graph anew, as a user's call does. ``force``: the loop on CPU too (no graph there; the quick run's
    check of this path). ``compiled``: ``graph_decode="compiled"``, the step's forward compiled before the capture
    (its compilation falls in the untimed warm-up calls). Tokens/s by :func:`difference_rate`."""
    from radistill.hybrid.graph_decode import decode_plan

    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0,
                  cache_implementation="static")
    mode = "compiled" if compiled else True if force else None
    if decode_plan(model, ids, {**kwargs, "max_new_tokens": new_tokens}, mode) is None:
        raise RuntimeError("this call would not take the graph loop (CPU, or a setting it leaves to transformers)")
    return {**difference_rate(model, ids, new_tokens, {**kwargs, "graph_decode": mode}, repeat),
            "loop": "radistill graph loop"}


class LastStep:
    """Keeps the compiled decode step ``generate`` used and the keyword arguments of its last call (the static
    cache among them), by wrapping ``model.get_compiled_call``, so one decode step can be run again under the
    profiler with exactly generate's inputs."""

    def __init__(self, model):
        self.model, self.step, self.kwargs = model, None, None

    def __enter__(self):
        original = self.model.get_compiled_call

        def recording(compile_config):
            step = original(compile_config)

            def record(**kwargs):
                self.step, self.kwargs = step, kwargs
                return step(**kwargs)
            return record
        self.model.get_compiled_call = recording
        return self

    def __exit__(self, *exc):
        del self.model.get_compiled_call


def device_time(event) -> float:
    """Self device microseconds of a profiler entry (``self_device_time_total``; older torch: ``self_cuda_...``)."""
    value = getattr(event, "self_device_time_total", None)
    return float(value if value is not None else getattr(event, "self_cuda_time_total", 0.0))


def launch_call(event) -> bool:
    """A host-side CUDA runtime/driver call that puts work on the device (cudaLaunchKernel, Triton's cuLaunchKernel*,
    cudaGraphLaunch, async copies and sets), as the profiler names them."""
    return not str(event.device_type).endswith("CUDA") and (
        ("Launch" in event.key and event.key.startswith("cu")) or event.key in ("cudaMemcpyAsync", "cudaMemsetAsync"))


def profile_call(fn, device: str, rows: int = 15) -> dict:
    """torch.profiler over one ``fn()``: the top ``rows`` device kernels by total time (name, count, total us),
    their summed device time, the number of kernels run, the host's launch calls by kind, and the wall time of the
    profiled call (profiler overhead included). On CPU (no device kernels) the top CPU ops stand in, so the path
    runs in the smoke test."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    if cuda:
        kernels = [e for e in events if str(e.device_type).endswith("CUDA") and device_time(e) > 0]
        timing = device_time
    else:
        kernels = [e for e in events if e.self_cpu_time_total > 0 and e.key.startswith("aten::")]
        timing = lambda e: float(e.self_cpu_time_total)  # noqa: E731
    kernels.sort(key=timing, reverse=True)
    launches = {e.key: int(e.count) for e in events if launch_call(e)}
    return {"timed": "device kernels" if cuda else "CPU aten ops (no device)",
            "top": [{"name": e.key, "count": int(e.count), "total_us": timing(e)} for e in kernels[:rows]],
            "device_total_us": sum(timing(e) for e in kernels), "kernels_run": sum(int(e.count) for e in kernels),
            "launch_calls": launches, "wall_us": wall * 1e6}


@torch.no_grad()
def profile_decode(model, ids, compile_config, cache_length, device) -> dict:
    """One decode step with generate's own inputs: the compiled step (a CUDA-graph replay on GPU) and the same step
    eagerly (its kernels one launch each: what the graph saves the host). The step's input shapes are recorded:
    the static cache's length shows in its masks."""
    # generate never shrinks a static cache (transformers and HybridCache keep the longest length asked so far): start
    # from this cell's own length, not a longer context's, whose compiled shapes and attention span would be measured
    if hasattr(model, "_previous_max_cache_length"):
        del model._previous_max_cache_length
    with LastStep(model) as last:
        generate(model, ids, 3, compile_config, cache_length=cache_length)
    if last.step is None:
        raise RuntimeError("generate never called the compiled decode step")
    step, kwargs = last.step, last.kwargs
    step(**kwargs)  # the step at the last position again (same inputs, same cache slot): a warm replay
    result = {"step_inputs": [[name, list(shape)] for key in sorted(kwargs)
                              for name, shape, _, _ in StepInputs.layout(kwargs[key], key)]}
    result["compiled"] = profile_call(lambda: step(**kwargs), device)
    model(**kwargs)
    result["eager"] = profile_call(lambda: model(**kwargs), device)
    return result


@torch.no_grad()
def profile_prefill(model, ids, device) -> dict:
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return profile_call(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), device)


class TorchScan:
    """Within the block, every recurrent scan of fewer than ``tokens`` tokens takes the plain-PyTorch chunked path
    (compiled on CUDA) instead of fla's kernels (``RADISTILL_SSD_TORCH_BELOW``, read at each dispatch)."""

    def __init__(self, tokens: int):
        self.tokens = tokens

    def __enter__(self):
        self.previous = os.environ.get(TORCH_BELOW_ENV)
        os.environ[TORCH_BELOW_ENV] = str(self.tokens)

    def __exit__(self, *exc):
        if self.previous is None:
            os.environ.pop(TORCH_BELOW_ENV, None)
        else:
            os.environ[TORCH_BELOW_ENV] = self.previous


def run_parts(work: list, time_limit: float | None, reserve: float, started: float, result: dict, save,
              clock=time.perf_counter) -> None:
    """Run ``work`` [(what, kind, fn)] in order. With ``time_limit`` (seconds since ``started``), a part starts only
    if it is expected to end by the limit -- less ``reserve`` for every part but the ``profile`` -- expected = the
    longest finished part of its kind; for the first of a kind, the longest finished part of any kind (a first
    part may compile new shapes), and ``reserve`` for the profile. Appends to ``result["done"]`` /
    ``result["skipped"]`` and calls ``save()`` after each part."""
    took: dict[str, float] = {}
    for what, kind, fn in work:
        begun = clock()
        elapsed = begun - started
        if time_limit is not None:
            limit = time_limit - (reserve if kind != "profile" else 0.0)
            expected = took.get(kind, reserve if kind == "profile" else max(took.values(), default=0.0))
            if elapsed + expected >= limit:
                result["skipped"].append(what)
                print(f"{what}: skipped (at {elapsed:.0f} s, expected {expected:.0f} s more; limit {limit:g} s)",
                      flush=True)
                continue
        fn()
        took[kind] = max(took.get(kind, 0.0), clock() - begun)
        result["done"].append(f"{what} (by {clock() - started:.0f} s)")
        save()


def run(args) -> dict:
    started = time.perf_counter()
    quick = args.quick
    skip = set(args.skip or [])
    device = "cpu" if quick else args.device
    dtype = torch.float32 if quick else torch.bfloat16
    # The compiled steps go through nn.Module.__call__'s frames, whose recompile budget (default 8) the shapes here
    # (3 models x batch sizes x cache lengths) could exhaust, after which dynamo silently runs eagerly
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    models = make_generate_models(quick, device, dtype, args.mixers, args.state_size, args.window)
    names = list(models)
    teacher, hybrids = names[0], names[1:]
    # the hybrids once more through their own generate() default on CUDA: the captured greedy loop (the rows above
    # go through transformers' loop: min_new_tokens and compile_config keep them there)
    graph_names = [f"{h} graph loop" for h in hybrids] if args.graph_loop else []
    base = {**{n: n for n in names}, **{g: h for g, h in zip(graph_names, hybrids)}}
    compiled_names = []
    if args.graph_loop and args.compiled_loop:  # the loop once more with its step's forward compiled
        chosen = [h for h, m in zip(hybrids, args.mixers) if args.compiled_loop == "all" or m in args.compiled_loop]
        compiled_names = [f"{h} graph loop compiled" for h in chosen]
        graph_names += compiled_names
        base.update(zip(compiled_names, chosen))
        if quick:  # no C++ compiler for inductor's CPU code here: trace with a compiler-free backend
            from radistill.hybrid import graph_decode as loop_module

            loop_module.STEP_BACKEND = "aot_eager"
    if quick:
        # CPU has no CUDA graphs and no C++ toolchain here: the eager backend still traces the whole step
        compile_config = CompileConfig(backend="eager", fullgraph=True, mode=None)
        compile_config._compile_all_devices = True
        # 16 new tokens: the graph loop's rate is a difference of two calls (16 vs 4 tokens), which on a loaded CPU
        # needs more than a couple of steps to stand above the calls' spread
        prefill_lengths, prefill_b16, contexts, batches, long = [32, 64], (64, 2), [48], [1, 2], (48, 16)
        new_tokens = 16
    else:
        # transformers' default CompileConfig; --dynamic: one dynamic-shape graph per model instead of a recompile
        # per new batch size / cache length (same setting for all models)
        compile_config = CompileConfig(dynamic=True) if args.dynamic else None
        prefill_lengths, prefill_b16, contexts, batches, long = [2048, 8192, 32768], (8192, 16), [8192, 32768], \
            [1, 16], (32768, 256)
        new_tokens = args.new_tokens
        contexts, batches = args.contexts or contexts, args.batches or batches
    result = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "python": platform.python_version(), "cuda": torch.version.cuda, "fla": _fla_version()},
        "dtype": str(dtype).removeprefix("torch."),
        "quick": quick,
        "models": names,
        "graph_loop_models": graph_names,
        "graph_loop_only": args.graph_loop_only,
        "setting": "generate(cache_implementation='static') for all, transformers' default compile of the decode "
                   "step" + (" (quick: eager backend, fullgraph)" if quick else " (inductor, reduce-overhead)")
                   + (", dynamic=True" if args.dynamic and not quick else ""),
        "bandwidth_bytes_per_s": H200_BANDWIDTH,
        "new_tokens": new_tokens,
        "time_limit_s": args.time_limit,
        "weight_bytes": {n: weight_bytes(m) for n, m in models.items()},
        "cache_bytes_per_sequence": {n: {} for n in names},
        "config_bytes_per_sequence": {n: {} for n in names},  # radistill.memory's accounting, to check against
        "prefill_s": {n: {} for n in names},
        "prefill_host_s": {n: {} for n in names},
        "prefill_torch_scan_s": {n: {} for n in hybrids},
        "prefill_torch_scan_host_s": {n: {} for n in hybrids},
        "decode": {n: {} for n in names + graph_names},
        "ceiling": {n: {} for n in hybrids + graph_names},  # teacher bytes / hybrid bytes per decode cell
        "long": {n: {} for n in names + graph_names},
        "agreement": {},
        "done": [],
        "skipped": [],
        "errors": [],
    }
    if args.teacher_rows_from is not None:  # an earlier run's teacher rows, said so in the result
        earlier = json.loads(args.teacher_rows_from.read_text())
        result["decode"][teacher] = earlier["decode"].get(earlier["models"][0], {})
        result["long"][teacher] = earlier["long"].get(earlier["models"][0], {})
        result["teacher_rows_from"] = {"file": str(args.teacher_rows_from), "device": earlier.get("device"),
                                       "versions": earlier.get("versions")}
    profile_out = args.out.with_name(args.out.stem + "-profile.json")
    profiles = {"device": result["device"], "versions": result["versions"], "models": names, "cases": {},
                "errors": []}

    def save() -> None:
        write_json_atomic(args.out, result)
        write_text_atomic(args.out.with_suffix(".md"), table(result))
        if profiles["cases"] or profiles["errors"]:
            write_json_atomic(profile_out, profiles)
            write_text_atomic(profile_out.with_suffix(".md"), profile_table(profiles))

    def attempt(what: str, fn, errors: list | None = None):
        try:
            return fn()
        except Exception as exc:  # one failed cell must not cost the rest of a GPU run
            (result["errors"] if errors is None else errors).append(f"{what}: {describe(exc)}")
            print(f"  {what}: FAILED {describe(exc)}", flush=True)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            return None

    # Order: generate never shrinks a model's static cache (to keep compiled shapes), so decode contexts go
    # ascending (a shorter context after a longer one would attend over the longer buffer); the longest context's
    # cells and the long run share one cache length, so they share compiled shapes.
    length, steps = long
    cache_lengths = {n: n + max(new_tokens, steps if n == length else 0) + 8 for n in contexts}
    contexts = sorted(contexts)

    def cache_bytes_of(name: str, context: int) -> int | None:
        """Measured cache bytes per sequence of ``name`` at ``context`` (a real prefill), once per pair."""
        if context not in result["cache_bytes_per_sequence"][name]:
            model = models[name]
            result["cache_bytes_per_sequence"][name][context] = attempt(
                f"cache bytes {name} {context}", lambda: sequence_cache_bytes(model, context, device))
            row = attempt(f"config bytes {name} {context}", lambda: config_bytes(model, context, result["dtype"]))
            result["config_bytes_per_sequence"][name][context] = row
        return result["cache_bytes_per_sequence"][name][context]

    def add_bound(cell: dict, name: str, context: int, batch: int) -> None:
        per_sequence = cache_bytes_of(name, context)
        if per_sequence:
            cell["bytes_per_step"] = step_bytes(models[name], per_sequence, batch)
            cell["bound_tokens_per_s"] = batch * H200_BANDWIDTH / cell["bytes_per_step"]
            if cell.get("tokens_per_s"):
                cell["percent_of_bound"] = 100 * cell["tokens_per_s"] / cell["bound_tokens_per_s"]

    def decode(context: int, batch: int, name: str) -> None:
        key, model = f"{context}x{batch}", models[base[name]]
        if name in graph_names:
            cell = attempt(f"decode {name} {key}", lambda: graph_decode_cell(
                model, prompt(model, batch, context, device), new_tokens, force=quick,
                compiled=name.endswith(" compiled"))) or {}
            add_bound(cell, base[name], context, batch)  # same model, same bytes as its transformers-loop row
            result["decode"][name][key] = cell
            print(f"decode {name} {key}: {cell}", flush=True)
            t = {}
            add_bound(t, teacher, context, batch)  # the teacher's bytes (measured here too with --graph-loop-only)
            if t.get("bytes_per_step") and cell.get("bytes_per_step"):
                result["ceiling"][name][key] = t["bytes_per_step"] / cell["bytes_per_step"]
            return
        cell = attempt(f"decode {name} {key}", lambda: decode_cell(
            model, prompt(model, batch, context, device), new_tokens, compile_config, cache_lengths[context])) or {}
        add_bound(cell, name, context, batch)
        result["decode"][name][key] = cell
        print(f"decode {name} {key}: {cell}", flush=True)
        for hybrid in hybrids:  # the ceiling of every cell both sides of which have their bytes
            for cell_key, c in result["decode"][hybrid].items():
                t = result["decode"][teacher].get(cell_key) or {}
                if t.get("bytes_per_step") and c.get("bytes_per_step"):
                    result["ceiling"][hybrid][cell_key] = t["bytes_per_step"] / c["bytes_per_step"]

    def prefill(length: int, batch: int = 1) -> None:
        key = f"{length}x{batch}"
        for name in names:
            host = []
            value = attempt(f"prefill {name} {key}",
                            lambda: time_prefill(models[name], batch, length, device, host=host))
            result["prefill_s"][name][key] = value
            result["prefill_host_s"][name][key] = host[0] if host else None
            print(f"prefill {name} {key}: {value} (host {host[0] if host else None})", flush=True)
        if batch == 1:  # the scan on the plain-PyTorch chunked path instead of fla's kernels
            for name in hybrids:
                host = []
                with TorchScan(length + 1):
                    value = attempt(f"prefill {name} torch scan {key}",
                                    lambda: time_prefill(models[name], batch, length, device, host=host))
                result["prefill_torch_scan_s"][name][key] = value
                result["prefill_torch_scan_host_s"][name][key] = host[0] if host else None
                print(f"prefill {name} torch scan {key}: {value} (host {host[0] if host else None})", flush=True)
        save()

    def long_run(model):
        ids = prompt(model, 1, length, device, seed=1)
        cache_length = cache_lengths.get(length, length + steps + 8)
        generate(model, ids, steps, compile_config, cache_length=cache_length)  # warm-up (new shapes compile)
        first, _ = generate(model, ids, 1, compile_config, cache_length=cache_length)
        total, _ = generate(model, ids, steps, compile_config, cache_length=cache_length)
        return {"prompt": length, "new_tokens": steps, "ttft_s": first, "total_s": total,
                "end_to_end_tokens_per_s": steps / total,
                "decode_tokens_per_s": (steps - 1) / max(total - first, 1e-9)}

    def long_graph(model, compiled: bool = False):
        """The long generation through the hybrid's own greedy loop (what generate() does on CUDA by default)."""
        cell = graph_decode_cell(model, prompt(model, 1, length, device, seed=1), steps, force=quick,
                                 compiled=compiled)
        return {"prompt": length, "new_tokens": steps, "ttft_s": cell["first_token_s"], "total_s": cell["generate_s"],
                "end_to_end_tokens_per_s": steps / cell["generate_s"], "decode_tokens_per_s": cell["tokens_per_s"]}

    def long_all(decoded: list[str]) -> None:
        for name in decoded:
            looped = name in graph_names
            run_one = (lambda: long_graph(models[base[name]], name.endswith(" compiled"))) if looped else \
                (lambda: long_run(models[name]))
            result["long"][name] = attempt(f"long {name}", run_one)
            print(f"long {name}: {result['long'][name]}", flush=True)
            save()

    def agreement(name: str) -> dict:
        """Fraction of equal greedy tokens, and where they part: the step, the eager path's top-2 logit margin
        there, and the largest logit difference up to it (same tokens so far, so the same inputs). A margin
        below that difference is a near-tie that rounding flipped, not a wrong step."""
        model = models[name]
        ids = prompt(model, 1, 64 if quick else 512, device, seed=2)  # batch 1: the shapes compiled already
        n = 8 if quick else 32
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                      attention_mask=torch.ones_like(ids), output_scores=True, return_dict_in_generate=True)
        with torch.no_grad():
            static = model.generate(input_ids=ids, cache_implementation="static", compile_config=compile_config,
                                    max_cache_len=max(cache_lengths.values()), **kwargs)
            growing = model.generate(input_ids=ids, **kwargs)
        a, b = static.sequences[0, ids.shape[1]:], growing.sequences[0, ids.shape[1]:]
        parted = (a != b).nonzero()
        last = int(parted[0]) if len(parted) else n - 1
        gap = max(float((static.scores[i] - growing.scores[i]).float().abs().max()) for i in range(last + 1))
        top2 = growing.scores[last][0].float().topk(2).values
        return {"equal_fraction": float((a == b).float().mean()),
                "first_different_step": int(parted[0]) if len(parted) else None,
                "eager_top2_margin_there": float(top2[0] - top2[1]) if len(parted) else None,
                "max_logit_difference_until_then": gap}

    def agreement_all() -> None:
        for name in hybrids:
            result["agreement"][name] = attempt(f"agreement {name}", lambda: agreement(name))
        save()

    def profile_all() -> None:
        context, batch = contexts[0], max(batches)
        for name in names:
            model = models[name]
            ids = prompt(model, batch, context, device)
            profiles["cases"].setdefault(name, {})[f"decode step {context}x{batch}"] = attempt(
                f"profile decode {name}", lambda ids=ids: profile_decode(
                    model, ids, compile_config, cache_lengths[context], device), profiles["errors"])
            del ids  # the batch-16 prompt is not needed by the prefill profile
            profiles["cases"][name][f"prefill {prefill_lengths[0]}x1"] = attempt(
                f"profile prefill {name}", lambda: profile_prefill(model, prompt(model, 1, prefill_lengths[0], device),
                                                                   device), profiles["errors"])
            save()

    # (what, kind, run): a part's kind names the finished parts whose longest time estimates it (a model's decode
    # cells each compile their own shapes, so one model's cell is the best guess for its next)
    # The compiled loop's cells come after the long generation: each compiles its own shapes (tens of seconds), and
    # the rows the table needs (teacher, each hybrid's default loop, prefill, long) go first under a limit.
    first, rest = contexts[:1], contexts[1:]
    looped = [g for g in graph_names if g not in compiled_names]
    decoded = looped if args.graph_loop_only else [teacher] + looped
    if "hf-loop" not in skip and not args.graph_loop_only:  # the hybrids through transformers' loop as well
        decoded[1:1] = hybrids
    if args.graph_loop_only:  # the graph-loop rows alone (no compile): prefill, agreement and the teacher's rows off
        skip |= {"prefill", "agreement"}
    work = [(f"decode {c}x{b} {n}", f"decode {n}", lambda c=c, b=b, n=n: decode(c, b, n))
            for c in first for b in batches for n in decoded]
    if "prefill" not in skip:
        work += [(f"prefill {n}x1", "prefill", lambda n=n: prefill(n)) for n in prefill_lengths[:2]]
    work += [(f"decode {c}x{b} {n}", f"decode {n}", lambda c=c, b=b, n=n: decode(c, b, n))
             for c in rest for b in batches for n in decoded]
    if "prefill" not in skip:
        work += [(f"prefill {n}x1", "prefill", lambda n=n: prefill(n)) for n in prefill_lengths[2:]]
        work.append((f"prefill {prefill_b16[0]}x{prefill_b16[1]}", "prefill", lambda: prefill(*prefill_b16)))
    if "long" not in skip:
        work.append(("long", "long", lambda: long_all(decoded)))
    work += [(f"decode {c}x{b} {n}", f"decode {n}", lambda c=c, b=b, n=n: decode(c, b, n))
             for c in contexts for b in batches for n in compiled_names]
    if "agreement" not in skip:
        work.append(("agreement", "agreement", agreement_all))
    if args.profile:
        work.append(("profile", "profile", profile_all))
    run_parts(work, args.time_limit, args.profile_reserve if args.profile else 0.0, started, result, save)
    save()  # also when the limit left nothing to run: the files say what was not run
    return result


def table(result: dict) -> str:
    names = result["models"]
    teacher, hybrids = names[0], names[1:]
    fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    v = result["versions"]
    lines = [f"# generate() benchmark: {result['device']} ({result['dtype']}), torch {v['torch']}, transformers "
             f"{v['transformers']}, fla {v['fla']}", "", f"Setting: {result['setting']}.", ""]
    if result.get("graph_loop_only"):
        earlier = result.get("teacher_rows_from")
        lines += ["Graph-loop rows only (--graph-loop-only)" + (
            f"; the teacher's rows are copied from {earlier['file']} ({earlier['device']}, {earlier['versions']}), "
            "an earlier run: its ratios compare across runs." if earlier else "."), ""]
    shown = [n for n in names if n == teacher or result["decode"][n]]  # --graph-loop-only: no empty model rows
    if result["prefill_s"][teacher]:
        lines += ["| prefill (ms) | " + " | ".join(names) + " | " + " | ".join(f"{h} / teacher" for h in hybrids)
                  + " |", "|---|" + "---|" * (2 * len(names) - 1)]
    for cell in result["prefill_s"][teacher]:
        t = result["prefill_s"][teacher].get(cell)
        hs = [result["prefill_s"][h].get(cell) for h in hybrids]
        ratios = [f"{h / t:.2f}" if t and h else "-" for h in hs]
        lines.append(f"| {cell} | {fmt(t and t * 1e3)} | " + " | ".join(fmt(h and h * 1e3) for h in hs) + " | "
                     + " | ".join(ratios) + " |")
    if any(result["prefill_torch_scan_s"].get(h) for h in hybrids):
        lines += ["", "| prefill: scan path (ms; host ms until the forward returned) | model | "
                      "default path (fla on CUDA) | PyTorch chunked path |", "|---|---|---|---|"]
        for h in hybrids:
            for cell, value in result["prefill_torch_scan_s"][h].items():
                fla, fla_host = result["prefill_s"][h].get(cell), result["prefill_host_s"][h].get(cell)
                host = result["prefill_torch_scan_host_s"][h].get(cell)
                lines.append(f"| {cell} | {h} | {fmt(fla and fla * 1e3)} ({fmt(fla_host and fla_host * 1e3)}) | "
                             f"{fmt(value and value * 1e3)} ({fmt(host and host * 1e3)}) |")
    lines += ["", f"| decode ({result['new_tokens']} new) | model | tok/s | GB / step | bound tok/s | % of bound | "
                  "vs teacher | ceiling |", "|---|---|---|---|---|---|---|---|"]
    for cell in result["decode"][teacher]:
        t = (result["decode"][teacher].get(cell) or {}).get("tokens_per_s")
        for name in shown + result.get("graph_loop_models", []):
            c = result["decode"][name].get(cell) or {}
            ratio = "" if name == teacher or not (t and c.get("tokens_per_s")) else f"{c['tokens_per_s'] / t:.2f}x"
            ceiling = result["ceiling"].get(name, {}).get(cell)
            lines.append(f"| {cell} | {name} | {fmt(c.get('tokens_per_s'))} | "
                         f"{fmt(c.get('bytes_per_step') and c['bytes_per_step'] / 1e9, 3)} | "
                         f"{fmt(c.get('bound_tokens_per_s'))} | {fmt(c.get('percent_of_bound'))} | {ratio} | "
                         f"{'' if ceiling is None else f'{ceiling:.2f}x'} |")
    lines += ["", "GB / step: weights once + per sequence the KV and window rings once and 2x the SSM state and conv "
                  "window (read and rewritten), "
                  "from the models' real parameters and the caches of real prefills; ceiling = teacher bytes / "
                  "hybrid bytes, the hybrid/teacher decode ratio once both steps are bandwidth-bound (above it: the "
                  "teacher is further from its bound than the hybrid); bound: "
                  f"{result['bandwidth_bytes_per_s'] / 1e12:.1f} TB/s / bytes."]
    if result.get("graph_loop_models"):
        lines += ["", "\"graph loop\" rows: the same hybrid through its own generate() default on CUDA "
                      "(generate(cache_implementation='static'), greedy): one decode step captured as a CUDA graph per "
                      "call and replayed per token, one host read per 16 tokens (radistill/hybrid/graph_decode.py); "
                      "the other rows go through transformers' loop (generate(..., graph_decode=False) for a user)."]
    long_names = [n for n in names if result["long"].get(n)] + result.get("graph_loop_models", [])
    if any(result["long"].get(n) for n in long_names):
        lines += ["", "| long generation | TTFT (s) | end-to-end tok/s | decode tok/s |", "|---|---|---|---|"]
        for name in long_names:
            c = result["long"].get(name) or {}
            label = f"{name}: {c.get('prompt', '?')} + {c.get('new_tokens', '?')}"
            lines.append(f"| {label} | {fmt(c.get('ttft_s'), 3)} | {fmt(c.get('end_to_end_tokens_per_s'))} | "
                         f"{fmt(c.get('decode_tokens_per_s'))} |")
    for name, a in result["agreement"].items():
        if a:
            lines += ["", f"{name}: greedy tokens, static compiled vs eager growing cache: "
                          f"{fmt(100 * a['equal_fraction'])}% equal; first different step "
                          f"{a['first_different_step']} (eager top-2 margin there {a['eager_top2_margin_there']}, "
                          f"max logit difference until then {a['max_logit_difference_until_then']:.3g})."]
    layouts = {f"{n} {c}": (cell or {}).get("step_input_layouts") for n in names
               for c, cell in result["decode"][n].items()}
    lines += ["", f"Decode step input layouts per cell (1 = one graph): {layouts}."]
    if result["skipped"]:
        lines += ["", f"Not run (--time-limit {result['time_limit_s']} s): {', '.join(result['skipped'])}."]
    if result["errors"]:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def profile_table(profiles: dict) -> str:
    v = profiles["versions"]
    lines = [f"# generate() kernel profile: {profiles['device']}, torch {v['torch']}, transformers "
             f"{v['transformers']}, fla {v['fla']}", ""]

    def block(title: str, p: dict | None) -> None:
        if not p:
            lines.extend([f"## {title}", "", "failed (see errors)", ""])
            return
        launches = ", ".join(f"{k} {n}" for k, n in p["launch_calls"].items()) or "none recorded"
        lines.extend([f"## {title}", "",
                      f"{p['timed']}: {p['device_total_us']:.0f} us in {p['kernels_run']} runs; wall "
                      f"{p['wall_us']:.0f} us (profiled); host launch calls: {launches}.", "",
                      "| kernel | count | total us |", "|---|---|---|"])
        lines.extend(f"| `{row['name'][:100]}` | {row['count']} | {row['total_us']:.0f} |" for row in p["top"])
        lines.append("")

    for name, cases in profiles["cases"].items():
        for case, value in cases.items():
            if case.startswith("decode") and value:
                shapes = ", ".join(f"{n} {tuple(shape)}" for n, shape in value.get("step_inputs", []))
                lines.extend([f"{name}: {case}: step inputs {shapes}.", ""])
                block(f"{name}: {case}, compiled step", value.get("compiled"))
                block(f"{name}: {case}, eager step", value.get("eager"))
            else:
                block(f"{name}: {case}", value)
    if profiles["errors"]:
        lines += ["Errors:", ""] + [f"- {e}" for e in profiles["errors"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run with tiny shapes")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mixers", type=lambda v: [x for x in v.split(",") if x],
                        default=["discrete_mamba2", "window_recurrent"],
                        help="hybrids to build, comma-separated mixer names [discrete_mamba2,window_recurrent]")
    parser.add_argument("--state-size", type=int, default=8)
    parser.add_argument("--window", type=int, default=16, help="window of mixers that take one [16]")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per timed decode generate")
    parser.add_argument("--contexts", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="decode prompt lengths [8192,32768]")
    parser.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="decode batch sizes [1,16]")
    parser.add_argument("--dynamic", action="store_true",
                        help="CompileConfig(dynamic=True) for all models (fewer compiles if time is short)")
    parser.add_argument("--skip", type=lambda v: [x for x in v.split(",") if x], default=None,
                        help="parts to leave out, comma-separated: prefill, long, agreement, hf-loop (the "
                             "hybrids' rows through transformers' loop; their graph-loop rows stay)")
    parser.add_argument("--no-graph-loop", dest="graph_loop", action="store_false",
                        help="skip the hybrids' rows through their own captured greedy loop (CUDA only)")
    parser.add_argument("--compiled-loop", nargs="?", const="all", default=None,
                        type=lambda v: v if v == "all" else [x for x in v.split(",") if x],
                        help="also the graph loop with its step's forward compiled by inductor "
                             "(generate(graph_decode='compiled'); each cell's shapes compile once, untimed), for "
                             "every hybrid or for the comma-separated mixers given; these cells run after 'long'")
    parser.add_argument("--graph-loop-only", action="store_true",
                        help="only the hybrids' graph-loop rows (decode cells and the long generation; nothing "
                             "compiles), e.g. to re-measure them; the teacher's rows come from another run")
    parser.add_argument("--teacher-rows-from", type=Path, default=None,
                        help="with --graph-loop-only: copy the teacher's decode and long rows from this earlier "
                             "generate.json (recorded as such), for the ratio columns")
    parser.add_argument("--profile", action="store_true",
                        help="last: kernel profiles of one decode step and one short prefill per model "
                             "-> <out>-profile.{json,md}")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds from the start of the run (model building included) by which parts must "
                             "end: a part starts only if the longest finished part of its kind would end by then "
                             "(results so far are kept; the very first part has no estimate: leave a margin)")
    parser.add_argument("--profile-reserve", type=float, default=60.0,
                        help="with --profile and --time-limit: seconds kept free for the profile at the end [60]")
    parser.add_argument("--out", type=Path, default=None, help="JSON path [benchmarks/results/generate.json]")
    args = parser.parse_args()
    unknown = set(args.skip or []) - {"prefill", "long", "agreement", "hf-loop"}
    if unknown:
        parser.error(f"--skip takes prefill, long, agreement, hf-loop; got {', '.join(sorted(unknown))}")
    missing = [m for m in args.mixers if find_mixer(m) is None]
    if missing or not args.mixers:
        parser.error(f"--mixers needs registered mixer names; unknown: {', '.join(missing) or '(none given)'}")
    if isinstance(args.compiled_loop, list) and (set(args.compiled_loop) - set(args.mixers) or not args.compiled_loop):
        parser.error(f"--compiled-loop takes mixers of --mixers ({','.join(args.mixers)}); got "
                     f"{','.join(args.compiled_loop) or '(none)'}")
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error("--time-limit must be > 0 seconds")
    if args.profile_reserve < 0:
        parser.error("--profile-reserve must be >= 0 seconds")
    if args.out is None:
        args.out = RESULTS / ("generate-quick.json" if args.quick else "generate.json")
    if args.quick:
        torch.set_num_threads(1)
    result = run(args)
    print(table(result))


if __name__ == "__main__":
    main()
