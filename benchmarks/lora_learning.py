"""Does restricted LoRA learn? Two new tasks, three methods, a learning-rate sweep: learning against forgetting.

A student of ``../shared/fixtures/teacher-19m`` (by default the scan's top 16 heads kept, state 8, built and
calibrated here but NOT distilled; ``--student DIR`` for a distilled one) is fine-tuned, per task, by

- ``lora-restricted``: LoRA on the recurrent heads and the kept heads (``recurrent,kept-heads``),
- ``lora-all``: LoRA on every linear layer but the LM head (``all``),
- ``full``: every weight,

each at ``--lrs-lora`` / ``--lrs-full`` (three learning rates each), with the finetune wing's code
(:mod:`radistill.finetune`: ``add_lora``, ``train``, ``document_batches``, ``marked_batches``). Same steps, batch
and data for every method of a task. The tasks, both made up here, so the model has never seen them:

A. **new facts** (closed book). ``--entities`` invented names (syllables, none an English word), each with a job
   and, for about half of them, a favourite colour (values: single-token words the teacher's world uses).
   Training text: four paraphrased statements per fact ("Zarnoble works as a baker.", "Name: Zarnoble; Job:
   baker", ...), loss on every token. Scored as multiple choice among ``--choices`` values of the attribute
   (the right one and seeded distractors): on *held-out phrasings* never trained on ("Question: What is the job
   of Zarnoble? Answer:"; the headline) and, as a memorisation check, on a *seen phrasing* ("Name: Zarnoble; Job:").
B. **a new retrieval format** (in context). A list written value first, ``Ticket numbers:`` then lines such as
   ``42 goes to apple.``, then ``Which number goes to apple? Answer:`` -> `` 42``. Training documents: a fresh
   list, then every key asked once in random order with its answer (loss on the answers only:
   ``marked_batches``); scored on held-out lists (fresh keys from the other half of the word list, fresh values),
   multiple choice over the list's values (chance 1 / ``--pairs``). Copying what follows the key in the list (the
   KV probe's skill) finds no value there, at best the next line's. Worded apart from the KV probe, which measures
   forgetting (see ``LIST_QUESTION``).

Per (task, method, lr): held-out accuracy before/after (learning); KV retrieval at 10 and 40 pairs
(:mod:`radistill.eval.kv`), held-out prose perplexity (also over each window's first 32 predictions) and the
KL / top-1 agreement of the next-token distributions against the starting student on held-out prose
(:func:`radistill.eval.fidelity.compare_batch`) (forgetting); trainable parameters, steps, target tokens, seconds,
first and last losses.

    python benchmarks/lora_learning.py --scan benchmarks/results/window-cpu-scan/scan.json \
        --first-lrs facts:lora-restricted=3e-3,facts:full=1e-3 --kv-steps 200 --time-limit 400  # one H200
    python benchmarks/lora_learning.py --quick --out /tmp/q.json   # CPU smoke run (tiny everything, 1 lr each)
    python benchmarks/lora_learning.py --merge a.json b.json --out benchmarks/results/lora_learning.json
                                                                   # runs of one student, each with its settings

Runs go in priority order: every (task, method) at its first learning rate (``--first-lrs``, per method or per
task:method, else its kind's middle one), facts before the value-first task, then the rest of the sweep, so a run
cut by ``--time-limit`` (checked before each run against the slowest run of its task so far) still compares the
three methods. Results are written after every run. On CUDA the recurrent scan runs eagerly unless ``--compile`` (compiling it took 241 s of a 410 s
shared-H200 run whose training runs took 14 s each).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from radistill.distill.data import heldout_sequences  # noqa: E402
from radistill.distill.recipe import DataConfig  # noqa: E402
from radistill.eval.choice import choice_accuracy  # noqa: E402
from radistill.eval.fidelity import FidelityConfig, compare_batch  # noqa: E402
from radistill.eval.kv import KVEvalConfig, kv_retrieval  # noqa: E402
from radistill.eval.suites import JOBS  # noqa: E402
from radistill.finetune.data import document_batches, marked_batches, replay_batches, with_replay  # noqa: E402
from radistill.finetune.lora import LoraSpec, add_lora, merge_lora  # noqa: E402
from radistill.finetune.train import FinetuneConfig, train  # noqa: E402
from radistill.models.access import load_model  # noqa: E402
from radistill.probes.items import ProbeItem  # noqa: E402
from radistill.probes.kv import KVProbeConfig, kv_items, spacing, value_prefix, value_range, words  # noqa: E402
from radistill.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

SHARED = ROOT.parent / "shared" / "fixtures"
TEACHER = SHARED / "teacher-19m"
CORPUS = SHARED / "corpus" / "prose-train.txt.xz"
RESULTS = ROOT / "benchmarks" / "results"
METHODS = (("lora-restricted", "recurrent,kept-heads"), ("lora-all", "all"), ("full", None),
           ("lora-recurrent", "recurrent"))  # the last: the kept (retrieval) heads frozen; not run by default
DEFAULT_METHODS = ("lora-restricted", "lora-all", "full")
TASKS = ("facts", "reversed-kv")
SHORT = 32  # prose perplexity is also reported over each window's first SHORT predictions

# ---- task A: new facts ---------------------------------------------------------------------------------------------
COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "black", "white", "brown", "grey", "pink", "gold",
           "silver")
SYLLABLES = ("ba", "bel", "cor", "da", "dri", "fen", "gal", "har", "ist", "jo", "kel", "lor", "mar", "nob", "or",
             "pel", "quin", "ras", "sev", "tor", "ul", "vel", "wen", "xa", "yor", "zar", "bri", "mox", "thal", "ves")


@dataclass(frozen=True)
class Attribute:
    name: str
    values: tuple[str, ...]
    train: tuple[str, ...]  # statements: {name}, {value}, {a} (the article before the value)
    seen: str  # a training template whose value ends it after a space: its prefix is the seen-phrasing question
    heldout: tuple[str, ...]  # questions never trained on; the value follows after a space


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def attributes(tokenizer) -> tuple[Attribute, Attribute]:
    """Job and favourite colour, values restricted to words that are one token after a space (every choice then
    costs one log-prob, so no value wins by being short, and scoring reads one forward per item)."""
    def single(values):
        return tuple(v for v in values if len(tokenizer(" " + v, add_special_tokens=False).input_ids) == 1)

    job = Attribute(
        "job", single(JOBS),
        train=("Name: {name}; Job: {value}", "{name} works as {a} {value}.", "By trade, {name} is {a} {value}.",
               "Everyone in town knows {name}, the {value}."),
        seen="Name: {name}; Job: {value}",
        heldout=("Question: What is the job of {name}? Answer:", "The occupation of {name} is"),
    )
    colour = Attribute(
        "colour", single(COLOURS),
        train=("The favourite colour of {name} is {value}.", "{name} likes the colour {value}.",
               "Name: {name}; Colour: {value}", "Ask {name} and you will hear that {value} is the best colour."),
        seen="The favourite colour of {name} is {value}.",
        heldout=("Question: What is the favourite colour of {name}? Answer:", "The colour {name} loves most is"),
    )
    return job, colour


def invent_names(count: int, rng: random.Random) -> list[str]:
    """``count`` distinct made-up names of 2-3 syllables, none an English word (the model cannot know them)."""
    known = {w.lower() for w in words()}
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if name.lower() not in known and name not in names:
            names.append(name)
    return names


def facts_task(tokenizer, entities: int, choices: int, seed: int = 0):
    """(training statements, held-out-phrasing items, seen-phrasing items, facts)."""
    rng = random.Random(seed)
    job, colour = attributes(tokenizer)
    if min(len(job.values), len(colour.values)) < choices:
        raise SystemExit(f"--choices {choices}: this tokenizer has only {len(job.values)} single-token jobs and "
                         f"{len(colour.values)} colours")
    facts = []  # (name, attribute, value)
    for name in invent_names(entities, rng):
        facts.append((name, job, rng.choice(job.values)))
        if rng.random() < 0.5:
            facts.append((name, colour, rng.choice(colour.values)))
    statements, heldout, seen = [], [], []
    for name, attr, value in facts:
        statements += [t.format(name=name, value=value, a=article(value)) for t in attr.train]
        options = [value, *rng.sample([v for v in attr.values if v != value], choices - 1)]
        rng.shuffle(options)
        spaced = tuple(f" {v}" for v in options)
        answer = options.index(value)
        heldout += [ProbeItem(q.format(name=name), spaced, answer) for q in attr.heldout]
        seen.append(ProbeItem(attr.seen.split("{value}")[0].rstrip().format(name=name), spaced, answer))
    return statements, heldout, seen, [(n, a.name, v) for n, a, v in facts]


# ---- task B: a value-first retrieval format ------------------------------------------------------------------------
# Worded apart from the KV probe ("key:value" lines, "The value of the key 'k' is"): with its question, learning to
# read the number *before* the key would answer the probe with the previous line's value, and the probe, which
# measures forgetting here, would measure that interference instead (CPU check: KV@10 0.94 -> 0.16 after full
# fine-tuning at 1e-4 on "42 is the value of apple." lists asked "The value of apple is").
LIST_HEADER = "Ticket numbers:\n"
LIST_LINE = "{value} goes to {key}.\n"
LIST_QUESTION = "\nWhich number goes to {key}? Answer:"


def reversed_kv_task(tokenizer, pairs: int, train_docs: int, heldout: int, seed: int = 0):
    """(training documents as ``(piece, scored)`` pieces, held-out items). Keys: the word list's even entries for
    training, odd for held-out; values: distinct numbers written as one token after ``is``
    (:func:`radistill.probes.kv.value_range`)."""
    prefix = value_prefix(tokenizer)
    end, start = spacing(tokenizer, prefix)
    values = value_range(tokenizer, prefix)
    vocabulary = words()
    train_keys, test_keys = list(vocabulary[0::2]), list(vocabulary[1::2])

    def draw(rng, keys):
        k = rng.sample(keys, pairs)
        v = rng.sample(values, pairs)
        return k, v, LIST_HEADER + "".join(LIST_LINE.format(value=b, key=a) for a, b in zip(k, v))

    rng = random.Random(seed)
    documents = []
    for _ in range(train_docs):
        keys, vals, body = draw(rng, train_keys)
        order = rng.sample(range(pairs), pairs)
        pieces = [(body, False)]
        for i in order:  # the loss falls on the answers only: the random keys and values are unpredictable noise
            pieces += [(LIST_QUESTION.format(key=keys[i]) + end, False), (f"{start}{vals[i]}", True), (".", False)]
        documents.append(pieces)
    rng = random.Random(seed + 1)
    items = []
    for _ in range(heldout):
        keys, vals, body = draw(rng, test_keys)
        target = rng.randrange(pairs)
        items.append(ProbeItem(body + LIST_QUESTION.format(key=keys[target]) + end,
                               tuple(f"{start}{v}" for v in vals), target))
    return documents, items


def key_first_lists(tokenizer, count: int, pairs: int, seed: int) -> list:
    """The KV probe's own lookups (key first, the order the student already reads) as training documents, the loss on
    the answer: what ``--replay-kv`` rehearses beside a new format. Seeded apart from the evaluation's items."""
    items = kv_items(tokenizer, KVProbeConfig(pairs=pairs, samples=count, seed=seed))
    return [[(item.prompt, False), (item.choices[item.answer], True)] for item in items]


