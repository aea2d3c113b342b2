"""Stage-3 (end-to-end distillation) training throughput and MFU of a Llama-3.2-1B-shaped teacher/student pair.

    python benchmarks/distill.py                 # one GPU: seq 2048, bf16, micro-batches 4 and 8, eager + compiled
    python benchmarks/distill.py --quick         # CPU smoke run on tiny shapes (seconds)

Random weights (shapes are what matter): the teacher is Llama-3.2-1B-shaped, in bf16; the student is built from it
with 10 kept heads (the authors' top 10 for Llama-3.2-1B) and DiscreteMamba2 heads of state 8 elsewhere, fp32
master weights under bf16 autocast, AdamW. Each measured step is exactly the trainer's optimizer step
(``Trainer.step``: forward, fused chunked KL, backward, clipping, AdamW) on random tokens.

MFU = achieved FLOP/s / peak bf16 FLOP/s, with FLOPs per token =
    teacher forward 2·N_t + student forward+backward 6·N_s        (N: matmul parameters, LM head included)
  + causal attention 2·T·d_head·heads per layer, x1 teacher (forward) and x3 student kept heads (fwd+bwd)
  + recurrence 4·d_state·d_head per recurrent head per layer (state update + readout), x3 (fwd+bwd).
Writes ``benchmarks/results/distill.json`` and ``.md`` (only ``distill-quick.json`` with --quick) and prints the table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from environment import versions  # noqa: E402  (also imported from here by gpu24.py)
from radistill.distill.recipe import DistillRecipe, merge  # noqa: E402
from radistill.distill.stages import make_objective  # noqa: E402
from radistill.distill.trainer import Trainer  # noqa: E402
from radistill.hybrid.build import convert, student_config  # noqa: E402
from radistill.models.presets import random_model, shape_config, tiny_config  # noqa: E402
from radistill.utils.io import write_json_atomic  # noqa: E402

# The authors' top-10 retrieval heads of Llama-3.2-1B-Instruct (layer, head), from their released code.
TOP10_LLAMA_1B = [(9, 25), (4, 4), (10, 26), (0, 20), (8, 20), (8, 19), (8, 16), (7, 22), (10, 20), (5, 5)]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


class RandomTokens:
    """Stands in for the packed data stream: ``next_batch(n)`` -> [n, seq] random ids (on the CPU, like real data)."""

    def __init__(self, vocab: int, seq_len: int):
        self.vocab, self.seq_len = vocab, seq_len
        self.generator = torch.Generator().manual_seed(0)
        self.sequences = 0  # emitted so far, as PackedStream counts them

    def next_batch(self, n: int) -> torch.Tensor:
        self.sequences += n
        return torch.randint(0, self.vocab, (n, self.seq_len), generator=self.generator)

    def position_ids(self, batch: torch.Tensor) -> None:
        """One stretch of positions per row, as ``PackedStream`` with ``data.packing: concat``: the models' default."""
        return None


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: everything but the input embedding (a tied LM head counts once)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters() if p.ndim >= 2 and p is not embed)
    return total + (head.numel() if head is embed else 0)


def flops_per_token(teacher, student, seq_len: int) -> dict:
    cfg = student.config
    layers, hd = cfg.num_hidden_layers, cfg.head_dim
    kept = sum(len(k) for k in cfg.kept_heads)
    recurrent = layers * cfg.num_attention_heads - kept
    state = cfg.mixer_settings.get("state_size", 64)
    parts = {
        "teacher_matmul": 2 * matmul_params(teacher),
        "teacher_attention": 2 * seq_len * hd * cfg.num_attention_heads * layers,
        "student_matmul": 6 * matmul_params(student),
        "student_attention": 3 * 2 * seq_len * hd * kept,
        "student_recurrence": 3 * 4 * state * hd * recurrent,
    }
    parts["total"] = sum(parts.values())
    return parts


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build_pair(quick: bool, device: str, state_size: int):
    if quick:
        config = tiny_config("llama", num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                             hidden_size=128, head_dim=16, intermediate_size=256, vocab_size=512)
        kept = [(0, 1), (2, 5)]
    else:
        config = shape_config("llama-3.2-1b")
        kept = TOP10_LLAMA_1B
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        teacher = random_model(config, seed=0, dtype=dtype)
    per_layer = [[h for l, h in kept if l == layer] for layer in range(config.num_hidden_layers)]
    student = convert(teacher, student_config(teacher, per_layer, "discrete_mamba2", {"state_size": state_size}))
    return teacher, student.float().train()


