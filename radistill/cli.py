"""The ``radistill`` command line: scan -> build -> distill -> eval -> report, or ``run`` for all of it.

Each pipeline area contributes its commands through ``register(app)`` in its own ``cli`` module, so this
file stays a table of contents.
"""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console

from radistill.utils.errors import RadistillError

app = typer.Typer(
    name="radistill",
    help="Retrieval-aware distillation: find a Transformer's retrieval heads, keep them, make the rest recurrent.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that register commands, in pipeline order. A missing one (a partial install) is skipped.
COMMAND_MODULES = (
    "radistill.scan.cli",
    "radistill.hybrid.cli",
    "radistill.distill.cli",
    "radistill.eval.cli",
    "radistill.report.cli",
    "radistill.pipeline",
    "radistill.memplan.cli",
    "radistill.finetune.cli",
)

for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as exc:
        if not (exc.name == _name or _name.startswith(f"{exc.name}.")):
            raise
        continue
    _module.register(app)


def main() -> None:
    """Entry point that turns a :class:`RadistillError` into one red line and exit code 2."""
    try:
        app(standalone_mode=False)
    except RadistillError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)


if __name__ == "__main__":
    main()
