"""Host work of the hybrid's prefill and decode step vs its teacher's: operators launched and host time.

Why: on the H200 (benchmarks/results/generate.md) the hybrid's 2k-token prefill takes as long as the host needs to
launch it, and its compiled batch-1 decode is barely faster than the teacher's, so what costs is host work, not
device work. Host work can be counted on any machine: the aten operators a forward dispatches are the kernels it
launches (an elementwise op is one kernel, a matmul one or two), and a CPU run at small widths measures the host
time per operator.

Models: the teacher (random weights, SDPA) and its hybrid (the paper's 10 kept heads, every other head a
DiscreteMamba2 head of state size 8), as benchmarks/decode.py builds them. ``--shape`` picks
- ``llama-3.2-1b``: Llama-3.2-1B's real shape (the default on CUDA: what benchmarks/generate.py measures);
- ``1b-narrow`` (the default on CPU): Llama-3.2-1B's structure (16 layers x 32 heads, 8 KV heads, the same kept
  heads) at narrow widths (head_dim 8, hidden 256, vocab 1024), so the operator count per forward is the real
  shape's while the CPU's arithmetic stays small next to its host work;
- ``quick``: decode.py's 4-layer quick model (the test's CPU smoke run).

Measured for each model:
- ``prefill_ops``: aten operators of one prefill forward (batch 1, ``model(ids, use_cache=True,
  logits_to_keep=1)``, what generate's prefill runs), by name, and per decoder layer (attention-only layers vs
  layers with recurrent heads, the scan apart); counted with a TorchDispatchMode, so every operator that reaches a
  kernel counts (the scan on CPU is the PyTorch chunked scan; on CUDA fla's, whose Triton kernels are no aten
  operators: only its wrapper's operators count there, ``prefill_device_launches`` sees the kernels);
- ``prefill_device_launches`` (CUDA only): the kernels the device ran for that forward (torch.profiler), which
  include the Triton kernels of fla's scan that no aten count sees;
- ``prefill_host_ms``: median wall time until that forward returned (on CUDA the device may still be running: when
  the full time is close to it, the prefill is host-bound), and ``prefill_ms`` with the device synchronised;
- ``decode_ops``: aten operators of one eager one-token step on the static cache, inside the model's forward
  (``decode_ops_growing``: on the default growing cache, generate's eager path), and
  ``generate_outside_ops``: those generate() runs per token outside it (its input preparation, our
  ``create_masks_for_generate``, the token bookkeeping);
- ``generate_outside_host_ms``: host time per token between the end of one decode forward and the start of the next
  (generate's own per-token work), and ``decode_call_host_ms`` the host time inside the forward call, from a
  greedy ``generate(cache_implementation="static")`` -- compiled on CUDA (transformers' default reduce-overhead),
  eager on CPU. Both without synchronising, so they are host time, not device time -- unless generate() itself
  waits for the device between steps (a stopping check reading a device value), which then shows in the gap.

    python benchmarks/host_overhead.py                      # CPU -> benchmarks/results/host_overhead-cpu.{json,md}
    python benchmarks/host_overhead.py --device cuda        # one H200 -> benchmarks/results/host_overhead-h200.*
    python benchmarks/host_overhead.py --quick --out /tmp/host.json   # CPU smoke run (seconds)
    python benchmarks/host_overhead.py --mixer window_recurrent    # the default student -> ...-window_recurrent.*
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode import PAPER_HEADS, QUICK_HEADS, sync  # noqa: E402
from generate import prefill_timings  # noqa: E402

from radistill.hybrid.build import convert, student_config  # noqa: E402
from radistill.models.presets import shape_config, tiny_config  # noqa: E402
from radistill.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while active, under the label ``self.label`` (None: not counted)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, Counter] = {}
        self.label: str | None = "all"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.label is not None:
            self.counts.setdefault(self.label, Counter())[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def total(self, label: str) -> int:
        return sum(self.counts.get(label, Counter()).values())


def make_models(shape: str, device: str, dtype: torch.dtype, state_size: int,
                mixer: str = "discrete_mamba2") -> dict[str, torch.nn.Module]:
    """The teacher and its hybrid with ``mixer`` in every replaced head (the build's defaults: a window mixer gets a
    window of 16 and the build's attention sinks), labelled as benchmarks/generate.py labels them."""
    from transformers import AutoModelForCausalLM

    from generate import model_label
    from radistill.hybrid.memory import takes_window, with_build_defaults

    if shape == "quick":
        config = tiny_config("llama", num_hidden_layers=4, hidden_size=256, intermediate_size=512,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=1024)
        heads = QUICK_HEADS
    elif shape == "1b-narrow":
        config = shape_config("llama-3.2-1b", hidden_size=256, intermediate_size=512, head_dim=8, vocab_size=1024)
        heads = PAPER_HEADS
    else:
        config = shape_config(shape)
        heads = PAPER_HEADS
    torch.manual_seed(0)
    with torch.device(device):
        teacher = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype).eval()
    kept = [sorted(h for l, h in heads if l == layer) for layer in range(config.num_hidden_layers)]
    settings = with_build_defaults(mixer, {"state_size": state_size} | ({"window": 16} if takes_window(mixer) else {}))
    hybrid = convert(teacher, student_config(teacher, kept, mixer, settings)).eval()
    label = (f"hybrid K={len(heads)} N={state_size}" if mixer == "discrete_mamba2" else
             model_label(mixer, len(heads), state_size, settings.get("window", 0), settings.get("sink", 0)))
    return {"teacher": teacher, label: hybrid}