def synchronizer(device: str):
    """What waits for ``device``'s queued work before a clock is read (nothing to wait for on the CPU)."""
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def time_steps(stage: int, student, teacher, recipe, data, device: str, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per optimizer step of ``stage``, last loss): ``Trainer.step`` on ``data`` (``next_batch(n)``) after
    ``warmup`` untimed steps (compilation, kernel selection, allocator). One process: every layer is trained."""
    cfg = recipe.stage(stage)
    trainer = Trainer(student, teacher, tokenizer=None, recipe=recipe, run_dir=Path("unused"), device=device)
    layers = list(range(student.config.num_hidden_layers))
    objective = make_objective(stage, student, teacher, cfg, layers, compile_loss=trainer.compiles)
    optimizer = trainer.make_optimizer(objective, cfg)
    sync = synchronizer(device)
    for i in range(warmup):
        trainer.step(objective, optimizer, data, cfg, stage, i, warmup + steps, 1)
    sync()
    start = time.perf_counter()
    for i in range(steps):
        loss, _, _ = trainer.step(objective, optimizer, data, cfg, stage, warmup + i, warmup + steps, 1)
    sync()
    return (time.perf_counter() - start) / steps, loss


def measure(teacher, student, device: str, seq_len: int, batch: int, steps: int, warmup: int, compile: bool) -> dict:
    stage = dict(seq_len=seq_len, batch_size=batch, grad_accum=1, lr=1e-5, warmup=0.0, decay=0.0, schedule="constant")
    recipe = merge(DistillRecipe(), {"compile": compile, "dtype": "bf16", "stages": {3: stage}})
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds, loss = time_steps(3, student, teacher, recipe, RandomTokens(teacher.config.vocab_size, seq_len), device,
                               steps, warmup)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"seconds_per_step": seconds, "tokens_per_s": batch * seq_len / seconds, "loss": loss,
            "peak_memory_gib": memory}


def seconds_per_call(fn, device: str, repeats: int) -> float:
    """Seconds per call of ``fn`` after one untimed call (compilation, kernel selection, optimizer state)."""
    sync = synchronizer(device)
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def breakdown(teacher, student, device: str, seq_len: int, batch: int, repeats: int, compiled: bool) -> dict:
    """Seconds per call of each part of a stage-3 step, alone: the teacher's forward, the student's forward and
    backward up to its final norm, the fused KL (forward and its gradients; its chunk arithmetic compiled if
    ``compiled``) and the AdamW update. Their sum beside the whole step's time shows what the step spends between
    them. The layers run as the last measured rows left them (compiled once a compiled row ran)."""
    from radistill.distill.losses import distillation_loss
    from radistill.distill.recipe import LossConfig
    from radistill.distill.stages import final_hidden, head_weight

    ids = RandomTokens(teacher.config.vocab_size, seq_len).next_batch(batch).to(device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    student.requires_grad_(True)
    with autocast, torch.no_grad():
        teacher_hidden = final_hidden(teacher, ids)
        student_hidden = final_hidden(student, ids)

    def teacher_forward():
        with autocast, torch.no_grad():
            final_hidden(teacher, ids)

    def student_forward_backward():
        with autocast:
            final_hidden(student, ids).float().square().mean().backward()

    def loss():
        hidden = student_hidden.detach().requires_grad_(True)
        with autocast:
            distillation_loss(hidden, head_weight(student), teacher_hidden, head_weight(teacher), ids,
                              LossConfig(), compiled).backward()

    parts = {"teacher forward": teacher_forward, "student forward+backward": student_forward_backward,
             "fused KL (+grads)": loss}
    times = {name: seconds_per_call(fn, device, repeats) for name, fn in parts.items()}
    for p in student.parameters():
        p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6, fused=device.startswith("cuda") or None)
    times["AdamW step"] = seconds_per_call(optimizer.step, device, repeats)
    student.zero_grad(set_to_none=True)
    del optimizer
    return times


def kernel_table(teacher, student, device: str, seq_len: int, batch: int, compiled: bool, top: int = 25) -> list[dict]:
    """The ``top`` CUDA kernels of one whole stage-3 step by self time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    stage = dict(seq_len=seq_len, batch_size=batch, grad_accum=1, lr=1e-6, warmup=0.0, decay=0.0, schedule="constant")
    recipe = merge(DistillRecipe(), {"compile": compiled, "dtype": "bf16", "stages": {3: stage}})
    data = RandomTokens(teacher.config.vocab_size, seq_len)
    time_steps(3, student, teacher, recipe, data, device, steps=1, warmup=1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        time_steps(3, student, teacher, recipe, data, device, steps=1, warmup=0)
    events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events) or 1
    return [{"name": e.key[:90], "calls": e.count, "ms": e.self_device_time_total / 1e3,
             "share": e.self_device_time_total / total} for e in events[:top]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU, a smoke test")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch-sizes", default=None, help="micro-batch sizes to try, e.g. 4,8")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--state-size", type=int, default=8)
    parser.add_argument("--compile", choices=("both", "on", "off"), default=None)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense bf16 TFLOP/s")
    parser.add_argument("--profile", action="store_true",
                        help="also time each part of a step alone and list the top CUDA kernels (first batch size)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    quick = args.quick or device == "cpu"
    seq_len = args.seq_len or (128 if quick else 2048)
    batches = [int(b) for b in (args.batch_sizes or ("2" if quick else "4,8")).split(",")]
    steps, warmup = args.steps or (3 if quick else 10), args.warmup or (1 if quick else 3)
    compile_modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile or ("off" if quick else "both")]
    out = args.out or ROOT / "benchmarks" / "results" / ("distill-quick.json" if quick else "distill.json")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    teacher, student = build_pair(quick, device, args.state_size)
    flops = flops_per_token(teacher, student, seq_len)
    peak = peak_tflops(device, args.peak_tflops)
    rows = []
    for compiled in compile_modes:
        for batch in batches:
            row = {"batch_size": batch, "seq_len": seq_len, "compile": compiled}
            try:
                row.update(measure(teacher, student, device, seq_len, batch, steps, warmup, compiled))
                achieved = row["tokens_per_s"] * flops["total"]
                row["tflops"] = achieved / 1e12
                row["mfu"] = achieved / (peak * 1e12) if peak else None
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as exc:  # a benchmark run unattended reports what failed and goes on
                row["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            if device == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(_row_text(row), flush=True)

    result = {
        "benchmark": "stage-3 distillation step (teacher fwd + student fwd/bwd + fused KL + AdamW)",
        "shape": "tiny" if quick else "llama-3.2-1b",
        "kept_heads": sum(len(k) for k in student.config.kept_heads),
        "state_size": args.state_size,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "peak_bf16_tflops": peak,
        "flops_per_token": flops,
        "params": {"teacher_matmul": matmul_params(teacher), "student_matmul": matmul_params(student)},
        "versions": versions(),
        "runs": rows,
        "profile": None,
    }
    best = max((r for r in rows if "mfu" in r and r["mfu"] is not None), key=lambda r: r["mfu"], default=None)
    result["best_mfu"] = best["mfu"] if best else None
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)  # the rows survive a profile cut short
    if args.profile:
        compiled = compile_modes[-1]
        profile = result["profile"] = {
            "batch_size": batches[0], "compile": compiled,
            "seconds": breakdown(teacher, student, device, seq_len, batches[0], steps, compiled),
        }
        write_json_atomic(out, result)
        profile["kernels"] = (kernel_table(teacher, student, device, seq_len, batches[0], compiled)
                              if device == "cuda" else [])
        write_json_atomic(out, result)
        print(_profile_text(profile), flush=True)
    table = _table(result)
    print(table)
    if not quick:  # quick results are smoke tests (the *-quick.json files are git-ignored)
        out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out}" + ("" if quick else f" and {out.with_suffix('.md')}"))
    return 0


