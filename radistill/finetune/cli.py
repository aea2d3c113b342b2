"""``radistill finetune STUDENT --data FILE --out DIR``: LoRA on the recurrent heads and kept heads (or all)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from radistill.utils.console import console
from radistill.utils.errors import RadistillError


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune(
        student: Path = typer.Argument(..., help="student directory (from `radistill build` or `distill`)"),
        out: Path = typer.Option(..., "--out", help="directory for the adapter (and merged/ with --merge)"),
        data: Optional[str] = typer.Option(None, "--data", help="JSONL of {prompt, answer} pairs, or text "
                                                                 "(.txt/.txt.xz/.jsonl/.parquet/HF dataset id)"),
        targets: str = typer.Option("recurrent,kept-heads", "--lora-targets",
                                    help="recurrent, kept-heads, o-proj, mlp (comma-separated), or all"),
        rank: int = typer.Option(16, "--lora-rank", help="LoRA rank"),
        alpha: float = typer.Option(32.0, "--lora-alpha", help="LoRA alpha (scale = alpha / rank)"),
        dropout: float = typer.Option(0.0, "--lora-dropout"),
        old_targets: Optional[str] = typer.Option(None, "--targets", hidden=True),
        old_rank: Optional[int] = typer.Option(None, "--rank", hidden=True),
        old_alpha: Optional[float] = typer.Option(None, "--alpha", hidden=True),
        old_dropout: Optional[float] = typer.Option(None, "--dropout", hidden=True),
        steps: int = typer.Option(100, "--steps"),
        lr: float = typer.Option(2e-4, "--lr"),
        micro_batch: int = typer.Option(8, "--micro-batch", help="sequences per step"),
        old_batch_size: Optional[int] = typer.Option(None, "--batch-size", hidden=True),
        seq_len: int = typer.Option(512, "--seq-len", help="longest pair / packed text length in tokens"),
        optimizer: str = typer.Option("adamw", "--optimizer", help="adamw or adamw8bit"),
        checkpointing: bool = typer.Option(False, "--checkpointing/--no-checkpointing",
                                           help="activation checkpointing of the decoder layers"),
        seed: int = typer.Option(0, "--seed"),
        replay: Optional[str] = typer.Option(None, "--replay", help="general text (as --data takes it) whose steps go "
                                             "between the task's, against forgetting; e.g. the distillation data"),
        replay_share: float = typer.Option(0.5, "--replay-share", help="with --replay: the fraction of steps on it"),
        merge: bool = typer.Option(False, "--merge", help="also write OUT/merged: adapters folded into the weights"),
        adapter: Optional[Path] = typer.Option(None, "--adapter", help="merge this saved adapter (no training) "
                                                                        "into STUDENT, written to OUT"),
        device: str = typer.Option("auto", "--device"),
        overwrite: bool = typer.Option(False, "--overwrite"),
    ) -> None:
        """LoRA fine-tuning of a student: adapters on the recurrent heads and kept heads only (default) or on
        every linear layer; save, reload with PeftModel.from_pretrained, merge into a plain checkpoint."""
        from radistill.finetune.lora import LoraSpec
        from radistill.finetune.run import finetune_student, merge_adapter
        from radistill.finetune.train import FinetuneConfig
        from radistill.utils.cli_options import renamed

        targets = renamed(targets, old_targets, "--targets", "--lora-targets", default="recurrent,kept-heads")
        rank = renamed(rank, old_rank, "--rank", "--lora-rank", default=16)
        alpha = renamed(alpha, old_alpha, "--alpha", "--lora-alpha", default=32.0)
        dropout = renamed(dropout, old_dropout, "--dropout", "--lora-dropout", default=0.0)
        micro_batch = renamed(micro_batch, old_batch_size, "--batch-size", "--micro-batch", default=8)

        if adapter is not None:
            if data is not None:
                raise RadistillError("--adapter merges an existing adapter; drop --data (or drop --adapter to train)")
            console.print(f"merged {adapter} into {merge_adapter(student, adapter, out)}")
            return
        if data is None:
            raise RadistillError("say what to train on: --data FILE (or --adapter DIR to merge a saved adapter)")
        cfg = FinetuneConfig(lora=LoraSpec(targets=targets, rank=rank, alpha=alpha, dropout=dropout), steps=steps,
                             lr=lr, batch_size=micro_batch, seq_len=seq_len, optimizer=optimizer,
                             checkpointing=checkpointing, seed=seed, replay=replay, replay_share=replay_share)
        result = finetune_student(student, data, out, cfg, device=device, merge=merge, overwrite=overwrite)
        console.print(f"{result.steps} steps, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, "
                      f"{result.tokens_per_s:,.0f} target tokens/s; adapter in {out}"
                      + (f", merged student in {out / 'merged'}" if merge else ""))
