"""Start-up time of the `radistill` command: how long `radistill --help` and a usage error take.

    python benchmarks/startup.py               # 7 repeats of each, median
    python benchmarks/startup.py --repeats 1 --out /tmp/startup.json
    python benchmarks/startup.py --root /path/to/other/checkout --out /tmp/before.json   # the same for another tree

Each case runs `python -m radistill.cli ARGS` in a fresh interpreter (what the console script does) from the
repository root; a bare `python -c pass` is timed beside them, the interpreter's own share. The command modules
import torch and transformers only inside their commands, so none of these cases should pay for them (~4-12 s).
Prints a table; writes JSON (machine, versions, per-case times) to benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radistill.utils.io import write_json_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CASES = {  # name: (arguments of `python -m radistill.cli`, expected exit code)
    "radistill --help": (["--help"], 0),
    "radistill --version": (["--version"], 0),
    "radistill scan (missing argument)": (["scan"], 2),
    "radistill distill --bogus (unknown option)": (["distill", "s", "--bogus"], 2),
}


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def time_command(command: list[str], root: Path, repeats: int) -> dict:
    """Wall seconds of each run, the exit code and the number of stderr lines (of the last run)."""
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
        times.append(time.perf_counter() - start)
    return {"seconds": times, "median_s": statistics.median(times), "exit_code": done.returncode,
            "stderr_lines": len(done.stderr.strip().splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "startup.json")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose radistill is timed")
    args = parser.parse_args()
    root = args.root.resolve()
    rows = [{"case": "python -c pass (interpreter only)", "expected_exit": 0,
             **time_command([sys.executable, "-c", "pass"], root, args.repeats)}]
    for name, (cli_args, expected) in CASES.items():
        rows.append({"case": name, "expected_exit": expected,
                     **time_command([sys.executable, "-m", "radistill.cli", *cli_args], root, args.repeats)})
    width = max(len(r["case"]) for r in rows)
    print(f"{'case':<{width}}  median s  min s  max s  exit  stderr lines  (n={args.repeats}, {root})")
    for r in rows:
        print(f"{r['case']:<{width}}  {r['median_s']:8.3f}  {min(r['seconds']):5.3f}  {max(r['seconds']):5.3f}  "
              f"{r['exit_code']:4d}  {r['stderr_lines']:12d}")
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg")
                    else None},
        "versions": {"python": platform.python_version(), "torch": version("torch"),
                     "transformers": version("transformers"), "typer": version("typer"), "rich": version("rich")},
        "root": str(root),
        "repeats": args.repeats,
        "rows": rows,
    }
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
