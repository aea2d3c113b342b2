"""The memory plan: for each pipeline step, the first strategy (in order of preference) whose estimate fits.

Preference order (:func:`candidates`): what trains best first, then what runs fastest. Full training before LoRA,
fp32 AdamW before 8-bit (only offered when torchao or bitsandbytes imports), no activation checkpointing before
checkpointing (it costs a second forward), the requested micro-batch before smaller ones (gradient accumulation
keeps the tokens per step), larger logit chunks before smaller ones. Stages 1/2 train fewer layers at a time
before streaming the teacher; stage 3 streams precomputed top-k teacher logits as the last resort. The trainer
reads top-k logits only when its recipe opts in (``teacher_logits: topk``: they change the loss and cost k * 6 + 4
bytes of disk per token), so the plans it applies (``trainer_only``) never choose them; a recipe's own choice of
teacher logits is planned as given (``stage3_teacher``). A streamed teacher they do choose (``teacher_offload``).

The budget is ``gpu_memory * (1 - reserve)``: the reserve covers the CUDA allocator's fragmentation and what the
estimates leave out (kernel workspaces, the CUDA context when the cap is the card's size).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from radistill.memplan.estimate import Breakdown, Estimator, GiB, ServingLimits, Strategy, Workload, serving_limits
from radistill.memplan.shapes import Shapes
from radistill.utils.errors import RadistillError
from radistill.utils.io import write_json_atomic
from radistill.utils.optim import eight_bit_library as eight_bit_optimizer

STEPS = ("scan", "build", "distill stage 1", "distill stage 2", "distill stage 3", "eval", "finetune")
# teacher handling radistill distill's plan may choose (streamed: stages 1/2's teacher_offload; top-k logits are opt-in)
TRAINER_TEACHERS = ("resident", "streamed")
LOGIT_CHUNKS = (2048, 512, 128)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str | int | float) -> int:
    """``"24GiB"``, ``"24 GB"``, ``"80g"`` (= GiB), or a number of bytes -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = (match.group(2).lower() if match else "")
    unit = {"g": "gib", "m": "mib", "k": "kib", "t": "tib"}.get(unit, unit)
    if match is None or unit not in _UNITS:
        raise RadistillError(f"--gpu-memory {text!r} is not a size: write e.g. 24GiB, 24GB or 80g")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass
class StepPlan:
    step: str
    strategy: Strategy
    memory: Breakdown
    fits: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"step": self.step, "strategy": self.strategy.to_dict(), "memory": self.memory.to_dict(),
                "fits": self.fits, "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, data: dict) -> "StepPlan":
        return cls(data["step"], Strategy.from_dict(data["strategy"]), Breakdown.from_dict(data["memory"]),
                   data["fits"], list(data["notes"]))


