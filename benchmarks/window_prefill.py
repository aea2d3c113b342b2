"""The window mixer's prefill: its banded path against the blockwise reference, in one process.

    python benchmarks/window_prefill.py                      # CPU: fp32, lengths 2048, 8192
    python benchmarks/window_prefill.py --device cuda        # bf16, lengths 2048, 8192, 32768

One :class:`~radistill.hybrid.mixers.WindowAttention` layer with the Llama-3.2-1B attention shape (hidden 2048,
32 query heads of 64 over 8 KV heads, every head windowed, W = 16, with the build's 4 attention sinks unless
``--sink``) runs a batch-1 prefill (``forward`` with a fresh
ring state, as generate's prefill calls it) of each length, twice: through the banded path (the default: queries in
chunks against their band of keys, two batched matmuls) and through the blockwise reference (blocks of 256 queries
in a Python loop, which any input with padding between real tokens still takes). Per path: the median wall time of
3 calls after a warm-up (synchronised on CUDA) of the whole forward and of the attention alone, the aten operators
one forward launches (torch.profiler), and the largest difference between the two outputs. Writes
benchmarks/results/window_prefill.{json,md} (CUDA) or window_prefill-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from decode import sync  # noqa: E402  (benchmarks/decode.py)
from environment import device_label, versions  # noqa: E402  (benchmarks/environment.py)
from radistill.hybrid.mixers import WindowAttention  # noqa: E402
from radistill.hybrid.mixers.window import DEFAULT_SINK  # noqa: E402
from radistill.utils.io import write_json_atomic, write_text_atomic  # noqa: E402


def operators(fn) -> int:
    """aten operators one call of ``fn`` launches (each costs host time; on CUDA most launch a kernel)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def measure(mixer: WindowAttention, hidden: torch.Tensor, cos_sin, device: str, path: str, repeat: int = 3):
    """(median seconds of the whole forward, median seconds of the attention alone, aten operators of one forward,
    output) of a prefill through ``path`` ("banded" or "blockwise")."""
    if path == "blockwise":
        mixer._banded = mixer._blockwise  # this instance only: forward's banded call goes to the reference
    try:
        def forward():
            state = mixer.empty_state(hidden.shape[0], hidden.device, hidden.dtype)
            return mixer(hidden, state=state, position_embeddings=cos_sin)[0]

        q, k, v = mixer._qkv(hidden, cos_sin)
        valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)

        def attention():
            return mixer._banded(q, k, v, valid, 0, None)

        def timed(fn) -> float:
            fn()  # warm-up
            times = []
            for _ in range(repeat):
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        with torch.no_grad():
            out = forward()
            whole, core, ops = timed(forward), timed(attention), operators(forward)
    finally:
        mixer.__dict__.pop("_banded", None)
    return whole, core, ops, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=lambda v: [int(x) for x in v.split(",")], default=None,
                        help="prefill lengths [CPU 2048,8192; CUDA 2048,8192,32768]")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--sink", type=int, default=DEFAULT_SINK, help=f"attention sinks [{DEFAULT_SINK}, the build's]")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = args.lengths or ([2048, 8192, 32768] if cuda else [2048, 8192])
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    heads, kv_heads, dim, hidden_size = 32, 8, 64, 2048
    mixer = WindowAttention(hidden_size, heads, dim, window=args.window, sink=args.sink,
                            kv_groups=[h // (heads // kv_heads) for h in range(heads)]).to(args.device, dtype).eval()
    rows = []
    for length in lengths:
        hidden = torch.randn(1, length, hidden_size, device=args.device, dtype=dtype)
        angle = torch.arange(length, device=args.device, dtype=torch.float32)[:, None] * \
            (10000.0 ** (-torch.arange(0, dim, 2, device=args.device) / dim))[None, :]
        angle = torch.cat([angle, angle], dim=-1)[None]
        cos_sin = (angle.cos().to(dtype), angle.sin().to(dtype))
        banded_s, banded_core, banded_ops, banded = measure(mixer, hidden, cos_sin, args.device, "banded")
        block_s, block_core, block_ops, block = measure(mixer, hidden, cos_sin, args.device, "blockwise")
        row = {"length": length, "banded_ms": 1e3 * banded_s, "blockwise_ms": 1e3 * block_s,
               "banded_attention_ms": 1e3 * banded_core, "blockwise_attention_ms": 1e3 * block_core,
               "speedup": block_s / banded_s, "attention_speedup": block_core / banded_core,
               "banded_operators": banded_ops, "blockwise_operators": block_ops,
               "max_abs_difference": float((banded.float() - block.float()).abs().max())}
        rows.append(row)
        print(row, flush=True)
    result = {"device": device_label(args.device),
              "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."),
              "shape": {"hidden": hidden_size, "heads": heads, "kv_heads": kv_heads, "head_dim": dim,
                        "window": args.window, "sink": args.sink, "block_size": mixer.block_size, "batch": 1},
              "versions": versions(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "rows": rows}
    out = args.out or ROOT / "benchmarks" / "results" / ("window_prefill.json" if cuda else "window_prefill-cpu.json")
    lines = [f"# Window mixer prefill, banded vs blockwise: {result['device']}, {result['dtype']}, {result['date']}",
             "",
             f"One layer, hidden {hidden_size}, {heads} heads x {dim} over {kv_heads} KV heads, W = {args.window}, "
             f"{args.sink} sinks (the blockwise path then reads every earlier key), "
             f"batch 1, blockwise blocks of {mixer.block_size}; median of 3 after a warm-up.", "",
             "| tokens | forward ms: banded | blockwise | speedup | attention alone ms: banded | blockwise | speedup "
             "| aten ops per forward: banded | blockwise | max abs diff |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['length']} | {r['banded_ms']:.1f} | {r['blockwise_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['banded_attention_ms']:.1f} | {r['blockwise_attention_ms']:.1f} | {r['attention_speedup']:.2f}x | "
              f"{r['banded_operators']} | {r['blockwise_operators']} | {r['max_abs_difference']:.1e} |" for r in rows]
    lines += ["", "Forward: the projections, RoPE, the window attention and the ring written for the next step; "
                  "attention alone: the banded / blockwise call on the same q, k, v."]
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
