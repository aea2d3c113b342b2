"""``radistill distill STUDENT --teacher TEACHER --data SRC --out RUN``: the MOHAWK stages on a hybrid student."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from radistill.distill.recipe import STAGES, DistillRecipe, merge, read_recipe_file, with_recommended
from radistill.utils.cli_options import renamed
from radistill.utils.errors import RadistillError


def overrides_from_flags(*, stages: str | None = None, data: str | None = None, seq_len: int | None = None,
                         batch_size: int | None = None, grad_accum: int | None = None, seed: int | None = None,
                         dtype: str | None = None, compile: bool | None = None, tensorboard: bool | None = None,
                         checkpoint_every: int | None = None, gpu_memory: str | None = None,
                         parallel: str | None = None, shard_teacher: bool | None = None,
                         tokens: dict[int, int | None] | None = None,
                         lr: dict[int, float | None] | None = None, teacher_logits: str | None = None,
                         teacher_topk: int | None = None) -> dict[str, Any]:
    """CLI flags as a partial recipe (``None`` = not given); per-stage settings apply to every stage, the teacher
    logits' to stage 3."""
    out: dict[str, Any] = {}
    per_stage: dict[int, dict[str, Any]] = {s: {} for s in STAGES}
    if stages is not None:
        try:
            chosen = {int(s) for s in stages.split(",") if s.strip()}
        except ValueError as exc:
            raise RadistillError(f"--stages {stages!r}: give stage numbers separated by commas, e.g. 2,3") from exc
        if not chosen or not chosen <= set(STAGES):
            raise RadistillError(f"--stages {stages!r}: choose from 1, 2, 3 (e.g. --stages 2,3)")
        for s in STAGES:
            per_stage[s]["enabled"] = s in chosen
    shared = dict(seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, checkpoint_every=checkpoint_every)
    for s in STAGES:
        per_stage[s].update({k: v for k, v in shared.items() if v is not None})
        if (tokens or {}).get(s) is not None:
            per_stage[s]["tokens"] = tokens[s]
        if (lr or {}).get(s) is not None:
            per_stage[s]["lr"] = lr[s]
    for key, value in dict(teacher_logits=teacher_logits, teacher_topk=teacher_topk).items():
        if value is not None:
            per_stage[3][key] = value
    out["stages"] = {s: v for s, v in per_stage.items() if v}
    if data is not None:  # a local file is recorded absolute, so that --resume works from any directory
        out["data"] = {"source": str(Path(data).resolve()) if Path(data).exists() else data}
    for key, value in dict(seed=seed, dtype=dtype, compile=compile, tensorboard=tensorboard, gpu_memory=gpu_memory,
                           parallel=parallel, shard_teacher=shard_teacher).items():
        if value is not None:
            out[key] = value
    return out


def split_data_flags(values: list[str] | None) -> tuple[str | None, float | None]:
    """``--data SRC [--data teacher:SHARE]`` -> (the source, the teacher-text share or None)."""
    sources, share = [], None
    for value in values or []:
        if value.startswith("teacher:"):
            try:
                share = float(value.removeprefix("teacher:"))
            except ValueError as exc:
                raise RadistillError(f"--data {value!r}: write the teacher-text share as teacher:0.25") from exc
        else:
            sources.append(value)
    if len(sources) > 1:
        raise RadistillError(f"--data names {len(sources)} sources ({', '.join(sources)}): give one file or dataset "
                             "id, and optionally teacher:SHARE for teacher-generated text")
    return (sources[0] if sources else None), share


def resolve_recipe(run_dir: Path, recipe_file: Path | None, flags: dict[str, Any], resume: bool) -> DistillRecipe:
    """Defaults <- RUN/recipe.json (when resuming) <- --recipe FILE <- flags; a new run also gets the recommended
    options the file and flags leave unset (:func:`radistill.distill.recipe.with_recommended`)."""
    recipe = DistillRecipe()
    saved = run_dir / "recipe.json"
    resuming = resume and saved.exists()
    if resuming:
        recipe = DistillRecipe.load(saved)
    from_file = read_recipe_file(recipe_file) if recipe_file is not None else {}
    recipe = merge(merge(recipe, from_file), flags)
    if resuming:  # the run's recipe.json already holds what it was started with
        return recipe
    explicit_data = {**(from_file.get("data") or {}), **(flags.get("data") or {})}
    return with_recommended(recipe, {"data": explicit_data})


