"""``radistill bridge STUDENT --source MODEL@LAYER | chunk-ae:K --task kv-outside --steps N --out DIR``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from radistill.utils.console import console
from radistill.utils.errors import RadistillError


def _pairs(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise RadistillError(f"--pairs {text!r}: give whole numbers separated by commas, e.g. 2,4,8") from None


def register(app: typer.Typer) -> None:
    @app.command("bridge")
    def bridge(
        student: Path = typer.Argument(..., help="student directory (its kept heads are bridged), or a teacher with "
                                                 "--heads"),
        source: str = typer.Option(..., "--source", help="MODEL@LAYER (another model's hidden states after LAYER "
                                                          "layers) or chunk-ae:K (K tokens per memory vector)"),
        out: Path = typer.Option(..., "--out", help="directory for the adapter and bridge_results.json"),
        task: str = typer.Option("kv-outside", "--task", help="kv-outside: the KV dictionary is given only to the "
                                                             "source"),
        steps: int = typer.Option(200, "--steps", help="bridge training steps"),
        pairs: str = typer.Option("2,4,8", "--pairs", help="dictionary sizes to train and report on"),
        heads: Optional[str] = typer.Option(None, "--heads", help="heads to bridge, L.H,... (default: the "
                                                                 "student's kept heads)"),
        full_width_every: int = typer.Option(0, "--full-width-every", help="train the full-width baseline "
                                                                          "(cross-attention every N layers) instead"),
        lr: float = typer.Option(3e-3, "--lr"),
        batch: int = typer.Option(16, "--batch"),
        train_samples: int = typer.Option(512, "--train-samples", help="training items per pairs count"),
        eval_samples: int = typer.Option(64, "--eval-samples", help="held-out items per pairs count"),
        ae_steps: int = typer.Option(300, "--ae-steps", help="chunk-ae:K: autoencoder training steps"),
        seed: int = typer.Option(0, "--seed"),
        device: str = typer.Option("auto", "--device"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace a bridge already in --out"),
    ) -> None:
        """Attach a cross-attention bridge to the kept (retrieval) heads and train it on an outside-memory task."""
        from radistill.bridge.run import BridgeRunConfig, run_bridge

        config = BridgeRunConfig(str(student), source, str(out), task, steps, _pairs(pairs), heads, full_width_every,
                                 lr, batch, train_samples, eval_samples, ae_steps, seed, device, overwrite=overwrite)
        result = run_bridge(config, log=console.print)
        console.print(f"{result['bridge']} bridge: {result['trainable_parameters']:,} trainable parameters "
                      f"({result['training_tokens']:,} training tokens)")
        for p in config.pairs:
            console.print(f"  {p} pairs: KV accuracy {result['accuracy_without_bridge'][p]:.3f} without -> "
                          f"{result['accuracy_with_bridge'][p]:.3f} with the bridge (chance {1 / p:.3f})")
        console.print(f"wrote {out}")
