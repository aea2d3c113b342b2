"""The scan's memory plan (``radistill scan --gpu-memory``): its peak from the model config and the probe, and the
rows per forward and prompts per chunk that fit; plus what the eval's plan (:mod:`radistill.memplan.eval`) shares
with it: the budget, the model an inference step runs, the first fitting strategy, the fit check with advice.

What the fast scan (:mod:`radistill.scan.fast`) holds at its peak, for a chunk of ``C`` prompts tree-packed into
rows of ``S`` tokens and ``R`` (prompt, head) rows per ablated forward, beside the weights:

- the clean cache: per layer its input, its attention output and its ``o_proj`` input ``[C, S, ·]``, the rotary
  cos/sin and the packed batch, alive for the whole chunk;
- then either the clean forward of the chunk (one layer's transient at ``[C, S]``, the tree mask ``[C, 1, S, S]``
  and, with a mask, SDPA's K/V repeated to every query head) and its scoring,
- or one ablated forward: the rows it gathers from the cache (``o_proj`` input, attention output, hidden state,
  cos/sin, mask, the ablated heads' ``o_proj`` columns), one layer's transient at ``[R, S]``, then the logits at
  the scored positions, one ``[vocab]`` row per distinct position however many choices read it (at most
  ``LOGIT_CHUNK`` rows at once).

Layer transients come from the meta-device dry runs every plan uses (:meth:`Shapes.profile`); the rest is
arithmetic on the shapes the probe fixes, chunk by chunk in the scan's order (an ablated forward is cut at its
longest row; the estimate takes its chunk's). ``mean`` ablation first measures the means on batches of 8 prompts,
with no cache: one more phase.

Preference (:func:`scan_candidates`): the rows per forward are what keeps the GPU busy, while the prompt chunk only
trades memory (every prompt's clean forward runs once whatever the chunk), so the chunk shrinks first -- as long
as it still fills a forward's rows -- and the rows only then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from radistill.memplan.estimate import Breakdown, GiB, Strategy, Workload
from radistill.memplan.plan import Plan, StepPlan, _micro_batches, parse_size
from radistill.memplan.shapes import Shapes
from radistill.probes.items import EncodedItem
from radistill.probes.scoring import LOGIT_CHUNK, pack
from radistill.utils.errors import RadistillError

MASK_BUILD_BOOLS = 3  # PackedBatch.attention_mask: bool [rows, S, S] comparisons alive while the mask is made
INDEX_BYTES = 8  # int64 token ids, positions and segments
MEANS_BATCH = 8  # radistill.scan.ablation.head_means: prompts per forward when mean ablation measures the means


# ---- shared with the eval's plan ---------------------------------------------------------------------------------
def budget(gpu_memory: str | int, reserve: float) -> tuple[int, int]:
    """(GPU bytes, bytes usable after the reserve for fragmentation and kernel workspaces)."""
    gpu = parse_size(gpu_memory)
    if not 0 <= reserve < 1:
        raise RadistillError(f"--reserve {reserve}: give a fraction in [0, 1), e.g. 0.05")
    return gpu, int(gpu * (1 - reserve))


def model_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """The dtype ``load_model`` gives the model (``auto``: bf16 on CUDA, fp32 elsewhere)."""
    from radistill.models.access import _resolve_dtype

    return _resolve_dtype(dtype, device)


def workload_dtype(dtype: torch.dtype) -> str:
    """:class:`Workload`'s name for a dtype's size (fp16 weighs what bf16 does)."""
    return "fp32" if dtype.itemsize == 4 else "bf16"


def model_name(config) -> str:
    return getattr(config, "_name_or_path", "") or config.model_type


def inference_model(config) -> tuple[Shapes, nn.Module]:
    """Meta models of ``config`` and the one an inference step runs: a built student's own model, or the teacher
    (whose hypothetical student keeps no head and is not used)."""
    if getattr(config, "model_type", None) == "radistill_hybrid":
        shapes = Shapes(config)
        return shapes, shapes.student
    shapes = Shapes(config, keep=0)
    return shapes, shapes.teacher


def load_config_and_tokenizer(model_id):
    """A model's config and tokenizer, no weights: all a plan needs besides the step's settings."""
    from radistill.models.access import load_config, load_tokenizer

    return load_config(model_id), load_tokenizer(model_id)


def layer_peak(shapes: Shapes, model: nn.Module, batch: int, seq: int, dtype: torch.dtype) -> int:
    """The largest no-grad layer forward of ``model`` at ``[batch, seq]``: its output plus its transient."""
    return max(p.kept + p.forward_extra for p in
               (shapes.profile(model, i, batch, seq, dtype, False, False) for i, _ in shapes.layer_groups(model)))


def repeated_kv_bytes(model: nn.Module, batch: int, seq: int, dtype: torch.dtype) -> int:
    """K and V repeated to every query head of one layer: transformers' SDPA path does this when it is given a mask
    and the layer has grouped KV heads (without a mask SDPA's own GQA reads the KV heads as they are)."""
    heads = [m.q_proj.out_features // m.head_dim for m in model.modules()
             if getattr(m, "num_key_value_groups", 1) > 1 and hasattr(m, "q_proj")]
    return 2 * batch * max(heads, default=0) * seq * model.config.head_dim * dtype.itemsize


def logit_bytes(rows: int, vocab: int, dtype: torch.dtype) -> int:
    """``rows`` positions through the LM head, then ``.float()`` (a copy unless fp32) and a log-softmax."""
    upcast = 4 if dtype.itemsize != 4 else 0
    return rows * vocab * (dtype.itemsize + upcast + 4)


def phase_peak(phases: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
    """The parts (e.g. activations, logits, caches) of the phase whose sum is largest."""
    return max(phases, key=sum)


def first_fit(step: str, candidates: Iterable[Strategy], estimate: Callable[[Strategy], Breakdown], limit: int,
              notes: Callable[[Strategy], list[str]]) -> StepPlan:
    """The first candidate whose estimate fits ``limit`` bytes; if none does, the smallest, marked as not fitting."""
    best: tuple[Strategy, Breakdown] | None = None
    for strategy in candidates:
        memory = estimate(strategy)
        if memory.total <= limit:
            return StepPlan(step, strategy, memory, True, notes(strategy))
        if best is None or memory.total < best[1].total:
            best = (strategy, memory)
    if best is None:
        raise RadistillError(f"{step}: nothing to plan")
    return StepPlan(step, best[0], best[1], False, notes(best[0]))


def size(nbytes: int) -> str:
    """Bytes in GiB, or in MiB below one GiB (a small model's plan is not all zeros)."""
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / (1 << 20):.1f} MiB"


def require_step_fit(plan: Plan, advice: dict[str, str], describe: Callable[[StepPlan], str]) -> None:
    """Raise before any compute if a step does not fit: its estimate by part, its leanest strategy (in
    ``describe``'s words) and ``advice[step]`` (what to change)."""
    failing = [s for s in plan.steps if not s.fits]
    if not failing:
        return
    lines = []
    for s in failing:
        m = s.memory
        parts = ", ".join(f"{k} {size(getattr(m, k))}" for k in ("weights", "activations", "logits", "caches")
                          if getattr(m, k))
        lines.append(f"{s.step} needs {size(m.total)} even with {describe(s)} ({parts}): {advice[s.step]}")
    raise RadistillError(f"does not fit in {size(plan.gpu_memory)} ({size(plan.budget)} after the reserve): "
                         + "; ".join(lines))


# ---- the scan ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeShape:
    """What of a probe sets the scan's memory (from its encoded items: no model needed)."""

    lengths: tuple[int, ...]  # tree-packed row length per item, in the fast scan's order (shortest items first)
    prompt: int  # tokens of the longest prompt (what mean ablation's means are measured on)
    scores: int  # distinct scored positions of the row that has the most (single-token choices: 1)
    branches: bool  # some choice has several tokens: forwards carry a 4D tree mask (else SDPA's causal kernel)

    @classmethod
    def of(cls, items: Sequence[EncodedItem]) -> "ProbeShape":
        order = sorted(range(len(items)), key=lambda i: items[i].max_length)  # as radistill.scan.fast.fast_scan
        packed = pack([items[i] for i in order])
        return cls(tuple(packed.lengths.tolist()), max(len(item.prompt_ids) for item in items),
                   int(packed.positions_per_row.max()), not packed.causal_only)

    @property
    def items(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return max(self.lengths)

    def chunks(self, size: int) -> set[tuple[int, int]]:
        """(prompts, tokens of the longest packed row) of each chunk of ``size`` prompts."""
        return {(len(self.lengths[i : i + size]), max(self.lengths[i : i + size]))
                for i in range(0, self.items, size)}


def scan_breakdown(shapes: Shapes, model: nn.Module, probe: ProbeShape, st: Strategy, dtype: torch.dtype,
                   heads_per_layer: int, ablation: str = "zero") -> Breakdown:
    """Peak bytes of the fast scan with ``st.prompt_chunk`` prompts cached and ``st.micro_batch`` rows per forward
    (see the module docstring): the largest phase of any chunk."""
    config, layout = model.config, shapes.layout
    a, hidden, vocab, hd = dtype.itemsize, config.hidden_size, config.vocab_size, layout.head_dim
    o_width = layout.num_heads * hd  # the o_proj input

    def chunk_phases(chunk: int, seq: int) -> list[tuple[int, int, int]]:
        rows = min(st.micro_batch, chunk * heads_per_layer)

        def mask(n: int) -> int:
            return n * seq * seq * a if probe.branches else 0

        def forward(n: int) -> int:  # with a mask, transformers' SDPA path repeats K/V per query head
            repeated = repeated_kv_bytes(model, n, seq, dtype) if probe.branches else 0
            return repeated + layer_peak(shapes, model, n, seq, dtype)

        def scoring(n: int) -> tuple[int, int]:  # (final norm's output + scored states, logits)
            positions = min(n * probe.scores, LOGIT_CHUNK)
            return n * seq * hidden * a + positions * hidden * a, logit_bytes(positions, vocab, dtype)

        mask_build = MASK_BUILD_BOOLS * seq * seq if probe.branches else 0
        cache = (layout.num_layers * chunk * seq * (2 * hidden + o_width) * a  # hidden_in, attn_out, o_input
                 + 2 * chunk * seq * hd * a + 3 * chunk * seq * INDEX_BYTES)  # cos/sin; ids, positions, segments
        final, clean_logits = scoring(chunk)
        # z, its head, attention, hidden; the ablated heads' o_proj columns; positions (cos/sin: in the profile)
        gathered = (rows * seq * (o_width + hd + 2 * hidden) * a + hidden * rows * hd * a
                    + rows * seq * INDEX_BYTES + mask(rows))
        tail, tail_logits = scoring(rows)
        return [(mask(chunk) + max(chunk * mask_build, forward(chunk)), 0, cache),
                (mask(chunk) + chunk * seq * hidden * a + final, clean_logits, cache),  # last output, then scores
                (gathered + max(rows * mask_build, forward(rows)), 0, cache),
                (gathered + tail, tail_logits, cache)]

    phases = [phase for chunk, seq in probe.chunks(st.prompt_chunk) for phase in chunk_phases(chunk, seq)]
    if ablation == "mean":  # before any chunk: prompts only (no mask), each head's slice upcast and summed in fp32
        n, seq = min(MEANS_BATCH, probe.items), probe.prompt
        upcast = n * seq * o_width * 4 * (2 if a != 4 else 1)
        phases.append((2 * n * seq * hidden * a + layer_peak(shapes, model, n, seq, dtype) + upcast, 0, 0))
    activations, logits, caches = phase_peak(phases)
    return Breakdown(weights=Shapes.params(model) * a, activations=activations, logits=logits, caches=caches)


def scan_candidates(probe: ProbeShape, batch_size: int, prompt_chunk: int, heads_per_layer: int) -> Iterator[Strategy]:
    """(rows per forward, prompts per chunk) in order of preference (module docstring)."""
    first_chunk = min(prompt_chunk, probe.items)
    for rows in _micro_batches(min(batch_size, first_chunk * heads_per_layer)):
        for chunk in _micro_batches(first_chunk):
            if chunk * heads_per_layer < rows:
                break
            yield Strategy(micro_batch=rows, trainable="none", optimizer="none", prompt_chunk=chunk)


def describe_scan(step: StepPlan) -> str:
    return (f"{step.strategy.micro_batch} (prompt, head) rows per forward, {step.strategy.prompt_chunk} prompts "
            "cached per chunk")


SCAN_ADVICE = ("use fewer pairs (--pairs) or a shorter probe (--probe), load the model in bf16 (--dtype bf16) if "
               "it is fp32, or use a GPU with more memory")


def plan_scan(config, items: Sequence[EncodedItem], gpu_memory: str | int, *, batch_size: int, prompt_chunk: int,
              dtype: torch.dtype, ablation: str = "zero", heads_per_layer: int | None = None, reserve: float = 0.05,
              name: str | None = None) -> Plan:
    """Plan the fast scan of ``config``'s model on ``items`` (encoded) in ``gpu_memory``, starting from
    ``batch_size`` rows per forward and ``prompt_chunk`` prompts per chunk."""
    gpu, limit = budget(gpu_memory, reserve)
    shapes, model = inference_model(config)
    probe = ProbeShape.of(items)
    heads = heads_per_layer or shapes.layout.num_heads
    candidates = list(scan_candidates(probe, batch_size, prompt_chunk, heads))

    def notes(st: Strategy) -> list[str]:
        lines = [f"probe: {probe.items} prompts, longest packed row {probe.width} tokens"
                 + ("" if probe.branches else ", single-token choices (no tree mask)")]
        if st.micro_batch < candidates[0].micro_batch:
            lines.append(f"rows per forward lowered from {candidates[0].micro_batch} to {st.micro_batch}")
        if st.prompt_chunk < probe.items:
            lines.append(f"{-(-probe.items // st.prompt_chunk)} chunks of prompts, each chunk's clean activations "
                         "cached in turn")
        return lines

    step = first_fit("scan", candidates, lambda st: scan_breakdown(shapes, model, probe, st, dtype, heads, ablation),
                     limit, notes)
    work = Workload(dtype=workload_dtype(dtype), probe_tokens=probe.width, scan_rows=batch_size)
    return Plan(name or model_name(config), gpu, limit, work, [step])


__all__ = ["ProbeShape", "SCAN_ADVICE", "budget", "describe_scan", "first_fit", "inference_model", "layer_peak",
           "load_config_and_tokenizer", "logit_bytes", "model_dtype", "model_name", "phase_peak", "plan_scan",
           "repeated_kv_bytes", "require_step_fit", "scan_breakdown", "scan_candidates", "size", "workload_dtype"]
