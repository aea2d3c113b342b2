"""How long does `radistill build` of the example teacher take, and where does the time go?

    python benchmarks/build_time.py                    # CPU (default device: cuda if there is one)
    python benchmarks/build_time.py --device cuda      # one GPU
    python benchmarks/build_time.py --quick --out /tmp/build_time.json   # smoke test (tests/test_build_speed.py)

Teacher: examples/teacher-19m. Heads: ``--heads L.H,...``, or the top ``--keep`` (16) of a scan this script runs
first (KV probe, 10 pairs, 8 samples, seed 0; written to ``--work``/scan/scan.json and reused by later runs), as
``radistill build TEACHER --scan scan.json --keep 16 --state-size 8`` takes them. Two calibration texts: the small
built-in one (no ``--calibration-data``) and 16,384 tokens of examples/data/prose-train.txt.xz, the size of a real
build.

Per case:
- ``cli s``: wall time of the whole command in a fresh process (``python -m radistill.cli build ...``: Python and
  library imports, loading, conversion, calibration, saving), what a user waits for;
- ``build s``: ``build_student`` in this already-warm process, then its parts measured one by one (``load``,
  ``convert``, ``calibrate``, ``save``) by calling the same functions ``build_student`` calls, in its order.
Writes ``--out`` (benchmarks/results/build_time.json) and prints the table with the device and versions.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radistill.hybrid.build import build_student, convert, select_heads, student_config  # noqa: E402
from radistill.hybrid.calibrate import DEFAULT_TOKENS, calibrate, calibration_batches  # noqa: E402
from radistill.models.access import load_model, resolve_device  # noqa: E402
from radistill.utils.io import write_json_atomic  # noqa: E402

TEACHER = ROOT / "examples" / "teacher-19m"
PROSE = ROOT / "examples" / "data" / "prose-train.txt.xz"
QUICK_HEADS = "0.0,2.4,8.3"


def scan_heads(teacher: Path, device: str, work: Path) -> Path:
    """scan.json of the teacher (a small KV scan), made once under ``work``."""
    path = work / "scan" / "scan.json"
    if path.exists():
        return path
    from radistill.probes.kv import KVProbeConfig, kv_items
    from radistill.scan.run import scan_model

    model, tokenizer = load_model(teacher, device=device)
    items = kv_items(tokenizer, KVProbeConfig(pairs=10, samples=8, seed=0))
    result = scan_model(model, tokenizer, str(teacher), items=items, probe={"kind": "kv", "pairs": 10, "samples": 8})
    result.save(path.parent)
    return path


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def parts(teacher: Path, device: str, heads: dict, state_size: int, data: Path | None, tokens: int,
          out: Path) -> dict[str, float]:
    """The build's steps one by one, as build_student runs them."""
    seconds = {}
    (model, tokenizer), seconds["load"] = timed(lambda: load_model(teacher, device=device), device)
    selection = select_heads(model, **heads)
    config = student_config(model, selection.kept_per_layer(model.config.num_hidden_layers), "discrete_mamba2",
                            {"state_size": state_size})
    student, seconds["convert"] = timed(lambda: convert(model, config), device)
    batches = calibration_batches(tokenizer, data, tokens)
    _, seconds["calibrate"] = timed(lambda: calibrate(student, model, batches), device)
    _, seconds["save"] = timed(lambda: student.to(torch.bfloat16).save_pretrained(out), device)
    return seconds


def cli_seconds(teacher: Path, device: str, head_args: list[str], state_size: int, data: Path | None,
                tokens: int, out: Path) -> float:
    command = [sys.executable, "-m", "radistill.cli", "build", str(teacher), *head_args, "--state-size",
               str(state_size), "--device", device, "--out", str(out), "--overwrite"]
    if data is not None:
        command += ["--calibration-data", str(data), "--calibration-tokens", str(tokens)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"radistill build failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--teacher", type=Path, default=TEACHER)
    parser.add_argument("--heads", default=None, help="L.H,... to keep (default: the top --keep of a scan)")
    parser.add_argument("--keep", type=int, default=16)
    parser.add_argument("--state-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="calibration tokens of the prose case")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "radistill-build-time")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "build_time.json")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads, here and in the fresh process (default: torch's own choice); on a "
                             "machine shared with other jobs, 1 avoids OpenMP threads spinning against each other")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: heads {QUICK_HEADS}, built-in text only, no fresh-process timing")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the fresh `radistill build` process inherits it
    device = resolve_device(args.device)
    heads_spec = args.heads or (QUICK_HEADS if args.quick else None)
    if heads_spec is not None:
        heads, head_args = {"heads": heads_spec}, ["--heads", heads_spec]
    else:
        scan = scan_heads(args.teacher, device, args.work)
        heads, head_args = {"scan": scan, "keep": args.keep}, ["--scan", str(scan), "--keep", str(args.keep)]
    cases = [("built-in text", None, 0)] + ([] if args.quick else [(f"prose, {args.tokens} tokens", PROSE,
                                                                     args.tokens)])
    rows = []
    for name, data, tokens in cases:
        tokens_arg = tokens or DEFAULT_TOKENS
        out = args.work / "student"
        _, build_s = timed(lambda: build_student(args.teacher, out, **heads, state_size=args.state_size,
                                                 calibration_data=data, calibration_tokens=tokens_arg,
                                                 device=device, overwrite=True), device)
        steps = parts(args.teacher, device, heads, args.state_size, data, tokens_arg, args.work / "parts")
        cli_s = None if args.quick else cli_seconds(args.teacher, device, head_args, args.state_size, data,
                                                     tokens_arg, args.work / "cli")
        rows.append({"case": name, "cli_s": cli_s, "build_s": build_s, **{f"{k}_s": v for k, v in steps.items()}})
        print(f"{name}: build {build_s:.2f}s" + ("" if cli_s is None else f", cli {cli_s:.2f}s"), flush=True)

    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({platform.processor()}"
                  f" {os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "quick": args.quick, "teacher": str(args.teacher), "heads": head_args, "state_size": args.state_size,
        "rows": rows,
    }
    columns = ["case", "cli_s", "build_s", "load_s", "convert_s", "calibrate_s", "save_s"]
    lines = [f"build of {args.teacher.name} on {result['device']}, torch {result['torch']}, transformers "
             f"{result['transformers']} (load average {result['load_average']})",
             " | ".join(c.removesuffix("_s") + (" s" if c != "case" else "") for c in columns)]
    for row in rows:
        lines.append(" | ".join(row["case"] if c == "case" else ("-" if row[c] is None else f"{row[c]:.2f}")
                                for c in columns))
    result["table"] = "\n".join(lines)
    write_json_atomic(args.out, result)
    print(result["table"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
