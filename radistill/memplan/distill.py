"""The plan of a distillation run, from its recipe: what ``radistill distill --gpu-memory`` checks and applies.

``plan_distill`` plans each enabled stage with that stage's own sequence length and batch, among the strategies
the trainer implements; ``recipe_overrides`` turns the chosen strategies into recipe settings, so the trainer does
what the plan printed: micro-batch and gradient accumulation, the optimizer (8-bit AdamW), stages 1/2's layer
blocks and streamed teacher, stage 3's activation checkpointing, logit chunk and LoRA.

Stage 3's teacher logits are the recipe's choice, never the plan's: stored top-k logits change the loss (a KL over
the top k + the rest) and take k * 6 + 4 bytes of disk per token, so they are planned only when the recipe asks
(``teacher_logits: topk``): then stage 3's teacher term is what it holds (the stored top-k of a micro-batch, not the
teacher) and a note gives the precompute's own peak and disk size. A stage 3 that does not fit with the teacher but
would with top-k logits says so in a note.
"""

from __future__ import annotations

from radistill.memplan.estimate import GiB, Estimator, Workload
from radistill.memplan.plan import Plan, StepPlan, eight_bit_optimizer, parse_size, plan_step
from radistill.memplan.shapes import Shapes


def stage_workload(recipe, stage: int) -> Workload:
    cfg = recipe.stage(stage)
    return Workload(seq_len=cfg.seq_len, batch_size=cfg.batch_size, dtype=recipe.dtype, lora_rank=cfg.lora_rank,
                    lora_targets=cfg.lora_targets, topk=cfg.teacher_topk)


def plan_distill(model, recipe, gpu_memory: str | int, reserve: float = 0.05) -> Plan:
    """Plan the recipe's enabled stages for ``model`` (a student directory/config, or a teacher config with the
    student's ``keep`` unknown: pass the student)."""
    from radistill.hybrid.memory import load_any_config

    config = model if hasattr(model, "to_dict") else load_any_config(model)
    gpu = parse_size(gpu_memory)
    budget = int(gpu * (1 - reserve))
    shapes = Shapes(config)
    eight_bit = eight_bit_optimizer()
    steps = []
    for s in recipe.enabled_stages():
        estimator = Estimator(shapes, stage_workload(recipe, s))
        trainable = "lora" if recipe.stage(s).trainable == "lora" else "full"
        teacher = "topk" if recipe.stage(s).teacher_logits == "topk" else "resident"
        step = plan_step(estimator, f"distill stage {s}", budget, eight_bit, trainable, trainer_only=True,
                         stage3_teacher=teacher if s == 3 else None)
        if s == 3:
            _teacher_logits_notes(step, estimator, recipe.stage(s), budget, eight_bit, trainable)
        steps.append(step)
    return Plan(str(model), gpu, budget, stage_workload(recipe, recipe.enabled_stages()[-1]), steps, {}, eight_bit)


def _teacher_logits_notes(step: StepPlan, estimator: Estimator, cfg, budget: int, eight_bit, trainable: str) -> None:
    """Stage 3 with stored top-k logits: the precompute's peak and disk size; with the teacher resident and no fit:
    whether stored top-k logits would fit."""
    from radistill.distill.teacher_logits import bytes_per_token

    disk = cfg.tokens * bytes_per_token(cfg.teacher_topk) / GiB
    if step.strategy.teacher == "topk":
        peak = estimator.topk_precompute(step.strategy)
        step.notes.append(f"before stage 3 the teacher alone stores its top-{cfg.teacher_topk} logits: peak "
                          f"{peak / GiB:.2f} GiB{'' if peak <= budget else ' (does not fit)'}, {disk:.1f} GiB on disk "
                          f"for {cfg.tokens:,} tokens")
        return
    if step.fits:
        return
    topk = plan_step(estimator, step.step, budget, eight_bit, trainable, trainer_only=True, stage3_teacher="topk")
    precompute = estimator.topk_precompute(topk.strategy)
    if topk.fits and precompute <= budget:
        step.notes.append(f"fits with --teacher-logits topk (opt-in: a top-{cfg.teacher_topk} KL, {disk:.1f} GiB on "
                          f"disk for {cfg.tokens:,} tokens): {topk.memory.total / GiB:.2f} GiB with "
                          f"{topk.strategy.describe()}, its precompute {precompute / GiB:.2f} GiB")


def recipe_overrides(plan: Plan, recipe) -> dict:
    """A partial recipe (for ``radistill.distill.recipe.merge``) with every memory setting of each planned stage: the
    micro-batch, with gradient accumulation raised so the sequences per step stay the same; the optimizer; stages
    1/2's ``layer_block`` (None: all layers in one pass) and ``teacher_offload``; stage 3's
    ``activation_checkpointing`` and logit chunk; LoRA where chosen. The plan decides these settings whatever the
    recipe had (they change memory and time; apart from 8-bit moments, which the plan takes only when fp32 AdamW
    cannot fit, not what is learned)."""
    stages: dict[int, dict] = {}
    for step in plan.steps:
        number = int(step.step.rsplit(" ", 1)[1])
        cfg = recipe.stage(number)
        st = step.strategy
        accum = cfg.grad_accum * max(1, cfg.batch_size // st.micro_batch)
        override = {"batch_size": st.micro_batch, "grad_accum": accum, "optimizer": st.optimizer}
        if number == 3:
            override["activation_checkpointing"] = st.checkpointing
            if st.logits_chunk:
                override["loss"] = {"chunk_tokens": st.logits_chunk}
        else:
            override["layer_block"] = st.layers_at_once or None
            override["teacher_offload"] = st.teacher == "streamed"
        if st.trainable == "lora":
            override["trainable"] = "lora"
        stages[number] = override
    return {"stages": stages}


__all__ = ["plan_distill", "recipe_overrides", "stage_workload"]
