"""`radistill serve` under concurrent clients: the same requests sent one after another, then all at once.

    python benchmarks/serve.py --models /tmp/smollm2.gguf,runs/student --clients 8 --max-tokens 32
    python benchmarks/serve.py --quick                  # CPU smoke run on a tiny random student (tests use it)

For each model (a teacher and its student side by side, or any model radistill loads) a server runs in this process
on a free port, as `radistill serve` starts it. Each client sends one greedy completion request over HTTP (a prose
opening as its prompt, ``--max-tokens`` new tokens); "sequential" sends them in turn (the server waiting for no
companions, as one without batching), "concurrent" from one thread per client at once, which the server batches
(up to ``--max-batch`` rows per generate() call, waiting ``--batch-wait-ms`` for them). Both orders must
return the same texts (checked). Prints a table; writes JSON (device, versions, per-model times, generate() calls) to
benchmarks/results/serve-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from environment import device_label, versions  # noqa: E402
from radistill.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = ["The capital of France is", "Water boils at", "The largest planet in our solar system is",
           "Photosynthesis is the process by which", "The Pacific Ocean is", "William Shakespeare wrote",
           "A prime number is", "The speed of light is", "The first person to walk on the moon",
           "The human heart has", "Mount Everest is", "The Great Wall of China", "An atom consists of",
           "The Amazon river flows", "Gravity is the force that", "The piano was invented"]


def quick_model():
    """A tiny random window_recurrent student and a byte-level tokenizer (the tests' own), for --quick."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_build import VOCAB, byte_tokenizer
    from test_hybrid import make_teacher
    from test_window_mixer import MAMBA, window_student

    torch.manual_seed(0)
    student = window_student(make_teacher(vocab_size=VOCAB), [[0], [], [1], []], 4, mixer="window_recurrent",
                             settings={"window": 4, "sink": 2, **MAMBA})
    return student, byte_tokenizer()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as response:
        return json.loads(response.read())


def measure(model, tokenizer, name: str, clients: int, max_tokens: int, max_batch: int, batch_wait: float) -> dict:
    from radistill.serve import Generator, make_server

    generator = Generator(model, tokenizer, name, max_tokens=max_tokens, max_batch=max_batch, batch_wait=batch_wait)
    server = make_server(generator, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
              for i in range(clients)]
    try:
        # requests in turn, as a server without batching serves them: no wait for companions that never come
        generator.batch_wait = 0.0
        post(url, {**bodies[0], "max_tokens": 2})  # first-use work (allocations, kernels) out of the timing
        generator.calls = 0
        start = time.perf_counter()
        sequential = [post(url, body) for body in bodies]
        sequential_s = time.perf_counter() - start
        sequential_calls, generator.calls, generator.batch_wait = generator.calls, 0, batch_wait
        concurrent: list = [None] * clients

        def client(i: int) -> None:
            concurrent[i] = post(url, bodies[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        concurrent_s = time.perf_counter() - start
    finally:
        server.shutdown()
        server.server_close()
    texts = [[r["choices"][0]["text"] for r in run] for run in (sequential, concurrent)]
    tokens = sum(r["usage"]["completion_tokens"] for r in concurrent)
    return {"model": name, "clients": clients, "max_tokens": max_tokens,
            "sequential_s": sequential_s, "concurrent_s": concurrent_s, "speedup": sequential_s / concurrent_s,
            "generate_calls": {"sequential": sequential_calls, "concurrent": generator.calls},
            "completion_tokens": tokens, "concurrent_tokens_per_s": tokens / concurrent_s,
            "sequential_tokens_per_s": sum(r["usage"]["completion_tokens"] for r in sequential) / sequential_s,
            "same_texts": texts[0] == texts[1]}


def table(result: dict) -> str:
    lines = [f"# radistill serve, {result['clients']} clients: {result['device']}, torch {result['versions']['torch']}, "
             f"transformers {result['versions']['transformers']}", "",
             "| model | sequential s | concurrent s | speedup | generate() calls seq / conc | tok/s seq | tok/s conc "
             "| same texts |", "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        calls = row["generate_calls"]
        lines.append(f"| {row['model']} | {row['sequential_s']:.2f} | {row['concurrent_s']:.2f} | "
                     f"{row['speedup']:.2f}x | {calls['sequential']} / {calls['concurrent']} | "
                     f"{row['sequential_tokens_per_s']:.1f} | {row['concurrent_tokens_per_s']:.1f} | "
                     f"{row['same_texts']} |")
    lines += ["", f"Each client: one greedy completion of {result['max_tokens']} new tokens over HTTP; "
              "concurrent requests share generate() calls (up to --max-batch rows)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated: student dirs, HF ids, GGUF files")
    parser.add_argument("--names", default=None, help="comma-separated names for the table [the --models entries]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="as `radistill serve --batch-wait-ms`")
    parser.add_argument("--quick", action="store_true", help="a tiny random student on the CPU, 4 clients")
    parser.add_argument("--out", type=Path, default=None, help="JSON path [benchmarks/results/serve-<device>.json]")
    args = parser.parse_args(argv)
    if args.quick:
        # the smoke run checks that the four requests share one call, even on a loaded machine: a long wait, which
        # the batch leaves as soon as it holds all four (--max-batch 4)
        args.clients, args.max_tokens, args.device, args.batch_wait_ms, args.max_batch = 4, 8, "cpu", 5000.0, 4
        loaded = [("tiny-student", *quick_model())]
    else:
        if not args.models:
            parser.error("give --models (or --quick)")
        from radistill.models.access import load_model

        models = [m for m in args.models.split(",") if m]
        names = args.names.split(",") if args.names else models
        if len(names) != len(models):
            parser.error(f"--names gives {len(names)} names for {len(models)} models")
        loaded = [(name, *load_model(m, device=args.device)) for name, m in zip(names, models)]
    device = str(next(loaded[0][1].parameters()).device)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "models": None if args.quick else args.models,
              "device": device_label(device), "versions": versions(), "clients": args.clients,
              "max_tokens": args.max_tokens, "max_batch": args.max_batch, "batch_wait_ms": args.batch_wait_ms,
              "rows": []}
    for name, model, tokenizer in loaded:
        result["rows"].append(measure(model, tokenizer, name, args.clients, args.max_tokens, args.max_batch,
                                      args.batch_wait_ms / 1000))
        print(json.dumps(result["rows"][-1]))
    text = table(result)
    print(text)
    out = args.out or RESULTS / f"serve-{'cpu' if device == 'cpu' else 'cuda'}.json"
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), text)
    return result


if __name__ == "__main__":
    main()
