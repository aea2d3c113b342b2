"""Lazy re-exports for package ``__init__`` modules (PEP 562).

An area's package re-exports its main names (``from radistill.scan import run_scan``), but importing them eagerly
would make ``import radistill.scan.cli`` import torch, and ``radistill --help`` take seconds. With
:func:`lazy_exports` a name's module is imported the first time the name is looked up.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Iterable


class _Shadowing:
    """A name that is also a submodule's (``radistill.finetune.train``, the function, vs the module): importing the
    submodule binds the module on the package under that name, after which PEP 562's ``__getattr__`` is never
    asked. A data descriptor on the package's class wins over that binding, as the eager re-export used to."""

    def __init__(self, name: str, module: str):
        self.name, self.module = name, module

    def __get__(self, package, owner=None):
        if package is None:
            return self
        return getattr(importlib.import_module(self.module), self.name)

    def __set__(self, package, value):
        if not isinstance(value, types.ModuleType):  # the import system's binding; the module is in sys.modules
            raise AttributeError(f"{package.__name__}.{self.name} is a re-export and cannot be set")


def lazy_exports(package: str, exports: dict[str, Iterable[str]]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``, exporting each module's names (``{module: names}``) on first
    access; the value is then stored on the package, so later lookups are plain attribute reads."""
    if any(isinstance(names, str) for names in exports.values()):  # ("name") is a string, not a 1-tuple
        raise TypeError(f"{package}: lazy_exports takes a tuple of names per module")
    where = {name: module for module, names in exports.items() for name in names}
    shadowed = {name for name in where if f"{package}.{name}" in exports}
    if shadowed:
        namespace = {name: _Shadowing(name, where[name]) for name in shadowed}
        sys.modules[package].__class__ = type("LazyPackage", (types.ModuleType,), namespace)

    def __getattr__(name: str):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__
