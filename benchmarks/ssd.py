"""Speed and accuracy of the recurrence's implementations (radistill.ops.ssd) on one device.

    python benchmarks/ssd.py            # GPU: B 2/4/8 x T 2048/4096/8192 x N 8/64, 32 heads, P 64, bf16
    python benchmarks/ssd.py --quick    # CPU smoke run: small shapes, float32, eager paths only

Paths: the PyTorch chunked scan eager and torch.compile'd, fla's chunked kernel, fla's fused-recurrent kernel and
the materialised matrix (only where its [B, H, T, T] fits). Each is timed forward and forward + backward (where it
has a backward) and its outputs and gradients are compared with the chunked scan in a wider dtype (float32 on GPU,
float64 on CPU), as max |error| / max |reference|. Prints a table; writes JSON (device, versions, rows) to
benchmarks/results/ssd.json (ssd-quick.json for --quick).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from radistill.ops.ssd import ssd_chunk, ssd_fla, ssd_naive
from radistill.ops.ssd.fla import chunk_backward_ok, fla_installed
from radistill.utils.io import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"
MATRIX_BUDGET_BYTES = 16e9  # the matrix path holds ~4 float32 [B, H, T, T] tensors; skip it beyond this


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def make_inputs(B, T, H, N, P, dtype, device):
    """x, log_a (spread of decays), b, c, initial state, all requiring grad."""
    g = torch.Generator(device="cpu").manual_seed(0)
    tensors = [
        torch.randn(B, T, H, P, generator=g), -F.softplus(torch.randn(B, T, H, generator=g) * 2),
        torch.randn(B, T, H, N, generator=g) / N**0.5, torch.randn(B, T, H, N, generator=g) / N**0.5,
        torch.randn(B, H, N, P, generator=g),
    ]
    return [t.to(device=device, dtype=dtype).requires_grad_(True) for t in tensors]


def run(fn, inputs, cotangents, backward):
    """One call: outputs and, with backward, the inputs' gradients (cleared first)."""
    for t in inputs:
        t.grad = None
    y, final = fn(*inputs)
    if backward:
        torch.autograd.backward([y, final], [cotangents[0].to(y.dtype), cotangents[1].to(final.dtype)])
    return y, final


