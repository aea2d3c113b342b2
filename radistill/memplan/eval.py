"""The eval's memory plan (``radistill eval --gpu-memory``): each task's peak from the model config and the task's
own inputs (its tokenised prompts, the windows of its text), and the largest batch that fits.

A task makes one or more kinds of forward (:class:`Pass`), each sized for ``batch`` rows:

- ``last``: multiple choice whose choices are single tokens (``radistill.eval.choice.single_token_logprobs``):
  a decoder forward of the right-padded prompts, logits at each prompt's last position only;
- ``tree`` / ``flat``: multiple choice with longer choices (``radistill.probes.scoring.choice_logprobs``): a
  teacher's items tree-packed under a 4D mask, a hybrid's one row per (item, choice); logits at the scored
  positions, at most ``LOGIT_CHUNK`` at once;
- ``generate``: greedy generation of the KV answers: the prefill of the left-padded prompts, and the model's cache
  at prompt + new tokens;
- ``ppl``: perplexity windows: a decoder forward (no cache), then the LM head and cross-entropy at the scored
  positions, at most perplexity's own ``LOGIT_CHUNK`` at once.

Every forward: the embeddings and one layer's input beside the largest layer's no-grad forward (meta dry runs,
:meth:`Shapes.profile`), the padding or tree mask, and SDPA's repeated K/V under a mask. A task's peak is its
largest pass; the batch shrinks by halves from the one the task would use (``task_batch_size``) until it fits.
Batch size changes only how the rows are grouped: each row's numbers are the same.

lm-eval tasks are not planned: how long their requests are is known only to lm-eval once it has loaded them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from radistill.eval.perplexity import LOGIT_CHUNK as PPL_LOGIT_CHUNK
from radistill.eval.tasks import task_batch_size
from radistill.memplan.estimate import Breakdown, Strategy, Workload
from radistill.memplan.plan import Plan, StepPlan, _micro_batches
from radistill.memplan.scan import (
    INDEX_BYTES, MASK_BUILD_BOOLS, budget, first_fit, inference_model, layer_peak, logit_bytes, model_name,
    phase_peak, repeated_kv_bytes, workload_dtype,
)
from radistill.memplan.shapes import Shapes
from radistill.probes.items import EncodedItem
from radistill.probes.scoring import LOGIT_CHUNK, pack

ADVICE = {
    "kv": "use fewer pairs (--kv-pairs: the longest prompt sets every row's width) or --no-generate (generation "
          "keeps a KV cache)",
    "ppl": "lower --seq-len (the perplexity window: its activations grow with it)",
    "jsonl": "shorten the longest items of the task file",
}
GPU_ADVICE = "or use a GPU with more memory"
KINDS = {"last": "choices scored at the prompt's last token", "tree": "choices tree-packed into one row per item",
         "flat": "one row per choice", "generate": "greedy generation", "ppl": "perplexity windows"}


@dataclass(frozen=True)
class Pass:
    """One kind of forward a task makes, with the shapes its inputs fix (module docstring)."""

    kind: str  # last | tree | flat | generate | ppl
    width: int  # tokens of the longest row
    rows_per_item: int = 1  # flat packing: one row per choice
    scores: int = 1  # scored positions of the row (window) that has the most
    new_tokens: int = 0  # generate
    padded: bool = True  # rows differ in length: the model builds a [rows, 1, T, T] mask from the padding


def choice_pass(items: list[EncodedItem], hybrid: bool) -> Pass:
    """The forward ``radistill.eval.choice.choice_accuracy`` makes for ``items``."""
    prompts = {len(item.prompt_ids) for item in items}
    if all(len(c) == 1 for item in items for c in item.choice_ids):
        return Pass("last", max(prompts), padded=len(prompts) > 1)
    packed = pack(items, tree=not hybrid)
    return Pass("flat" if hybrid else "tree", packed.input_ids.shape[1],
                rows_per_item=max(len(item.choice_ids) for item in items) if hybrid else 1,
                scores=int(packed.positions_per_row.max()), padded=len(set(packed.lengths.tolist())) > 1)


def generate_pass(items: list[EncodedItem]) -> Pass:
    """``radistill.eval.kv.greedy_exact_match``: left-padded prompts, the longest answer + 1 new tokens."""
    prompts = {len(item.prompt_ids) for item in items}
    new = max(len(c) for item in items for c in item.choice_ids) + 1
    return Pass("generate", max(prompts), new_tokens=new, padded=len(prompts) > 1)


def ppl_pass(windows: list[tuple[int, int, int]]) -> Pass:
    """``radistill.eval.perplexity.perplexity`` over ``windows`` (``window_spans``)."""
    widths = {end - begin for begin, end, _ in windows}
    return Pass("ppl", max(widths), scores=max(end - first for _, end, first in windows), padded=len(widths) > 1)


def cache_bytes(model: nn.Module, length: int, dtype: torch.dtype) -> int:
    """One sequence's cache at ``length`` tokens: every KV head of a teacher; kept KV heads + states of a hybrid."""
    from radistill.hybrid.memory import attention_windows, student_rows, teacher_rows
    from radistill.models.access import layout_from_config

    config = model.config
    if getattr(config, "model_type", None) == "radistill_hybrid":
        row = student_rows(config, [length], dtype.itemsize)[0]
    else:
        row = teacher_rows(layout_from_config(config), [length], dtype.itemsize,
                           windows=attention_windows(config))[0]
    return row.kv_bytes + row.ssm_bytes + row.conv_bytes


