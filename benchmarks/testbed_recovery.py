"""The method's effect on a real model: does keeping the scan's top heads let a distilled hybrid keep retrieval?

    python benchmarks/testbed_recovery.py                          # one GPU: 20M tokens per student (fixed budget)
    python benchmarks/testbed_recovery.py --budget-tokens 50e6     # another fixed budget per student
    python benchmarks/testbed_recovery.py --time-limit 540         # the largest budget (<= 50M) that fits 540 s
    python benchmarks/testbed_recovery.py --quick                  # CPU smoke run (tiny budget, few probe items)
    python benchmarks/testbed_recovery.py --top 4,16               # also a top-16 student (same budget)
    python benchmarks/testbed_recovery.py --merge a.json b.json    # one table from runs of different students
    python benchmarks/testbed_recovery.py --heads 8.2,7.6 --students chosen2-s64   # a student keeping these heads

On ``../shared/fixtures/teacher-19m`` with the prose corpus ``../shared/fixtures/corpus/prose-train.txt.xz`` as the
only training text (no retrieval data; the students' decays and normaliser are calibrated on prose too):

1. scan the teacher's 80 heads with the KV-retrieval probe (or read ``--scan scan.json``);
2. build four students: the top 4 heads with state 64 and with state 8, no heads, and 4 random heads from the
   lower half of the ranking (state 64);
3. distill each with the same recipe and token budget (stage 2 on 20% of the tokens, then stage 3 on 80%, as the
   authors' 5B + 20B; the trainer of ``radistill distill``);
4. report KV-retrieval accuracy at 5/10/20/40 pairs (log-likelihood over the dictionary's values, items seeded
   apart from the scan's) and held-out prose perplexity, beside the teacher's, and each student's numbers before
   distillation.

Budget. Without ``--time-limit`` every student gets ``--budget-tokens`` (default 20M; --quick 2,048) and training
is never cut short. With ``--time-limit``, throughput is measured *after* a warm-up (compilation, autotuning), the
evaluation cost is measured on a real (untrained) student, and the budget is the largest that fits the time left
after the measured per-student costs (capped at ``--budget-tokens``, default 50M there). If it clearly cannot fit
(an explicit ``--budget-tokens`` over the limit, or fewer than ``MIN_TOKENS`` tokens), the run stops before
training with the numbers that say why. A student that still overruns its predicted time by 50% is stopped and
flagged in red, in the table ("time cap") and the JSON (``truncated``).

Every phase is timed (``timings`` in the JSON; a table at the end), so the next run's budget can be trusted.
Writes ``benchmarks/results/testbed_recovery.json`` and ``.md`` (only ``testbed_recovery-quick.json`` with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from distill import synchronizer, time_steps  # noqa: E402  (benchmarks/distill.py)
from radistill.distill.data import PackedStream, heldout_sequences  # noqa: E402
from radistill.distill.recipe import DistillRecipe, merge  # noqa: E402
from radistill.distill.trainer import Trainer  # noqa: E402
from radistill.models.access import load_model, weights_fingerprint  # noqa: E402
from radistill.probes.items import EncodedItem, encode_items  # noqa: E402
from radistill.probes.kv import KVProbeConfig, kv_items  # noqa: E402
from radistill.probes.scoring import choice_logprobs, summarize  # noqa: E402
from radistill.utils.console import console  # noqa: E402
from radistill.utils.io import write_json_atomic  # noqa: E402

SHARED = ROOT.parent / "shared" / "fixtures"
TEACHER = SHARED / "teacher-19m"
CORPUS = SHARED / "corpus" / "prose-train.txt.xz"
SUITES = ROOT / "examples" / "suites" / "teacher-19m"  # records and facts (radistill.eval.suites), multiple choice
PAIRS = (5, 10, 20, 40)
STAGE2_SHARE = 0.2  # of each student's tokens (the authors' repo: 5B of 25B)
KV_SEED = 1234  # evaluation items: not the scan's seed (0), heads are not judged on the items that ranked them
DEFAULT_BUDGET = 20_000_000  # tokens per student without --time-limit
MAX_AUTO_BUDGET = 50_000_000  # with --time-limit and no --budget-tokens: the ceiling
MIN_TOKENS = {"cuda": 2_000_000, "cpu": 1_024}  # below this a student learns nothing worth reporting: stop instead
OVERRUN = 1.5  # a student stops at this many times its predicted training time (time-limited runs only)


class OutOfTime(Exception):
    """Raised from the trainer's step hook when a student overruns its predicted time."""


