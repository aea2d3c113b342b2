"""Sampled decoding through generate(): the teacher and each hybrid in transformers' loop (static cache, its
compiled decode step on CUDA), and each hybrid in its own captured loop (generate(do_sample=True,
graph_decode=True)), all with the same sampling (temperature 0.8, top-p 0.95), in one run.

    python benchmarks/sampling.py                   # CUDA: the Llama-3.2-1B shape, 10 kept heads, state 8, bf16
    python benchmarks/sampling.py --quick           # CPU smoke run on tiny shapes (tests use it)

Why: greedy calls on CUDA take the captured loop by default (benchmarks/generate.py measures them); sampled calls
take it only when asked for (graph_decode=True), until this table shows what it gives on a GPU. Tokens/s per
context x batch = batch x (n - n/4) / (time(n) - time(n/4)): two calls that prefill (and capture) alike, so the
difference is decode steps only; each call once untimed first, then the median of 3. No end token: every call
makes exactly n tokens. Writes benchmarks/results/sampling-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from environment import device_label, versions  # noqa: E402
from generate import difference_rate, make_generate_models, prompt  # noqa: E402

from radistill.hybrid.graph_decode import decode_plan  # noqa: E402
from radistill.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}


@torch.no_grad()
def rate(model, ids: torch.Tensor, new_tokens: int, **extra) -> dict:
    """Decode tokens/s of sampled generate() calls (module docstring), ``extra`` added to the call."""
    kwargs = dict(attention_mask=torch.ones_like(ids), eos_token_id=None, pad_token_id=0,
                  cache_implementation="static", **SAMPLING, **extra)
    return difference_rate(model, ids, new_tokens, kwargs, first_token=False)


def table(result: dict) -> str:
    cells = list(result["cells"])
    lines = [f"# Sampled decode through generate(): {result['device']} ({result['dtype']}), torch "
             f"{result['versions']['torch']}, transformers {result['versions']['transformers']}", "",
             f"Sampling: {result['sampling']}; {result['new_tokens']} new tokens per timed call.", "",
             "| model | loop | " + " | ".join(f"{c} tok/s" for c in cells) + " | "
             + " | ".join(f"{c} vs teacher" for c in cells) + " |",
             "|---|---|" + "---|" * (2 * len(cells))]
    teacher = result["rows"][0]
    for row in result["rows"]:
        rates = [row["cells"].get(c, {}).get("tokens_per_s") for c in cells]
        ratios = ["" if row is teacher or not (r and t) else f"{r / t:.2f}x"
                  for r, t in zip(rates, (teacher["cells"].get(c, {}).get("tokens_per_s") for c in cells))]
        lines.append(f"| {row['model']} | {row['loop']} | " + " | ".join("-" if r is None else f"{r:.1f}" for r in rates)
                     + " | " + " | ".join(ratios) + " |")
    lines += ["", "transformers' loop: generate(cache_implementation='static', do_sample=True, ...) (on CUDA its "
              "compiled decode step); captured loop: the same call with graph_decode=True (the hybrid's device-side "
              "loop, the draw captured with the step: radistill/hybrid/graph_decode.py)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, short prompts")
    parser.add_argument("--mixers", default="discrete_mamba2,window_recurrent")
    parser.add_argument("--contexts", default="8192", help="prompt lengths, comma-separated [8192]")
    parser.add_argument("--batches", default="1,16", help="batch sizes, comma-separated [1,16]")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="JSON path [benchmarks/results/sampling-<device>.json]")
    args = parser.parse_args(argv)
    device = "cpu" if args.quick else "cuda"
    dtype = torch.float32 if args.quick else torch.bfloat16
    contexts = [48] if args.quick else [int(x) for x in args.contexts.split(",")]
    batches = [1, 2] if args.quick else [int(x) for x in args.batches.split(",")]
    new_tokens = 12 if args.quick else args.new_tokens
    models = make_generate_models(args.quick, device, dtype, [m for m in args.mixers.split(",") if m], 8, 16)
    names = list(models)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device_label(device), "versions": versions(), "dtype": str(dtype).removeprefix("torch."),
              "sampling": SAMPLING, "new_tokens": new_tokens,
              "cells": {f"{c}x{b}": {"context": c, "batch": b} for c in contexts for b in batches},
              "rows": [{"model": names[0], "loop": "transformers", "cells": {}}]
              + [{"model": n, "loop": loop, "cells": {}} for n in names[1:] for loop in ("transformers", "captured")]}
    out = args.out or RESULTS / f"sampling-{'cpu' if args.quick else 'cuda'}.json"
    for key, cell in result["cells"].items():
        for row in result["rows"]:
            model = models[row["model"]]
            ids = prompt(model, cell["batch"], cell["context"], device)
            extra = {}
            if row["model"] != names[0]:  # the teacher is a transformers model: it takes no graph_decode
                extra["graph_decode"] = row["loop"] == "captured"
                plan = decode_plan(model, ids, {**SAMPLING, "cache_implementation": "static",
                                                "max_new_tokens": new_tokens}, extra["graph_decode"] or False)
                assert (plan is not None) == extra["graph_decode"], "the row would not take the loop it names"
            row["cells"][key] = rate(model, ids, new_tokens, **extra)
            print(f"{row['model']} ({row['loop']}) {key}: {row['cells'][key]}", flush=True)
            write_json_atomic(out, result)  # as it goes: a cut run keeps its rows
    text = table(result)
    print(text)
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), text)
    return result


if __name__ == "__main__":
    main()
