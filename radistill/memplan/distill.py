"""The plan of a distillation run, from its recipe: what ``radistill distill --gpu-memory`` checks and applies.

``plan_distill`` plans each enabled stage with that stage's own sequence length and batch, among the strategies
the trainer implements; ``recipe_overrides`` turns the chosen strategies into recipe settings, so the trainer does
what the plan printed: micro-batch and gradient accumulation, the optimizer (8-bit AdamW), stages 1/2's layer
blocks, stage 3's activation checkpointing, logit chunk and LoRA.
"""

from __future__ import annotations

from radistill.memplan.estimate import Estimator, Workload
from radistill.memplan.plan import Plan, eight_bit_optimizer, parse_size, plan_step
from radistill.memplan.shapes import Shapes


def stage_workload(recipe, stage: int) -> Workload:
    cfg = recipe.stage(stage)
    return Workload(seq_len=cfg.seq_len, batch_size=cfg.batch_size, dtype=recipe.dtype, lora_rank=cfg.lora_rank,
                    lora_targets=cfg.lora_targets)


def plan_distill(model, recipe, gpu_memory: str | int, reserve: float = 0.05) -> Plan:
    """Plan the recipe's enabled stages for ``model`` (a student directory/config, or a teacher config with the
    student's ``keep`` unknown: pass the student)."""
    from radistill.hybrid.memory import load_any_config

    config = model if hasattr(model, "to_dict") else load_any_config(model)
    gpu = parse_size(gpu_memory)
    budget = int(gpu * (1 - reserve))
    shapes = Shapes(config)
    eight_bit = eight_bit_optimizer()
    steps = [plan_step(Estimator(shapes, stage_workload(recipe, s)), f"distill stage {s}", budget, eight_bit,
                       "lora" if recipe.stage(s).trainable == "lora" else "full", trainer_only=True)
             for s in recipe.enabled_stages()]
    return Plan(str(model), gpu, budget, stage_workload(recipe, recipe.enabled_stages()[-1]), steps, {}, eight_bit)


def recipe_overrides(plan: Plan, recipe) -> dict:
    """A partial recipe (for ``radistill.distill.recipe.merge``) with every memory setting of each planned stage: the
    micro-batch, with gradient accumulation raised so the sequences per step stay the same; the optimizer; stages
    1/2's ``layer_block`` (None: all layers in one pass); stage 3's ``activation_checkpointing`` and logit chunk;
    LoRA where chosen. The plan decides these settings whatever the recipe had (they change memory and time; apart
    from 8-bit moments, which the plan takes only when fp32 AdamW cannot fit, not what is learned)."""
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
        if st.trainable == "lora":
            override["trainable"] = "lora"
        stages[number] = override
    return {"stages": stages}


__all__ = ["plan_distill", "recipe_overrides", "stage_workload"]