class BudgetError(SystemExit):
    """The requested budget cannot fit: stop before training, loudly."""


class Timings:
    """Wall seconds per named phase, in the order they first ran (a phase run twice adds up)."""

    def __init__(self, sync):
        self.seconds: dict[str, float] = {}
        self.sync = sync
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def to_dict(self) -> dict[str, float]:
        out = {k: round(v, 2) for k, v in self.seconds.items()}
        out["other"] = round(self.elapsed() - sum(self.seconds.values()), 2)
        out["total"] = round(self.elapsed(), 2)
        return out

    def table(self) -> str:
        rows = self.to_dict()
        total = rows["total"]
        width = max(len(k) for k in rows)
        lines = [f"{'phase':<{width}}  seconds  share"]
        lines += [f"{k:<{width}}  {v:7.1f}  {v / max(total, 1e-9):5.1%}" for k, v in rows.items()]
        return "\n".join(lines)


def recipe_for(tokens: int, quick: bool, seed: int, lr2: float = 1e-3, lr3: float = 5e-4,
               trainable2: str = "recurrent", trainable3: str = "recurrent", compile: bool = False,
               stage1_share: float = 0.0) -> DistillRecipe:
    """The recipe every student gets: stage 2 then stage 3, cosine schedules, seq 512 (--quick: 128); with
    ``stage1_share`` > 0 first stage 1 (matrix orientation, the recurrent heads, stage 2's lr) on that share.

    Learning rates are those of a small model (the teacher-19m was trained at ~1e-3), not the 1B defaults."""
    batch, accum = (4, 1) if quick else (64, 1)
    seq = 128 if quick else 512
    shared = dict(seq_len=seq, batch_size=batch, grad_accum=accum, schedule="cosine", warmup=0.05, decay=0.0,
                  min_lr_ratio=0.1, checkpoint_every=10**9, log_every=5 if quick else 20, clip=1.0)
    per_step = seq * batch * accum
    stage1 = int(tokens * stage1_share) // per_step * per_step
    stage2 = max(int(tokens * STAGE2_SHARE) // per_step, 1) * per_step
    stage3 = max((tokens - stage1 - stage2) // per_step, 1) * per_step
    return merge(DistillRecipe(), {
        "stages": {1: {**shared, "enabled": True, "tokens": stage1, "lr": lr2, "trainable": "recurrent"} if stage1
                   else {"enabled": False},
                   2: {**shared, "tokens": stage2, "lr": lr2, "trainable": trainable2},
                   3: {**shared, "tokens": stage3, "lr": lr3, "trainable": trainable3}},
        "data": {"source": str(CORPUS)},
        "seed": seed,
        "dtype": "bf16",
        "compile": compile,
        "keep_checkpoints": 1,
    })


def student_specs(ranked: list, tops: list[int], seed: int) -> list[dict]:
    """The students: the scan's top K heads (state 64) for each K in ``tops``, the first K also at state 8, no heads,
    and as many random heads (the first K) from the lower half of the ranking."""
    first = tops[0]
    lower_half = ranked[len(ranked) // 2 :]
    specs = [{"name": f"top{k}-s64", "kept_heads": ranked[:k], "state_size": 64} for k in tops]
    specs.insert(1, {"name": f"top{first}-s8", "kept_heads": ranked[:first], "state_size": 8})
    specs += [{"name": "none-s64", "kept_heads": [], "state_size": 64},
              {"name": f"random-low{first}-s64", "kept_heads": sorted(random.Random(seed).sample(lower_half, first)),
               "state_size": 64}]
    return specs


def chosen_students(parser, students: list[dict], names: str | None) -> list[dict]:
    """The specs named in ``--students a,b`` (all of them without it); an unknown name is a usage error."""
    if not names:
        return students
    wanted = [s.strip() for s in names.split(",")]
    unknown = sorted(set(wanted) - {s["name"] for s in students})
    if unknown:
        parser.error(f"unknown students {unknown}: choose from {', '.join(s['name'] for s in students)}")
    return [s for s in students if s["name"] in wanted]


def scan_heads(args, device: str, work: Path):
    """The teacher's heads, best first, as (layer, head) pairs."""
    from radistill.scan.result import load_scan

    if args.scan is not None:
        result = load_scan(args.scan)
    else:
        from radistill.scan.run import run_scan

        result = run_scan(TEACHER, out=work / "scan", pairs=20, samples=4 if args.quick else 64, device=device,
                          overwrite=True)  # the work folder is scratch
    return [(h.layer, h.head) for h in result.heads]


# --- evaluation: one prompt forward per item, big batches, a bounded held-out set ---------------------------
class EvalSet:
    """KV items (tokenised once) per dictionary size and held-out windows [n, seq], shared by every model."""

    def __init__(self, tokenizer, recipe: DistillRecipe, kv_items_per_size: int, ppl_tokens: int, seq_len: int):
        self.kv: dict[int, list[EncodedItem]] = {
            p: encode_items(tokenizer, kv_items(tokenizer, KVProbeConfig(pairs=p, samples=kv_items_per_size,
                                                                          seed=KV_SEED)))
            for p in PAIRS
        }
        self.heldout = heldout_sequences(recipe.data, tokenizer, seq_len, max(1, ppl_tokens // seq_len))


@torch.inference_mode()
def kv_accuracy(model, items: list[EncodedItem], batch: int, device: str) -> float:
    """Log-likelihood multiple choice over the dictionary's values. Single-token values (this tokenizer): every
    choice is read off ONE forward of the prompt (right-padded rows; a causal model's last real position does
    not see the padding), for attention and recurrent models alike. Otherwise ``choice_logprobs``."""
    if not all(len(c) == 1 for item in items for c in item.choice_ids):
        return summarize(choice_logprobs(model, items, batch_size=batch), [i.answer for i in items]).accuracy
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    correct = 0
    order = sorted(items, key=lambda i: len(i.prompt_ids))
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        width = max(len(i.prompt_ids) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for r, item in enumerate(rows):
            ids[r, : len(item.prompt_ids)] = torch.tensor(item.prompt_ids)
        last = torch.tensor([len(i.prompt_ids) - 1 for i in rows], device=device)
        with _autocast(device):
            hidden = decoder(input_ids=ids.to(device), use_cache=False).last_hidden_state
            logits = head(hidden[torch.arange(len(rows), device=device), last]).float()  # [rows, vocab]
        for r, item in enumerate(rows):
            correct += int(logits[r, [c[0] for c in item.choice_ids]].argmax()) == item.answer
    return correct / len(items)


@torch.inference_mode()
def heldout_perplexity(model, windows: torch.Tensor, batch: int, device: str) -> float:
    """exp(mean next-token NLL) over packed held-out windows [n, seq] (each predicts its seq - 1 next tokens)."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(windows), batch):
        ids = windows[start : start + batch].to(device)
        with _autocast(device):
            logits = head(decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]).float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    return float(torch.exp(nll / (windows.shape[0] * (windows.shape[1] - 1))))


def evaluate(model, evalset: EvalSet, device: str, batch: int) -> dict:
    model.eval()
    kv = {str(p): kv_accuracy(model, items, batch, device) for p, items in evalset.kv.items()}
    return {"kv_retrieval": kv, "heldout_ppl": heldout_perplexity(model, evalset.heldout, max(1, batch // 4), device)}


def suite_scores(model, tokenizer, batch: int, quick: bool) -> dict:
    """Accuracy on the testbed's capability suites (in-context record lookups, recalled facts); quick: the first 16
    items of each."""
    from radistill.eval.choice import choice_accuracy
    from radistill.probes.items import load_jsonl

    scores = {}
    for path in sorted(SUITES.glob("*.jsonl")):
        items = load_jsonl(path)
        scores[path.stem] = choice_accuracy(model, tokenizer, items[:16] if quick else items, batch)
    return scores


# the teacher's generated texts per (teacher, settings): every student of a run is scored on the same texts, and
# the teacher generates them once (on a CPU, generating took most of each SmolLM2 student's fidelity time)
_TEACHER_TEXTS: dict[tuple, tuple[list, list]] = {}


def fidelity_scores(teacher, tokenizer, student, quick: bool, batch: int = 8) -> dict:
    """``radistill.eval.fidelity`` of the student against the teacher on the prose corpus and the teacher's own
    samples, without the token ids it also returns (reproducible from its seed, too large for a table's JSON)."""
    from radistill.eval.fidelity import FidelityConfig, fidelity

    config = FidelityConfig(windows=4, window=64, samples=2, generate=32, greedy_prompts=2, greedy_tokens=16,
                            text_tokens=8192) if quick else FidelityConfig()
    key = (id(teacher), weights_fingerprint(teacher), quick)
    samples, greedy = _TEACHER_TEXTS.get(key, (None, None))
    result = fidelity(teacher, tokenizer, student, tokenizer, str(CORPUS), config, batch_size=batch,
                      samples=samples, greedy_continuations=greedy)
    _TEACHER_TEXTS[key] = (result.samples or None, result.greedy_continuations or None)
    out = result.to_dict()
    out.pop("samples", None)
    out.pop("greedy_continuations", None)
    return out


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


# --- training -----------------------------------------------------------------------------------------------
def measure_costs(student, teacher, tokenizer, recipe: DistillRecipe, device: str, run_dir: Path):
    """What sizes the budget, measured on a throwaway copy of a real student:

    - tokens/s of stages 2 and 3 timed AFTER warm-up steps (torch.compile, autotuning, allocator; the compiled
      graphs are kept for the real runs, one cache per process);
    - the trainer's fixed cost per student (streams starting, checkpoints, exports, first steps): a full
      ``Trainer.run`` of one step per stage, minus those two steps at the measured rates.
    Returns ({stage: tokens/s}, fixed seconds)."""
    rates = {}
    for stage in recipe.enabled_stages():
        stream = PackedStream(recipe.data, tokenizer, recipe.stage(stage).seq_len, seed=0)
        warmup, steps = (1, 2) if device == "cpu" else (3, 10)
        seconds, _ = time_steps(stage, student, teacher, recipe, stream, device, steps=steps, warmup=warmup)
        rates[stage] = _tokens_per_step(recipe, stage) / seconds
    one_step = merge(recipe, {"stages": {k: {"tokens": _tokens_per_step(recipe, k)} for k in rates}})
    start = time.perf_counter()
    Trainer(student, teacher, tokenizer, one_step, run_dir, device).run()
    fixed = time.perf_counter() - start - sum(_tokens_per_step(recipe, k) / rates[k] for k in rates)
    return rates, max(fixed, 0.0)


def distill_student(student, run_dir: Path, teacher, tokenizer, recipe: DistillRecipe, device: str,
                    deadline_seconds: float | None, timings: Timings, name: str) -> tuple[int, bool, dict]:
    """Train ``student`` in place (stage 2 then 3). Returns (tokens, truncated, {stage: seconds}).

    A ``run_dir`` that an earlier process left (killed, or stopped by its deadline before evaluating) is continued
    from its newest checkpoint (the Trainer's resume), not refused: a benchmark run again picks up its students.
    ``tokens`` counts the whole stage, the earlier process's steps included."""
    steps_done: dict[int, int] = {}
    stage_clock: dict[int, float] = {}
    deadline = None if deadline_seconds is None else time.perf_counter() + deadline_seconds

    def hook(stage: int, step: int) -> None:
        if stage not in stage_clock:
            stage_clock[stage] = time.perf_counter()
        steps_done[stage] = step
        if deadline is not None and time.perf_counter() > deadline:
            raise OutOfTime

    truncated = False
    stage_seconds: dict[int, float] = {}
    with timings(f"{name}: train"):
        try:
            resume = (Path(run_dir) / "recipe.json").exists()
            for result in Trainer(student, teacher, tokenizer, recipe, run_dir, device, step_hook=hook).run(resume):
                stage_seconds[result.stage] = result.seconds
        except OutOfTime:
            truncated = True
    tokens = sum(step * _tokens_per_step(recipe, stage) for stage, step in steps_done.items())
    # a continued run: the stages before the first one trained here were finished by the earlier process
    first = min(steps_done, default=None)
    tokens += sum(recipe.stage(stage).tokens for stage in recipe.enabled_stages() if first is not None and stage < first)
    return tokens, truncated, stage_seconds


def _tokens_per_step(recipe: DistillRecipe, stage: int) -> int:
    cfg = recipe.stage(stage)
    return cfg.seq_len * cfg.batch_size * cfg.grad_accum


def _compiled_graphs() -> int | None:
    """Graphs torch.compile has built in this process (each recompilation adds one)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 (a private counter: report what we can)
        return None


# what runs merged into one table must share, and what each run keeps as its own
SAME_SETUP = ("teacher", "recipe", "budget_tokens", "budget_mode", "device", "torch", "kv_items_per_size",
              "heldout_tokens", "quick")
PER_RUN = ("wall_seconds", "predicted_seconds", "timings", "compiled_graphs", "measured_tokens_per_s",
           "measured_seconds_per_student")


def _setup(result: dict, key: str):
    """``result[key]``, for the recipe without the settings of stages it skips (they change nothing)."""
    if key != "recipe":
        return result[key]
    return {**result[key], "stages": {k: v for k, v in result[key]["stages"].items() if v["enabled"]}}


def merge_runs(results: list[dict]) -> dict:
    """One result from runs of different students with the same setup (e.g. one run per device call): the students
    in the runs' order, wall and predicted seconds summed, each run's timings kept under ``runs`` (a merged result
    may be merged again: its runs are carried over)."""
    first = results[0]
    for other in results[1:]:
        differ = [k for k in SAME_SETUP if _setup(other, k) != _setup(first, k)]
        if differ:
            raise SystemExit(f"cannot merge runs whose {', '.join(differ)} differ: they are not one experiment")
    names = [s["name"] for r in results for s in r["students"]]
    if len(set(names)) < len(names):
        raise SystemExit(f"a student appears in more than one run: {', '.join(names)}")
    merged = {k: v for k, v in first.items() if k not in PER_RUN}
    merged["students"] = [s for r in results for s in r["students"]]
    merged["runs"] = [run for r in results for run in r.get("runs") or
                      [{"students": [s["name"] for s in r["students"]], **{k: r[k] for k in PER_RUN}}]]
    for key in ("wall_seconds", "predicted_seconds"):
        merged[key] = round(sum(r[key] for r in results), 1)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="merge these result files (runs of different students, same setup) into --out")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny budget, few probe items")
    parser.add_argument("--budget-tokens", type=float, default=None,
                        help=f"tokens per student (default {DEFAULT_BUDGET:,}; with --time-limit: at most this, "
                             f"default {MAX_AUTO_BUDGET:,}; quick 2,048)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for the whole run: size the budget from measured costs (default: no limit)")
    parser.add_argument("--top", default="4", help="kept-head counts of the top-K students, e.g. 4,16 (the first "
                        "also gets a state-8 student and a random-K control)")
    parser.add_argument("--students", default=None, help="comma-separated subset of the students (default: all)")
    parser.add_argument("--heads", default=None, help="also a student keeping these heads, e.g. 8.2,7.6,0.5,7.3 "
                        "(joint_selection.py's choice): 'chosenK-s64'")
    parser.add_argument("--kv-items", type=int, default=None, help="KV items per dictionary size (200; quick 16)")
    parser.add_argument("--ppl-tokens", type=int, default=None,
                        help="held-out tokens for perplexity (65,536; quick 4,096)")
    parser.add_argument("--eval-batch", type=int, default=None, help="rows per evaluation forward (256; quick 16)")
    parser.add_argument("--scan", type=Path, default=None, help="use this scan.json instead of scanning")
    parser.add_argument("--lr-stage2", type=float, default=1e-3)
    parser.add_argument("--lr-stage3", type=float, default=5e-4)
    # recurrent heads only by default: training every parameter lowered KV retrieval below the untrained students'
    # on the H100 (benchmarks/results/testbed_recovery-trainable-all.md)
    parser.add_argument("--trainable-stage2", default="recurrent", help="what stage 2 trains: recurrent, mixer or all")
    parser.add_argument("--trainable-stage3", default="recurrent", help="what stage 3 trains: recurrent, mixer or all")
    parser.add_argument("--stage1-share", type=float, default=0.0,
                        help="share of each student's tokens for stage 1 (matrix orientation) before stage 2 "
                             "(default 0: skipped, as the paper does for hybrids)")
    parser.add_argument("--compile", action="store_true", help="the recipe's compile: true (torch.compile on CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default 1: on a shared machine oversubscribed OpenMP is 10-20x slower)")
    parser.add_argument("--work", type=Path, default=None, help="where students and runs go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.merge:
        if args.out is None:
            parser.error("--merge needs --out")
        result = merge_runs([json.loads(path.read_text()) for path in args.merge])
        table = markdown(result)
        write_json_atomic(args.out, result)
        args.out.with_suffix(".md").write_text(table + "\n")
        print(table + f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
        return 0
    if not TEACHER.exists() or not CORPUS.exists():
        console.print(f"[red]needs {TEACHER} and {CORPUS}[/]")
        return 2
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    quick = args.quick or device == "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads or 1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    timings = Timings(synchronizer(device))
    graphs_at_start = _compiled_graphs()
    kv_per_size = args.kv_items or (16 if quick else 200)
    ppl_tokens = args.ppl_tokens or (4096 if quick else 65536)
    eval_batch = args.eval_batch or (16 if quick else 256)
    limited = args.time_limit is not None
    if args.budget_tokens is not None:
        budget = int(args.budget_tokens)
    else:
        budget = 2048 if quick else (MAX_AUTO_BUDGET if limited else DEFAULT_BUDGET)
    out = args.out or ROOT / "benchmarks" / "results" / ("testbed_recovery-quick.json" if quick else
                                                         "testbed_recovery.json")
    work = args.work or Path(tempfile.mkdtemp(prefix="testbed-recovery-"))
    work.mkdir(parents=True, exist_ok=True)

    def recipe_of(tokens: int) -> DistillRecipe:
        return recipe_for(tokens, quick, args.seed, args.lr_stage2, args.lr_stage3, args.trainable_stage2,
                          args.trainable_stage3, args.compile, args.stage1_share)

    from radistill.hybrid.build import build_student

    with timings("setup (teacher, held-out, probe items)"):
        teacher, tokenizer = load_model(TEACHER, dtype="bf16" if device == "cuda" else "fp32", device=device)
        recipe = recipe_of(budget)
        evalset = EvalSet(tokenizer, recipe, kv_per_size, ppl_tokens, recipe.stage(3).seq_len)

    console.print("scanning the teacher's heads ...")
    with timings("scan"):
        ranked = scan_heads(args, device, work)
    students = student_specs(ranked, [int(k) for k in args.top.split(",")], args.seed)
    if args.heads:
        try:
            chosen = [tuple(int(x) for x in h.strip().split(".")) for h in args.heads.split(",")]
        except ValueError:
            parser.error(f"--heads {args.heads!r}: write heads as layer.head, comma-separated, e.g. 8.2,7.6")
        if not set(chosen) <= set(ranked):  # ranked holds every (layer, head) pair: this also checks the form
            parser.error(f"--heads {args.heads!r}: the teacher's heads are layer.head with layer < "
                         f"{max(l for l, _ in ranked) + 1} and head < {max(h for _, h in ranked) + 1}")
        students.append({"name": f"chosen{len(chosen)}-s64", "kept_heads": chosen, "state_size": 64})
    students = chosen_students(parser, students, args.students)
    with timings("build students (on the CPU: calibration in fp32, no GPU autotuning per shape)"):
        cpu_teacher, _ = load_model(TEACHER, dtype="fp32", device="cpu")
        for s in students:
            build_student(cpu_teacher, work / s["name"], heads=s["kept_heads"], state_size=s["state_size"],
                          tokenizer=tokenizer, calibration_data=CORPUS, calibration_tokens=2048 if quick else 16384,
                          overwrite=True)

    console.print("evaluating the teacher ...")
    with timings("eval: teacher"):
        teacher_result = {"name": "teacher", **evaluate(teacher, evalset, device, eval_batch)}
    console.print(_row_line(teacher_result))

    # measured costs: throughput after warm-up, and one real student's evaluation (its "before" numbers)
    console.print(f"measuring throughput after warm-up on {students[0]['name']} ...")
    with timings("measure throughput + trainer overhead (incl. warm-up/compile)"):
        probe, _ = load_model(work / students[0]["name"], dtype="fp32", device=device)
        rates, trainer_fixed = measure_costs(probe, teacher, tokenizer, recipe, device, work / "run-probe")
        del probe
    before: dict[str, dict] = {}
    eval_costs = []
    for s in students if not quick else students[:1]:
        with timings(f"eval before: {s['name']}"):
            model, _ = load_model(work / s["name"], dtype="fp32", device=device)
            start = time.perf_counter()
            before[s["name"]] = evaluate(model, evalset, device, eval_batch)
            eval_costs.append(time.perf_counter() - start)
            del model
        console.print(_row_line({"name": f"{s['name']} (before)", **before[s["name"]]}))
    # the first evaluation of each shape pays compilation/autotuning, which the later (post-training) ones reuse
    eval_cost = min(eval_costs)

    stage_tokens = {k: recipe.stage(k).tokens for k in rates}
    seconds_per_token = sum(stage_tokens[k] / rates[k] for k in rates) / sum(stage_tokens.values())
    per_student_overhead = eval_cost + trainer_fixed + 1.0  # + loading the student
    rate_text = ", ".join(f"stage {k} {rate:,.0f} tok/s" for k, rate in rates.items()) + " after warm-up"
    predicted_train = budget * seconds_per_token
    predicted_total = timings.elapsed() + len(students) * (predicted_train + per_student_overhead)
    if limited:
        left = args.time_limit - timings.elapsed() - len(students) * per_student_overhead
        fits = int(0.9 * max(left, 0.0) / len(students) / seconds_per_token)  # 10% margin
        why = (f"{rate_text}; {timings.elapsed():.0f} s spent before training; per student: evaluation "
               f"{eval_cost:.1f} s, trainer overhead {trainer_fixed:.1f} s; {len(students)} students")
        if args.budget_tokens is not None and fits < budget:
            raise BudgetError(f"--budget-tokens {budget:,} does not fit --time-limit {args.time_limit:.0f} s "
                              f"(predicted {predicted_total:.0f} s; at most {fits:,} tokens fit): {why}. "
                              "Raise --time-limit or lower --budget-tokens.")
        if fits < MIN_TOKENS[device]:
            raise BudgetError(f"only {fits:,} tokens per student fit --time-limit {args.time_limit:.0f} s "
                              f"(need >= {MIN_TOKENS[device]:,}): {why}. Raise --time-limit, or drop it and pass "
                              "--budget-tokens.")
        budget = min(budget, fits)
        recipe = recipe_of(budget)
        predicted_train = budget * seconds_per_token
        predicted_total = timings.elapsed() + len(students) * (predicted_train + per_student_overhead)
    budget = sum(recipe.stage(k).tokens for k in recipe.enabled_stages())  # whole steps
    console.print(f"budget: {budget:,} tokens per student ({_split_text(recipe.to_dict()['stages'])}); "
                  f"{rate_text}; predicted {predicted_train:.0f} s training + "
                  f"{per_student_overhead:.0f} s overhead per student, {predicted_total:.0f} s in all")

    rows = []
    for s in students:
        console.print(f"distilling {s['name']} ...")
        with timings(f"{s['name']}: load"):
            model, _ = load_model(work / s["name"], dtype="fp32", device=device)
        deadline = OVERRUN * (predicted_train + trainer_fixed) + 30 if limited else None
        tokens, truncated, stage_seconds = distill_student(
            model, work / f"run-{s['name']}", teacher, tokenizer, recipe, device, deadline, timings, s["name"])
        if truncated:
            console.print(f"[red]{s['name']} overran its predicted {predicted_train + trainer_fixed:.0f} s by "
                          f"{OVERRUN}x and was stopped at {tokens:,} of {budget:,} tokens: the throughput "
                          "measurement was wrong[/]")
        with timings(f"{s['name']}: eval"):
            result = evaluate(model, evalset, device, eval_batch)
        row = {**s, "kept_heads": [list(h) for h in s["kept_heads"]], "tokens": tokens, "truncated": truncated,
               "train_seconds": {f"stage{k}": round(v, 1) for k, v in stage_seconds.items()},
               **result}
        if s["name"] in before:
            row["before"] = before[s["name"]]
        rows.append(row)
        console.print(_row_line(row))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

    graphs = _compiled_graphs()
    result = {
        "students": rows,
        "teacher": teacher_result,
        "recipe": recipe.to_dict(),
        "budget_tokens": budget,
        "budget_mode": "time-limit" if limited else "fixed",
        "time_limit": args.time_limit,
        "measured_tokens_per_s": {f"stage{k}": round(v, 1) for k, v in rates.items()},
        "measured_seconds_per_student": {"eval": round(eval_cost, 2), "trainer_overhead": round(trainer_fixed, 2)},
        "predicted_seconds": round(predicted_total, 1),
        "wall_seconds": round(timings.elapsed(), 1),
        "timings": timings.to_dict(),
        "compiled_graphs": None if graphs is None else graphs - (graphs_at_start or 0),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "quick": quick,
        "torch": torch.__version__,
        "kv_items_per_size": kv_per_size,
        "heldout_tokens": int(evalset.heldout.numel()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    print(table)
    print("\n" + timings.table())
    if not quick:  # quick results are smoke tests (the *-quick.json files are git-ignored)
        out.with_suffix(".md").write_text(table + "\n\n```\n" + timings.table() + "\n```\n")
    print(f"wrote {out}" + ("" if quick else f" and {out.with_suffix('.md')}") + f" in {result['wall_seconds']:.0f} s "
          f"(predicted {result['predicted_seconds']:.0f} s; torch.compile graphs: {result['compiled_graphs']})")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _row_line(row: dict) -> str:
    kv = " ".join(f"{k}:{v:.2f}" for k, v in row["kv_retrieval"].items())
    tokens = f"  {row['tokens']:,} tokens" if "tokens" in row else ""
    return f"{row['name']}: KV {kv}  ppl {row['heldout_ppl']:.2f}{tokens}"


def _split_text(stages: dict) -> str:
    """'stage 2 N + stage 3 M' over the enabled stages of a recipe's ``stages`` dict (JSON keys)."""
    return " + ".join(f"stage {k} {cfg['tokens']:,}" for k, cfg in sorted(stages.items()) if cfg["enabled"])


def markdown(result: dict) -> str:
    head = "| model | kept heads | state | tokens | " + " | ".join(f"KV@{p}" for p in PAIRS) + " | held-out ppl |"
    lines = [head, "|" + "---|" * (5 + len(PAIRS))]
    t = result["teacher"]
    lines.append("| teacher | all 80 | – | – | " + " | ".join(f"{t['kv_retrieval'][str(p)]:.2f}" for p in PAIRS)
                 + f" | {t['heldout_ppl']:.2f} |")
    for r in result["students"]:
        kept = ", ".join(f"{l}.{h}" for l, h in r["kept_heads"]) or "none"
        note = " (time cap)" if r["truncated"] else ""
        lines.append(f"| {r['name']} | {kept} | {r['state_size']} | {r['tokens']:,}{note} | "
                     + " | ".join(f"{r['kv_retrieval'][str(p)]:.2f}" for p in PAIRS) + f" | {r['heldout_ppl']:.2f} |")
        if "before" in r:
            b = r["before"]
            kv = " | ".join(f"{b['kv_retrieval'][str(p)]:.2f}" for p in PAIRS)
            lines.append(f"| ↳ before distillation | | | 0 | {kv} | {b['heldout_ppl']:.2f} |")
    stages = result["recipe"]["stages"]
    lines.append(f"\n{result['device']}, {result['wall_seconds']:.0f} s wall "
                 f"(predicted {result['predicted_seconds']:.0f} s), "
                 f"{result['kv_items_per_size']} KV items per size, {result['heldout_tokens']:,} held-out tokens; "
                 f"{_split_text(stages)} tokens per student "
                 f"({result['budget_mode']} budget)"
                 + (f"; merged from {len(result['runs'])} runs, one process each." if "runs" in result else "."))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
