"""``radistill scan`` and ``radistill analyze``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from radistill.utils.console import console, is_main_process, progress


def _top_table(result, top: int) -> Table:
    table = Table(title=f"top {top} heads ({result.metric} drop, {result.ablation} ablation; baseline accuracy "
                        f"{result.baseline['accuracy']:.3f}, log-prob {result.baseline['logprob']:.3f})")
    for column in ("rank", "head", "kv head", "score", "accuracy drop", "log-prob drop"):
        table.add_column(column, justify="right")
    for rank, h in enumerate(result.top(top), start=1):
        table.add_row(str(rank), h.name, str(h.kv_head), f"{h.score:.4f}", f"{h.accuracy_drop:+.3f}",
                      f"{h.logprob_drop:+.4f}")
    return table


def register(app: typer.Typer) -> None:
    @app.command("scan")
    def scan(
        model: str = typer.Argument(..., help="HF model id or local directory of a Llama-like causal LM"),
        out: Path = typer.Option(..., "--out", help="directory for scan.json, scan.csv, heads.png"),
        pairs: int = typer.Option(20, help="key:value pairs per KV-probe prompt"),
        samples: int = typer.Option(64, help="KV-probe prompts"),
        metric: str = typer.Option("logprob", help="ranking metric: logprob (continuous) or accuracy (the paper's)"),
        ablation: str = typer.Option("zero", help="zero, or mean (the head's mean output on the probe)"),
        seed: int = typer.Option(0, help="seed of the KV probe"),
        device: str = typer.Option("auto", help="cuda, cuda:1, cpu or auto"),
        dtype: str = typer.Option("auto", help="bf16, fp16, fp32 or auto (bf16 on GPU, fp32 on CPU)"),
        rows_per_forward: Optional[int] = typer.Option(None, "--rows-per-forward",
                                                       help="(prompt, head) rows per forward [GPU 256, CPU 32]"),
        old_batch_size: Optional[int] = typer.Option(None, "--batch-size", hidden=True),
        probe: Optional[Path] = typer.Option(None, help="your own probe: JSONL of {prompt, choices, answer}"),
        top: int = typer.Option(10, help="heads shown in the table"),
        gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="plan for this GPU memory (e.g. 24GiB): "
                                                 "rows per forward and prompts cached at once that fit; stops "
                                                 "before loading the weights if nothing fits"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace the scan files already in --out"),
    ) -> None:
        """Rank every attention head by how much in-context retrieval depends on it (ablation scan)."""
        from radistill.models.access import load_config, require_attention
        from radistill.scan.run import SCAN_FILES, run_scan
        from radistill.utils.cli_options import renamed
        from radistill.utils.io import refuse_existing

        rows_per_forward = renamed(rows_per_forward, old_batch_size, "--batch-size", "--rows-per-forward")

        # earlier results first: the refusal must not wait on (or fail in) loading the model's config
        refuse_existing([out / name for name in SCAN_FILES], overwrite)
        require_attention(load_config(model))  # before the progress bar: an unsupported model is one error line
        with progress() as bar:
            task = bar.add_task("scanning heads", total=None, status="")

            def advance(n: int, total: int) -> None:
                bar.update(task, advance=n, total=total)

            result = run_scan(model, out, pairs=pairs, samples=samples, metric=metric, ablation=ablation, seed=seed,
                              device=device, dtype=dtype, batch_size=rows_per_forward, probe_file=probe,
                              progress=advance, gpu_memory=gpu_memory, overwrite=overwrite)
        if is_main_process():
            console.print(_top_table(result, top))
            console.print(f"wrote {out / 'scan.json'}, scan.csv, heads.png")

    @app.command("analyze")
    def analyze_command(
        model: str = typer.Argument(..., help="the scanned model (HF id or local directory)"),
        scan: Path = typer.Option(..., "--scan", help="scan.json from `radistill scan`"),
        out: Path = typer.Option(..., "--out", help="directory for analysis.json and attention maps"),
        top: int = typer.Option(8, help="how many of the scan's best heads to analyse"),
        pairs: Optional[int] = typer.Option(None, help="pairs per prompt [the scan's]"),
        samples: int = typer.Option(8, help="KV-probe prompts to average over"),
        device: str = typer.Option("auto", help="cuda, cpu or auto"),
        dtype: str = typer.Option("auto", help="bf16, fp16, fp32 or auto"),
    ) -> None:
        """Attention maps of the scan's top heads and a gather / aggregate label for each (G&A)."""
        from radistill.models.access import load_model
        from radistill.scan.analyze import analyze
        from radistill.scan.result import load_scan

        result = load_scan(scan)
        loaded, tokenizer = load_model(model, dtype=dtype, device=device)
        heads = analyze(loaded, tokenizer, result, out, top=top, pairs=pairs, samples=samples, scan_path=str(scan))
        table = Table(title="gather / aggregate")
        for column in ("rank", "head", "label", "aggregate mass", "hit rate", "gather mass"):
            table.add_column(column, justify="right")
        for h in heads:
            table.add_row(str(h.rank), f"{h.layer}.{h.head}", h.label, f"{h.aggregate_mass:.2f}",
                          f"{h.aggregate_hit_rate:.2f}", f"{h.gather_mass:.2f}")
        console.print(table)
        console.print(f"wrote {out / 'analysis.json'} and {len(heads)} attention maps")
