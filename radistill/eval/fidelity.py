"""Label-free fidelity: how closely a student's next-token distributions follow its teacher's.

A student can pass the KV probe and still lose what the teacher knows (memorised facts) or what it reads
(structured records in the prompt). Fidelity needs no labels: on text, compare the two models position by position.

Two kinds of text, each scored separately:
  ``heldout``    windows of ``--text`` (``FidelityConfig.windows`` of ``window`` tokens, seeded random starts);
  ``generated``  the teacher's own samples: ``prompt`` tokens of ``--text`` then ``generate`` sampled tokens
                 (seeded; the token ids are stored in the result, so they can be read back and scored again
                 even where another device's sampler would draw other tokens). Only the generated part is scored.

Per scored position (the next-token distributions p = teacher, q = student):
  ``kl``          KL(p || q) in nats, computed in fp32 from the log-softmax of both models' logits;
  ``top1``        argmax q == argmax p;
  ``confident``   top1 restricted to positions where max p >= ``confident`` (0.9): memorised facts, in-context copies.

Each is also split by the teacher's **attention reach** at that position, from one extra teacher pass with eager
attention: for every layer and head, the attention-weighted mean distance back to the keys,
``d(l, h, t) = sum_s a(l, h, t, s) * (t - s)``, where the weight on the first token (the attention sink many heads
park their attention on) counts as distance 0; the reach is the mean of ``d`` over all layers and heads that
return weights. A position is ``long`` when its reach is ``>= long_range`` (16) tokens, else ``local``. The mean,
not the max over heads: teacher-19m has diffuse heads in most layers (its layer-0 heads spread over the whole
context), so a max made 89% of prose positions "long"; the mean splits its held-out prose about in half (median
reach 15.5 tokens). Only the per-position reach is kept (hooks reduce each layer's ``[batch, heads, T, T]``
weights as soon as they are made), so memory is one layer's weights of one batch.

Greedy continuation agreement: for ``greedy_prompts`` prompts of ``--text``, the teacher continues greedily for
``greedy_tokens`` tokens; the student reads the prompt plus that continuation in one forward and the score is the
number of tokens before its first argmax that differs. Until the first difference the student's own greedy
continuation would have read the same tokens, so this is exactly where greedy decoding of the student would
leave the teacher's path.
"""

from __future__ import annotations

import math
import random
import statistics
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from radistill.eval.choice import model_device
from radistill.eval.coverage import TaskResult
from radistill.eval.perplexity import CHARS_PER_TOKEN, read_text
from radistill.utils.errors import RadistillError

LOGIT_CHUNK = 1024  # scored positions per LM-head call: bounds [positions, vocab] logits (as in perplexity)
SPLITS = ("all", "local", "long")
TEXTS = ("heldout", "generated")


