"""Bridges on a teacher-19m student: KV accuracy when the dictionary is given ONLY to an outside source.

    python benchmarks/bridge.py --quick --out bridge-cpu --overwrite  # CPU, small counts -> results/bridge-cpu.{json,md}
    python benchmarks/bridge.py --device cuda --steps 800 --rows full-teacher,kept-teacher,gate-closed,none \\
        --time-limit 420 --merge                                    # GPU: adds these rows to results/bridge.{json,md}

The student: teacher-19m with the scan's top 16 heads kept and every other head a discrete Mamba-2 mixer of state
size 8 (``radistill build --keep 16 --state-size 8``, calibrated as build does it), not distilled: the numbers test the wiring and what the bridge
alone adds, not a distilled student. The scan is the committed one (``results/window-cpu-scan/scan.json``, the
KV probe at 20 pairs) unless ``--scan`` names another.

Rows (the ``kv-outside`` task, :mod:`radistill.bridge.task`, multiple choice, chance = 1 / pairs):

* ``none``: the student alone (it never sees the dictionary: chance level is the honest answer);
* ``kept-head / teacher@L``: a kept-head bridge reading teacher-19m's hidden states at layer L (composition);
* ``kept-head / chunk-ae:K``: a kept-head bridge reading a chunk autoencoder's latents (K tokens per vector);
* ``full-width every N / <source>``: the composition-paper baseline, cross-attention over the whole hidden state
  after every N-th layer; same training loop, items, steps and learning rate.

``--rows`` picks and orders them (names: ROWS below; default: all, most wanted first): ``full-teacher``,
``kept-teacher``, ``gate-closed`` (the check below), ``none``, ``kept-ae``, ``full-ae``, ``ae-table`` (the chunk
autoencoder is trained only when an ``*-ae`` row asks for it). Each row reports trainable parameters, training
tokens and its own steps, batch, learning rate, item counts, seconds, device and date, so rows of different runs
can sit in one table honestly. Rows are written as they finish. ``--merge`` adds this run's rows to the existing
results file (under a file lock, so two processes can share one file); without it an existing file is refused
unless ``--overwrite``. ``--time-limit S``: a row that would end past S seconds (judged from the seconds per step
of the rows so far) is skipped, and a row still training when the time left is only what its evaluation needs
stops there and is recorded with the steps it took (``cut``). Also: the chunk autoencoder's round-trip token accuracy
at K = 1, 2, 4, 8 on held-out dictionaries, and the student's own in-context KV accuracy and held-out perplexity
with a bridge attached, its gate closed and a memory in use: they must equal the student's without a bridge.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from testbed_recovery import KV_SEED, TEACHER, heldout_perplexity, recipe_for  # noqa: E402
from radistill.bridge.chunk_ae import (ChunkAEConfig, ChunkAutoencoder, chunk_batches,  # noqa: E402
                                       round_trip_accuracy, train_chunk_ae)
from radistill.bridge.module import make_bridge  # noqa: E402
from radistill.bridge.sources import ChunkSource, HiddenStateSource  # noqa: E402
from radistill.bridge.task import outside_items  # noqa: E402
from radistill.bridge.train import accuracy, train_bridge  # noqa: E402
from radistill.distill.data import heldout_sequences  # noqa: E402
from radistill.eval.kv import KVEvalConfig, kv_retrieval  # noqa: E402
from radistill.hybrid.build import build_student  # noqa: E402
from radistill.models.access import load_model  # noqa: E402
from radistill.utils.io import write_json_atomic, write_text_atomic  # noqa: E402
from environment import device_label, versions  # noqa: E402

SCAN = ROOT / "benchmarks" / "results" / "window-cpu-scan" / "scan.json"
ROWS = ("full-teacher", "kept-teacher", "gate-closed", "none", "kept-ae", "full-ae", "ae-table")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized counts (the committed bridge-cpu result)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--teacher", default=str(TEACHER))
    p.add_argument("--scan", default=str(SCAN), help="scan.json of the teacher [the committed window-cpu scan]")
    p.add_argument("--keep", type=int, default=16)
    p.add_argument("--rows", default=",".join(ROWS), help=f"which rows, in this order [{','.join(ROWS)}]")
    p.add_argument("--pairs", help="dictionary sizes [quick 2,4, else 2,4,8,16]")
    p.add_argument("--steps", type=int, help="bridge training steps [quick 60, else 2000]")
    p.add_argument("--batch", type=int, help="items per step [quick 16, else 64]")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-samples", type=int, help="training items per dictionary size [quick 256, else 4096]")
    p.add_argument("--eval-samples", type=int, help="held-out items per dictionary size [quick 32, else 256]")
    p.add_argument("--ae-steps", type=int, help="chunk autoencoder steps [quick 200, else 3000]")
    p.add_argument("--ae-batch", type=int, help="chunks per autoencoder step [quick 64, else 256]")
    p.add_argument("--source-layer", type=int, default=6, help="teacher layer read by the model source [6]")
    p.add_argument("--chunk", type=int, default=4, help="K of the chunk-ae source [4]")
    p.add_argument("--ae-ks", default="1,2,4,8", help="K values for the round-trip table")
    p.add_argument("--full-width-every", type=int, default=2)
    p.add_argument("--calibration-tokens", type=int, help="build's calibration tokens [build's default]")
    p.add_argument("--kv-samples", type=int, help="in-context KV items per size for the student's own KV "
                                                   "[quick 16, else 128]")
    p.add_argument("--ppl-tokens", type=int, help="held-out tokens for perplexity [quick 1024, else 65536]")
    p.add_argument("--time-limit", type=float, help="seconds for the whole run: rows that would end past it are "
                                                    "skipped, a training row is cut to leave time for its evaluation")
    p.add_argument("--compile", action="store_true", help="keep torch.compile on for the recurrent scan [off: at "
                   "these short lengths the eager scan is fast and compiling cost minutes on a shared GPU]")
    p.add_argument("--merge", action="store_true", help="add this run's rows to the existing results file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing results file")
    p.add_argument("--out", default="bridge", help="results stem under benchmarks/results/ [bridge]")
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(args.rows) - set(ROWS))
    if not args.rows or unknown or len(set(args.rows)) != len(args.rows):
        p.error(f"--rows {','.join(args.rows)!r}: each at most once, from {', '.join(ROWS)}")
    if args.merge and args.overwrite:
        p.error("--merge adds to the results file, --overwrite replaces it: pass one")
    return args


def _relative(path: str) -> str:
    return str(Path(path).resolve().relative_to(ROOT)) if Path(path).resolve().is_relative_to(ROOT) else str(path)


def train_ae(k: int, tok, train_items, eval_items, steps: int, batch: int, device: str) -> tuple[ChunkAutoencoder, dict]:
    torch.manual_seed(0)
    ae = ChunkAutoencoder(ChunkAEConfig(vocab_size=len(tok), chunk=k, pad_token_id=tok.pad_token_id or 0)).to(device)
    train = chunk_batches([it.source_ids for it in train_items], ae)
    held = chunk_batches([it.source_ids for it in eval_items], ae).to(device)
    losses = train_chunk_ae(ae, train, steps=steps, batch=batch)
    return ae, {"K": k, "steps": steps, "batch": batch, "final_loss": losses[-1] if losses else None,
                "round_trip_accuracy": round_trip_accuracy(ae, held), "parameters": sum(p.numel() for p in ae.parameters()),
                "train_chunks": len(train), "heldout_chunks": len(held)}


def own_quality(student, tok, heldout, pairs, samples, device, bridge=None, memory=None) -> dict:
    """The student's in-context KV accuracy and held-out perplexity (optionally with ``bridge`` using ``memory``)."""
    config = KVEvalConfig(pairs=tuple(pairs), samples=samples, seed=KV_SEED, generate=False)
    ctx = bridge.use(memory) if bridge is not None else torch.no_grad()
    with ctx:
        kv = {t.name: t.value for t in kv_retrieval(student, tok, config, batch_size=16)}
        ppl = heldout_perplexity(student, heldout, 4, device)
    return {"kv": {str(p): kv[f"kv_ret@{p}"] for p in pairs}, "heldout_ppl": ppl}


