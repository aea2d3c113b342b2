"""Does restricted LoRA work? LoRA on the recurrent + kept heads vs LoRA on every linear layer vs full fine-tuning.

A student of ``../shared/fixtures/teacher-19m`` (16 kept heads, the set this teacher's retrieval needs; built here
from a scan and distilled briefly, or given with ``--student``) learns a task it cannot do yet: a dictionary question in a format it never saw,

    Stock list:
    - 42 crates of pepper
    - 17 crates of walnut
    ...
    Question: how many crates of walnut? Answer: 17

trained on prompt/answer pairs, scored as multiple choice over the list's numbers on held-out lists (new random
words and numbers: the skill must generalise, facts cannot be memorised). The same steps, batch and data for the
three methods; learning rates are each method's usual (LoRA 1e-3, full 1e-4). Also reported: the paper's KV
probe before/after (what the fine-tune costs the original skill), trainable parameters, peak memory, time.

    python benchmarks/lora_targets.py             # GPU: < 4 min, writes benchmarks/results/lora_targets.json
    python benchmarks/lora_targets.py --quick     # CPU smoke run: tiny budgets (lora_targets-quick.json)
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from radistill.eval.choice import choice_accuracy
from radistill.finetune.data import Pair, pair_batches
from radistill.finetune.lora import LoraSpec, add_lora, merge_lora
from radistill.finetune.train import FinetuneConfig, train
from radistill.memplan import GiB
from radistill.models.access import load_model, resolve_device
from radistill.probes.items import ProbeItem
from radistill.probes.kv import KVProbeConfig, kv_items, value_prefix, words
from radistill.utils.io import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "fixtures"
RESULTS = Path(__file__).parent / "results"
METHODS = (  # name, LoRA targets (None: full fine-tuning), learning rate
    ("lora-restricted", "recurrent,kept-heads", 1e-3),
    ("lora-all", "all", 1e-3),
    ("full", None, 1e-4),
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, default=SHARED / "teacher-19m")
    parser.add_argument("--corpus", type=Path, default=SHARED / "corpus" / "prose-train.txt.xz")
    parser.add_argument("--student", type=Path, default=None, help="use this student instead of building one")
    parser.add_argument("--keep", type=int, default=16, help="kept heads (4 was too few: its student did not retrieve)")
    parser.add_argument("--state-size", type=int, default=16)
    parser.add_argument("--distill-tokens", type=int, default=400_000, help="per stage (2 and 3); 0: no distill")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=8, help="entries per stock list")
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


# ---- the task ----------------------------------------------------------------------------------------------------
def stock_item(rng: random.Random, pairs: int, prefix: str) -> tuple[ProbeItem, Pair]:
    """One stock list with a question: as a multiple-choice item (scoring) and a prompt/answer pair (training)."""
    names = rng.sample(words(), pairs)
    counts = rng.sample(range(100), pairs)
    target = rng.randrange(pairs)
    body = "".join(f"- {c} crates of {n}\n" for n, c in zip(names, counts))
    prompt = f"Stock list:\n{body}Question: how many crates of {names[target]}? Answer:"
    choices = tuple(f"{prefix}{c}" for c in counts)
    return ProbeItem(prompt, choices, target), Pair(prompt, choices[target])


def task(tokenizer, pairs: int, train_items: int, heldout: int, seed: int = 0):
    prefix = value_prefix(tokenizer)
    train_rng, test_rng = random.Random(seed), random.Random(seed + 1)
    train_pairs = [stock_item(train_rng, pairs, prefix)[1] for _ in range(train_items)]
    test_items = [stock_item(test_rng, pairs, prefix)[0] for _ in range(heldout)]
    return train_pairs, test_items


# ---- the student ---------------------------------------------------------------------------------------------------
def make_student(args, device: str, work: Path) -> Path:
    """Scan the teacher, build a student keeping ``--keep`` heads, distil it briefly; returns its directory."""
    from radistill.distill.recipe import DistillRecipe, merge
    from radistill.distill.trainer import Trainer
    from radistill.hybrid.build import build_student
    from radistill.scan.run import probe_items, scan_model

    teacher, tokenizer = load_model(args.teacher, device=device, attn_implementation="sdpa")
    samples = 8 if args.quick else 32
    items, probe = probe_items(tokenizer, pairs=10, samples=samples, seed=0, probe_file=None)
    scan_json = scan_model(teacher, tokenizer, str(args.teacher), items=items, probe=probe).save(work / "scan")
    student_dir = build_student(teacher, work / "student", scan=scan_json, keep=args.keep,
                                state_size=args.state_size, tokenizer=tokenizer, calibration_data=args.corpus,
                                calibration_tokens=4096 if args.quick else 16384, overwrite=True)
    if not args.distill_tokens:
        return student_dir
    stage = dict(tokens=args.distill_tokens, seq_len=512, batch_size=8, grad_accum=1, warmup=0.05,
                 checkpoint_every=10**6, log_every=50)
    recipe = merge(DistillRecipe(), {
        "stages": {1: {"enabled": False}, 2: {**stage, "lr": 1e-3}, 3: {**stage, "lr": 3e-4}},
        "data": {"source": str(args.corpus)},
    })
    student, _ = load_model(student_dir, dtype="fp32", device=device)
    Trainer(student, teacher, tokenizer, recipe, work / "distill", device).run()
    return work / "distill" / "stage3"


# ---- one method ------------------------------------------------------------------------------------------------------
def peak_meter(device: str):
    """(start, stop) around a run -> the CUDA allocator's peak in bytes; None on CPU (counting live tensors op by
    op, as radistill.memplan.LiveTensors does, would dominate the run time of a CPU smoke run)."""
    if not device.startswith("cuda"):
        return (lambda: None), (lambda: None)

    def start():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    return start, torch.cuda.max_memory_allocated


def warm_up(base, tokenizer, train_pairs, args, device) -> None:
    """One throwaway training step of each kind on copies, so that one-off costs (compiling the recurrent scan's
    backward, kernel selection) fall on no method's time: the first method measured used to pay them all."""
    for targets in (None, "recurrent,kept-heads"):
        model = copy.deepcopy(base)
        if targets is None:
            model.requires_grad_(True)
        else:
            model = add_lora(model, LoraSpec(targets=targets, rank=args.rank), quiet=True)[0]
        cfg = FinetuneConfig(lora=None, steps=1, lr=1e-9, batch_size=args.batch_size, seq_len=512, loss_chunk=512)
        train(model, pair_batches(tokenizer, train_pairs, args.batch_size, 512, seed=1), cfg, device,
              autocast=device.startswith("cuda"))


