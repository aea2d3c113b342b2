"""The ``radistill`` command line: scan -> build -> distill -> eval -> report, or ``run`` for all of it.

Each pipeline area contributes its commands through ``register(app)`` in its own ``cli`` module, so this
file stays a table of contents. Those modules import torch, transformers and the heavy parts of radistill only
inside their commands: ``radistill --help`` and a usage error answer in a fraction of a second
(``benchmarks/startup.py``).

What users see when something is wrong: a usage error (missing argument, unknown option or command, a value of the
wrong type) and a :class:`RadistillError` (bad input found by radistill) are one line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console

from radistill import __version__
from radistill.utils.errors import RadistillError

try:  # recent typer ships its own copy of click, whose exceptions are not click's
    from typer._click import exceptions as _click_exceptions
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as _click_exceptions

ClickException, UsageError = _click_exceptions.ClickException, _click_exceptions.UsageError
NoArgsIsHelpError = getattr(_click_exceptions, "NoArgsIsHelpError", ())  # click < 8.2 has none: catch nothing

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
    "radistill.bridge.cli",
    "radistill.serve.cli",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"radistill {__version__}")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Retrieval-aware distillation: find a Transformer's retrieval heads, keep them, make the rest recurrent."""


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as exc:
        if not (exc.name == _name or _name.startswith(f"{exc.name}.")):
            raise
        continue
    _module.register(app)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(message: str) -> None:
    # soft_wrap: rich would otherwise break a long message at the terminal width (80 columns off a terminal)
    Console(stderr=True).print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True, highlight=False)


def main(args: list[str] | None = None) -> None:
    """Entry point: usage errors and :class:`RadistillError` become one red line on stderr and exit code 2."""
    try:
        result = app(args=args, prog_name="radistill", standalone_mode=False)
    except NoArgsIsHelpError as exc:  # bare `radistill` or `radistill scan`: the help is the answer
        typer.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
        sys.exit(2)
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "radistill"
        _error(f"{_one_line(exc.format_message())} (see `{where} --help`)")
        sys.exit(2)
    except ClickException as exc:
        _error(_one_line(exc.format_message()))
        sys.exit(exc.exit_code)
    except RadistillError as exc:
        _error(_one_line(str(exc)))
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