@dataclass
class Plan:
    """The whole pipeline's plan (JSON: :meth:`to_dict` / :meth:`from_dict`)."""

    model: str
    gpu_memory: int
    budget: int
    workload: Workload
    steps: list[StepPlan]
    serving: dict[str, ServingLimits] = field(default_factory=dict)
    eight_bit: str | None = None

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.steps)

    def step(self, name: str) -> StepPlan:
        for s in self.steps:
            if s.step == name:
                return s
        raise RadistillError(f"the plan has no step {name!r}; steps: {', '.join(s.step for s in self.steps)}")

    def to_dict(self) -> dict:
        return {"model": self.model, "gpu_memory": self.gpu_memory, "budget": self.budget, "fits": self.fits,
                "workload": self.workload.to_dict(), "eight_bit": self.eight_bit,
                "steps": [s.to_dict() for s in self.steps],
                "serving": {k: v.to_dict() for k, v in self.serving.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        return cls(data["model"], data["gpu_memory"], data["budget"], Workload(**data["workload"]),
                   [StepPlan.from_dict(s) for s in data["steps"]],
                   {k: ServingLimits(**v) for k, v in data.get("serving", {}).items()}, data.get("eight_bit"))

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())


def _micro_batches(batch: int) -> list[int]:
    sizes, b = [], batch
    while b >= 1:
        sizes.append(b)
        b //= 2
    return sizes


def candidates(step: str, work: Workload, layers: int, eight_bit: bool, trainable: str = "full",
               trainer_only: bool = False, stage3_teacher: str | None = None) -> Iterator[Strategy]:
    """Strategies for ``step`` in order of preference (module docstring). ``trainer_only``: only what
    ``radistill distill`` chooses by itself (:data:`TRAINER_TEACHERS`), for plans it applies. ``stage3_teacher``:
    stage 3's teacher as the recipe sets it (``resident`` or ``topk``), the only one planned; None: resident, then
    top-k logits with LoRA as the last resort."""
    optimizers = ("adamw", "adamw8bit") if eight_bit else ("adamw",)
    teachers = TRAINER_TEACHERS if trainer_only else ("resident", "streamed", "topk")
    batches = _micro_batches(work.batch_size)
    if step == "scan":
        # a chunk never holds more prompts than the probe has (else the printed strategy would claim it does)
        chunks = sorted({min(c, work.probe_samples) for c in (256, 128, 64, 32, 16, 8)}, reverse=True)
        for chunk, rows in itertools.product(chunks, _micro_batches(work.scan_rows)):
            yield Strategy(micro_batch=rows, trainable="none", optimizer="none", prompt_chunk=chunk)
    elif step == "build":
        yield Strategy(trainable="none", optimizer="none")
        yield Strategy(trainable="none", optimizer="none", device="cpu")
    elif step in ("distill stage 1", "distill stage 2"):
        kinds = "recurrent" if step.endswith("1") else "full"
        at_once = [0] + [k for k in (8, 4, 2, 1) if k < layers]  # 0: all layers in one pass
        stage_teachers = [t for t in ("resident", "streamed") if t in teachers]
        for teacher, k, optimizer, mb in itertools.product(stage_teachers, at_once, optimizers, batches):
            yield Strategy(micro_batch=mb, trainable=kinds, optimizer=optimizer, layers_at_once=k, teacher=teacher)
    elif step in ("distill stage 3", "finetune"):
        stage3 = step.endswith("3")
        teacher = (stage3_teacher or "resident") if stage3 else "none"
        modes = [("full", o, teacher) for o in optimizers] if trainable == "full" else []
        topk = [("lora", "adamw", "topk")] if stage3 and stage3_teacher is None and "topk" in teachers else []
        modes += [("lora", "adamw", teacher)] + topk
        for (kind, optimizer, source), ckpt, mb, chunk in itertools.product(modes, (False, True), batches,
                                                                           LOGIT_CHUNKS):
            yield Strategy(micro_batch=mb, trainable=kind, optimizer=optimizer, checkpointing=ckpt, teacher=source,
                           logits_chunk=min(chunk, mb * work.seq_len))
    elif step == "eval":
        for mb in _micro_batches(work.eval_batch):
            yield Strategy(micro_batch=mb, trainable="none", optimizer="none", teacher="none")
    else:
        raise RadistillError(f"unknown step {step!r}: choose from {', '.join(STEPS)}")


def _estimate(estimator: Estimator, step: str, strategy: Strategy) -> Breakdown:
    if step.startswith("distill stage") and step[-1] in "12":
        return estimator.layerwise(int(step[-1]), strategy)
    return {"scan": estimator.scan, "build": estimator.build, "distill stage 3": estimator.distill3,
            "eval": estimator.eval, "finetune": estimator.finetune}[step](strategy)


def _notes(st: Strategy, work: Workload, layers: int, eight_bit: str | None) -> list[str]:
    notes = []
    if st.micro_batch < work.batch_size and st.trainable != "none":
        notes.append(f"gradient accumulation x{work.batch_size // st.micro_batch} keeps {work.batch_size} "
                     "sequences per step")
    if st.layers_at_once and st.layers_at_once < layers:
        notes.append(f"{-(-layers // st.layers_at_once)} passes over the data, one per block of "
                     f"{st.layers_at_once} layer(s); the other student layers stay off the GPU")
    if st.teacher == "streamed":
        notes.append("teacher weights in CPU memory, moved to the GPU one module at a time for its forward "
                     "(teacher_offload)")
    if st.teacher == "topk":
        from radistill.distill.teacher_logits import bytes_per_token

        notes.append(f"teacher top-{work.topk} logits precomputed once into RUN/teacher_logits "
                     f"({bytes_per_token(work.topk)} B/token on disk) and read from there, the teacher off the GPU: "
                     "radistill distill --teacher-logits topk (opt-in; --gpu-memory never chooses it)")
    if st.optimizer == "adamw8bit":
        notes.append(f"8-bit AdamW from {eight_bit}")
    if st.trainable == "lora":
        notes.append(f"LoRA r={work.lora_rank} on {work.lora_targets}; base weights frozen in {work.dtype}")
    if st.device == "cpu":
        notes.append("built on the CPU (--device cpu), then loaded onto the GPU by the next step")
    return notes


def plan_step(estimator: Estimator, step: str, budget: int, eight_bit: str | None = None,
              trainable: str = "full", trainer_only: bool = False, stage3_teacher: str | None = None) -> StepPlan:
    """The first candidate of ``step`` that fits ``budget``; if none does, the smallest one, marked as not fitting."""
    work, layers = estimator.w, estimator.s.layout.num_layers
    best: tuple[int, Strategy, Breakdown] | None = None
    for strategy in candidates(step, work, layers, eight_bit is not None, trainable, trainer_only, stage3_teacher):
        memory = _estimate(estimator, step, strategy)
        if memory.total <= budget:
            return StepPlan(step, strategy, memory, True, _notes(strategy, work, layers, eight_bit))
        if best is None or memory.total < best[0]:
            best = (memory.total, strategy, memory)
    _, strategy, memory = best
    return StepPlan(step, strategy, memory, False, _notes(strategy, work, layers, eight_bit))


def make_plan(model, gpu_memory: str | int, *, keep: int | None = None, state_size: int | None = None,
              mixer: str = "discrete_mamba2", workload: Workload | None = None, steps: tuple[str, ...] = STEPS,
              reserve: float = 0.05, finetune_trainable: str = "lora", serving_context: int = 32768) -> Plan:
    """Plan ``steps`` for ``model`` (directory, config.json, HF id, preset shape name, or an HF config object).

    A teacher needs ``keep`` (and usually ``state_size``) to describe its student; a built student has both.
    """
    from radistill.hybrid.memory import load_any_config

    config = model if hasattr(model, "to_dict") else load_any_config(model)
    gpu = parse_size(gpu_memory)
    if not 0 <= reserve < 1:
        raise RadistillError(f"--reserve {reserve}: give a fraction in [0, 1), e.g. 0.05")
    budget = int(gpu * (1 - reserve))
    work = workload or Workload()
    if keep is None and set(steps) <= {"scan"} and getattr(config, "model_type", None) != "radistill_hybrid":
        keep = 0  # the scan comes before any student: its shape does not matter here
    shapes = Shapes(config, keep=keep, state_size=state_size, mixer=mixer)
    estimator = Estimator(shapes, work)
    eight_bit = eight_bit_optimizer()
    planned = [plan_step(estimator, step, budget, eight_bit, finetune_trainable if step == "finetune" else "full")
               for step in steps]
    serving = {which: serving_limits(shapes, which, budget, work.dtype, serving_context)
               for which in ("teacher", "student")}
    name = str(model) if not hasattr(model, "to_dict") else getattr(config, "_name_or_path", "") or config.model_type
    return Plan(name, gpu, budget, work, planned, serving, eight_bit)


def require_fit(plan: Plan, steps: tuple[str, ...] | None = None) -> None:
    """Raise before any compute if a step of ``steps`` (default: all) does not fit, with the numbers and the fix."""
    failing = [s for s in plan.steps if not s.fits and (steps is None or s.step in steps)]
    if not failing:
        return
    lines = []
    for s in failing:
        m = s.memory
        parts = ", ".join(f"{k} {getattr(m, k) / GiB:.1f}" for k in
                          ("weights", "trainable", "activations", "teacher", "logits", "caches") if getattr(m, k))
        lines.append(f"{s.step} needs {m.total / GiB:.1f} GiB even with its leanest strategy "
                     f"({s.strategy.describe()}; {parts} GiB)")
    raise RadistillError(
        f"does not fit in {plan.gpu_memory / GiB:.1f} GiB ({plan.budget / GiB:.1f} GiB after the reserve): "
        + "; ".join(lines) + ". Lower --seq-len or --micro-batch, keep fewer heads, install torchao for 8-bit "
        "optimizer states, or use a GPU with more memory (`radistill plan` shows every part)"
    )


__all__ = ["Plan", "STEPS", "StepPlan", "TRAINER_TEACHERS", "candidates", "eight_bit_optimizer", "make_plan",
           "parse_size", "plan_step", "require_fit"]
