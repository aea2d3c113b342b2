"""Paths as the report shows them: a report is committed and shared, so it must not reveal where its maker kept
files. A path inside the run directory is shown relative to it; any other absolute path by its name only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ELIDED = "…/"  # marks a path shown by its name only, so nobody takes it for one relative to the run


def run_name(root: Path) -> str:
    """The run directory's own name (also for ``.`` or a path ending in ``/``)."""
    return root.resolve().name


def shown_path(value: str | Path, root: Path) -> str:
    """``value`` relative to the run directory ``root`` (``.`` for the run itself) when it lies inside it, else
    ``…/NAME``. What is not an absolute path -- an HF id such as ``meta-llama/Llama-3.2-1B``, a relative path --
    is shown as it is."""
    path = Path(value)
    if not path.is_absolute():
        return str(value)
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return ELIDED + path.name


def without_absolute_paths(data: Any, root: Path) -> Any:
    """A copy of JSON-like ``data`` (dicts, lists, strings, numbers) with every absolute-path string shown by
    :func:`shown_path`."""
    if isinstance(data, dict):
        return {key: without_absolute_paths(value, root) for key, value in data.items()}
    if isinstance(data, list):
        return [without_absolute_paths(value, root) for value in data]
    if isinstance(data, str):
        return shown_path(data, root)
    return data