def timed_ms(fn, device, reps):
    """Median wall time of fn() in ms, after two warm-up calls (compilation, autotuning)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def paths(device, chunk, B, T, H, compiled):
    """name -> (fn, has_backward, skip reason or None)."""
    cuda = device.type == "cuda"
    fla_ok = cuda and fla_installed()
    matrix_fits = 4 * 4 * B * H * T * T <= MATRIX_BUDGET_BYTES
    out = {
        "torch_chunk_eager": (lambda *t: ssd_chunk(*t, chunk_size=chunk), True, None),
        "torch_chunk_compiled": (lambda *t: compiled(*t, chunk_size=chunk), True, None if cuda else "CPU: no compile"),
        "fla_chunk": (ssd_fla, fla_ok and chunk_backward_ok(device), None if fla_ok else "fla not installed / no CUDA"),
        "fla_fused_recurrent": (lambda *t: ssd_fla(*t, recurrent=True), True,
                                None if fla_ok else "fla not installed / no CUDA"),
        "naive_matrix": (ssd_naive, True, None if matrix_fits else "[B, H, T, T] too large"),
    }
    return out


def bench_shape(B, T, H, N, P, dtype, ref_dtype, device, chunk, reps, compiled):
    inputs = make_inputs(B, T, H, N, P, dtype, device)
    ref_inputs = [t.detach().to(ref_dtype).requires_grad_(True) for t in inputs]
    g = torch.Generator(device="cpu").manual_seed(1)
    cot = [torch.randn(B, T, H, P, generator=g).to(device), torch.randn(B, H, N, P, generator=g).to(device)]
    ref = run(lambda *t: ssd_chunk(*t, chunk_size=chunk), ref_inputs, cot, True)
    ref_grads = [t.grad for t in ref_inputs]
    rows = []
    for name, (fn, has_bwd, skip) in paths(device, chunk, B, T, H, compiled).items():
        row = {"B": B, "T": T, "H": H, "N": N, "P": P, "path": name, "fwd_ms": None, "fwd_bwd_ms": None,
               "y_err": None, "state_err": None, "grad_err": None, "peak_gb": None, "note": skip}
        if skip is None:
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    baseline = torch.cuda.memory_allocated()
                with torch.no_grad():
                    y, final = run(fn, inputs, cot, False)
                    row["fwd_ms"] = timed_ms(lambda: run(fn, inputs, cot, False), device, reps)
                row["y_err"], row["state_err"] = rel_err(y, ref[0]), rel_err(final, ref[1])
                if has_bwd:
                    run(fn, inputs, cot, True)
                    row["grad_err"] = max(rel_err(t.grad, r) for t, r in zip(inputs, ref_grads))
                    row["fwd_bwd_ms"] = timed_ms(lambda: run(fn, inputs, cot, True), device, reps)
                else:
                    row["note"] = "backward unreliable here (Hopper, Triton < 3.7.1): forward only"
                if device.type == "cuda":
                    row["peak_gb"] = (torch.cuda.max_memory_allocated() - baseline) / 1e9  # beyond the inputs
            except torch.OutOfMemoryError:
                row["note"] = "out of memory"
            except Exception as error:  # one failing path must not hide the others' numbers
                row["note"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def fmt(value, spec):
    return "-".rjust(int(spec.split(".")[0])) if value is None else format(value, spec)


def format_row(r):
    return (f"{r['B']:>2} {r['T']:>6} {r['N']:>3}  {r['path']:<21}"
            f" {fmt(r['fwd_ms'], '9.3f')} {fmt(r['fwd_bwd_ms'], '9.3f')}"
            f"  {fmt(r['y_err'], '8.1e')} {fmt(r['state_err'], '8.1e')} {fmt(r['grad_err'], '8.1e')}"
            f" {fmt(r['peak_gb'], '6.2f')}  {r['note'] or ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CPU-sized run (float32, eager paths)")
    parser.add_argument("--batch", default=None, help="comma-separated batch sizes")
    parser.add_argument("--seq", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--state", default="8,64", help="comma-separated state sizes N")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    quick = args.quick or device.type == "cpu"
    ints = lambda text, default: [int(v) for v in (text or default).split(",")]  # noqa: E731
    batches = ints(args.batch, "1,2" if quick else "2,4,8")
    seqs = ints(args.seq, "256,512" if quick else "2048,4096,8192")
    heads, reps = args.heads or (4 if quick else 32), args.reps or (3 if quick else 10)
    dtype, ref_dtype = (torch.float32, torch.float64) if quick else (torch.bfloat16, torch.float32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference stays float32

    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"triton {version('triton')}, fla {version('fla-core')}, {dtype}, chunk {args.chunk}")
    print(" B      T   N  path                     fwd ms fwd+bwd ms     y_err st_err   grad_err peak GB")
    # one dynamic-shape compile serves every shape (a static one per shape would cost minutes of compiling);
    # the matmuls go to cuBLAS either way, only the fused elementwise kernels are shape-generic
    compiled = torch.compile(ssd_chunk, dynamic=True)
    rows = [row for B in batches for T in seqs for N in ints(args.state, "")
            for row in bench_shape(B, T, heads, N, args.head_dim, dtype, ref_dtype, device, args.chunk, reps, compiled)]
    out = args.out or RESULTS / ("ssd-quick.json" if quick else "ssd.json")
    write_json_atomic(out, {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "triton": version("triton"), "fla-core": version("fla-core"),
                     "cuda": torch.version.cuda},
        "dtype": str(dtype).removeprefix("torch."), "reference_dtype": str(ref_dtype).removeprefix("torch."),
        "chunk_size": args.chunk, "reps": reps, "rows": rows,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