def _settings(row: dict) -> str:
    """Steps x batch (and the planned steps of a cut row), lr, held-out items: what makes two rows comparable."""
    if row.get("steps") is None:
        return f"no training, {row['eval_samples']} items" if row.get("eval_samples") else "-"
    cut = f" (cut, of {row['planned_steps']})" if row.get("cut") else ""
    return f"{row['steps']}{cut} x {row['batch']}, lr {row['lr']:g}, {row['eval_samples']} items"


def markdown(r: dict) -> str:
    pairs = r["pairs"]
    lines = [f"# Bridges on a teacher-19m student (keep {r['keep']}, state 8, built, not distilled)", "",
             "Task kv-outside: the dictionary is given only to the source; accuracy over held-out items per "
             "dictionary size (multiple choice, chance 1 / pairs). Each row names its own training (steps x items "
             "per step, lr, held-out items per size), device, date and seconds: rows of different runs compare "
             "only where those agree.", "",
             "| bridge | source | trainable params | training tokens | training | "
             + " | ".join(f"{p} pairs" for p in pairs) + " | device, date, s |",
             "|---|---|---:|---:|---|" + "---:|" * len(pairs) + "---|"]
    lines.append("| chance | - | - | - | - | " + " | ".join(f"{1 / p:.3f}" for p in pairs) + " | |")
    for row in r["rows"]:
        when = f"{row.get('device', '?')}, {row.get('date', '?')}" + (
            f", {row['seconds']:.0f} s" if row.get("seconds") is not None else "")
        lines.append(f"| {row['bridge']} | {row['source']} | {row['trainable_parameters']:,} | "
                     f"{row['training_tokens']:,} | {_settings(row)} | "
                     + " | ".join(f"{row['accuracy'][str(p)]:.3f}" for p in pairs) + f" | {when} |")
    if r.get("chunk_ae"):
        lines += ["", "Chunk autoencoder round trip (held-out dictionaries):", "",
                  "| K | steps | parameters | token accuracy |", "|---:|---:|---:|---:|"]
        lines += [f"| {a['K']} | {a['steps']} | {a['parameters']:,} | {a['round_trip_accuracy']:.4f} |"
                  for a in r["chunk_ae"]]
    own, closed = r.get("student_own"), r.get("student_gate_closed")
    if own and closed:
        lines += ["", "The student's own quality, without a bridge and with a kept-head bridge attached, gate closed, "
                  "a memory in use:", "", "| | " + " | ".join(f"KV@{p}" for p in own["kv"]) + " | held-out ppl |",
                  "|---|" + "---:|" * (len(own["kv"]) + 1)]
        for name, q in (("no bridge", own), ("gate closed", closed)):
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in q["kv"].values())
                         + f" | {q['heldout_ppl']:.4f} |")
        lines += ["", f"Equal: {r['gate_closed_equal']}."]
    if r.get("skipped"):
        lines += ["", "Not run (time limit): " + ", ".join(f"{s['row']} ({s['run']})" for s in r["skipped"]) + "."]
    if not r.get("complete", True):
        lines += ["", "**Incomplete**: a run is still going or was cut before all its rows; the rows above are final."]
    return "\n".join(lines) + "\n"


