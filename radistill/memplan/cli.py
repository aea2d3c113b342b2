"""``radistill plan TEACHER_OR_CONFIG --gpu-memory 24GiB``: every step's estimated peak and the strategy that fits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.table import Table

from radistill.utils.console import console, is_main_process

PARTS = ("weights", "trainable", "activations", "teacher", "logits", "caches")
SHORT = {"trainable": "grads+opt", "activations": "activ."}


def plan_table(plan) -> Table:
    from radistill.memplan.estimate import GiB

    table = Table(title=f"memory plan for {plan.model} in {plan.gpu_memory / GiB:.1f} GiB "
                        f"({plan.budget / GiB:.1f} GiB usable), GiB")
    table.add_column("step", no_wrap=True)
    for part in PARTS:
        table.add_column(SHORT.get(part, part), justify="right")
    table.add_column("peak", justify="right")
    for s in plan.steps:
        peak = f"[{'green' if s.fits else 'bold red'}]{s.memory.total / GiB:.2f}[/]"
        table.add_row(s.step, *(f"{getattr(s.memory, p) / GiB:.2f}" for p in PARTS), peak)
    return table


def strategy_lines(plan, describe: Optional[Callable] = None) -> str:
    """One line per step: the strategy chosen (``describe(step_plan)``, by default the strategy's own words), then
    its notes (too long for table cells)."""
    describe = describe or (lambda step: step.strategy.describe())
    lines = []
    for s in plan.steps:
        lines.append(f"[bold]{s.step}[/]: {describe(s)}")
        lines += [f"    [dim]{n}[/]" for n in s.notes]
    return "\n".join(lines)


def print_plan(plan, describe: Optional[Callable] = None) -> None:
    """The plan's table and chosen strategies, as every ``--gpu-memory`` step shows them first (main process only)."""
    if is_main_process():
        console.print(plan_table(plan))
        console.print(strategy_lines(plan, describe))


def serving_table(plan) -> Table:
    table = Table(title=f"serving in {plan.budget / (1 << 30):.1f} GiB (bf16, prefill in chunks)")
    for column in ("model", "KV B/token", "state B/seq", "max context (batch 1)", "max batch"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, s in plan.serving.items():
        over = s.max_positions and s.max_context_b1 > s.max_positions
        context = f"{s.max_context_b1:,}" + (" (> model's max)" if over else "")
        table.add_row(name, f"{s.kv_bytes_per_token:,}", f"{s.state_bytes:,}", context,
                      f"{s.max_batch} at {s.batch_context:,}")
    return table


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan(
        model: str = typer.Argument(..., help="teacher or student directory, config.json, HF id, or a shape name "
                                               "(llama-3.2-1b, nanbeige4.1-3b)"),
        gpu_memory: str = typer.Option(..., "--gpu-memory", help="GPU memory to plan for, e.g. 24GiB"),
        keep: Optional[int] = typer.Option(None, "--keep", help="teacher: heads the student keeps"),
        state_size: Optional[int] = typer.Option(None, "--state-size", help="teacher: the student's state size"),
        seq_len: int = typer.Option(2048, "--seq-len", help="training sequence length"),
        micro_batch: int = typer.Option(8, "--micro-batch", help="training sequences per micro-batch (per process)"),
        old_batch_size: Optional[int] = typer.Option(None, "--batch-size", hidden=True),
        eval_batch: int = typer.Option(8, "--eval-batch", help="sequences per eval forward"),
        lora_rank: int = typer.Option(16, "--lora-rank", help="LoRA rank (as finetune's --lora-rank)"),
        lora_targets: str = typer.Option("recurrent,kept-heads", "--lora-targets",
                                         help="LoRA target groups (as finetune's --lora-targets)"),
        dtype: str = typer.Option("bf16", "--dtype", help="bf16 (mixed precision) or fp32"),
        reserve: float = typer.Option(0.05, "--reserve", help="fraction of the GPU kept free for fragmentation"),
        out: Optional[Path] = typer.Option(None, "--out", help="also write the plan as JSON here"),
        as_json: bool = typer.Option(False, "--json", help="print the plan as JSON instead of tables"),
    ) -> None:
        """Estimate each pipeline step's peak GPU memory (weights, trainable state, activations, teacher, logits,
        caches) and choose how it fits: layer-at-a-time stages, checkpointing, chunked logits, 8-bit or LoRA."""
        from radistill.memplan.plan import make_plan
        from radistill.memplan.estimate import Workload
        from radistill.utils.cli_options import renamed

        micro_batch = renamed(micro_batch, old_batch_size, "--batch-size", "--micro-batch", default=8)
        work = Workload(seq_len=seq_len, batch_size=micro_batch, dtype=dtype, lora_rank=lora_rank,
                        lora_targets=lora_targets, eval_batch=eval_batch, eval_context=seq_len)
        result = make_plan(model, gpu_memory, keep=keep, state_size=state_size, workload=work, reserve=reserve)
        if out is not None:
            result.save(out)
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
            return
        print_plan(result)
        console.print(serving_table(result))
        if not result.fits:
            bad = ", ".join(s.step for s in result.steps if not s.fits)
            console.print(f"[bold red]does not fit:[/] {bad} (red); the row shows its leanest strategy")