@dataclass(frozen=True)
class FidelityConfig:
    windows: int = 16  # held-out windows
    window: int = 256  # tokens per held-out window
    samples: int = 8  # teacher-generated samples
    prompt: int = 32  # tokens of --text that start a sample (and a greedy prompt)
    generate: int = 224  # sampled tokens per sample (scored)
    temperature: float = 1.0
    greedy_prompts: int = 16
    greedy_tokens: int = 64
    confident: float = 0.9  # teacher max-probability threshold for "confident" positions
    long_range: int = 16  # attention reach (tokens) from which a position counts as long-range
    seed: int = 0
    text_tokens: int = 65536  # tokens of --text read for windows and prompts

    def __post_init__(self):
        for name in ("windows", "samples", "greedy_prompts"):
            if getattr(self, name) < 0:
                raise RadistillError(f"fidelity: {name} must be >= 0 (got {getattr(self, name)})")
        for name in ("window", "prompt", "generate", "greedy_tokens", "long_range", "text_tokens"):
            if getattr(self, name) < 1:
                raise RadistillError(f"fidelity: {name} must be >= 1 (got {getattr(self, name)})")
        if self.window < 2:
            raise RadistillError("fidelity: window must be >= 2 tokens")
        if not 0.0 < self.confident < 1.0:
            raise RadistillError(f"fidelity: confident must be between 0 and 1 (got {self.confident})")
        if self.temperature <= 0:
            raise RadistillError("fidelity: temperature must be > 0 (sampling; greedy agreement is its own score)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SplitStats:
    """Sums over the scored positions of one split; means are derived, so splits add up exactly."""

    positions: int = 0
    kl_sum: float = 0.0
    top1_hits: int = 0
    confident_positions: int = 0
    confident_hits: int = 0

    def add(self, other: "SplitStats") -> None:
        self.positions += other.positions
        self.kl_sum += other.kl_sum
        self.top1_hits += other.top1_hits
        self.confident_positions += other.confident_positions
        self.confident_hits += other.confident_hits

    @property
    def kl(self) -> float | None:
        return self.kl_sum / self.positions if self.positions else None

    @property
    def top1(self) -> float | None:
        return self.top1_hits / self.positions if self.positions else None

    @property
    def confident(self) -> float | None:
        return self.confident_hits / self.confident_positions if self.confident_positions else None

    def to_dict(self) -> dict:
        return {**asdict(self), "kl": self.kl, "top1": self.top1, "confident": self.confident}

    @classmethod
    def from_dict(cls, data: dict) -> "SplitStats":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass
class FidelityResult:
    """Per text kind (``heldout``, ``generated``) and split (``all``, ``local``, ``long``) the sums and means;
    greedy agreement per prompt; and the token ids read, so the run can be repeated exactly."""

    config: FidelityConfig
    texts: dict[str, dict[str, SplitStats]] = field(default_factory=dict)
    greedy: list[int] = field(default_factory=list)  # tokens before the first divergence, per prompt
    reach: dict[str, dict[str, float]] = field(default_factory=dict)  # per text: mean/median reach, long share
    samples: list[list[int]] = field(default_factory=list)  # teacher samples: prompt + generated ids
    greedy_continuations: list[list[int]] = field(default_factory=list)  # teacher greedy: prompt + continuation

    @property
    def greedy_mean(self) -> float | None:
        return statistics.fmean(self.greedy) if self.greedy else None

    @property
    def greedy_median(self) -> float | None:
        return float(statistics.median(self.greedy)) if self.greedy else None

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "texts": {kind: {split: s.to_dict() for split, s in splits.items()} for kind, splits in self.texts.items()},
            "greedy": {"tokens": self.greedy, "mean": self.greedy_mean, "median": self.greedy_median,
                       "of": self.config.greedy_tokens},
            "reach": self.reach,
            "samples": self.samples,
            "greedy_continuations": self.greedy_continuations,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "FidelityResult":
        return cls(
            FidelityConfig(**data["config"]),
            {kind: {split: SplitStats.from_dict(s) for split, s in splits.items()}
             for kind, splits in data["texts"].items()},
            list(data["greedy"]["tokens"]), dict(data.get("reach", {})), data.get("samples", []),
            data.get("greedy_continuations", []),
        )

    def task_results(self) -> list[TaskResult]:
        """The headline numbers as ``eval.json`` tasks; ``fidelity`` carries the whole result as its details."""
        results = []
        for kind, prefix in (("heldout", "fidelity"), ("generated", "fidelity_gen")):
            splits = self.texts.get(kind)
            if not splits or not splits["all"].positions:
                continue
            every = splits["all"]
            results.append(TaskResult(f"{prefix}_kl" if kind == "generated" else "fidelity", "kl", every.kl,
                                      higher_is_better=False, samples=every.positions))
            results.append(TaskResult(f"{prefix}_top1", "agreement", every.top1, samples=every.positions))
            if every.confident is not None:
                results.append(TaskResult(f"{prefix}_confident", "agreement", every.confident,
                                          samples=every.confident_positions))
            for split in ("local", "long"):
                part = splits[split]
                if part.positions:
                    results.append(TaskResult(f"{prefix}_kl@{split}", "kl", part.kl, higher_is_better=False,
                                              samples=part.positions))
                    results.append(TaskResult(f"{prefix}_top1@{split}", "agreement", part.top1,
                                              samples=part.positions))
                if part.confident is not None:
                    results.append(TaskResult(f"{prefix}_confident@{split}", "agreement", part.confident,
                                              samples=part.confident_positions))
        if self.greedy:
            results.append(TaskResult("fidelity_greedy", "tokens", self.greedy_mean, samples=len(self.greedy)))
            results.append(TaskResult("fidelity_greedy_median", "tokens", self.greedy_median,
                                      samples=len(self.greedy)))
        if results:
            results[0].details = self.to_dict()
        return results


def table_summary(details: dict) -> dict:
    """What a results table keeps of ``FidelityResult.to_dict()``: per text kind and split the KL, top-1 and
    confident top-1 with their position counts, the greedy agreement's mean / median / of, and the attention reach
    (not the token ids, which a table does not need and which its seed reproduces)."""
    out = {kind: {split: {k: stats[k] for k in ("kl", "top1", "confident", "positions", "confident_positions")}
                  for split, stats in splits.items()}
           for kind, splits in details["texts"].items()}
    out["greedy"] = {k: details["greedy"][k] for k in ("mean", "median", "of")}
    out["reach"] = details.get("reach", {})
    return out


# --- checks and text -------------------------------------------------------------------------------------------


def check_same_tokenizer(teacher_tokenizer, student_tokenizer) -> None:
    """Fidelity compares distributions token by token: both models must read and write the same token ids."""
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise RadistillError("fidelity: the student's tokenizer differs from the teacher's (different vocabularies); "
                             "fidelity compares next-token distributions id by id, so both must share one tokenizer")
    probe = "Fidelity check: 0123 café <|endoftext|> x"
    if teacher_tokenizer(probe).input_ids != student_tokenizer(probe).input_ids:
        raise RadistillError("fidelity: the student's tokenizer encodes text differently from the teacher's (same "
                             "vocabulary, other rules or special tokens); both must share one tokenizer")


def text_ids(tokenizer, path: str, max_tokens: int) -> torch.Tensor:
    """``[tokens]`` the first ``max_tokens`` token ids of a text file."""
    text = read_text(path, max_tokens * CHARS_PER_TOKEN)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids[:max_tokens], dtype=torch.long)
    return ids