# ---- the student -------------------------------------------------------------------------------------------------
def build_default_student(args, device: str, work: Path) -> tuple[Path, dict]:
    """The scan's top ``--keep`` heads at state ``--state-size``, calibrated on prose, not distilled (as
    benchmarks/testbed_recovery.py builds its students before distillation)."""
    from testbed_recovery import scan_heads

    from radistill.hybrid.build import build_student

    ranked = scan_heads(args, device, work)
    heads = ranked[: args.keep]
    teacher, tokenizer = load_model(TEACHER, dtype="fp32", device=device)
    tokens = 2048 if args.quick else 16384
    path = build_student(teacher, work / "student", heads=heads, state_size=args.state_size, tokenizer=tokenizer,
                         calibration_data=CORPUS, calibration_tokens=tokens, overwrite=True, device=device)
    return path, {"source": "built here", "distilled": False, "kept_heads": [f"{l}.{h}" for l, h in heads],
                  "state_size": args.state_size, "calibration_tokens": tokens,
                  "scan": str(args.scan) if args.scan else "scanned here"}


def describe_student(path: Path) -> dict:
    """What a ``--student`` folder is, from its JSON: distilled when a trainer exported it (the run's recipe.json sits
    in it or, for ``RUN/stageN/``, one level up: where the model card looks too)."""
    distilled = any((p / "recipe.json").is_file() for p in (path, path.parent))
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    kept = config.get("kept_heads") or []
    return {"source": str(path), "distilled": distilled,
            "kept_heads": [f"{layer}.{h}" for layer, heads in enumerate(kept) for h in heads],
            "state_size": (config.get("mixer_settings") or {}).get("state_size")}


