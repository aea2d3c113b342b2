"""Prefill and decode speed of a Llama-3.2-1B-shaped teacher vs its head-level hybrid, and cache bytes per sequence.

The teacher has random bf16 weights with Llama-3.2-1B's shapes (``presets.shape_config("llama-3.2-1b")``, SDPA);
the hybrids keep the 10 heads the paper's authors kept for Llama-3.2-1B (method.md) as attention and make the
other 502 heads DiscreteMamba2 heads with state size 8 and 64. Weights are random: speed does not depend on them.

Measured, per model:
- prefill: one forward of a batch-1 prompt of each context length (2k/8k/32k), median of 3, after a warm-up;
- decode tokens/s at batch 1 and 16 after a prompt of each context length, two ways, the same for every model:
  ``eager``  -- the plain transformers decode loop: one ``model(next_token, cache)`` per step, growing caches
               (the teacher's ``DynamicCache``, the hybrid's ``HybridCache``), greedy;
  ``graph``  -- static caches (the teacher's ``StaticCache``, the hybrid's ``HybridCache.make_static``) and the
               whole step (forward, argmax, position update) captured once in a CUDA graph and replayed;
  each the median of ``--repeat`` timed passes of ``--steps`` steps after one untimed pass over the same steps.
  A growing cache gives every eager step a new key length, so kernels that set up per shape (cuDNN attention
  builds a graph per key length; Triton autotunes per shape) do it at every step of a first pass: that pass is
  kept apart (``eager_first_pass_tokens_per_s``) and never in the median;
- cache bytes per sequence (measured from the caches after the prompt; and from the config by radistill.memory);
- the memory-bandwidth bound: bytes a step must read (weights + the cache: KV, and the recurrent states read and
  written) / HBM bandwidth measured by a device copy; ``efficiency`` = measured / bound tokens/s.

Goals: decode >= 2x the teacher at >= 8k context; cache <= 1/6 of the teacher's at 4k.

    python benchmarks/decode.py                 # on one H100: the full table -> benchmarks/results/decode.{json,md}
    python benchmarks/decode.py --quick --out /tmp/decode-quick.json   # CPU smoke run (< 1 min): tiny, eager
    python benchmarks/decode.py --contexts 32768 --merge   # add cells to an existing decode.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radistill.hybrid.build import convert, student_config  # noqa: E402
from radistill.hybrid.graph_decode import capture_graph  # noqa: E402
from radistill.hybrid.memory import cache_nbytes, memory_rows  # noqa: E402
from radistill.hybrid.modeling import CACHE_FIELD, output_cache  # noqa: E402
from radistill.models.presets import shape_config, tiny_config  # noqa: E402
from radistill.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

# The authors' top-10 heads of Llama-3.2-1B-Instruct, (layer, head), rank order (method.md).
PAPER_HEADS = [(9, 25), (4, 4), (10, 26), (0, 20), (8, 20), (8, 19), (8, 16), (7, 22), (10, 20), (5, 5)]
QUICK_HEADS = [(0, 1), (1, 5), (2, 2), (2, 3)]  # --quick: 4 layers x 8 heads
RESULTS = ROOT / "benchmarks" / "results"


# ---- setup -------------------------------------------------------------------------------------------------------


def make_models(quick: bool, device: str, dtype: torch.dtype, state_sizes: list[int]) -> dict[str, torch.nn.Module]:
    """The teacher (random weights) and one hybrid per state size, built by radistill's build path."""
    from transformers import AutoModelForCausalLM

    if quick:
        config = tiny_config("llama", num_hidden_layers=4, hidden_size=256, intermediate_size=512,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=1024)
        heads = QUICK_HEADS
    else:
        config = shape_config("llama-3.2-1b")
        heads = PAPER_HEADS
    torch.manual_seed(0)
    with torch.device(device):
        teacher = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype).eval()
    kept = [sorted(h for l, h in heads if l == layer) for layer in range(config.num_hidden_layers)]
    models = {"teacher": teacher}
    for n in state_sizes:
        models[f"hybrid K={len(heads)} N={n}"] = convert(
            teacher, student_config(teacher, kept, "discrete_mamba2", {"state_size": n})
        ).eval()
    return models


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hbm_bandwidth(device: str) -> float | None:
    """Device memory bandwidth in bytes/s, from timing a 2 GiB device-to-device copy (read + write)."""
    if not device.startswith("cuda"):
        return None
    src = torch.empty(2 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    del src, dst
    return 2 * 10 * (2 << 30) / seconds


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter once (tied embeddings count once, as lm_head)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    if not model.config.tie_word_embeddings:  # an untied embedding table is only gathered, B rows per step
        embed = model.get_input_embeddings().weight
        total -= embed.numel() * embed.element_size()
    return total


# ---- measurements ------------------------------------------------------------------------------------------------


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def describe(exc: BaseException) -> str:
    """One line for the results: "out of memory", or the exception's type and first line."""
    if is_oom(exc):
        return "out of memory"
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


@torch.no_grad()
def prefill(model, batch: int, length: int, device: str, seed: int = 0):
    """Run a random prompt (the same for the same ``seed``) through the model; returns (last-token logits, cache)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out.logits, output_cache(out)


@torch.no_grad()
def time_prefill(model, length: int, device: str, repeat: int = 3) -> float:
    """Median seconds of a batch-1 prefill of ``length`` tokens (after one warm-up, which also compiles)."""
    prefill(model, 1, length, device)
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        prefill(model, 1, length, device)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def eager_decode(model, logits, cache, steps: int, device: str) -> tuple[float, list]:
    """``steps`` steps of the plain decode loop (greedy) after a prefill; returns (seconds, generated ids) and
    leaves the cache advanced."""
    token = logits[:, -1:].argmax(-1)
    generated = []
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, **{CACHE_FIELD: cache}, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        generated.append(token)
    sync(device)
    return time.perf_counter() - start, generated


def time_eager_decode(model, batch: int, length: int, steps: int, device: str, repeat: int) -> dict[str, float]:
    """Tokens/s of the plain decode loop: the median of ``repeat`` timed passes, each an untimed prefill of the same
    prompt and ``steps`` timed steps, after one such pass untimed (its rate is returned apart: what first calls of
    each shape cost)."""
    rates = []
    for _ in range(repeat + 1):
        logits, cache = prefill(model, batch, length, device)
        seconds, _ = eager_decode(model, logits, cache, steps, device)
        rates.append(batch * steps / seconds)
        del logits, cache  # before the next prefill: one cache at a time
    return {"eager_tokens_per_s": statistics.median(rates[1:]), "eager_first_pass_tokens_per_s": rates[0]}


def static_cache(model, cache, max_length: int):
    """The prompt's cache moved into static buffers of ``max_length`` positions (same tensors a graph replays on)."""
    if hasattr(cache, "make_static"):
        return cache.make_static(max_length)
    from transformers import StaticCache

    static = StaticCache(config=model.config, max_cache_len=max_length)
    for layer, source in zip(static.layers, cache.layers):
        layer.lazy_initialization(source.keys, source.values)
        held = source.keys.shape[-2]
        layer.keys[:, :, :held].copy_(source.keys)
        layer.values[:, :, :held].copy_(source.values)
        layer.cumulative_length.fill_(held)
    return static


class StaticDecoder:
    """One greedy decode step on static buffers: token, position and mask are tensors updated in place, so the
    step can be replayed as a CUDA graph. ``step()`` runs it eagerly (CPU), ``capture()`` records the graph."""

    def __init__(self, model, cache, last_logits, position: int, max_length: int):
        batch, device = last_logits.shape[0], last_logits.device
        self.model, self.cache, self.max_length = model, cache, max_length
        self.token = last_logits[:, -1:].argmax(-1)  # [B, 1]
        self.position = torch.full((batch, 1), position, dtype=torch.long, device=device)
        self.slots = torch.arange(max_length, device=device)
        self.graph = None

    @torch.no_grad()
    def step(self) -> None:
        # [B, 1, 1, max_length]: the slots written so far and this token's (slot index = position: no padding)
        mask = (self.slots <= self.position.view(-1, 1, 1, 1)).view(self.position.shape[0], 1, 1, -1)
        out = self.model(input_ids=self.token, position_ids=self.position, attention_mask=mask,
                         **{CACHE_FIELD: self.cache}, use_cache=True, logits_to_keep=1)
        self.token.copy_(out.logits[:, -1:].argmax(-1))
        self.position.add_(1)

    @torch.no_grad()
    def capture(self, warmup: int = 3) -> None:
        self.graph = capture_graph(self.step, warmup)

    def run(self) -> None:
        self.graph.replay() if self.graph is not None else self.step()


@torch.no_grad()
def graph_decode(model, batch: int, length: int, steps: int, device: str, repeat: int, warmup: int = 3) -> float:
    """Tokens/s of CUDA-graph replays of the static decode step after a prompt of ``length`` tokens: the median of
    ``repeat`` timed passes of ``steps`` replays, after the capture (``warmup`` eager steps first) and one untimed
    pass. The replays go on from position to position, so the static buffers hold them all."""
    logits, cache = prefill(model, batch, length, device)
    max_length = length + warmup + (repeat + 1) * steps + 8
    decoder = StaticDecoder(model, static_cache(model, cache, max_length), logits, length, max_length)
    del cache  # the static copy is what the graph uses
    decoder.capture(warmup)
    rates = []
    for _ in range(repeat + 1):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            decoder.run()
        sync(device)
        rates.append(batch * steps / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def step_bytes(model, per_sequence: dict[str, int], batch: int) -> int:
    """Bytes one decode step must move: weights once, plus per sequence its KV read and its states read + written."""
    state = per_sequence.get("ssm", 0) + per_sequence.get("conv", 0)
    return weight_bytes(model) + batch * (per_sequence["kv"] + 2 * state)


# ---- the run -----------------------------------------------------------------------------------------------------


def run(args) -> dict:
    device = "cpu" if args.quick else args.device
    dtype = torch.float32 if args.quick else torch.bfloat16
    contexts = [128, 256] if args.quick else args.contexts
    batches = [1, 2] if args.quick else args.batches
    steps = 4 if args.quick else args.steps
    repeat = min(args.repeat, 2) if args.quick else args.repeat
    use_graphs = device.startswith("cuda") and not args.no_cuda_graphs
    bandwidth = hbm_bandwidth(device)
    previous = json.loads(args.out.read_text()) if args.merge and args.out.exists() else None

    models = make_models(args.quick, device, dtype, args.state_sizes)
    teacher_config = models["teacher"].config
    result = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "python": platform.python_version(), "cuda": torch.version.cuda},
        "fla": _fla_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "quick": args.quick,
        "timing": f"decode: median of {repeat} timed passes of {steps} steps after one untimed pass "
                  "(eager_first_pass_tokens_per_s: that pass); prefill: median of 3 after one",
        "hbm_bandwidth_gb_s": None if bandwidth is None else bandwidth / 1e9,
        "decode_modes": {
            "eager": "plain decode loop, growing caches (teacher DynamicCache, hybrid HybridCache), greedy",
            "graph": "static caches (teacher StaticCache, hybrid HybridCache.make_static) + the whole step in a "
                     "CUDA graph, greedy",
        },
        "kept_heads": [f"{l}.{h}" for l, h in (QUICK_HEADS if args.quick else PAPER_HEADS)],
        "models": {},
    }
    if previous is not None:  # --merge: this run's cells are added to (or replace) those of the earlier run
        result["models"] = previous["models"]
    for name, model in models.items():
        print(f"== {name}", flush=True)
        entry = result["models"].setdefault(name, {"prefill_s": {}, "decode": {}, "cache_bytes_per_sequence": {}})
        entry["weight_bytes"] = weight_bytes(model)
        for length in contexts:
            try:
                entry["prefill_s"][str(length)] = time_prefill(model, length, device)
            except Exception as exc:  # one failed cell must not cost the rest of a GPU run
                entry["prefill_s"][str(length)] = None
                entry.setdefault("errors", {})[f"prefill {length}"] = describe(exc)
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            print(f"  prefill {length}: {entry['prefill_s'][str(length)]}", flush=True)
            for batch in batches:
                cell = entry["decode"].setdefault(str(length), {})[str(batch)] = {}
                measure_decode(model, batch, length, steps, repeat, device, bandwidth, use_graphs, args.quick, cell,
                               entry)
                print(f"  decode {length} x{batch}: {cell}", flush=True)
        write_json_atomic(args.out, result)  # partial results survive a timeout

    contexts = sorted({int(n) for entry in result["models"].values() for n in entry["decode"]})
    batches = sorted({int(b) for entry in result["models"].values() for cells in entry["decode"].values()
                      for b in cells})
    # radistill.memory's numbers (bf16) at the run's contexts and at 4k, the cache goal
    lengths = sorted(set(contexts) | {4096})
    by_config = result["cache_bytes_from_config"] = {}
    for name, model in models.items():
        rows = memory_rows(teacher_config if name == "teacher" else model.config, lengths, "bf16")
        wanted = "teacher" if name == "teacher" else "student"  # a student config also yields its teacher's rows
        by_config[name] = {str(r.length): r.to_dict() for r in rows if r.model.startswith(wanted)}
    result["goals"] = goals(result, contexts, batches)
    return result


