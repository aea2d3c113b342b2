"""``radistill report RUN``: the run's results as one self-contained HTML page with its PNGs beside it."""

from __future__ import annotations

from pathlib import Path

import typer

from radistill.utils.console import console


def report_command(
    run: Path = typer.Argument(..., help="Directory of `radistill run`/`demo`, or a `radistill distill` RUN."),
    out: Path = typer.Option(None, "--out", help="Where to write index.html and the PNGs (default: RUN/report)."),
) -> None:
    """Build the report: head heatmap, kept heads, eval table with coverage, training curves, memory, settings."""
    from radistill.report.build import build_report

    page = build_report(run, out)
    console.print(f"report: {page}")


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)