# ---- measuring ---------------------------------------------------------------------------------------------------
class Evaluator:
    """Every number of one model, on items and prose windows fixed once."""

    def __init__(self, tokenizer, tasks: dict, args, device: str):
        self.tokenizer, self.tasks, self.device = tokenizer, tasks, device
        self.kv = KVEvalConfig(pairs=(10, 40), samples=args.kv_items, seed=1234, generate=False)
        self.windows = heldout_sequences(DataConfig(source=str(CORPUS)), tokenizer, args.ppl_seq,
                                         max(1, args.ppl_tokens // args.ppl_seq))
        self.batch = args.eval_batch

    @torch.inference_mode()
    def task_scores(self, model) -> dict:
        return {name: choice_accuracy(model, self.tokenizer, items, self.batch) for name, items in self.tasks.items()}

    @torch.inference_mode()
    def forgetting(self, model, start=None) -> dict:
        kv = {t.name: t.value for t in kv_retrieval(model, self.tokenizer, self.kv, self.batch)}
        out = {"kv@10": kv["kv_ret@10"], "kv@40": kv["kv_ret@40"], **self.perplexity(model)}
        if start is not None:
            out.update(self.fidelity(start, model))
        return out

    def perplexity(self, model) -> dict:
        """exp(mean next-token NLL) over the held-out windows ``[n, ppl_seq]`` (each predicts its last seq - 1), and
        over their first ``SHORT`` predictions only: training on short documents may leave the start of a text
        fine and break what comes later (the recurrent heads' state never ran that long in training)."""
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        nll, count, short_nll, short_count = 0.0, 0, 0.0, 0
        step = max(1, self.batch // 8)
        for i in range(0, len(self.windows), step):
            ids = self.windows[i : i + step].to(self.device)
            logits = head(decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]).float()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [b, T-1]
            nll += float(losses.sum())
            count += losses.numel()
            short_nll += float(losses[:, :SHORT].sum())
            short_count += losses[:, :SHORT].numel()
        return {"heldout_ppl": math.exp(nll / count), f"heldout_ppl_first{SHORT}": math.exp(short_nll / short_count)}

    def fidelity(self, start, model) -> dict:
        """KL(start || tuned) and top-1 agreement, means over every next-token position of the held-out windows.
        ``compare_batch`` splits positions by the first model's attention reach; a zero reach puts them all in one
        split, which is all this needs (the reach pass would cost a third forward per batch)."""
        config = FidelityConfig()
        totals = None
        for i in range(0, len(self.windows), max(1, self.batch // 8)):
            rows = self.windows[i : i + max(1, self.batch // 8)]
            stats = compare_batch(start, model, rows, 0, config, torch.zeros(rows.shape))["all"]
            if totals is None:
                totals = stats
            else:
                totals.add(stats)
        return {"kl_vs_start": totals.kl, "top1_vs_start": totals.top1}


def training_batches(tokenizer, setup: dict, seed: int):
    """Task A: statements, loss on every token; task B: documents of pieces, loss on the answers."""
    if setup["marked"]:
        return marked_batches(tokenizer, setup["train"], setup["batch"], setup["seq_len"], seed=seed)
    return document_batches(tokenizer, setup["train"], setup["batch"], setup["seq_len"], seed=seed)


def prepare(model, targets: str | None, rank: int):
    """A copy of ``model`` with LoRA on ``targets`` (None: every weight trainable) and the adapter summary."""
    model = copy.deepcopy(model)
    if targets is None:
        model.requires_grad_(True)
        return model, None
    return add_lora(model, LoraSpec(targets=targets, rank=rank, alpha=2.0 * rank), quiet=True)


def run_one(task: str, method: str, targets: str | None, lr: float, base, data: dict, evaluator: Evaluator,
            args, device: str) -> dict:
    torch.manual_seed(args.seed)  # the adapters' initialisation: every run reproducible, every method the same draw
    model, summary = prepare(base, targets, args.rank)
    setup = data[task]
    batches = training_batches(evaluator.tokenizer, setup, args.seed)
    steps = setup["steps"]
    if args.replay_share:
        # prose steps between the task's (finetune.data.with_replay), the evaluations' held-out documents left out;
        # more steps in all, so that the task gets about as many as without replay
        replay = replay_batches(evaluator.tokenizer, str(CORPUS), args.replay_batch, args.replay_seq, args.seed + 1)
        if args.replay_kv:  # that share of the replay steps on key-first lookups instead of prose
            lists = key_first_lists(evaluator.tokenizer, 2000, 10, args.seed + 7)
            replay = with_replay(replay, marked_batches(evaluator.tokenizer, lists, args.replay_batch, 256,
                                                        seed=args.seed + 3), args.replay_kv, args.seed + 5)
        batches = with_replay(batches, replay, args.replay_share, args.seed)
        steps = round(steps / (1.0 - args.replay_share))
    cfg = FinetuneConfig(lora=None, steps=steps, lr=lr, batch_size=setup["batch"], seq_len=setup["seq_len"],
                         loss_chunk=2048, seed=args.seed)
    every = max(1, steps // 6)

    def progress(step: int, loss: float) -> None:
        if step % every == 0:
            print(f"  {task} {method} lr {lr:g}: step {step}/{steps} loss {loss:.3f}", flush=True)

    result = train(model, batches, cfg, device, autocast=device.startswith("cuda"), on_step=progress)
    plain = merge_lora(model) if targets is not None else model
    plain.eval()
    started = time.perf_counter()
    scores = evaluator.task_scores(plain)
    forgetting = evaluator.forgetting(plain, start=base)
    tail = result.losses[-max(1, len(result.losses) // 10):]
    return {
        "task": task, "method": method, "targets": targets or "every weight", "lr": lr,
        "trainable_params": result.trainable_params,
        "adapted_modules": None if summary is None else summary.module_count,
        "steps": result.steps, "batch": setup["batch"], "target_tokens": result.tokens,
        "replay_share": args.replay_share, "replay_batch": f"{args.replay_batch} x {args.replay_seq}",
        "replay_kv": args.replay_kv,
        "train_seconds": round(result.seconds, 2), "eval_seconds": round(time.perf_counter() - started, 2),
        "loss_first": result.losses[0], "loss_last": sum(tail) / len(tail),
        "after": scores, **forgetting,
    }


def warm_up(base, tokenizer, data: dict, args, device: str) -> None:
    """One throwaway step per task of each kind on copies: compilation (the recurrent scan's forward and backward)
    and kernel choice fall on no measured run."""
    for targets in (None, METHODS[0][1]):
        for setup in data.values():
            model, _ = prepare(base, targets, args.rank)
            cfg = FinetuneConfig(lora=None, steps=1, lr=1e-12, batch_size=setup["batch"], seq_len=setup["seq_len"],
                                 loss_chunk=2048)
            train(model, training_batches(tokenizer, setup, 0), cfg, device, autocast=device.startswith("cuda"))


def schedule(lrs: dict[str, list[float]], tasks: list[str], methods: list[str] | None = None,
             first: dict[str, float] | None = None) -> list[tuple[str, str, str | None, float]]:
    """(task, method, targets, lr) in priority order: every (task, method) at its first lr (``first`` keyed
    ``task:method`` or ``method``, else its kind's middle lr; facts before reversed-kv), then the rest of the sweep,
    middle first, each lr once. ``methods`` None: the three compared by default."""
    first = first or {}
    methods = DEFAULT_METHODS if methods is None else methods
    picked = {}
    for task in tasks:
        for method, targets in METHODS:
            sweep = lrs["full" if targets is None else "lora"]
            lead = first.get(f"{task}:{method}", first.get(method, sweep[min(1, len(sweep) - 1)]))
            rest = [sweep[i] for i in sorted(range(len(sweep)), key=lambda i: (i != 1, i)) if sweep[i] != lead]
            picked[task, method] = [lead, *rest]
    runs = []
    for rank in range(max(len(v) for v in picked.values())):
        for task in tasks:
            for method, targets in METHODS:
                if method not in methods:
                    continue
                if rank < len(picked[task, method]):
                    runs.append((task, method, targets, picked[task, method][rank]))
    return runs


# ---- output ------------------------------------------------------------------------------------------------------
def versions() -> dict:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def markdown(result: dict) -> str:
    before = result["before"]
    lines = [f"# LoRA learning vs forgetting ({result['date']}, {result['device']})", "",
             f"Student: {result['student']['source']}, "
             f"{'distilled' if result['student']['distilled'] else 'NOT distilled (no recipe.json of a distill run)'}"
             + (f" (kept heads {', '.join(result['student']['kept_heads'])}, state {result['student']['state_size']})"
                if result['student'].get('state_size') else "") + ".", "",
             "| task | method | lr | trainable | steps × batch | tokens | s | loss first → last | held-out acc "
             "before → after | seen phrasing | KV@10 | KV@40 | prose ppl | ppl first 32 | KL vs start "
             "| top-1 vs start |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    start = before["student"]
    lines.append(f"| (starting student) | – | – | – | – | – | – | – | facts {start['facts']:.3f}, reversed-kv "
                 f"{start['reversed-kv']:.3f} | {start['facts-seen']:.3f} | {start['kv@10']:.3f} | "
                 f"{start['kv@40']:.3f} | {start['heldout_ppl']:.2f} | {start[f'heldout_ppl_first{SHORT}']:.2f} "
                 "| 0 | 1 |")
    for r in result["runs"]:
        seen = f"{start['facts-seen']:.3f} → {r['after']['facts-seen']:.3f}" if r["task"] == "facts" else "–"
        lines.append(
            f"| {r['task']} | {r['method']} | {r['lr']:g} | {r['trainable_params']:,} | {r['steps']} × {r['batch']}"
            + (f", {r['replay_share']:.0%} of steps replay ({r['replay_batch']} prose"
               + (f"; {r['replay_kv']:.0%} of them key-first KV lists" if r.get("replay_kv") else "") + ")"
               if r.get("replay_share") else "")
            + f" | {r['target_tokens']:,} | {r['train_seconds']:.0f} | {r['loss_first']:.3f} → {r['loss_last']:.3f} | "
            f"{start[r['task']]:.3f} → **{r['after'][r['task']]:.3f}** | {seen} | {r['kv@10']:.3f} | "
            f"{r['kv@40']:.3f} | {r['heldout_ppl']:.2f} | {r[f'heldout_ppl_first{SHORT}']:.2f} | "
            f"{r['kl_vs_start']:.4f} | {r['top1_vs_start']:.3f} |")
    t = before.get("teacher")
    if t:
        lines.append(f"\nTeacher (for reference): facts {t['facts']:.3f}, seen phrasing {t['facts-seen']:.3f}, "
                     f"reversed-kv {t['reversed-kv']:.3f}, KV@10 {t['kv@10']:.3f}, KV@40 {t['kv@40']:.3f}, "
                     f"prose ppl {t['heldout_ppl']:.2f}.")
    facts, kv = result["tasks"]["facts"], result["tasks"]["reversed-kv"]
    lines.append(f"\nChance: facts {1 / facts['choices']:.3f} ({facts['heldout_items']} held-out-phrasing items, "
                 f"{facts['facts']} facts of {facts['entities']} invented entities, {facts['statements']} training "
                 f"statements); reversed-kv {1 / kv['pairs']:.3f} ({kv['heldout_items']} held-out lists of "
                 f"{kv['pairs']} pairs). Loss: mean next-token loss over the training targets (facts: every token of "
                 "the statements; reversed-kv: the answers only), last = mean of the last 10% of steps. KL / top-1: "
                 "next-token distributions against the starting student on held-out prose.")
    if result["skipped"]:
        lines.append(f"\nNot run (time limit {result['time_limit']} s): "
                     + ", ".join(f"{s['task']}/{s['method']}@{s['lr']:g}" for s in result["skipped"]) + ".")
    lines.append(f"\n{result['wall_seconds']:.0f} s wall; {json.dumps(result['versions'])}.")
    return "\n".join(lines)


def write(result: dict, out: Path) -> None:
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), (merged_markdown(result) if "parts" in result else markdown(result))
                      + "\n")


def merge_results(results: list[dict], names: list[str]) -> dict:
    """Runs of one student from several result files (each with its own settings, e.g. steps or replay per task)
    as one result: ``parts`` holds each file's result whole (its starting-student scores, its runs), so a run is
    compared with the start measured under its own settings. Refuses files of different students or task sets."""
    first, tasks = results[0], {}
    for name, r in zip(names, results):
        if r["student"].get("source") != first["student"].get("source"):
            raise SystemExit(f"--merge: {name} is a run of another student than {names[0]}; merge runs of one student")
        for task in dict.fromkeys(run["task"] for run in r["runs"]):  # the tasks it ran must be the same tasks
            if tasks.setdefault(task, r["tasks"][task]) != r["tasks"][task]:
                raise SystemExit(f"--merge: {name}'s task {task} is not the one of the files before it (other "
                                 "items or documents); merge runs of one task set")
    return {"date": max(r["date"] for r in results), "device": ", ".join(dict.fromkeys(r["device"] for r in results)),
            "student": first["student"], "tasks": tasks, "merged": names,
            "parts": [{**r, "file": name} for r, name in zip(results, names)]}


def merged_markdown(merged: dict) -> str:
    """One summary row per run (learning: held-out accuracy; forgetting: KV, prose ppl and agreement against the
    start its own file measured), then every file's table."""
    lines = [f"# LoRA learning vs forgetting: {len(merged['parts'])} runs of one student ({merged['date']}, "
             f"{merged['device']})", "",
             f"Student: {merged['student']['source']}, "
             f"{'distilled' if merged['student']['distilled'] else 'NOT distilled'}. Each row against the starting "
             "student as measured in its own run (held-out prose and KV items differ between runs: see each part).",
             "", "| task | method | lr | steps, replay | held-out acc before → after | KV@10 | KV@40 | prose ppl "
             "start → after | top-1 vs start | part |", "|---|---|---|---|---|---|---|---|---|---|"]
    for index, part in enumerate(merged["parts"], 1):
        start = part["before"]["student"]
        for r in part["runs"]:
            replay = ("" if not r.get("replay_share") else f", {r['replay_share']:.0%} replay"
                      + (f" ({r['replay_kv']:.0%} of it key-first KV)" if r.get("replay_kv") else " (prose)"))
            lines.append(f"| {r['task']} | {r['method']} | {r['lr']:g} | {r['steps']} × {r['batch']}{replay} | "
                         f"{start[r['task']]:.3f} → **{r['after'][r['task']]:.3f}** | "
                         f"{start['kv@10']:.2f} → {r['kv@10']:.2f} | {start['kv@40']:.2f} → {r['kv@40']:.2f} | "
                         f"{start['heldout_ppl']:.2f} → {r['heldout_ppl']:.2f} | {r['top1_vs_start']:.3f} | {index} |")
    for index, part in enumerate(merged["parts"], 1):
        body = markdown(part).replace("# LoRA learning vs forgetting", f"## Part {index}: {part['file']}", 1)
        lines += ["", body]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", type=Path, default=None, help="fine-tune this student (default: build the scan's "
                   "top --keep heads at state --state-size, not distilled)")
    p.add_argument("--scan", type=Path, default=None, help="scan.json to pick heads from (default: scan here)")
    p.add_argument("--keep", type=int, default=16)
    p.add_argument("--state-size", type=int, default=8)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {', '.join(TASKS)}")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated subset of "
                   f"{', '.join(m for m, _ in METHODS)}")
    p.add_argument("--lrs-lora", default="3e-4,1e-3,3e-3", help="LoRA learning rates (the middle one runs first)")
    p.add_argument("--lrs-full", default="1e-4,3e-4,1e-3", help="full fine-tuning learning rates")
    p.add_argument("--first-lrs", default="", help="first lr per method or per task:method, e.g. "
                   "facts:lora-restricted=3e-3,full=1e-3 (what a CPU sweep chose); others start at their kind's "
                   "middle lr")
    p.add_argument("--compile", action="store_true", help="on CUDA, compile the recurrent scan [off: at these "
                   "lengths the eager scan is fast; compiling took 241 s of a 410 s contended H200 run]")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run (both tasks)")
    p.add_argument("--kv-steps", type=int, default=None, help="steps per run of task B (default: --steps)")
    p.add_argument("--facts-batch", type=int, default=64, help="statements per step (task A)")
    p.add_argument("--kv-batch", type=int, default=64, help="lists per step (task B; 8 answers each)")
    p.add_argument("--entities", type=int, default=120)
    p.add_argument("--choices", type=int, default=4, help="choices per fact question")
    p.add_argument("--pairs", type=int, default=8, help="pairs per value-first list")
    p.add_argument("--heldout", type=int, default=200, help="held-out lists (task B)")
    p.add_argument("--kv-items", type=int, default=100, help="KV probe items per size (10 and 40 pairs)")
    p.add_argument("--ppl-tokens", type=int, default=32768)
    p.add_argument("--ppl-seq", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run: a run that would end "
                   "past it (judged by the slowest run of its task so far) is skipped; rows are written as they finish")
    p.add_argument("--replay-share", type=float, default=0.0, help="fraction of steps on held-in prose between the "
                   "task's (rehearsal against forgetting; the steps grow so the task keeps its count) [0: none]")
    p.add_argument("--replay-kv", type=float, default=0.0, help="with --replay-share: this fraction of the replay steps "
                   "on key-first KV lookups of 10 pairs (the order the student reads, rehearsed beside a new one; "
                   "items seeded apart from the evaluation's) instead of prose [0]")
    p.add_argument("--replay-batch", type=int, default=16, help="prose windows per replay step")
    p.add_argument("--replay-seq", type=int, default=64, help="tokens per replay window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU)")
    p.add_argument("--work", type=Path, default=None, help="where the built student goes (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny tasks, 3 steps, one lr per method")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--merge", nargs="+", default=None, help="join these result files (runs of one student, each "
                   "with its own settings) into --out instead of running")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.kv_steps, args.facts_batch, args.kv_batch, args.entities, args.heldout = 3, 3, 4, 2, 8, 8
        args.kv_items, args.ppl_tokens, args.ppl_seq, args.eval_batch, args.pairs = 4, 256, 128, 8, 4
        args.lrs_lora, args.lrs_full = "3e-3", "3e-4"
    if not 1 <= args.entities <= 5000 or args.choices < 2 or not 2 <= args.pairs <= 40 or args.heldout < 1:
        p.error("need 1 <= --entities <= 5000, --choices >= 2, 2 <= --pairs <= 40 and --heldout >= 1")
    args.kv_steps = args.kv_steps or args.steps
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or set(tasks) - set(TASKS):
        p.error(f"--tasks {args.tasks!r}: choose from {', '.join(TASKS)}")
    args.tasks = tasks
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods or set(args.methods) - {m for m, _ in METHODS}:
        p.error(f"--methods {','.join(args.methods)!r}: choose from {', '.join(m for m, _ in METHODS)}")
    try:
        args.lrs = {"lora": [float(x) for x in args.lrs_lora.split(",")],
                    "full": [float(x) for x in args.lrs_full.split(",")]}
    except ValueError:
        p.error("--lrs-lora / --lrs-full: comma-separated numbers, e.g. 1e-3,3e-3")
    if any(lr <= 0 for v in args.lrs.values() for lr in v) or not all(args.lrs.values()):
        p.error("learning rates must be positive numbers")
    try:
        pairs = (x.split("=") for x in args.first_lrs.split(",") if x.strip())
        args.first_lrs = {m.strip(): float(v) for m, v in pairs}
    except ValueError:
        p.error(f"--first-lrs {args.first_lrs!r}: method=lr pairs, e.g. lora-restricted=3e-3,full=1e-3")
    names = {m for m, _ in METHODS} | {f"{t}:{m}" for t in TASKS for m, _ in METHODS}
    if set(args.first_lrs) - names or any(v <= 0 for v in args.first_lrs.values()):
        p.error(f"--first-lrs: METHOD=lr or TASK:METHOD=lr with tasks {', '.join(TASKS)} and methods "
                f"{', '.join(m for m, _ in METHODS)}, positive learning rates")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        if args.out is None:
            raise SystemExit("--merge needs --out")
        try:
            results = [json.loads(Path(name).read_text()) for name in args.merge]
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--merge: cannot read a result file: {exc}") from exc
        merged = merge_results(results, [Path(name).name for name in args.merge])
        write(merged, args.out)
        print(merged_markdown(merged))
        return 0
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads or 1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        if not args.compile:
            torch.compiler.set_stance("force_eager")
    out = args.out or RESULTS / ("lora_learning-quick.json" if args.quick else "lora_learning.json")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if args.student is not None:
            student_dir, student_info = args.student, describe_student(args.student)
        else:
            student_dir, student_info = build_default_student(args, device, work)
        base, tokenizer = load_model(student_dir, dtype="fp32", device=device)

        statements, facts_heldout, facts_seen, facts = facts_task(tokenizer, args.entities, args.choices, args.seed)
        kv_docs, kv_heldout = reversed_kv_task(tokenizer, args.pairs, max(2000, args.kv_steps * args.kv_batch),
                                               args.heldout, args.seed)
        data = {
            "facts": {"train": statements, "batch": args.facts_batch, "steps": args.steps, "seq_len": 64,
                      "marked": False},
            "reversed-kv": {"train": kv_docs, "batch": args.kv_batch, "steps": args.kv_steps,
                            "seq_len": 64 + 32 * args.pairs, "marked": True},
        }
        evaluator = Evaluator(tokenizer, {"facts": facts_heldout, "facts-seen": facts_seen,
                                          "reversed-kv": kv_heldout}, args, device)
        before = {"student": {**evaluator.task_scores(base), **evaluator.forgetting(base)}}
        teacher, _ = load_model(TEACHER, dtype="fp32", device=device)
        before["teacher"] = {**evaluator.task_scores(teacher), **evaluator.forgetting(teacher)}
        del teacher
        print("before:", json.dumps(before), flush=True)
        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "versions": versions(), "quick": args.quick, "time_limit": args.time_limit,
            "student": {**student_info, "params": sum(p.numel() for p in base.parameters())},
            "tasks": {
                "facts": {"entities": args.entities, "facts": len(facts), "statements": len(statements),
                          "choices": args.choices, "heldout_items": len(facts_heldout), "seen_items": len(facts_seen),
                          "example_statements": statements[:8], "example_question": facts_heldout[0].to_dict()},
                "reversed-kv": {"pairs": args.pairs, "train_documents": len(kv_docs), "heldout_items": len(kv_heldout),
                                "example_document": "".join(piece for piece, _ in kv_docs[0]),
                                "example_question": kv_heldout[0].to_dict()},
            },
            "settings": {"steps": args.steps, "kv_steps": args.kv_steps, "facts_batch": args.facts_batch,
                         "kv_batch": args.kv_batch,
                         "lora_rank": args.rank, "lora_alpha": 2.0 * args.rank, "lrs": args.lrs,
                         "first_lrs": args.first_lrs, "compiled_scan": device == "cuda" and args.compile,
                         "optimizer": "adamw, constant lr, no weight decay", "seed": args.seed,
                         "kv_items": args.kv_items, "ppl_tokens": int(evaluator.windows.numel())},
            "before": before, "runs": [], "skipped": [], "wall_seconds": None,
        }
        warm_start = time.perf_counter()
        if device == "cuda":  # nothing is compiled on the CPU
            warm_up(base, tokenizer, {t: data[t] for t in args.tasks}, args, device)
        result["warm_up_seconds"] = round(time.perf_counter() - warm_start, 1)
        plan = schedule(args.lrs, args.tasks, args.methods, args.first_lrs)
        slowest: dict[str, float] = {}  # per task: its lengths and steps differ
        for task, method, targets, lr in plan:
            elapsed = time.perf_counter() - started
            expect = slowest.get(task, max(slowest.values(), default=0.0))
            if args.time_limit is not None and elapsed + expect > args.time_limit:
                result["skipped"].append({"task": task, "method": method, "lr": lr})
                continue
            run_started = time.perf_counter()
            row = run_one(task, method, targets, lr, base, data, evaluator, args, device)
            slowest[task] = max(slowest.get(task, 0.0), time.perf_counter() - run_started)
            result["runs"].append(row)
            result["wall_seconds"] = round(time.perf_counter() - started, 1)
            write(result, out)
            print(json.dumps(row), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    write(result, out)
    print(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