def prompt(model, length: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(1, model.config.vocab_size, (1, length), generator=generator).to(device)


@torch.no_grad()
def prefill_ops(model, ids: torch.Tensor) -> dict:
    """aten operators of one prefill forward: total, by name, and per decoder layer."""
    from radistill.hybrid.mixers import discrete_mamba2

    layers = model.model.layers
    counter = OpCounter()
    handles = []
    scan, calls = discrete_mamba2.ssd, []

    def labelled_scan(*args, **kwargs):  # the scan's ops apart: on CUDA it is one fla call, not these operators
        calls.append(1)
        outer, counter.label = counter.label, "scan"
        try:
            return scan(*args, **kwargs)
        finally:
            counter.label = outer

    discrete_mamba2.ssd = labelled_scan
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda *_, i=i: setattr(counter, "label", f"layer {i}")))
        handles.append(layer.register_forward_hook(lambda *_: setattr(counter, "label", "outside layers")))
    try:
        counter.label = "outside layers"
        with counter:
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
    finally:
        discrete_mamba2.ssd = scan
        for handle in handles:
            handle.remove()
    by_name = Counter()
    for counts in counter.counts.values():
        by_name.update(counts)
    per_layer = [counter.total(f"layer {i}") for i in range(len(layers))]  # without the scan's operators
    out = {"total": sum(by_name.values()), "outside_layers": counter.total("outside layers"),
           "scan": counter.total("scan"), "scan_calls": len(calls),
           "per_layer": per_layer, "by_name": dict(by_name.most_common())}
    if hasattr(layers[0].self_attn, "recurrent"):  # the hybrid: its layers with and without kept heads
        with_kept = [n for n, layer in zip(per_layer, layers) if layer.self_attn.attention is not None]
        without = [n for n, layer in zip(per_layer, layers) if layer.self_attn.attention is None]
        out["layer_with_kept_heads"] = max(with_kept, default=None)
        out["layer_recurrent_only"] = max(without, default=None)
        first = next(i for i, layer in enumerate(layers) if layer.self_attn.attention is None)
        out["recurrent_only_layer_by_name"] = dict(counter.counts[f"layer {first}"].most_common())
    return out


