"""Teacher vs hybrid through ``model.generate()``, each at its best transformers setting, in one process.

Models (as benchmarks/decode.py builds them): a Llama-3.2-1B-shaped teacher with random bf16 weights (SDPA) and its
head-level hybrid keeping the paper's 10 heads as attention, every other head a DiscreteMamba2 head of state size 8.
Weights are random: speed does not depend on them. Both generate greedily with ``cache_implementation="static"``,
so transformers compiles their decode step (its default ``CompileConfig``: inductor, ``reduce-overhead`` = CUDA
graphs) -- the teacher on transformers' ``StaticCache``, the hybrid on its static ``HybridCache``. Prefill is what
``generate`` runs eagerly (no compile), the hybrid's scan through fla's chunked kernel when installed.

Measured (one H200: ~8 minutes):
- prefill: one ``model(ids, use_cache=True, logits_to_keep=1)`` (what generate's prefill runs), median of 3 after a
  warm-up, batch 1 at 2k/8k/32k and batch 16 at 8k;
- decode tokens/s at 8k and 32k prompts, batch 1 and 16: ``generate`` of ``--new-tokens`` tokens minus ``generate``
  of 1 token (same prompt; both after an untimed warm-up that compiles), i.e. batch x (new - 1) / time difference;
- long generation: 32k prompt + 256 new tokens at batch 1: time to first token (generate of 1 token) and tokens/s;
- the hybrid's and teacher's bandwidth bound per decode cell: bytes one step must read (weights once; per sequence
  the filled KV, and recurrent states read + written, SSM at float32) / the H200's 4.8 TB/s, and % of it reached;
- a torch.profiler table of the hybrid's 8k batch-1 prefill (top kernels by device time);
- greedy agreement: the hybrid's tokens with the static compiled cache vs the eager growing cache (bf16: a rare
  near-tie may flip, so the fraction is reported, not asserted).

Rows are written to the JSON as they are measured, so a timeout keeps what was done.

    python benchmarks/generate.py            # one H200 -> benchmarks/results/generate.{json,md}
    python benchmarks/generate.py --quick --out /tmp/generate-quick.json   # CPU smoke run (tiny shapes, eager backend)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode import _fla_version, describe, make_models, sync, weight_bytes  # noqa: E402
from transformers.generation import CompileConfig  # noqa: E402

from radistill.hybrid.memory import memory_rows  # noqa: E402
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


def set_ssd_backend(model, backend: str) -> str:
    """Point every recurrent mixer with an ``ssd`` backend at ``backend``; returns the previous one."""
    mixers = [m for m in model.modules() if hasattr(m, "backend") and hasattr(m, "chunk_size")]
    previous = mixers[0].backend if mixers else backend
    for mixer in mixers:
        mixer.backend = backend
    return previous


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


def step_bytes(model, name: str, length: int, batch: int) -> int:
    """Bytes one decode step must read: the weights once, per sequence the filled KV and the recurrent states
    (read and written; the SSM state at float32 as HybridCache holds it, the conv window at bf16)."""
    rows = memory_rows(model.config, [length], "bf16")
    (row,) = [r for r in rows if r.model.startswith("teacher" if name == "teacher" else "student")]
    state = 2 * row.ssm_bytes + row.conv_bytes  # 2x: float32 SSM vs the rows' bf16 convention
    return weight_bytes(model) + batch * (row.kv_bytes + 2 * state)


def decode_cell(model, name, length, batch, new_tokens, device, compile_config, bandwidth, cache_length) -> dict:
    from torch._dynamo.utils import counters

    ids = prompt(model, batch, length, device)
    graphs_before = int(counters["stats"]["unique_graphs"])
    with StepInputs(model) as inputs:  # the untimed warm-up only: recording costs host time per step
        generate(model, ids, new_tokens, compile_config, cache_length=cache_length)  # warm-up: compiles, captures
    first, _ = generate(model, ids, 1, compile_config, cache_length=cache_length)
    total, _ = generate(model, ids, new_tokens, compile_config, cache_length=cache_length)
    rate = batch * (new_tokens - 1) / max(total - first, 1e-9)

    # graphs dynamo has built so far in the process: 0 would mean the decode step ran uncompiled; per cell, more
    # than one new graph or more than one step-input layout means per-token recompiles / re-recorded CUDA graphs
    cell = {"tokens_per_s": rate, "generate_s": total, "first_token_s": first,
            "dynamo_graphs_so_far": int(counters["stats"]["unique_graphs"]),
            "dynamo_graphs_this_cell": int(counters["stats"]["unique_graphs"]) - graphs_before,
            "step_input_layouts": len(inputs.layouts)}
    moved = step_bytes(model, name, length, batch)
    cell["bytes_per_step"] = moved
    cell["bound_tokens_per_s"] = batch * bandwidth / moved
    cell["percent_of_bound"] = 100 * rate / cell["bound_tokens_per_s"]
    return cell


def profile_prefill(model, length: int, device: str, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    ids = prompt(model, 1, length, device)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            sync(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"  # kernels, not wrappers
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def run(args) -> dict:
    quick = args.quick
    skip = set(args.skip or [])
    device = "cpu" if quick else args.device
    dtype = torch.float32 if quick else torch.bfloat16
    # Both models' compiled steps go through nn.Module.__call__'s frames, whose recompile budget (default 8) the
    # shapes here (2 models x batch sizes x cache lengths) could exhaust, after which dynamo silently runs eagerly
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    models = make_models(quick, device, dtype, [args.state_size])
    names = list(models)
    if quick:
        # CPU has no CUDA graphs and no C++ toolchain here: the eager backend still traces the whole step
        compile_config = CompileConfig(backend="eager", fullgraph=True, mode=None)
        compile_config._compile_all_devices = True
        prefill_lengths, prefill_b16, contexts, batches, long = [32, 64], 32, [48], [1, 2], (48, 6)
        new_tokens = 4
    else:
        # transformers' default CompileConfig; --dynamic: one dynamic-shape graph per model instead of a recompile
        # per new batch size / cache length (same setting for both models)
        compile_config = CompileConfig(dynamic=True) if args.dynamic else None
        prefill_lengths, prefill_b16, contexts, batches, long = [2048, 8192, 32768], 8192, [8192, 32768], [1, 16], \
            (32768, 256)
        new_tokens = args.new_tokens
        contexts, batches = args.contexts or contexts, args.batches or batches
    bandwidth = H200_BANDWIDTH
    result = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "python": platform.python_version(), "cuda": torch.version.cuda, "fla": _fla_version()},
        "dtype": str(dtype).removeprefix("torch."),
        "quick": quick,
        "models": names,
        "setting": "generate(cache_implementation='static') for both, transformers' default compile of the decode "
                   "step" + (" (quick: eager backend, fullgraph)" if quick else " (inductor, reduce-overhead)")
                   + (", dynamic=True" if args.dynamic and not quick else ""),
        "bandwidth_bytes_per_s": bandwidth,
        "new_tokens": new_tokens,
        "prefill_s": {n: {} for n in names},
        "decode": {n: {} for n in names},
        "long": {n: {} for n in names},
        "errors": [],
    }

    def save() -> None:
        write_json_atomic(args.out, result)

    def attempt(what: str, fn):
        try:
            return fn()
        except Exception as exc:  # one failed cell must not cost the rest of a GPU run
            result["errors"].append(f"{what}: {describe(exc)}")
            print(f"  {what}: FAILED {describe(exc)}", flush=True)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            return None

    if "prefill" not in skip:
        result["prefill_host_s"] = {n: {} for n in names}
        for length in prefill_lengths:
            for name in names:
                host = []
                value = attempt(f"prefill {name} {length}x1",
                                lambda: time_prefill(models[name], 1, length, device, host=host))
                result["prefill_s"][name][f"{length}x1"] = value
                result["prefill_host_s"][name][f"{length}x1"] = host[0] if host else None
                print(f"prefill {name} {length}x1: {value} (host {host[0] if host else None})", flush=True)
                save()
        # The hybrid's scan through the compiled PyTorch chunked scan instead of fla's kernels (whose Python launch
        # path costs ~0.5 ms of host time per layer): does it cut the host-bound short prefill?
        if device.startswith("cuda"):
            result["prefill_s_hybrid_torch_scan"], result["prefill_host_s_hybrid_torch_scan"] = {}, {}
            previous = set_ssd_backend(models[names[1]], "torch")
            for length in prefill_lengths[:2]:
                host = []
                value = attempt(f"prefill {names[1]} torch scan {length}x1",
                                lambda: time_prefill(models[names[1]], 1, length, device, host=host))
                result["prefill_s_hybrid_torch_scan"][f"{length}x1"] = value
                result["prefill_host_s_hybrid_torch_scan"][f"{length}x1"] = host[0] if host else None
                print(f"prefill {names[1]} torch scan {length}x1: {value} (host {host[0] if host else None})", flush=True)
                save()
            set_ssd_backend(models[names[1]], previous)
        for name in names:
            value = attempt(f"prefill {name} {prefill_b16}x16",
                            lambda: time_prefill(models[name], 16 if not quick else 2, prefill_b16, device))
            result["prefill_s"][name][f"{prefill_b16}x{16 if not quick else 2}"] = value
            save()

        result["profile_hybrid_prefill"] = attempt(
            "profile",
            lambda: profile_prefill(models[names[1]], prefill_lengths[min(1, len(prefill_lengths) - 1)], device))
        save()

    # Order: generate never shrinks a model's static cache (to keep compiled shapes), so contexts go ascending (a
    # shorter context after a longer one would attend over the longer buffer); the 32k cells and the long run share
    # one cache length, so they share compiled shapes; the most asked-for cells come first in case of a timeout.
    length, steps = long
    cache_lengths = {n: n + max(new_tokens, steps if n == length else 0) + 8 for n in contexts}
    cells = [(n, b) for n in contexts for b in batches]
    cells.sort(key=lambda cell: (cell[0], cell[0] == length and cell[1] != 1))  # the long run reuses the b1 shapes

    def long_run(model):
        ids = prompt(model, 1, length, device, seed=1)
        cache_length = cache_lengths.get(length, length + steps + 8)
        generate(model, ids, steps, compile_config, cache_length=cache_length)  # warm-up (new shapes compile)
        first, _ = generate(model, ids, 1, compile_config, cache_length=cache_length)
        total, _ = generate(model, ids, steps, compile_config, cache_length=cache_length)
        return {"prompt": length, "new_tokens": steps, "ttft_s": first, "total_s": total,
                "end_to_end_tokens_per_s": steps / total,
                "decode_tokens_per_s": (steps - 1) / max(total - first, 1e-9)}

    done_long = "long" in skip
    for context, batch in cells:
        if context == length and batch != 1 and not done_long:
            for name in names:
                result["long"][name] = attempt(f"long {name}", lambda: long_run(models[name]))
                print(f"long {name}: {result['long'][name]}", flush=True)
                save()
            done_long = True
        for name in names:
            cell = attempt(f"decode {name} {context}x{batch}", lambda: decode_cell(
                models[name], name, context, batch, new_tokens, device, compile_config, bandwidth,
                cache_lengths[context]))
            result["decode"][name][f"{context}x{batch}"] = cell
            print(f"decode {name} {context}x{batch}: {cell}", flush=True)
            save()
    if not done_long:
        for name in names:
            result["long"][name] = attempt(f"long {name}", lambda: long_run(models[name]))
            print(f"long {name}: {result['long'][name]}", flush=True)
            save()

    def agreement():
        """Fraction of equal greedy tokens, and where they part: the step, the eager path's top-2 logit margin
        there, and the largest logit difference up to it (same tokens so far, so the same inputs). A margin
        below that difference is a near-tie that rounding flipped, not a wrong step."""
        model = models[names[1]]
        ids = prompt(model, 1, 64 if quick else 512, device, seed=2)  # batch 1: the shapes compiled already
        steps = 8 if quick else 32
        kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0,
                      attention_mask=torch.ones_like(ids), output_scores=True, return_dict_in_generate=True)
        with torch.no_grad():
            static = model.generate(input_ids=ids, cache_implementation="static", compile_config=compile_config,
                                    max_cache_len=max(cache_lengths.values()), **kwargs)
            growing = model.generate(input_ids=ids, **kwargs)
        a, b = static.sequences[0, ids.shape[1]:], growing.sequences[0, ids.shape[1]:]
        parted = (a != b).nonzero()
        last = int(parted[0]) if len(parted) else steps - 1
        gap = max(float((static.scores[i] - growing.scores[i]).float().abs().max()) for i in range(last + 1))
        top2 = growing.scores[last][0].float().topk(2).values
        result["hybrid_static_vs_eager_divergence"] = {
            "first_different_step": int(parted[0]) if len(parted) else None,
            "eager_top2_margin_there": float(top2[0] - top2[1]) if len(parted) else None,
            "max_logit_difference_until_then": gap}
        return float((a == b).float().mean())
    if "agreement" not in skip:
        result["hybrid_static_compiled_vs_eager_token_agreement"] = attempt("agreement", agreement)
        save()
    return result


def table(result: dict) -> str:
    names = result["models"]
    teacher, hybrid = names[0], names[1]
    fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    v = result["versions"]
    lines = [f"# generate() benchmark: {result['device']} ({result['dtype']}), torch {v['torch']}, transformers "
             f"{v['transformers']}, fla {v['fla']}", "", f"Setting: {result['setting']}.", ""]
    lines += ["| prefill (ms) | " + " | ".join(names) + " | hybrid / teacher |", "|---|" + "---|" * (len(names) + 1)]
    for cell in result["prefill_s"][teacher]:
        t, h = result["prefill_s"][teacher].get(cell), result["prefill_s"][hybrid].get(cell)
        ratio = f"{h / t:.2f}" if t and h else "-"
        lines.append(f"| {cell} | {fmt(t and t * 1e3)} | {fmt(h and h * 1e3)} | {ratio} |")
    lines += ["", f"| decode tok/s ({result['new_tokens']} new) | model | tok/s | bound tok/s | % of bound | "
                  "hybrid / teacher |", "|---|---|---|---|---|---|"]
    for cell in result["decode"][teacher]:
        t = (result["decode"][teacher].get(cell) or {}).get("tokens_per_s")
        for name in names:
            c = result["decode"][name].get(cell) or {}
            ratio = "" if name == teacher or not (t and c.get("tokens_per_s")) else f"{c['tokens_per_s'] / t:.2f}x"
            lines.append(f"| {cell} | {name} | {fmt(c.get('tokens_per_s'))} | {fmt(c.get('bound_tokens_per_s'))} | "
                         f"{fmt(c.get('percent_of_bound'))} | {ratio} |")
    lines += ["", "| long generation | TTFT (s) | end-to-end tok/s | decode tok/s |", "|---|---|---|---|"]
    for name in names:
        c = result["long"].get(name) or {}
        label = f"{name}: {c.get('prompt', '?')} + {c.get('new_tokens', '?')}"
        lines.append(f"| {label} | {fmt(c.get('ttft_s'), 3)} | {fmt(c.get('end_to_end_tokens_per_s'))} | "
                     f"{fmt(c.get('decode_tokens_per_s'))} |")
    agree = result.get("hybrid_static_compiled_vs_eager_token_agreement")
    lines += ["", f"Hybrid greedy tokens, static compiled vs eager growing cache: {fmt(agree and 100 * agree)}% equal."]
    if result.get("hybrid_static_vs_eager_divergence"):
        lines.append(f"Divergence: {result['hybrid_static_vs_eager_divergence']}.")
    layouts = {f"{n} {c}": (cell or {}).get("step_input_layouts") for n in names
               for c, cell in result["decode"][n].items()}
    lines += ["", f"Decode step input layouts per cell (1 = one graph): {layouts}."]
    if result.get("prefill_host_s"):
        lines += ["", f"Prefill host seconds (until the forward returned): {result['prefill_host_s']}."]
    if result.get("prefill_s_hybrid_torch_scan"):
        lines.append(f"Hybrid prefill with the compiled PyTorch scan instead of fla: "
                     f"{result['prefill_s_hybrid_torch_scan']} (host {result['prefill_host_s_hybrid_torch_scan']}).")
    if result.get("profile_hybrid_prefill"):
        lines += ["", "Hybrid prefill profile (top kernels):", "", "```", result["profile_hybrid_prefill"], "```"]
    if result["errors"]:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run with tiny shapes")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--state-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per timed decode generate")
    parser.add_argument("--contexts", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="decode prompt lengths [8192,32768]")
    parser.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="decode batch sizes [1,16]")
    parser.add_argument("--dynamic", action="store_true",
                        help="CompileConfig(dynamic=True) for both models (fewer compiles if time is short)")
    parser.add_argument("--skip", type=lambda v: [x for x in v.split(",") if x], default=None,
                        help="parts to leave out, comma-separated: prefill, long, agreement (to split a run into "
                             "commands that each fit a time limit)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path [benchmarks/results/generate.json]")
    args = parser.parse_args()
    unknown = set(args.skip or []) - {"prefill", "long", "agreement"}
    if unknown:
        parser.error(f"--skip takes prefill, long, agreement; got {', '.join(sorted(unknown))}")
    if args.out is None:
        args.out = RESULTS / ("generate-quick.json" if args.quick else "generate.json")
    if args.quick:
        torch.set_num_threads(1)
    result = run(args)
    markdown = table(result)
    write_text_atomic(args.out.with_suffix(".md"), markdown)
    print(markdown)


if __name__ == "__main__":
    main()