def random_windows(ids: torch.Tensor, count: int, length: int, rng: random.Random) -> torch.Tensor:
    """``[count, length]`` windows of ``ids`` at seeded random starts (drawn with replacement of starts)."""
    if count == 0:
        return torch.empty(0, length, dtype=torch.long)
    if len(ids) < length:
        raise RadistillError(f"fidelity: the text holds {len(ids)} tokens, fewer than one window of {length}; "
                             "pass a longer --text or lower the window")
    starts = [rng.randrange(len(ids) - length + 1) for _ in range(count)]
    return torch.stack([ids[s : s + length] for s in starts])


# --- attention reach -------------------------------------------------------------------------------------------


def _attention_modules(model) -> list[torch.nn.Module]:
    """Each decoder layer's token mixer (``self_attn``): a teacher's attention or a hybrid's mixer, which returns
    the weights of its kept heads."""
    layers = getattr(model.get_decoder(), "layers", None)
    modules = [getattr(layer, "self_attn", None) for layer in layers or []]
    if not modules or any(m is None for m in modules):
        raise RadistillError(f"fidelity: {type(model).__name__} has no `layers[i].self_attn` to read attention "
                             "from; fidelity needs a Llama-like teacher (or a radistill hybrid)")
    return modules


@contextmanager
def eager_attention(model):
    """Run ``model`` with eager attention (which returns its weights) and restore its implementation after."""
    configs = {id(m.config): m.config for m in model.modules()
               if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")}
    before = {key: config._attn_implementation for key, config in configs.items()}
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if setter is not None:
            try:
                setter("eager")
            except (ValueError, TypeError, AttributeError):  # e.g. a custom class that declines the switch
                setter = None
        for config in configs.values():  # also covers submodules whose config the setter does not reach
            config._attn_implementation = "eager"
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = before[key]


@torch.no_grad()
def attention_reach(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``[batch, T]`` the teacher's attention reach per position (the mean over heads of the attention-weighted
    mean distance; see the module docstring), in tokens.

    One forward with eager attention; a hook on each layer's attention module reduces its ``[batch, heads, T, T]``
    weights to ``[batch, T]`` at once. Layers that return no weights (a hybrid layer without kept heads) add nothing.
    """
    length = input_ids.shape[1]
    device = model_device(model)
    distance = torch.arange(length, device=device)
    distance = (distance[:, None] - distance[None, :]).clamp(min=0).float()  # [T(query), T(key)]: t - s
    distance[:, 0] = 0.0  # the first token is the attention sink: weight parked there reads nothing far back
    total = torch.zeros(input_ids.shape, device=device)  # [batch, T]: sum over heads of their mean distance
    heads = []

    def hook(_module, _args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None or weights.dim() != 4:
            return
        total.add_((weights.float() * distance).sum(-1).sum(1))  # [batch, heads, T] -> [batch, T]
        heads.append(weights.shape[1])

    handles = [module.register_forward_hook(hook) for module in _attention_modules(model)]
    try:
        with eager_attention(model):
            model.get_decoder()(input_ids=input_ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if not heads:
        raise RadistillError(f"fidelity: {type(model).__name__} returned no attention weights even with eager "
                             "attention, so positions cannot be split into local and long-range")
    return (total / sum(heads)).cpu()


# --- scoring ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def compare_batch(teacher, student, input_ids: torch.Tensor, first: int, config: FidelityConfig,
                  reach: torch.Tensor) -> dict[str, SplitStats]:
    """Sums of KL, top-1 and confident agreement over positions ``[first, T)`` of ``input_ids`` ``[batch, T]``,
    split by ``reach`` ``[batch, T]``."""
    device_t, device_s = model_device(teacher), model_device(student)
    hidden_t = teacher.get_decoder()(input_ids=input_ids.to(device_t), use_cache=False).last_hidden_state
    hidden_s = student.get_decoder()(input_ids=input_ids.to(device_s), use_cache=False).last_hidden_state
    head_t, head_s = teacher.get_output_embeddings(), student.get_output_embeddings()
    rows, cols = torch.meshgrid(torch.arange(input_ids.shape[0]), torch.arange(first, input_ids.shape[1]),
                                indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    long = (reach[rows, cols] >= config.long_range)
    stats = {split: SplitStats() for split in SPLITS}
    for start in range(0, len(rows), LOGIT_CHUNK):
        r, c = rows[start : start + LOGIT_CHUNK], cols[start : start + LOGIT_CHUNK]
        logp = torch.log_softmax(head_t(hidden_t[r.to(device_t), c.to(device_t)]).float(), -1)
        logq = torch.log_softmax(head_s(hidden_s[r.to(device_s), c.to(device_s)]).float(), -1).to(logp.device)
        kl = (logp.exp() * (logp - logq)).sum(-1).clamp(min=0).double().cpu()  # [chunk]; fp rounding can dip < 0
        top_p, arg_p = logp.max(-1)
        hit = (logq.argmax(-1) == arg_p).cpu()
        confident = (top_p.exp() >= config.confident).cpu()
        is_long = long[start : start + LOGIT_CHUNK]
        for split, mask in (("all", torch.ones_like(is_long)), ("local", ~is_long), ("long", is_long)):
            part = stats[split]
            part.positions += int(mask.sum())
            part.kl_sum += float(kl[mask].sum())
            part.top1_hits += int(hit[mask].sum())
            part.confident_positions += int((confident & mask).sum())
            part.confident_hits += int((confident & hit & mask).sum())
    return stats


@torch.no_grad()
def teacher_samples(teacher, tokenizer, prompts: torch.Tensor, new_tokens: int, config: FidelityConfig,
                    greedy: bool) -> torch.Tensor:
    """``[batch, prompt + new_tokens]`` the teacher's continuations of ``prompts`` ``[batch, prompt]``.

    End-of-text is suppressed until ``new_tokens`` are made (``min_new_tokens``), so every sample has the same
    length and needs no padding; where the teacher would end its document it writes its next likeliest token.
    Sampling draws from a generator seeded with ``config.seed`` (torch's global RNG is restored after)."""
    device = model_device(teacher)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generation = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "pad_token_id": pad,
                  "eos_token_id": None, "do_sample": not greedy}
    if not greedy:
        generation.update(temperature=config.temperature, top_k=0, top_p=1.0)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        from transformers import GenerationConfig

        output = teacher.generate(input_ids=prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                                  generation_config=GenerationConfig(**generation))
    return output.cpu()


@torch.no_grad()
def greedy_agreement(student, sequences: torch.Tensor, prompt: int) -> list[int]:
    """Per row of ``sequences`` ``[batch, prompt + N]`` (a teacher's greedy continuations): how many of the N
    continuation tokens the student's argmax reproduces before its first miss."""
    device = model_device(student)
    hidden = student.get_decoder()(input_ids=sequences.to(device), use_cache=False).last_hidden_state
    predicted = student.get_output_embeddings()(hidden[:, prompt - 1 : -1]).argmax(-1).cpu()  # [batch, N]
    miss = predicted != sequences[:, prompt:]
    length = miss.shape[1]
    first_miss = torch.where(miss.any(1), miss.float().argmax(1), torch.full((miss.shape[0],), length))
    return [int(x) for x in first_miss]


def fidelity(teacher, teacher_tokenizer, student, student_tokenizer, text: str | None,
             config: FidelityConfig = FidelityConfig(), batch_size: int = 8,
             samples: list[list[int]] | None = None,
             greedy_continuations: list[list[int]] | None = None) -> FidelityResult:
    """Compare ``student`` with ``teacher`` on ``text`` and on the teacher's own samples (see the module docstring).

    ``samples`` / ``greedy_continuations``: the teacher's samples and greedy continuations from an earlier result
    (``FidelityResult.samples`` / ``.greedy_continuations``) to score again instead of generating anew: several
    students compared on exactly the same generated text, without the teacher's generation each time.
    """
    check_same_tokenizer(teacher_tokenizer, student_tokenizer)
    if text is None:
        raise RadistillError("task 'fidelity' needs a text file: pass --text FILE (.txt, .txt.xz or .txt.gz)")
    rng = random.Random(config.seed)
    ids = text_ids(teacher_tokenizer, text, config.text_tokens)
    windows = random_windows(ids, config.windows, config.window, rng)
    result = FidelityResult(config)
    batch_size = max(1, batch_size)

    def score(kind: str, rows: torch.Tensor, first: int) -> None:
        totals = {split: SplitStats() for split in SPLITS}
        reaches = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            reach = attention_reach(teacher, batch)
            reaches.append(reach[:, first:].reshape(-1))
            for split, part in compare_batch(teacher, student, batch, first, config, reach).items():
                totals[split].add(part)
        result.texts[kind] = totals
        if reaches:
            values = torch.cat(reaches).float()
            result.reach[kind] = {"mean": float(values.mean()), "median": float(values.median()),
                                  "long_share": float((values >= config.long_range).float().mean())}

    score("heldout", windows, 0)
    # the prompts are drawn whether or not stored samples replace the generation, so that the greedy prompts after
    # them are the same either way
    prompts = random_windows(ids, config.samples, config.prompt, rng) if config.samples else None

    if samples is not None:
        generated = torch.tensor(samples, dtype=torch.long)
        if generated.dim() != 2 or generated.shape[1] <= config.prompt:
            raise RadistillError("fidelity: stored samples must be equal-length rows longer than the prompt")
    elif config.samples:
        generated = torch.cat([teacher_samples(teacher, teacher_tokenizer, prompts[i : i + batch_size],
                                               config.generate, config, greedy=False)
                               for i in range(0, len(prompts), batch_size)])
    else:
        generated = torch.empty(0, config.prompt + config.generate, dtype=torch.long)
    result.samples = generated.tolist()
    if len(generated):
        score("generated", generated, config.prompt - 1)  # the state at prompt - 1 predicts the first sampled token

    if greedy_continuations is not None:
        continuations = torch.tensor(greedy_continuations, dtype=torch.long)
        if continuations.dim() != 2 or continuations.shape[1] <= config.prompt:
            raise RadistillError("fidelity: stored greedy continuations must be equal-length rows longer than the "
                                 "prompt")
    elif config.greedy_prompts:
        prompts = random_windows(ids, config.greedy_prompts, config.prompt, rng)
        continuations = torch.cat([teacher_samples(teacher, teacher_tokenizer, prompts[i : i + batch_size],
                                                   config.greedy_tokens, config, greedy=True)
                                   for i in range(0, len(prompts), batch_size)])
    else:
        continuations = torch.empty(0, config.prompt + config.greedy_tokens, dtype=torch.long)
    if len(continuations):
        result.greedy_continuations = continuations.tolist()
        for i in range(0, len(continuations), batch_size):
            result.greedy += greedy_agreement(student, continuations[i : i + batch_size], config.prompt)
    return result


def fidelity_task(teacher, teacher_tokenizer, student, student_tokenizer, text: str | None,
                  config: FidelityConfig, batch_size: int = 8) -> list[TaskResult]:
    """``radistill eval --tasks fidelity``: the headline numbers, the full result in the first task's details."""
    result = fidelity(teacher, teacher_tokenizer, student, student_tokenizer, text, config, batch_size)
    if not math.isfinite(result.texts["heldout"]["all"].kl or 0.0):
        raise RadistillError("fidelity: KL is not finite (a model produced NaN/inf logits); check the dtype")
    return result.task_results()