def prefill_times(model, ids: torch.Tensor, device: str, repeat: int) -> dict:
    total, returned = prefill_timings(model, ids, device, repeat)
    return {"prefill_host_ms": 1e3 * returned, "prefill_ms": 1e3 * total}


@torch.no_grad()
def device_launches(model, ids: torch.Tensor) -> int | None:
    """CUDA only: kernels (and copies/fills) the device ran for one prefill forward, from torch.profiler. The aten
    count misses Triton kernels (fla's scan launches its own), this count sees every launch."""
    if not ids.is_cuda:
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


@torch.no_grad()
def prefill_host_profile(model, ids: torch.Tensor, top: int = 25) -> list[dict]:
    """Where the host's time goes in one (warm) prefill forward: Python's cProfile, the ``top`` functions by their
    own time. On CUDA the forward returns before the device finishes, so this is the launch side alone: the
    kernel launches, the Python around them, and any call that waits for the device (a ``.item()``, a
    ``nonzero``) shows up as its own time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    profiler.disable()
    if ids.is_cuda:
        torch.cuda.synchronize()
    stats = pstats.Stats(profiler)
    rows = []
    for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        where = path if path == "~" else f"{'/'.join(Path(path).parts[-2:])}:{line}"
        rows.append({"function": f"{where} {name}", "calls": calls, "own_ms": 1e3 * own, "cumulative_ms": 1e3 * cumulative})
    return sorted(rows, key=lambda r: -r["own_ms"])[:top]


class StepRecorder:
    """Wraps the decode forward generate() calls (``model.__call__`` eager, ``get_compiled_call`` compiled) to
    record when each call starts and returns, and to switch an OpCounter's label between inside and outside."""

    def __init__(self, model, counter: OpCounter | None = None):
        self.model, self.counter = model, counter
        self.calls: list[tuple[float, float]] = []
        self.outside_ops: list[int] = []
        self._ops_at_exit: int | None = None

    def wrap(self, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            if self.counter is not None:
                if self._ops_at_exit is not None:
                    self.outside_ops.append(self.counter.total("outside") - self._ops_at_exit)
                self.counter.label = "inside"
            out = fn(*args, **kwargs)
            if self.counter is not None:
                self.counter.label = "outside"
                self._ops_at_exit = self.counter.total("outside")
            self.calls.append((start, time.perf_counter()))
            return out
        return call

    def __enter__(self):
        model = self.model
        get_compiled = model.get_compiled_call
        # instance attributes: generate() looks both up on the instance (`self.__call__`, `self.get_compiled_call`)
        model.__call__ = self.wrap(type(model).__call__.__get__(model))
        model.get_compiled_call = lambda config: self.wrap(get_compiled(config))
        return self

    def __exit__(self, *exc):
        del self.model.__call__, self.model.get_compiled_call

    def gaps_ms(self) -> list[float]:
        """Host ms from one decode call's return to the next call's start."""
        return [1e3 * (b[0] - a[1]) for a, b in zip(self.calls, self.calls[1:])]


def generate_kwargs(new_tokens: int, length: int, static: bool = True) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                  pad_token_id=0)
    if static:
        kwargs.update(cache_implementation="static", max_cache_len=length + new_tokens)
    return kwargs


@torch.no_grad()
def decode_ops(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """Per token: aten ops inside the eager decode forward and those generate() runs outside it, on the static
    cache (what the compiled step traces) and on the default growing cache (generate's eager default)."""
    out = {}
    for static in (True, False):
        counter = OpCounter()
        counter.label = None  # the prefill and generate's set-up are not counted: the recorder labels decode steps
        with StepRecorder(model, counter) as recorder, counter:
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), disable_compile=True,
                           **generate_kwargs(new_tokens, ids.shape[1], static))
        steps = len(recorder.calls)
        if not static:
            out["decode_ops_growing"] = counter.total("inside") / steps
            continue
        out.update({
            "decode_ops": counter.total("inside") / steps,
            "generate_outside_ops": statistics.median(recorder.outside_ops),
            "decode_by_name": {k: v / steps for k, v in counter.counts["inside"].most_common()},
            "outside_by_name": {k: v / steps for k, v in counter.counts.get("outside", Counter()).most_common()},
        })
    return out