def measure_decode(model, batch, length, steps, repeat, device, bandwidth, use_graphs, quick, cell, entry) -> None:
    """Fill ``cell`` with one (context, batch) decode measurement; a failure (e.g. out of memory) is recorded in
    ``cell["error"]``, not raised."""
    logits = cache = None
    try:
        logits, cache = prefill(model, batch, length, device)
        per_sequence = {k: v // batch for k, v in cache_nbytes(cache).items()}
        entry["cache_bytes_per_sequence"][str(length)] = per_sequence
        logits = cache = None  # each measurement below prefills its own
        cell.update(time_eager_decode(model, batch, length, steps, device, repeat))
        if use_graphs:
            try:
                cell["graph_tokens_per_s"] = graph_decode(model, batch, length, steps, device, repeat)
            except Exception as exc:
                if is_oom(exc):
                    raise
                cell["graph_error"] = describe(exc)
        elif quick:  # check the static step on CPU: it must continue the eager tokens exactly
            cell["static_step_matches_eager"] = check_static_step(model, batch, length, device)
        if bandwidth is not None:
            moved = step_bytes(model, per_sequence, batch)
            cell["bytes_per_step"] = moved
            cell["bound_tokens_per_s"] = batch * bandwidth / moved
            best = cell.get("graph_tokens_per_s") or cell["eager_tokens_per_s"]
            cell["efficiency"] = best / cell["bound_tokens_per_s"]
    except Exception as exc:  # one failed cell must not cost the rest of a GPU run
        cell["error"] = describe(exc)
    finally:
        del logits, cache
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def check_static_step(model, batch: int, length: int, device: str, steps: int = 3) -> bool:
    """The static decode step (what the CUDA graph records) continues a prompt like the eager loop does."""
    logits, cache = prefill(model, batch, length, device)
    _, eager = eager_decode(model, logits, cache, steps, device)
    logits, cache = prefill(model, batch, length, device)  # the same prompt again
    decoder = StaticDecoder(model, static_cache(model, cache, length + steps + 1), logits, length,
                            length + steps + 1)
    static = []
    for _ in range(steps):
        decoder.step()
        static.append(decoder.token.clone())
    return all(torch.equal(a, b) for a, b in zip(eager, static))


def _fla_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("fla-core")
    except Exception:
        return None


def goals(result: dict, contexts: list[int], batches: list[int]) -> dict:
    """The issue's goals on this run. Per (context >= 8k, batch) cell: the hybrid/teacher decode speedup per mode,
    and the speedup the bandwidth bound allows (at batch 1 the weights dominate the bytes of a step, so no cache
    saving can reach 2x there: the bound says which cells can)."""
    models = result["models"]
    teacher = models["teacher"]
    speedups, cache_ratio = {}, {}
    for name, entry in models.items():
        if name == "teacher":
            continue
        for length in (n for n in contexts if n >= 8192 or result["quick"]):
            for batch in batches:
                mine = entry["decode"].get(str(length), {}).get(str(batch), {})
                theirs = teacher["decode"].get(str(length), {}).get(str(batch), {})
                cell = {}
                for key in ("eager_tokens_per_s", "graph_tokens_per_s", "bound_tokens_per_s"):
                    if mine.get(key) and theirs.get(key):
                        cell[key.removesuffix("_tokens_per_s")] = mine[key] / theirs[key]
                if cell:
                    speedups[f"{name} @ {length} x{batch}"] = cell
        config_rows = result["cache_bytes_from_config"]
        student, base = config_rows[name]["4096"], config_rows["teacher"]["4096"]
        with_conv = (student["kv_bytes"] + student["ssm_bytes"] + student["conv_bytes"]) / base["total_bytes"]
        cache_ratio[name] = {"KV+SSM": student["total_bytes"] / base["total_bytes"], "KV+SSM+conv": with_conv}
    measured = {cell: max(v.get("eager", 0), v.get("graph", 0)) for cell, v in speedups.items()}
    return {
        "decode_speedup_at_8k_plus (hybrid / teacher)": speedups,
        "decode >= 2x in": sorted(c for c, v in measured.items() if v >= 2.0),
        "decode < 2x in": sorted(c for c, v in measured.items() if v < 2.0),
        "cache_ratio_at_4k (hybrid / teacher)": cache_ratio,
        "cache <= 1/6 at 4k": all(v["KV+SSM+conv"] <= 1 / 6 for v in cache_ratio.values()),
    }


def table(result: dict) -> str:
    """The results as markdown (errors in full: the JSON)."""
    lines = [f"# decode benchmark: {result['device']} ({result['dtype']}), torch {result['versions']['torch']}, "
             f"transformers {result['versions']['transformers']}, fla {result['fla']}", ""]
    if result["hbm_bandwidth_gb_s"]:
        lines += [f"HBM bandwidth (device copy): {result['hbm_bandwidth_gb_s']:.0f} GB/s", ""]
    lines += ["| model | prefill " + " | prefill ".join(result["models"]["teacher"]["prefill_s"]) + " (ms) |",
              "|---|" + "---|" * len(result["models"]["teacher"]["prefill_s"])]
    for name, entry in result["models"].items():
        lines.append(f"| {name} | " + " | ".join("OOM" if v is None else f"{v * 1e3:.1f}"
                                                  for v in entry["prefill_s"].values()) + " |")
    lines += ["", "| model | context | batch | eager tok/s | eager 1st pass tok/s | graph tok/s | bound tok/s | "
                  "efficiency | cache MB/seq (KV+SSM+conv) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in result["models"].items():
        for length, by_batch in entry["decode"].items():
            cache = entry["cache_bytes_per_sequence"].get(length, {})
            for batch, cell in by_batch.items():
                fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
                eager = cell["error"] if "error" in cell else fmt(cell.get("eager_tokens_per_s"))
                first = fmt(cell.get("eager_first_pass_tokens_per_s"))
                graph = "failed (see JSON)" if "graph_error" in cell else fmt(cell.get("graph_tokens_per_s"))
                lines.append(
                    f"| {name} | {length} | {batch} | {eager} | {first} | {graph} | "
                    f"{fmt(cell.get('bound_tokens_per_s'))} | {fmt(cell.get('efficiency'), 2)} | "
                    f"{fmt(cache.get('total', 0) / 1e6, 2)} |")
    found = result["goals"]
    lines += ["", "| hybrid / teacher decode (context >= 8k) | eager | graph | bandwidth bound |", "|---|---|---|---|"]
    for cell, ratio in found["decode_speedup_at_8k_plus (hybrid / teacher)"].items():
        lines.append(f"| {cell} | " + " | ".join(f"{ratio[k]:.2f}x" if k in ratio else "-"
                                                 for k in ("eager", "graph", "bound")) + " |")
    lines += ["", "| hybrid / teacher cache at 4k | KV+SSM | KV+SSM+conv |", "|---|---|---|"]
    for name, ratio in found["cache_ratio_at_4k (hybrid / teacher)"].items():
        lines.append(f"| {name} | {ratio['KV+SSM']:.3f} | {ratio['KV+SSM+conv']:.3f} |")
    lines += ["", f"decode >= 2x in: {', '.join(found['decode >= 2x in']) or 'none'}",
              f"cache <= 1/6 of the teacher's at 4k: {found['cache <= 1/6 at 4k']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run with tiny shapes (< 1 min)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192, 32768])
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    parser.add_argument("--state-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64])
    parser.add_argument("--steps", type=int, default=64, help="decode steps per timed pass")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per cell (after one untimed pass)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="eager decode only")
    parser.add_argument("--out", type=Path, default=None, help="JSON path [benchmarks/results/decode.json]")
    parser.add_argument("--merge", action="store_true",
                        help="keep the cells of an existing --out file (run the contexts in separate commands)")
    args = parser.parse_args()
    if args.out is None:
        args.out = RESULTS / ("decode-quick.json" if args.quick else "decode.json")
    if args.quick:
        torch.set_num_threads(1)
    result = run(args)
    write_json_atomic(args.out, result)
    markdown = table(result)
    write_text_atomic(args.out.with_suffix(".md"), markdown)
    print(markdown)


if __name__ == "__main__":
    main()