def distill(
    student: Path = typer.Argument(..., help="Hybrid student directory (from `radistill build`)."),
    teacher: str = typer.Option(..., "--teacher", help="Teacher model id or directory."),
    data: Optional[list[str]] = typer.Option(
        None, "--data", help=".txt/.txt.xz/.jsonl/.parquet file or HF dataset id; again as teacher:0.25 to mix in "
        "that share of text the teacher generates from prompts of it (data.teacher_share)."),
    out: Path = typer.Option(..., "--out", help="Run directory (recipe.json, metrics.jsonl, stageN/, checkpoints/)."),
    recipe_file: Optional[Path] = typer.Option(None, "--recipe", help="Recipe file (JSON or YAML); flags win."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Stages to run, e.g. 2,3 (default: the recipe's)."),
    tokens_stage1: Optional[int] = typer.Option(None, "--tokens-stage1", help="Token budget of stage 1."),
    tokens_stage2: Optional[int] = typer.Option(None, "--tokens-stage2", help="Token budget of stage 2."),
    tokens_stage3: Optional[int] = typer.Option(None, "--tokens-stage3", help="Token budget of stage 3."),
    lr_stage1: Optional[float] = typer.Option(None, "--lr-stage1", help="Peak learning rate of stage 1."),
    lr_stage2: Optional[float] = typer.Option(None, "--lr-stage2", help="Peak learning rate of stage 2."),
    lr_stage3: Optional[float] = typer.Option(None, "--lr-stage3", help="Peak learning rate of stage 3."),
    teacher_logits: Optional[str] = typer.Option(
        None, "--teacher-logits", help="Stage 3's teacher: online (run beside the student) or topk (its top-k logits "
        "precomputed once into RUN/teacher_logits/, k*6+4 bytes/token on disk; stage 3 then runs without it)."),
    teacher_topk: Optional[int] = typer.Option(None, "--teacher-topk", help="Logits kept per position with "
                                               "--teacher-logits topk (default 64)."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per packed sequence (all stages)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Sequences per micro-batch per process "
                                              "(recipe key batch_size)."),
    old_batch_size: Optional[int] = typer.Option(None, "--batch-size", hidden=True),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 (autocast on CUDA) or fp32."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the layers (CUDA)."),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard"),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Plan for this GPU memory (e.g. 24GiB) and "
                                             "apply the plan; stops before any compute if it cannot fit."),
    parallel: Optional[str] = typer.Option(None, "--parallel", help="Stage 3 under torchrun: ddp (replicated "
                                           "student) or fsdp (FSDP2: student sharded over the ranks)."),
    shard_teacher: Optional[bool] = typer.Option(None, "--shard-teacher/--no-shard-teacher", help="With --parallel "
                                                 "fsdp, shard the teacher too, all but its LM head (stage 3 only)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 (torchrun: one GPU per rank)."),
) -> None:
    """Distill a hybrid student from its teacher: MOHAWK stages 1-3 (stage 1 off by default), resumable."""
    from radistill.distill.run import run_distill
    from radistill.utils.console import quiet_transformers

    quiet_transformers()
    micro_batch = renamed(micro_batch, old_batch_size, "--batch-size", "--micro-batch")
    source, share = split_data_flags(data)
    flags = overrides_from_flags(
        stages=stages, data=source, seq_len=seq_len, batch_size=micro_batch, grad_accum=grad_accum, seed=seed,
        dtype=dtype, compile=compile, tensorboard=tensorboard, checkpoint_every=checkpoint_every,
        gpu_memory=gpu_memory, parallel=parallel, shard_teacher=shard_teacher,
        tokens={1: tokens_stage1, 2: tokens_stage2, 3: tokens_stage3},
        lr={1: lr_stage1, 2: lr_stage2, 3: lr_stage3}, teacher_logits=teacher_logits, teacher_topk=teacher_topk,
    )
    if share is not None:
        flags.setdefault("data", {})["teacher_share"] = share
    recipe = resolve_recipe(out, recipe_file, flags, resume)
    run_distill(student, teacher, recipe, out, device=device, resume=resume)


def register(app: typer.Typer) -> None:
    app.command("distill")(distill)