def upgrade(old: dict) -> dict:
    """A results file written before rows carried their own settings: each row gets its file's (the file held one
    run), so it stays comparable once rows of other runs join it."""
    shared = {"steps": old.get("steps"), "batch": old.get("batch"), "lr": old.get("lr"),
              "train_samples": old.get("train_samples"), "eval_samples": old.get("eval_samples"),
              "device": old.get("device"), "date": old.get("date", "?"), "seconds": None, "run": "earlier run"}
    for row in old.get("rows", []):
        if "row" not in row:
            row.update({k: v for k, v in shared.items() if k not in row})
            if row["bridge"] == "none":
                row.update(steps=None, batch=None, lr=None)
            row["row"] = row["bridge"]
    return old


@contextmanager
def locked(path: Path):
    """An exclusive lock on ``path``.lock: two processes merging into one results file take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv=None) -> int:
    args = parse_args(argv)
    q = args.quick
    pairs = [int(p) for p in (args.pairs or ("2,4" if q else "2,4,8,16")).split(",")]
    steps, batch = args.steps or (60 if q else 2000), args.batch or (16 if q else 64)
    train_n, eval_n = args.train_samples or (256 if q else 4096), args.eval_samples or (32 if q else 256)
    ae_steps, ppl_tokens = args.ae_steps or (200 if q else 3000), args.ppl_tokens or (1024 if q else 65536)
    if not Path(args.teacher).exists() or not Path(args.scan).exists():
        print(f"needs {args.teacher} and {args.scan}")
        return 2
    out = Path(args.results_dir) / args.out
    json_path = out.with_suffix(".json")
    if json_path.exists() and not (args.merge or args.overwrite):
        print(f"{_relative(str(json_path))} exists: pass --merge to add this run's rows to it, --overwrite to replace "
              "it, or another --out", file=sys.stderr)
        return 2
    if args.merge and json_path.exists():
        old_pairs = json.loads(json_path.read_text()).get("pairs")
        if old_pairs != pairs:
            print(f"--merge: {_relative(str(json_path))} has pairs {old_pairs}, this run {pairs}: rows would not "
                  "line up; pass --pairs " + ",".join(map(str, old_pairs or [])) + " or another --out",
                  file=sys.stderr)
            return 2
    start, device = time.time(), args.device
    run_id = f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} pid {os.getpid()}"
    date = run_id[:10]
    if device == "cpu":
        torch.set_flush_denormal(True)  # subnormal floats are slow on CPU (the tests flush them too); no effect on GPU
    elif not args.compile:
        torch.compiler.set_stance("force_eager")
    teacher, tok = load_model(args.teacher, dtype="fp32", device=device)
    with tempfile.TemporaryDirectory() as tmp:  # `radistill build --keep K --state-size 8`, calibration included
        build_student(args.teacher, Path(tmp) / "student", scan=args.scan, keep=args.keep, state_size=8,
                      device=device, dtype="fp32",
                      **({} if args.calibration_tokens is None else {"calibration_tokens": args.calibration_tokens}))
        student, _ = load_model(Path(tmp) / "student", dtype="fp32", device=device)
    kept = student.config.kept_heads
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    train_items, eval_items = [], {}
    for i, p in enumerate(pairs):
        train_items += outside_items(tok, p, train_n, seed=i)
        eval_items[p] = outside_items(tok, p, eval_n, seed=500 + i)
    held = [it for items in eval_items.values() for it in items]
    teacher_name = f"teacher@{args.source_layer}"
    teacher_source = HiddenStateSource(teacher, args.source_layer)
    label = device_label(device)
    mine: dict = {"rows": [], "skipped": []}  # what this run adds to the results file
    pace = {"step": None, "eval": None}  # seconds per training step and per evaluation, the slowest so far

    def save(done: bool) -> dict:
        """Written after every row, so a run cut by a time limit keeps the rows it finished (``complete`` says).
        With --merge: under the lock, the file's rows of other runs, then this run's."""
        with locked(json_path):
            base = upgrade(json.loads(json_path.read_text())) if args.merge and json_path.exists() else {}
            rows = [r for r in base.get("rows", []) if r.get("run") != run_id] + mine["rows"]
            skipped = [s for s in base.get("skipped", []) if s.get("run") != run_id] + mine["skipped"]
            running = [r for r in base.get("running", []) if r != run_id] + ([] if done else [run_id])
            result = {
                **base, "keep": args.keep, "kept_heads": kept, "scan": _relative(args.scan), "pairs": pairs,
                "rows": rows, "skipped": skipped, "running": running, "complete": not running,
                "versions": versions(),
            }
            for key in ("steps", "batch", "lr", "train_samples", "eval_samples", "seconds", "device"):
                result.pop(key, None)  # per row now
            if "chunk_ae" in mine:  # an autoencoder of this run replaces one of the same K and training, no other
                same = {(a["K"], a["steps"], a["batch"]) for a in mine["chunk_ae"]}
                result["chunk_ae"] = sorted([a for a in base.get("chunk_ae", [])
                                             if (a["K"], a["steps"], a["batch"]) not in same] + mine["chunk_ae"],
                                            key=lambda a: (a["K"], a["steps"]))
            if "own" in mine:
                result.update(student_own=mine["own"], student_gate_closed=mine["closed"],
                              gate_closed_equal=mine["own"] == mine["closed"])
            write_json_atomic(json_path, result)
            write_text_atomic(out.with_suffix(".md"), markdown(result))
        return result

    def left() -> float:
        return float("inf") if args.time_limit is None else args.time_limit - (time.time() - start)

    def record(name: str, row: dict, seconds: float) -> None:
        mine["rows"].append({"row": name, **row, "train_samples": train_n, "eval_samples": eval_n, "device": label,
                             "date": date, "seconds": round(seconds, 1), "run": run_id})
        save(False)

    aes: dict[int, ChunkAutoencoder] = {}

    def chunk_ae(k: int) -> ChunkAutoencoder:
        if k not in aes:
            aes[k], info = train_ae(k, tok, train_items, held, ae_steps, args.ae_batch or (64 if q else 256), device)
            mine.setdefault("chunk_ae", []).append(info)
            print(f"chunk-ae K={k}: round trip {info['round_trip_accuracy']:.4f} ({time.time() - start:.0f} s)",
                  flush=True)
        return aes[k]

    def bridge_row(name: str, kind: str, source_name: str, source, every: int) -> None:
        if pace["step"] is not None and pace["step"] * steps + pace["eval"] > left():
            mine["skipped"].append({"row": name, "run": run_id})
            print(f"{name}: skipped (time limit)", flush=True)
            return
        began = time.time()
        reserve = pace["eval"] if pace["eval"] is not None else 60.0  # before any measured evaluation: a guess
        torch.manual_seed(0)
        bridge = make_bridge(student, d_aug=source.d_aug, every=every, source=source_name).to(device)
        history = train_bridge(student, bridge, source, train_items, steps=steps, batch=batch, lr=args.lr,
                               pad_id=pad_id, stop=lambda: left() < 1.5 * reserve,
                               log=lambda line: print(f"  {line} ({time.time() - start:.0f} s)", flush=True))
        trained = time.time()
        acc = {str(p): accuracy(student, bridge, source, items, pad_id=pad_id) for p, items in eval_items.items()}
        if history["steps"]:
            pace["step"] = max(pace["step"] or 0.0, (trained - began) / history["steps"])
        pace["eval"] = max(pace["eval"] or 0.0, time.time() - trained)
        row = {"bridge": kind, "source": source_name, "trainable_parameters": bridge.trainable_parameters(),
               "training_tokens": history["tokens"], "steps": history["steps"], "planned_steps": steps,
               "cut": history["steps"] < steps, "batch": batch, "lr": args.lr,
               "final_loss": sum(history["losses"][-10:]) / max(1, len(history["losses"][-10:])), "accuracy": acc}
        bridge.detach()
        print(f"{kind} / {source_name}: {acc} ({history['steps']} steps, {row['trainable_parameters']:,} params, "
              f"{time.time() - start:.0f} s)", flush=True)
        record(name, row, time.time() - began)

    full = f"full-width every {args.full_width_every}"
    for name in args.rows:
        if name == "full-teacher":
            bridge_row(name, full, teacher_name, teacher_source, args.full_width_every)
        elif name == "kept-teacher":
            bridge_row(name, "kept-head", teacher_name, teacher_source, 0)
        elif name == "kept-ae":
            bridge_row(name, "kept-head", f"chunk-ae:{args.chunk}", ChunkSource(chunk_ae(args.chunk)), 0)
        elif name == "full-ae":
            bridge_row(name, full, f"chunk-ae:{args.chunk}", ChunkSource(chunk_ae(args.chunk)),
                       args.full_width_every)
        elif name == "ae-table":
            for k in sorted({int(k) for k in args.ae_ks.split(",")}):
                chunk_ae(k)
            save(False)
        elif name == "none":
            began = time.time()
            acc = {str(p): accuracy(student, None, None, items, pad_id=pad_id) for p, items in eval_items.items()}
            record(name, {"bridge": "none", "source": "-", "trainable_parameters": 0, "training_tokens": 0,
                          "steps": None, "batch": None, "lr": None, "accuracy": acc}, time.time() - began)
        elif name == "gate-closed":
            heldout = heldout_sequences(recipe_for(1 << 20, True, 0).data, tok, 512, max(1, ppl_tokens // 512))
            kv_pairs, kv_samples = (5, 20) if q else (5, 10, 20, 40), args.kv_samples or (16 if q else 128)
            mine["own"] = own_quality(student, tok, heldout, kv_pairs, kv_samples, device)
            closed_bridge = make_bridge(student, d_aug=teacher_source.d_aug).to(device)
            memory, _ = teacher_source.encode(torch.tensor([held[0].source_ids], device=device))
            mine["closed"] = own_quality(student, tok, heldout, kv_pairs, kv_samples, device, closed_bridge, memory)
            closed_bridge.detach()
            print(f"student own {mine['own']}; gate closed {mine['closed']}", flush=True)
            save(False)
    result = save(True)
    print(markdown(result))
    print(f"wrote {_relative(str(out))}.{{json,md}}")
    return 0 if "own" not in mine or mine["own"] == mine["closed"] else 1


if __name__ == "__main__":
    sys.exit(main())