def pass_breakdown(shapes: Shapes, model: nn.Module, p: Pass, batch: int, dtype: torch.dtype) -> Breakdown:
    """Peak bytes of pass ``p`` with ``batch`` items (or windows) per forward."""
    a, hidden, vocab = dtype.itemsize, model.config.hidden_size, model.config.vocab_size
    rows, seq = batch * p.rows_per_item, p.width
    state = rows * seq * hidden * a  # one [rows, seq, hidden] hidden state

    if p.kind == "tree":  # the additive 4D mask in the model's dtype, made from bool comparisons
        mask, mask_build = rows * seq * seq * a, rows * seq * seq * MASK_BUILD_BOOLS
    else:  # the padding mask becomes a bool [rows, 1, seq, seq] mask; none without padding
        mask, mask_build = (rows * seq * seq if p.padded else 0), 0
    repeat = repeated_kv_bytes(model, rows, seq, dtype) if mask else 0
    # the embeddings and the layer's input beside the layer's own output and transient
    forward = mask + max(mask_build, 2 * state + repeat + layer_peak(shapes, model, rows, seq, dtype))

    if p.kind in ("last", "tree", "flat"):
        positions = rows if p.kind == "last" else min(rows * p.scores, LOGIT_CHUNK)
        phases = [(forward, 0, 0), (mask + state + positions * hidden * a, logit_bytes(positions, vocab, dtype), 0)]
    elif p.kind == "generate":
        full = rows * cache_bytes(model, seq + p.new_tokens, dtype)
        phases = [(forward, 0, rows * cache_bytes(model, seq, dtype)), (0, logit_bytes(rows, vocab, dtype), full)]
    else:  # ppl: the final states, and per chunk of scored positions their states, (row, position, target) ids
        positions = min(rows * p.scores, PPL_LOGIT_CHUNK)
        scoring = state + positions * hidden * a + 3 * rows * p.scores * INDEX_BYTES
        phases = [(forward, 0, 0), (scoring, logit_bytes(positions, vocab, dtype), 0)]
    activations, logits, caches = phase_peak(phases)
    return Breakdown(weights=Shapes.params(model) * a, activations=activations, logits=logits, caches=caches)


