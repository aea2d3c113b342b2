"""Calibrate a freshly converted student on text: each recurrent head's initial decay, then its static normaliser.

One pass of the teacher over the calibration tokens, then the fresh mixers on the inputs it stored:

1. **Half-lives** (``half_lives="attention"``): every replaced head's *typical attention distance* in the teacher,
   d̃ = exp(E[log(1 + t - s)]) - 1 under its causal softmax attention (query t, key s; the first key is left out
   and the rest renormalised, since a first-token attention sink says nothing about how far a head reads), sets
   the recurrent head's initial decay a so that its normalised kernel a^d has that mean distance,
   a / (1 - a) = d̃, i.e. a half-life of ln 2 / ln((1 + d̃) / d̃) tokens. ``"fixed"`` keeps the mixer's own
   data-independent spread (``min_half_life`` .. ``max_half_life``).
2. **Normaliser** statistics (:class:`~radistill.hybrid.normalizer.StaticNormalizer`): per channel, the replaced
   heads' attention output in the teacher and the fresh mixer's output, with the half-lives of pass 1. A mixer
   with a normaliser of its own on one part (``part_output`` / ``calibrate_part``, e.g. ``window_recurrent``'s
   recurrence) gets that part's moments and the teacher heads' instead (docs/hybrid.md, "Writing a mixer").

Why (benchmarks/results/init_quality.json, docs/hybrid.md "Initial quality"): on teacher-19m the decays and the
calibration text dominate a fresh student's quality. With the top 8 heads kept and state 16, held-out perplexity
before any training is 2449 with half-lives 8-1024 and the built-in text, 48 with fixed half-lives 1-16 on prose,
and 34 with half-lives from attention distance on prose (teacher: 4.1).

The calibration text is the distillation data when there is any (``source``: what ``--data`` takes), packed into
windows like training; otherwise a few built-in sentences and KV-probe prompts (enough for a smoke test only).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from radistill.hybrid.mixers import mixer_kwargs
from radistill.hybrid.modeling import HybridForCausalLM
from radistill.hybrid.normalizer import ChannelMoments
from radistill.models.access import decoder_layers, hidden_input
from radistill.utils.errors import RadistillError

HALF_LIVES = ("attention", "fixed")
DEFAULT_TOKENS = 16_384
MIN_HALF_LIFE, MAX_HALF_LIFE = 0.5, 4096.0
HEAD_CHUNK = 4  # attention scores [batch, HEAD_CHUNK, seq, seq - 1] exist one chunk at a time

# A few sentences of varied register so the fallback calibration is not only probe prompts; no network needed.
BUILTIN_TEXT = (
    "The committee met on Tuesday to review the budget, and after a long discussion it approved the new plan.",
    "Water boils at 100 degrees Celsius at sea level, but at higher altitudes it boils at a lower temperature.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "She opened the letter slowly, read the first line twice, and then put it back in the drawer without a word.",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong and Buzz Aldrin walked on its surface for two hours.",
    "Q: What is the capital of France?\nA: Paris.\nQ: What is 12 times 12?\nA: 144.",
    "Photosynthesis turns light, water and carbon dioxide into glucose and oxygen inside the chloroplasts.",
    "The train to the airport leaves every fifteen minutes from platform four; tickets are sold at the machines.",
)


@dataclass
class Calibration:
    """What :func:`calibrate` did (recorded in ``selection.json``)."""

    tokens: int
    half_lives: str
    # per layer: the recurrent heads' initial half-lives in tokens (empty for layers without recurrent heads)
    half_life_tokens: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        rounded = [[round(h, 2) for h in layer] for layer in self.half_life_tokens]
        return {"tokens": self.tokens, "half_lives": self.half_lives, "half_life_tokens": rounded}


# ---- the text -----------------------------------------------------------------------------------------------------


def calibration_batches(
    tokenizer, source: str | os.PathLike | None = None, max_tokens: int = DEFAULT_TOKENS, seq_len: int = 256,
    batch_size: int = 8,
) -> list[dict[str, torch.Tensor]]:
    """Batches ``{"input_ids", "attention_mask"}`` [B, T] of calibration text.

    ``source`` (a file or HF dataset id, as ``radistill distill --data`` takes; its held-out documents are skipped):
    its training documents tokenised and packed into ``seq_len`` windows, up to ``max_tokens`` tokens. ``None``:
    the built-in sentences and KV-probe prompts, right-padded.
    """
    if max_tokens < seq_len:
        raise RadistillError(f"calibration needs at least one window: max_tokens {max_tokens} < seq_len {seq_len}")
    if source is None:
        return _padded_batches(tokenizer, _builtin_texts(tokenizer), seq_len, batch_size)
    windows = _packed_windows(tokenizer, str(source), max_tokens, seq_len)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in windows.split(batch_size)]


def _builtin_texts(tokenizer, probe_samples: int = 8) -> list[str]:
    from radistill.probes.kv import KVProbeConfig, kv_items

    probes = kv_items(tokenizer, KVProbeConfig(pairs=12, samples=probe_samples, seed=1234))
    return list(BUILTIN_TEXT) + [item.prompt for item in probes]


def _packed_windows(tokenizer, source: str, max_tokens: int, seq_len: int) -> torch.Tensor:
    """[windows, seq_len] of the source's documents, each followed by EOS, concatenated. Training documents only,
    unless they are too few for one window (a single-document file): its held-out text is then used as well."""
    from radistill.distill.data import is_heldout, iter_documents, tokenize
    from radistill.distill.recipe import DataConfig

    cfg = DataConfig(source=source)
    training: list[int] = []
    heldout: list[int] = []
    wanted = max_tokens // seq_len * seq_len
    for index, doc in enumerate(iter_documents(cfg)):
        (heldout if is_heldout(index, cfg) else training).extend(tokenize(tokenizer, [doc])[0].tolist())
        if len(training) >= wanted:
            break
    ids = training if len(training) >= seq_len else training + heldout
    usable = min(len(ids), wanted) // seq_len * seq_len
    if usable == 0:
        raise RadistillError(f"calibration data {source} has {len(ids)} tokens, fewer than one window of {seq_len}: "
                             "pass more text")
    return torch.tensor(ids[:usable]).view(-1, seq_len)


def _padded_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int) -> list[dict]:
    encoded = [ids for ids in (tokenizer(t, add_special_tokens=True).input_ids[:max_length] for t in texts) if ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


# ---- one teacher pass, then the mixers -----------------------------------------------------------------------------

# Above this many bytes, the stored attention inputs wait in CPU memory rather than on the teacher's device.
STORE_ON_DEVICE_BYTES = 2 << 30


@torch.no_grad()
def calibrate(student: HybridForCausalLM, teacher: nn.Module, batches: Sequence[dict[str, torch.Tensor]],
              half_lives: str = "attention") -> Calibration:
    """Set every recurrent head's initial half-life (``"attention"`` or ``"fixed"``, module docstring) and its
    static normaliser from the teacher's activations on ``batches``. Only real tokens count (batches may be padded).

    One teacher pass collects what both steps need: the replaced heads' attention distances and output moments, and
    each recurrent layer's attention input [B, T, hidden]. The fresh mixers then run on those stored inputs once
    their half-lives are set (a second teacher pass would recompute the same inputs). The mixers run eagerly with
    the plain chunked scan: compiling it, or fla's kernels' first-call tuning, costs far more than calibration-sized
    work."""
    if half_lives not in HALF_LIVES:
        raise RadistillError(f"half_lives must be one of {', '.join(HALF_LIVES)}, got {half_lives!r}")
    blocks = {i: layer.self_attn for i, layer in enumerate(student.model.layers)
              if layer.self_attn.recurrent is not None}
    # mixers without a decay (e.g. window heads) keep their own; the normaliser is fit only where a mixer asks
    decaying = {i for i, b in blocks.items() if getattr(b.recurrent, "has_half_lives", False)}
    normalized = {i: b for i, b in blocks.items() if _needs_statistics(b.recurrent)}
    wanted = {i: blocks[i] for i in sorted(decaying | set(normalized))}
    group = student.config.num_attention_heads // student.config.num_key_value_heads
    distances = decaying if half_lives == "attention" else set()
    stats = _teacher_statistics(teacher, wanted, batches, group, student.config.head_dim, distances=distances,
                                keep_inputs=set(normalized)) if wanted else _TeacherStatistics(0, {}, {}, {})
    for i in distances:
        blocks[i].recurrent.set_half_lives(half_life_for_distance(stats.distances[i]))
    _mixer_statistics(normalized, stats)
    record = [blocks[i].recurrent.half_lives().tolist() if i in decaying else []
              for i in range(len(student.model.layers))]
    return Calibration(stats.tokens, half_lives, record)


def _normalized_heads(mixer) -> list[bool]:
    flags = getattr(mixer, "normalized_heads", None)
    return flags() if flags is not None else [True] * mixer.num_heads


def _calibrated_parts(mixer) -> list[tuple[nn.Module, slice]]:
    """(mixer, its heads among the layer's mixer heads) for every mixer of the layer (a bank's groups) that fits a
    normaliser of its own on one part (``part_output`` / ``calibrate_part``)."""
    groups = list(getattr(mixer, "groups", None) or [mixer])
    parts, start = [], 0
    for group in groups:
        if callable(getattr(group, "calibrate_part", None)):
            parts.append((group, slice(start, start + group.num_heads)))
        start += group.num_heads
    return parts


def _needs_statistics(mixer) -> bool:
    """Whether calibration fits a normaliser for this layer's mixer: the layer's, or one inside the mixer."""
    return any(_normalized_heads(mixer)) or bool(_calibrated_parts(mixer))


def _heads_of(moments: ChannelMoments, heads: slice) -> ChannelMoments:
    """The moments of some heads only."""
    part = ChannelMoments(0, 0)
    part.count, part.sum, part.sum_sq = moments.count, moments.sum[heads], moments.sum_sq[heads]
    return part


@torch.no_grad()
def recalibrate_normalizers(student: HybridForCausalLM, teacher: nn.Module,
                            batches: Sequence[dict[str, torch.Tensor]]) -> int:
    """Measure every static normaliser's statistics again on ``batches`` (:func:`calibrate`'s normaliser step alone:
    one teacher pass, then the current mixers on the stored inputs), for mixers that training has changed since the
    build (stage 1 reshapes them; the normaliser would still map the fresh mixer's scale onto the teacher's).
    Half-lives are left as they are, and heads whose mixer asks for no normaliser stay the identity. Returns the
    real tokens seen."""
    normalized = {i: layer.self_attn for i, layer in enumerate(student.model.layers)
                  if layer.self_attn.recurrent is not None and _needs_statistics(layer.self_attn.recurrent)}
    if not normalized:
        return 0
    group = student.config.num_attention_heads // student.config.num_key_value_heads
    stats = _teacher_statistics(teacher, normalized, batches, group, student.config.head_dim, distances=set(),
                                keep_inputs=set(normalized))
    _mixer_statistics(normalized, stats)
    return stats.tokens


def half_life_for_distance(distance: torch.Tensor) -> torch.Tensor:
    """Half-lives (tokens) of the decays whose normalised kernel a^d has mean distance ``distance``: a/(1-a) = d."""
    d = distance.double().clamp_min(1e-3)
    return (math.log(2.0) / torch.log1p(1.0 / d)).clamp(MIN_HALF_LIFE, MAX_HALF_LIFE)


class _Enough(Exception):
    """Raised once the teacher's last hooked attention module has run: nothing after it is looked at."""


