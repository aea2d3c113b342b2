"""One rich console for the package, and progress bars that are quiet when not on a terminal or not rank 0."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def progress(**kwargs) -> Progress:
    """A progress bar with count, elapsed time and ETA; disabled off rank 0."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not is_main_process() or kwargs.pop("disable", False),
        **kwargs,
    )
