"""Bridges on a teacher-19m student: KV accuracy when the dictionary is given ONLY to an outside source.

    python benchmarks/bridge.py --quick --out bridge-cpu            # CPU, small counts -> results/bridge-cpu.{json,md}
    python benchmarks/bridge.py --device cuda                       # GPU, full size -> results/bridge.{json,md}

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

Each row reports trainable parameters and training tokens. Also: the chunk autoencoder's round-trip token accuracy
at K = 1, 2, 4, 8 on held-out dictionaries, and the student's own in-context KV accuracy and held-out perplexity
with a bridge attached, its gate closed and a memory in use: they must equal the student's without a bridge.
"""

from __future__ import annotations

import argparse
import tempfile
import sys
import time
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU-sized counts (the committed bridge-cpu result)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--teacher", default=str(TEACHER))
    p.add_argument("--scan", default=str(SCAN), help="scan.json of the teacher [the committed window-cpu scan]")
    p.add_argument("--keep", type=int, default=16)
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
    p.add_argument("--out", default="bridge", help="results stem under benchmarks/results/ [bridge]")
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


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


def markdown(r: dict) -> str:
    pairs = r["pairs"]
    lines = [f"# Bridges on a teacher-19m student (keep {r['keep']}, state 8, built, not distilled)", "",
             f"Task kv-outside: the dictionary is given only to the source; {r['eval_samples']} held-out items per "
             f"size, {r['steps']} steps x {r['batch']} items, lr {r['lr']}. Device: {r['device']}, {r['seconds']:.0f} s.",
             "", "| bridge | source | trainable params | training tokens | " + " | ".join(f"{p} pairs" for p in pairs)
             + " |", "|---|---|---:|---:|" + "---:|" * len(pairs)]
    lines.append("| chance | - | - | - | " + " | ".join(f"{1 / p:.3f}" for p in pairs) + " |")
    for row in r["rows"]:
        lines.append(f"| {row['bridge']} | {row['source']} | {row['trainable_parameters']:,} | "
                     f"{row['training_tokens']:,} | " + " | ".join(f"{row['accuracy'][str(p)]:.3f}" for p in pairs)
                     + " |")
    lines += ["", "Chunk autoencoder round trip (held-out dictionaries):", "", "| K | steps | parameters | token accuracy |",
              "|---:|---:|---:|---:|"]
    lines += [f"| {a['K']} | {a['steps']} | {a['parameters']:,} | {a['round_trip_accuracy']:.4f} |"
              for a in r["chunk_ae"]]
    own, closed = r["student_own"], r["student_gate_closed"]
    lines += ["", "The student's own quality, without a bridge and with a kept-head bridge attached, gate closed, a "
              "memory in use:", "", "| | " + " | ".join(f"KV@{p}" for p in own["kv"]) + " | held-out ppl |",
              "|---|" + "---:|" * (len(own["kv"]) + 1)]
    for name, q in (("no bridge", own), ("gate closed", closed)):
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in q["kv"].values()) + f" | {q['heldout_ppl']:.4f} |")
    lines += ["", f"Equal: {r['gate_closed_equal']}."]
    if not r.get("complete", True):
        lines += ["", "**Incomplete**: the run was cut before every bridge row was trained; the rows above are final."]
    return "\n".join(lines) + "\n"


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
    start, device = time.time(), args.device
    if device == "cpu":
        torch.set_flush_denormal(True)  # subnormal floats are slow on CPU (the tests flush them too); no effect on GPU
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

    aes, ae_rows = {}, []
    for k in sorted({*(int(k) for k in args.ae_ks.split(",")), args.chunk}):
        aes[k], row = train_ae(k, tok, train_items, held, ae_steps, args.ae_batch or (64 if q else 256), device)
        ae_rows.append(row)
        print(f"chunk-ae K={k}: round trip {row['round_trip_accuracy']:.4f} ({time.time() - start:.0f} s)", flush=True)
    sources = {f"teacher@{args.source_layer}": HiddenStateSource(teacher, args.source_layer),
               f"chunk-ae:{args.chunk}": ChunkSource(aes[args.chunk])}

    heldout = heldout_sequences(recipe_for(1 << 20, True, 0).data, tok, 512, max(1, ppl_tokens // 512))
    kv_pairs, kv_samples = (5, 20) if q else (5, 10, 20, 40), args.kv_samples or (16 if q else 128)
    own = own_quality(student, tok, heldout, kv_pairs, kv_samples, device)
    closed_bridge = make_bridge(student, d_aug=sources[f"teacher@{args.source_layer}"].d_aug).to(device)
    memory, _ = sources[f"teacher@{args.source_layer}"].encode(torch.tensor([held[0].source_ids], device=device))
    closed = own_quality(student, tok, heldout, kv_pairs, kv_samples, device, closed_bridge, memory)
    closed_bridge.detach()
    print(f"student own {own}; gate closed {closed}", flush=True)

    def row(kind: str, name: str, source, every: int) -> dict:
        torch.manual_seed(0)
        bridge = make_bridge(student, d_aug=source.d_aug, every=every, source=name).to(device)
        history = train_bridge(student, bridge, source, train_items, steps=steps, batch=batch, lr=args.lr, pad_id=pad_id,
                               log=lambda line: print(f"  {line} ({time.time() - start:.0f} s)", flush=True))
        acc = {str(p): accuracy(student, bridge, source, items, pad_id=pad_id) for p, items in eval_items.items()}
        out = {"bridge": kind, "source": name, "trainable_parameters": bridge.trainable_parameters(),
               "training_tokens": history["tokens"], "final_loss": sum(history["losses"][-10:]) / 10, "accuracy": acc}
        bridge.detach()
        print(f"{kind} / {name}: {acc} ({out['trainable_parameters']:,} params, {time.time() - start:.0f} s)",
              flush=True)
        return out

    out = Path(args.results_dir) / args.out

    def save(rows: list[dict], done: bool) -> dict:
        """Written after every row, so a run cut by a time limit keeps the rows it finished (``complete`` says)."""
        result = {
            "keep": args.keep, "kept_heads": kept, "scan": _relative(args.scan), "pairs": pairs, "steps": steps,
            "batch": batch, "lr": args.lr, "train_samples": train_n, "eval_samples": eval_n, "rows": rows,
            "chunk_ae": ae_rows, "student_own": own, "student_gate_closed": closed, "gate_closed_equal": own == closed,
            "complete": done, "seconds": round(time.time() - start, 1),
            "device": device_label(device), "versions": versions(),
        }
        write_json_atomic(out.with_suffix(".json"), result)
        write_text_atomic(out.with_suffix(".md"), markdown(result))
        return result

    rows = [{"bridge": "none", "source": "-", "trainable_parameters": 0, "training_tokens": 0,
             "accuracy": {str(p): accuracy(student, None, None, items, pad_id=pad_id) for p, items in eval_items.items()}}]
    save(rows, False)
    plan = [("kept-head", name, source, 0) for name, source in sources.items()]
    plan += [(f"full-width every {args.full_width_every}", name, source, args.full_width_every)
             for name, source in sources.items()]
    for kind, name, source, every in plan:
        rows.append(row(kind, name, source, every))
        result = save(rows, False)
    result = save(rows, True)
    text = markdown(result)
    print(text)
    print(f"wrote {_relative(str(out))}.{{json,md}}")
    return 0 if result["gate_closed_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
