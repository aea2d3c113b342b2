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
- ``build s``: ``build_student`` alone, timed in a fresh process once its imports are done;
- its parts measured one by one in this process (``load``, ``convert``, ``calibrate``, ``save``) by calling the
  same functions ``build_student`` calls, in its order.

Before/after in one run: ``--baseline DIR`` (a checkout of the code to compare with, e.g. ``git worktree add
/tmp/before COMMIT``) times that checkout's ``cli s`` and ``build s`` too, alternating with this checkout's so that
both see the same machine load; ``--repeats N`` takes each timing N times (the median is reported, every sample
kept in the JSON). Writes ``--out`` (benchmarks/results/build_time.json) and prints the table with the device and
versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radistill.hybrid.build import convert, select_heads, student_config  # noqa: E402
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


def _run(command: list[str], root: Path) -> tuple[float, str]:
    """Run ``command`` in ``root`` with that checkout first on the path -> (wall seconds, stdout)."""
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} in {root} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                         f"{done.stderr[-2000:]}")
    return wall, done.stdout


def cli_seconds(teacher: Path, device: str, head_args: list[str], state_size: int, data: Path | None,
                tokens: int, out: Path, root: Path = ROOT) -> float:
    command = [sys.executable, "-m", "radistill.cli", "build", str(teacher), *head_args, "--state-size",
               str(state_size), "--device", device, "--out", str(out), "--overwrite"]
    if data is not None:
        command += ["--calibration-data", str(data), "--calibration-tokens", str(tokens)]
    return _run(command, root)[0]


# build_student in a fresh process, timed once its imports are done (and CUDA is up); prints the seconds
_BUILD = """
import json, sys, time
import torch
from radistill.hybrid.build import build_student
kwargs = json.loads(sys.argv[1])
cuda = kwargs["device"].startswith("cuda")
if cuda:
    torch.cuda.init()
start = time.perf_counter()
build_student(**kwargs)
if cuda:
    torch.cuda.synchronize()
print(time.perf_counter() - start)
"""


def build_seconds(teacher: Path, device: str, heads: dict, state_size: int, data: Path | None, tokens: int,
                  out: Path, root: Path = ROOT) -> float:
    kwargs = {"teacher": str(teacher), "out": str(out), **{k: v if k == "keep" else str(v) for k, v in heads.items()},
              "state_size": state_size, "calibration_data": None if data is None else str(data),
              "calibration_tokens": tokens, "overwrite": True, "device": device}
    return float(_run([sys.executable, "-c", _BUILD, json.dumps(kwargs)], root)[1].split()[-1])


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
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout of the code to compare with: its cli and build times, in the same run")
    parser.add_argument("--baseline-label", default=None, help="what --baseline is, for the JSON (e.g. its commit)")
    parser.add_argument("--repeats", type=int, default=1, help="take each fresh-process timing this many times")
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
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if args.baseline is not None and not (args.baseline / "radistill" / "hybrid" / "build.py").exists():
        raise SystemExit(f"--baseline {args.baseline} is not a radistill checkout (no radistill/hybrid/build.py)")
    checkouts = [("", ROOT)] + ([] if args.baseline is None else [("baseline_", args.baseline.resolve())])
    rows = []
    for name, data, tokens in cases:
        tokens_arg = tokens or DEFAULT_TOKENS
        samples: dict[str, list[float]] = {}
        for _ in range(args.repeats):  # alternating, so that every checkout sees the same load
            for prefix, root in checkouts:
                samples.setdefault(f"{prefix}build_s", []).append(build_seconds(
                    args.teacher, device, heads, args.state_size, data, tokens_arg, args.work / "student", root))
                if not args.quick:
                    samples.setdefault(f"{prefix}cli_s", []).append(cli_seconds(
                        args.teacher, device, head_args, args.state_size, data, tokens_arg, args.work / "cli", root))
        steps = parts(args.teacher, device, heads, args.state_size, data, tokens_arg, args.work / "parts")
        medians = {key: statistics.median(values) for key, values in samples.items()}
        rows.append({"case": name, "cli_s": medians.get("cli_s"), **medians, **{f"{k}_s": v for k, v in steps.items()},
                     **({"samples": samples} if args.repeats > 1 else {})})
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()), flush=True)

    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({platform.processor()}"
                  f" {os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "quick": args.quick, "teacher": str(args.teacher), "heads": head_args, "state_size": args.state_size,
        "repeats": args.repeats, "rows": rows,
    }
    if args.baseline is not None:
        result["baseline"] = args.baseline_label or str(args.baseline)
    columns = ["case", "cli_s", "build_s", "load_s", "convert_s", "calibrate_s", "save_s"]
    if args.baseline is not None:
        columns[3:3] = ["baseline_cli_s", "baseline_build_s"]
    lines = [f"build of {args.teacher.name} on {result['device']}, torch {result['torch']}, transformers "
             f"{result['transformers']} (load average {result['load_average']})",
             " | ".join(c.removesuffix("_s") + (" s" if c != "case" else "") for c in columns)]
    for row in rows:
        lines.append(" | ".join(row["case"] if c == "case" else ("-" if row.get(c) is None else f"{row[c]:.2f}")
                                for c in columns))
    result["table"] = "\n".join(lines)
    write_json_atomic(args.out, result)
    print(result["table"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
