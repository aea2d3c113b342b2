"""Load the teacher and student a run needs and hand them to the :class:`Trainer` (what the CLI calls)."""

from __future__ import annotations

from pathlib import Path

from radistill.distill.checkpoint import run_artifacts
from radistill.distill.data import check_source
from radistill.distill.recipe import DistillRecipe, merge
from radistill.distill.trainer import StageResult, Trainer
from radistill.models.access import load_model, resolve_device
from radistill.scan.distributed import init_from_env, world_size
from radistill.utils.console import console, is_main_process
from radistill.utils.errors import RadistillError


def run_distill(student_dir: str | Path, teacher_id: str | Path, recipe: DistillRecipe, run_dir: str | Path,
                device: str = "auto", resume: bool = False) -> list[StageResult]:
    """Distill ``student_dir`` from ``teacher_id`` into ``run_dir`` following ``recipe``.

    Under ``torchrun`` each rank takes its GPU (``LOCAL_RANK``) and joins the process group. The student is
    trained in fp32 (master weights) and loaded into CPU memory: the trainer moves to the GPU what each stage needs
    (stages 1/2 only the layers they train). The teacher is kept on the device, in bf16 on CUDA when the recipe
    computes in bf16 (with ``shard_teacher``: loaded into CPU memory, then sharded onto the devices; with a stage 1/2
    that has ``teacher_offload``: loaded into CPU memory, the trainer moving it to the device for the stages that
    hold it there). With ``recipe.gpu_memory`` the run is first planned for that much GPU memory
    (:func:`fit_recipe`).
    """
    if not recipe.enabled_stages():
        raise RadistillError("no stage is enabled: pass --stages (e.g. --stages 2,3) or enable one in the recipe")
    found = run_artifacts(Path(run_dir))
    if found and not resume:  # before loading anything (the Trainer checks again, for callers that skip this)
        raise RadistillError(f"{run_dir} already holds a distillation run ({', '.join(found)}): pass --resume to "
                             "continue it, or choose a new --out")
    check_source(recipe.data)  # a bad data file fails now, not after loading two models
    if recipe.gpu_memory is not None:
        recipe = fit_recipe(student_dir, recipe)
    device = init_from_env() or resolve_device(device)
    for line in whole_step_notes(recipe, world_size()) if is_main_process() else ():
        console.print(f"[yellow]warning:[/] {line}", soft_wrap=True)
    teacher_dtype = "bf16" if device.startswith("cuda") and recipe.dtype == "bf16" else "fp32"
    student, _ = load_model(student_dir, dtype="fp32", device="cpu")
    # a sharded teacher reaches the device only as shards (the Trainer shards it), never whole
    sharded = recipe.shard_teacher and world_size() > 1
    # a streamed teacher need never fit on the device whole
    streamed = any(recipe.stage(s).teacher_offload for s in recipe.enabled_stages())
    teacher, tokenizer = load_model(teacher_id, dtype=teacher_dtype, device="cpu" if sharded or streamed else device)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise RadistillError(
            f"the student's vocabulary ({student.config.vocab_size}) differs from the teacher's "
            f"({teacher.config.vocab_size}): build the student from this teacher"
        )
    selection = Path(student_dir) / "selection.json"
    extra = (selection,) if selection.exists() else ()
    if device.startswith("cuda") and not recipe.compile and is_main_process():
        console.print("[dim]compile is off: --compile (recipe `compile: true`) trains stage 3 of a 1B model 1.85x "
                      "faster on an H100, after a one-off compilation (benchmarks/results/distill.md)[/]")
    trainer = Trainer(student, teacher, tokenizer, recipe, Path(run_dir), device, export_files=extra)
    results = trainer.run(resume=resume)
    for r in results if is_main_process() else ():
        console.print(f"stage {r.stage}: {r.steps:,} steps, {r.tokens:,} tokens, loss {r.loss:.4f}, {r.seconds:.0f} s")
    return results


def whole_step_notes(recipe: DistillRecipe, ranks: int) -> list[str]:
    """One line per enabled stage whose token budget is not a whole number of optimizer steps, saying what runs.

    The rule (the :class:`Trainer`'s): a stage runs ``max(1, tokens // tokens_per_step)`` optimizer steps of
    ``seq_len * batch_size * grad_accum * ranks`` tokens (ranks: 1 for stages 1/2, which split layers, not data),
    so a budget is rounded down to whole steps, and up to one step when it is smaller than one.
    """
    notes = []
    for number in recipe.enabled_stages():
        cfg = recipe.stage(number)
        shards = 1 if number in (1, 2) else ranks
        per_step = cfg.seq_len * cfg.batch_size * cfg.grad_accum * shards
        steps = max(1, cfg.tokens // per_step)
        if steps * per_step != cfg.tokens:
            notes.append(
                f"stage {number}: {cfg.tokens:,} tokens is not a whole number of optimizer steps of {per_step:,} "
                f"tokens ({cfg.batch_size} x {cfg.seq_len} x {cfg.grad_accum} accum x {shards} ranks); it runs "
                f"{steps:,} step{'s' if steps != 1 else ''} = {steps * per_step:,} tokens"
            )
    return notes


def fit_recipe(student_dir: str | Path, recipe: DistillRecipe) -> DistillRecipe:
    """Plan the run for ``recipe.gpu_memory`` (printed), raise before any compute if it cannot fit, and return the
    recipe with the plan's settings applied (:func:`radistill.memplan.distill.recipe_overrides`: micro-batch,
    gradient accumulation, optimizer, layer blocks, streamed teacher, activation checkpointing, logit chunk, LoRA)."""
    from radistill.memplan.cli import print_plan
    from radistill.memplan.distill import plan_distill, recipe_overrides
    from radistill.memplan.plan import require_fit

    plan = plan_distill(student_dir, recipe, recipe.gpu_memory)
    print_plan(plan)
    require_fit(plan)
    return merge(recipe, recipe_overrides(plan, recipe))