def markdown(result: dict) -> str:
    """The results file's table, versions and (if profiled) the step's parts and top kernels."""
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    text = f"{_table(result).lstrip()}\n\n{versions}; MFU against {result['peak_bf16_tflops']} TFLOP/s dense bf16.\n"
    if result["profile"]:
        text += "\n```" + _profile_text(result["profile"]) + "\n```\n"
    return text


def _row_text(row: dict) -> str:
    if "error" in row:
        return f"batch {row['batch_size']} compile {row['compile']}: {row['error']}"
    mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "n/a"
    return (f"batch {row['batch_size']} compile {row['compile']}: {row['tokens_per_s']:,.0f} tok/s, "
            f"{row['tflops']:.1f} TFLOP/s, MFU {mfu}")


def _profile_text(profile: dict) -> str:
    lines = [f"\nparts of one step alone, micro-batch {profile['batch_size']}, compile {profile['compile']}:"]
    lines += [f"  {name:<26} {seconds * 1e3:8.1f} ms" for name, seconds in profile["seconds"].items()]
    lines += [f"  {'sum':<26} {sum(profile['seconds'].values()) * 1e3:8.1f} ms"]
    if profile["kernels"]:
        lines.append("top CUDA kernels of one step (self time):")
        lines += [f"  {k['ms']:8.2f} ms {k['share']:6.1%} x{k['calls']:<5} {k['name']}" for k in profile["kernels"]]
    return "\n".join(lines)


def _table(result: dict) -> str:
    lines = [f"\nstage 3 on {result['device']} ({result['shape']}, {result['kept_heads']} kept heads, "
             f"state {result['state_size']}):",
             "| micro-batch | seq | compile | tokens/s | TFLOP/s | MFU | step s | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['batch_size']} | {r['seq_len']} | {r['compile']} | {r['error']} | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "n/a"
        lines.append(f"| {r['batch_size']} | {r['seq_len']} | {r['compile']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tflops']:.1f} | {mfu} | {r['seconds_per_step']:.3f} | {mem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