def task_passes(spec, config, tokenizer, eval_config, hybrid: bool) -> tuple[Pass, ...]:
    """The passes of one task (``radistill.eval.tasks.TaskSpec``), from its inputs tokenised as the task does."""
    from radistill.eval.perplexity import CHARS_PER_TOKEN, read_text, window_spans
    from radistill.probes.items import encode_items, load_jsonl
    from radistill.probes.kv import KVProbeConfig, kv_items

    context = getattr(config, "max_position_embeddings", None)
    if spec.kind == "kv":
        passes = []
        for pairs in eval_config.kv.pairs:
            probe = KVProbeConfig(pairs=pairs, samples=eval_config.kv.samples, seed=eval_config.kv.seed)
            items = encode_items(tokenizer, kv_items(tokenizer, probe), max_length=context)
            passes.append(choice_pass(items, hybrid))
            if eval_config.kv.generate:
                passes.append(generate_pass(items))
        return tuple(passes)
    if spec.kind == "fidelity":  # the student and its teacher at once: not planned, runs at --batch-size / 4
        return ()
    if spec.kind == "jsonl":
        return (choice_pass(encode_items(tokenizer, load_jsonl(spec.path), max_length=context), hybrid),)
    seq_len = eval_config.seq_len or context
    text = read_text(eval_config.text, eval_config.ppl_tokens * CHARS_PER_TOKEN)
    tokens = min(len(tokenizer(text).input_ids), eval_config.ppl_tokens)
    if not seq_len or tokens < 2:  # nothing to size: the task itself says what is missing
        return ()
    return (ppl_pass(window_spans(tokens, seq_len, eval_config.stride or seq_len - 1)),)


def plan_eval(config, tokenizer, eval_config, gpu_memory: str | int, *, dtype: torch.dtype, reserve: float = 0.05,
              name: str | None = None) -> Plan:
    """Plan every task of ``eval_config`` but lm-eval's for ``config``'s model in ``gpu_memory``: one step per task
    (``eval NAME``), each with the largest batch (at most the task's usual one) that fits."""
    gpu, limit = budget(gpu_memory, reserve)
    shapes, model = inference_model(config)
    hybrid = model is shapes.student
    steps, widths = [], []
    for spec in eval_config.specs():
        if spec.kind == "lm_eval":
            continue
        passes = task_passes(spec, config, tokenizer, eval_config, hybrid)
        if not passes:
            continue
        widths += [p.width for p in passes]
        first = task_batch_size(spec, eval_config.batch_size)

        def estimate(st: Strategy, passes=passes) -> Breakdown:
            return max((pass_breakdown(shapes, model, p, st.micro_batch, dtype) for p in passes),
                       key=lambda b: b.total)

        def notes(st: Strategy, first=first, passes=passes) -> list[str]:
            kinds = ", ".join(KINDS[k] for k in dict.fromkeys(p.kind for p in passes))
            lines = [f"{kinds}; rows of up to {max(p.width for p in passes)} tokens"]
            if st.micro_batch < first:
                lines.append(f"batch lowered from {first} to {st.micro_batch}")
            return lines

        candidates = (Strategy(micro_batch=b, trainable="none", optimizer="none", teacher="none")
                      for b in _micro_batches(first))
        steps.append(first_fit(f"eval {spec.name}", candidates, estimate, limit, notes))
    work = Workload(dtype=workload_dtype(dtype), eval_batch=eval_config.batch_size,
                    eval_context=max(widths, default=Workload.eval_context))
    return Plan(name or model_name(config), gpu, limit, work, steps)


def describe_eval(step: StepPlan) -> str:
    return f"batch {step.strategy.micro_batch}"


def eval_batches(plan: Plan) -> dict[str, int]:
    """Task name -> the batch its plan chose."""
    return {s.step.removeprefix("eval "): s.strategy.micro_batch for s in plan.steps}


def eval_advice(plan: Plan, eval_config) -> dict[str, str]:
    """What to change for each planned task, by kind (for ``require_step_fit``)."""
    kinds = {spec.name: spec.kind for spec in eval_config.specs()}
    return {s.step: f"{ADVICE[kinds[s.step.removeprefix('eval ')]]}, {GPU_ADVICE}" for s in plan.steps}


__all__ = ["ADVICE", "Pass", "cache_bytes", "choice_pass", "describe_eval", "eval_advice", "eval_batches",
           "generate_pass", "pass_breakdown", "plan_eval", "ppl_pass", "task_passes"]