def run_method(name, targets, lr, base, tokenizer, train_pairs, test_items, kv_test, args, device) -> dict:
    model = copy.deepcopy(base)
    summary = None
    if targets is not None:
        model, summary = add_lora(model, LoraSpec(targets=targets, rank=args.rank, alpha=2.0 * args.rank))
    else:
        model.requires_grad_(True)
    cfg = FinetuneConfig(lora=None, steps=args.steps, lr=lr, batch_size=args.batch_size, seq_len=512, loss_chunk=512)
    start, stop = peak_meter(device)
    start()
    result = train(model, pair_batches(tokenizer, train_pairs, args.batch_size, 512, seed=1), cfg, device,
                   autocast=device.startswith("cuda"))
    peak = stop()
    plain = merge_lora(model) if targets is not None else model
    record = {
        "name": name, "targets": targets or "full", "lr": lr,
        "trainable_params": result.trainable_params,
        "adapted_modules": None if summary is None else summary.module_count,
        "peak_gib": None if peak is None else peak / GiB, "seconds": result.seconds,
        "loss_first": result.losses[0], "loss_last": sum(result.losses[-10:]) / len(result.losses[-10:]),
        "heldout_accuracy": choice_accuracy(plain, tokenizer, test_items),
        "kv_probe_accuracy": choice_accuracy(plain, tokenizer, kv_test),
    }
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    args = parse_args()
    device = resolve_device("auto")
    if args.quick:
        args.steps, args.batch_size, args.heldout, args.distill_tokens = 2, 4, 16, 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        student_dir = args.student or make_student(args, device, work)
        student, tokenizer = load_model(student_dir, dtype="fp32", device=device)
        teacher, _ = load_model(args.teacher, dtype="fp32", device=device)
        train_pairs, test_items = task(tokenizer, args.pairs, max(2000, args.steps * args.batch_size), args.heldout)
        kv_test = kv_items(tokenizer, KVProbeConfig(pairs=10, samples=args.heldout, seed=7))
        before = {
            "student_heldout_accuracy": choice_accuracy(student, tokenizer, test_items),
            "student_kv_probe_accuracy": choice_accuracy(student, tokenizer, kv_test),
            "teacher_heldout_accuracy": choice_accuracy(teacher, tokenizer, test_items),
            "teacher_kv_probe_accuracy": choice_accuracy(teacher, tokenizer, kv_test),
            "chance": 1 / args.pairs,
        }
        print(json.dumps(before), flush=True)
        del teacher
        warm_up(student, tokenizer, train_pairs, args, device)
        methods = [run_method(name, targets, lr, student, tokenizer, train_pairs, test_items, kv_test, args, device)
                   for name, targets, lr in METHODS]
        result = {
            "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
            "student": {"path": str(student_dir), "keep": args.keep, "state_size": args.state_size,
                        "distill_tokens_per_stage": args.distill_tokens if args.student is None else None,
                        "params": sum(p.numel() for p in student.parameters())},
            "task": {"format": "stock list, 'how many crates of X?'", "pairs_per_list": args.pairs,
                     "train_lists": len(train_pairs), "heldout_lists": len(test_items), "steps": args.steps,
                     "batch_size": args.batch_size, "lora_rank": args.rank},
            "before": before,
            "methods": methods,
            "seconds": time.perf_counter() - started,
        }
    out = args.out or RESULTS / ("lora_targets-quick.json" if args.quick else "lora_targets.json")
    write_json_atomic(out, result)
    print(json.dumps({k: result[k] for k in ("before", "methods")}, indent=2))


if __name__ == "__main__":
    main()