def _may_stop_early(teacher: nn.Module) -> bool:
    """Whether a forward of ``teacher`` may be left by an exception half way: not when a wrapper must run after each
    module's forward (FSDP's reshard, accelerate's offload hooks), which the exception would skip."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch without FSDP2
        FSDPModule = ()  # noqa: N806
    return not any(isinstance(m, FSDPModule) or hasattr(m, "_hf_hook") for m in teacher.modules())


def teacher_pass(teacher: nn.Module, batches, hooks: dict[int, dict]) -> int:
    """Run the teacher over ``batches`` with ``hooks`` {layer: {"attn": pre-hook(module, args, kwargs, mask),
    "q_proj" / "k_proj": forward hook(module, args, output, mask), "o_proj": pre-hook(module, args, mask)}}
    installed, ``mask`` being the batch's attention mask [B, T]. Returns the real tokens seen. (Calibration uses it;
    so does benchmarks/init_quality.py.)

    Each forward stops once the last hooked layer's attention has run: the layers after it, its MLP and the LM head
    would be computed for nothing (unless a wrapper such as FSDP must see every forward end)."""
    current: dict[str, torch.Tensor] = {}
    handles = []
    layers = decoder_layers(teacher)
    for i, layer in enumerate(layers):
        for name, hook in hooks.get(i, {}).items():
            if name == "attn":
                bound = lambda m, a, k, h=hook: h(m, a, k, current["mask"])  # noqa: E731
                handles.append(layer.self_attn.register_forward_pre_hook(bound, with_kwargs=True))
            elif name in ("q_proj", "k_proj"):
                bound = lambda m, a, o, h=hook: h(m, a, o, current["mask"])  # noqa: E731
                handles.append(getattr(layer.self_attn, name).register_forward_hook(bound))
            elif name == "o_proj":
                bound = lambda m, a, h=hook: h(m, a, current["mask"])  # noqa: E731
                handles.append(layer.self_attn.o_proj.register_forward_pre_hook(bound))
            else:
                raise ValueError(f"teacher_pass: no hook point {name!r} (attn, q_proj, k_proj, o_proj)")
    hooked = [i for i in range(len(layers)) if hooks.get(i)]

    def enough(module, args, output):
        raise _Enough

    if hooked and _may_stop_early(teacher):
        handles.append(layers[hooked[-1]].self_attn.register_forward_hook(enough))
    device = next(teacher.parameters()).device
    tokens = 0
    try:
        for batch in batches:
            current["mask"] = batch["attention_mask"].to(device)
            try:
                teacher(input_ids=batch["input_ids"].to(device), attention_mask=current["mask"], use_cache=False,
                        logits_to_keep=1)
            except _Enough:
                pass
            tokens += int(batch["attention_mask"].sum())
    finally:
        for handle in handles:
            handle.remove()
    return tokens


@dataclass
class _TeacherStatistics:
    tokens: int
    distances: dict[int, torch.Tensor]  # {layer: [recurrent heads]} typical attention distance (if asked for)
    teacher_moments: dict[int, ChannelMoments]  # the replaced heads' output (o_proj input) moments
    # {layer: [(attention input [B, T, D], mask [B, T], RoPE (cos, sin) [B, T, hd] each)]}
    inputs: dict[int, list[tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]]


def _teacher_statistics(teacher, blocks, batches, group_size: int, head_dim: int, distances: set[int],
                        keep_inputs: set[int]) -> _TeacherStatistics:
    """One teacher pass: attention distances of the layers in ``distances`` (module docstring), the replaced heads'
    output moments, and the attention inputs of the layers in ``keep_inputs`` (on the teacher's device, or in CPU
    memory when they are large)."""
    from radistill.models.attention import mean_log_distance, rotated_heads

    sums = {i: torch.zeros(len(b.recurrent_heads), dtype=torch.float64) for i, b in blocks.items()}
    counts = {i: 0 for i in blocks}
    moments = {i: ChannelMoments(len(b.recurrent_heads), head_dim) for i, b in blocks.items()}
    inputs: dict[int, list] = {i: [] for i in blocks}
    param = next(teacher.parameters())
    stored = sum(b["input_ids"].numel() for b in batches) * teacher.config.hidden_size * param.element_size()
    store = param.device if stored * len(keep_inputs) <= STORE_ON_DEVICE_BYTES else torch.device("cpu")

    # the replaced heads' q/k come from the teacher's own projections (every head's, computed anyway), caught as
    # q_proj / k_proj return and used at o_proj, once the layer's RoPE is known: no second projection
    projected: dict[str, torch.Tensor] = {}

    def attn_hook(i):
        def hook(module, args, kwargs, mask):
            hidden = hidden_input(args, kwargs)
            rope = kwargs.get("position_embeddings")
            if i in keep_inputs:
                inputs[i].append((hidden.to(store), mask.to(store),
                                  tuple(t.to(store) for t in rope) if rope is not None else None))
            if i in distances:
                projected["rope"] = rope

        return hook

    def keep_projection(name):
        def hook(module, args, output, mask):
            projected[name] = output

        return hook

    def o_proj_hook(i):
        def hook(module, args, mask):  # the o_proj input [B, T, H*hd] -> the replaced heads' slices
            heads = args[0].view(*args[0].shape[:-1], -1, head_dim)[:, :, blocks[i].recurrent_heads]
            moments[i].add(heads, mask)
            if i not in distances:
                return
            attn = decoder_layers(teacher)[i].self_attn
            q, k = rotated_heads(attn, projected.pop("q"), projected.pop("k"), projected.pop("rope"),
                                 list(blocks[i].recurrent_heads), group_size)
            log_distance = mean_log_distance(q, k, attn.scaling, HEAD_CHUNK)  # [B, r, T]
            queries = mask.bool().clone()
            queries[:, 0] = False  # its only key is the first one, which is left out
            sums[i] += log_distance.transpose(1, 2)[queries].double().sum(0).cpu()
            counts[i] += int(queries.sum())

        return hook

    hooks = {i: {"attn": attn_hook(i), "o_proj": o_proj_hook(i)} for i in blocks}
    for i in distances:
        hooks[i].update(q_proj=keep_projection("q"), k_proj=keep_projection("k"))
    tokens = teacher_pass(teacher, batches, hooks)
    found = {}
    if distances:
        if any(counts[i] == 0 for i in distances):
            raise RadistillError("calibration text too short: no query position beyond the first token")
        found = {i: torch.expm1(sums[i] / counts[i]) for i in distances}
    return _TeacherStatistics(tokens, found, moments, inputs)


def _mixer_statistics(blocks, stats: _TeacherStatistics) -> None:
    """Fill every recurrent block's normaliser from the fresh mixer's output on the stored attention inputs and the
    replaced heads' output moments."""
    for i, block in blocks.items():
        mixer = block.recurrent
        head_dim = stats.teacher_moments[i].sum.shape[-1]
        keep = torch.tensor(_normalized_heads(mixer))
        # the layer's normaliser (if any head asks for it) and the mixers' own part normalisers
        student = ChannelMoments(len(block.recurrent_heads), head_dim) if keep.any() else None
        parts = [(group, heads, ChannelMoments(group.num_heads, head_dim))
                 for group, heads in _calibrated_parts(mixer)]
        device = next(mixer.parameters()).device
        backend = getattr(mixer, "backend", None)
        if backend is not None:
            mixer.backend = "torch"
        try:
            with torch.compiler.set_stance("force_eager"):
                for hidden, mask, rope in stats.inputs[i]:
                    mask, hidden = mask.to(device), hidden.to(device)
                    rope = tuple(t.to(device) for t in rope) if rope is not None else None
                    # no padding (packed text): no mask, which the mixer then need not apply (the same output)
                    given = None if bool(mask.all()) else mask
                    if student is not None:
                        y, _ = mixer(hidden, attention_mask=given, **mixer_kwargs(mixer, rope))  # [B, T, r, hd]
                        student.add(y, mask)
                    for group, _, moments in parts:
                        moments.add(group.part_output(hidden, attention_mask=given, **mixer_kwargs(group, rope)), mask)
        finally:
            if backend is not None:
                mixer.backend = backend
        stats.inputs[i] = []  # freed layer by layer
        for group, heads, moments in parts:
            group.calibrate_part(moments, _heads_of(stats.teacher_moments[i], heads))
        if student is None:
            continue
        block.normalizer.calibrate(student, stats.teacher_moments[i])
        if not keep.all():  # heads whose mixer needs no correction stay the identity
            block.normalizer.reset_statistics(~keep)


__all__ = ["BUILTIN_TEXT", "Calibration", "DEFAULT_TOKENS", "HALF_LIVES", "calibrate", "calibration_batches",
           "half_life_for_distance", "recalibrate_normalizers", "teacher_pass"]
