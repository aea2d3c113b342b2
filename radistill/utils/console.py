"""One rich console for the package, and progress bars that are quiet when not on a terminal or not rank 0."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class _Progress(Progress):
    """Off a terminal a live bar is silent until it ends (rich does not redraw into a log file), so a long run
    showed nothing for minutes: there each update that sets a ``status`` (the caller's log points, e.g. every
    ``log_every`` steps) also prints one plain line."""

    def __init__(self, *columns, plain_lines: bool = False, **kwargs):
        super().__init__(*columns, **kwargs)
        self.plain_lines = plain_lines

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        if self.plain_lines and not self.disable and kwargs.get("status"):
            task = self._tasks[task_id]
            total = f"/{task.total:,.0f}" if task.total is not None else ""
            elapsed = task.elapsed or 0.0
            self.console.print(f"{task.description}: {task.completed:,.0f}{total} · {kwargs['status']} · "
                               f"{elapsed:,.0f} s", soft_wrap=True, highlight=False, markup=False)


def progress(**kwargs) -> Progress:
    """A progress bar with count, elapsed time and ETA; disabled off rank 0. Off a terminal, updates that set a
    ``status`` print a plain line each (``plain_lines``; default: when the console is not a terminal)."""
    plain = kwargs.pop("plain_lines", not console.is_terminal)
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not is_main_process() or kwargs.pop("disable", False),
        plain_lines=plain,
        **kwargs,
    )


def quiet_transformers() -> None:
    """No progress bars or warnings from transformers and huggingface_hub in our commands: off a terminal each
    bar is a line per update, and their warnings are not about anything the user can change."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    disable_progress_bars()