@torch.no_grad()
def decode_host(model, ids: torch.Tensor, new_tokens: int, device: str) -> dict:
    """Host ms per token outside and inside the decode forward, from a static-cache generate (compiled on CUDA)."""
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **generate_kwargs(new_tokens, ids.shape[1]))
    with StepRecorder(model) as recorder:
        sync(device)
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                       **generate_kwargs(new_tokens, ids.shape[1]))
        sync(device)
        seconds = time.perf_counter() - start
    inside = [1e3 * (b - a) for a, b in recorder.calls]
    return {"generate_outside_host_ms": statistics.median(recorder.gaps_ms()),
            "decode_call_host_ms": statistics.median(inside),
            "generate_ms_per_token": 1e3 * seconds / new_tokens, "decode_calls": len(recorder.calls)}


def git_commit() -> str | None:
    """The checkout's commit (with "+changes" when the working tree differs), so a results file names its code."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def table(result: dict) -> str:
    names = list(result["models"])
    rows = [("aten ops per prefill forward", "prefill_ops.total"),
            ("  outside the decoder layers", "prefill_ops.outside_layers"),
            ("  in the recurrent scan (CPU: PyTorch chunked scan; CUDA: fla)", "prefill_ops.scan"),
            ("  per layer, without the scan (max)", "per_layer_max"),
            ("  hybrid layer with kept heads", "prefill_ops.layer_with_kept_heads"),
            ("  hybrid layer, recurrent only", "prefill_ops.layer_recurrent_only"),
            ("device kernels per prefill (CUDA: profiler)", "prefill_device_launches"),
            ("prefill host ms (until returned)", "prefill_host_ms"),
            ("prefill ms (synchronised)", "prefill_ms"),
            ("aten ops per decode step (eager, static cache)", "decode_ops"),
            ("aten ops per decode step (eager, growing cache)", "decode_ops_growing"),
            ("aten ops per token in generate() outside forward", "generate_outside_ops"),
            ("generate() host ms per token outside forward", "generate_outside_host_ms"),
            ("decode call host ms", "decode_call_host_ms"),
            ("generate ms per token", "generate_ms_per_token")]

    def get(model: dict, key: str):
        if key == "per_layer_max":
            return max(model["prefill_ops"]["per_layer"])
        value = model
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    def fmt(value) -> str:
        return "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [f"# Host overhead: {result['device_name']} ({result['dtype']}), torch {result['torch']}, "
             f"transformers {result['transformers']}, code at {result.get('commit')}", "",
             f"Shape {result['shape']}, prefill {result['prefill_tokens']} tokens at batch 1, decode after a "
             f"{result['decode_prompt']}-token prompt ({result['new_tokens']} new tokens)."
             + (" On CPU the times include the arithmetic and vary with the machine's load from run to run; the "
                "operator counts do not." if result["dtype"] == "float32" else ""), "",
             f"| | {' | '.join(names)} | hybrid / teacher |", f"|---|{'---|' * len(names)}---|"]
    for label, key in rows:
        values = [get(result["models"][n], key) for n in names]
        ratio = f"{values[1] / values[0]:.2f}" if all(isinstance(v, (int, float)) and v for v in values) else ""
        lines.append(f"| {label} | {' | '.join(fmt(v) for v in values)} | {ratio} |")
    hybrid = result["models"][names[1]]
    lines += ["", "Hybrid prefill ops by name (top 25):", "", "```",
              *(f"{k:32s} {v}" for k, v in list(hybrid["prefill_ops"]["by_name"].items())[:25]), "```", "",
              "Hybrid recurrent-only layer, prefill ops by name:", "", "```",
              *(f"{k:32s} {v}" for k, v in hybrid["prefill_ops"].get("recurrent_only_layer_by_name", {}).items()),
              "```", "", "Per token outside the decode forward (hybrid | teacher):", "", "```"]
    teacher = result["models"][names[0]]
    for key in sorted(set(hybrid.get("outside_by_name", {})) | set(teacher.get("outside_by_name", {}))):
        lines.append(f"{key:32s} {hybrid.get('outside_by_name', {}).get(key, 0):6.1f} | "
                     f"{teacher.get('outside_by_name', {}).get(key, 0):6.1f}")
    lines += ["```", ""]
    for name, model in result["models"].items():  # cProfile of one warm prefill forward per model
        rows = model.get("prefill_host_profile") or []
        if rows:
            lines += [f"{name}: prefill host time by function (cProfile, own ms, top {len(rows)}):", "", "```",
                      *(f"{r['own_ms']:8.2f} {r['cumulative_ms']:8.2f} {r['calls']:6d}  {r['function']}" for r in rows),
                      "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=["quick", "1b-narrow", "llama-3.2-1b"], default=None,
                        help="default: llama-3.2-1b on CUDA, 1b-narrow on CPU (quick with --quick)")
    parser.add_argument("--prefill-tokens", type=int, default=None,
                        help="default: 2048 on CUDA; 64 on CPU (one scan chunk: host work, not arithmetic)")
    parser.add_argument("--decode-prompt", type=int, default=None, help="default: 8192 on CUDA, 64 on CPU")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--state-size", type=int, default=8)
    parser.add_argument("--mixer", default="discrete_mamba2",
                        help="the replaced heads' mixer [discrete_mamba2; window_recurrent: window 16 + 4 sinks]")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: the quick shape, short prompts")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--code", default=None, help="what code ran (default: the checkout's git commit)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    shape = args.shape or ("quick" if args.quick else "llama-3.2-1b" if cuda else "1b-narrow")
    prefill_tokens = args.prefill_tokens or (32 if args.quick else 2048 if cuda else 64)
    decode_prompt = args.decode_prompt or (16 if args.quick else 8192 if cuda else 64)
    new_tokens = 4 if args.quick else args.new_tokens
    repeat = 2 if args.quick else args.repeat
    dtype = torch.bfloat16 if cuda else torch.float32
    suffix = "" if args.mixer == "discrete_mamba2" else f"-{args.mixer}"
    out = args.out or RESULTS / (f"host_overhead-h200{suffix}.json" if cuda else f"host_overhead-cpu{suffix}.json")
    import transformers

    result = {"device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
              "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
              "transformers": transformers.__version__, "commit": args.code or git_commit(), "shape": shape,
              "prefill_tokens": prefill_tokens,
              "decode_prompt": decode_prompt, "new_tokens": new_tokens, "models": {}}
    for name, model in make_models(shape, args.device, dtype, args.state_size, args.mixer).items():
        row = {}
        ids = prompt(model, prefill_tokens, args.device)
        row["prefill_ops"] = prefill_ops(model, ids)
        row.update(prefill_times(model, ids, args.device, repeat))
        row["prefill_device_launches"] = device_launches(model, ids)
        row["prefill_host_profile"] = prefill_host_profile(model, ids)
        decode_ids = prompt(model, decode_prompt, args.device)
        row.update(decode_ops(model, decode_ids, new_tokens))
        row.update(decode_host(model, decode_ids, new_tokens, args.device))
        result["models"][name] = row
        write_json_atomic(out, result)
        print(f"{name}: prefill ops {row['prefill_ops']['total']}, host {row['prefill_host_ms']:.2f} ms; decode ops "
              f"{row['decode_ops']:.0f}, outside {row['generate_outside_ops']:.0f} ops "
              f"{row['generate_outside_host_ms']:.3f} ms", flush=True)
        del model
    write_text_atomic(out.with_suffix(".md"), table(result))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
