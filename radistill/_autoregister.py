"""Register the hybrid with transformers' Auto classes once transformers is imported, not when radistill is.

``import radistill`` must make ``AutoModelForCausalLM.from_pretrained(student_dir)`` work, but registering
means importing :mod:`radistill.hybrid.auto`, i.e. torch and transformers: seconds of start-up that
``radistill --help`` should not pay. Nobody can call an Auto class without importing transformers first, so
registering right after that import is as good as registering at ``import radistill``.

How: :func:`install` registers at once when transformers is already imported; otherwise it puts an import hook
first on ``sys.meta_path`` that wraps the loaders of ``transformers`` and of ``radistill.*`` modules, counting the
ones executing. When transformers is in ``sys.modules`` and none of them is mid-execution, it imports
:mod:`radistill.hybrid.auto` (whose import registers the classes) and removes itself. Waiting for the radistill
modules around the ``import transformers`` to finish matters: ``radistill.models.access`` imports transformers, and
:mod:`radistill.hybrid.auto` imports ``radistill.models.access``; registering halfway through would import a partly
executed module.

Why a hook and not something plainer: transformers has no plugin entry point for its Auto classes, and Python tells
no one when a module has finished importing except through ``sys.meta_path``. Importing
:mod:`radistill.hybrid.auto` in ``radistill/__init__.py`` would load torch for ``radistill --help``; watching only
``transformers`` would register from inside a radistill module that is still executing (the cycle above). Counting
the watched modules' execution is the least that handles every import order (tests/test_autoregister.py).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading

TRIGGER = "transformers"
TARGET = "radistill.hybrid.auto"

_state = threading.local()  # per thread: wrapped modules executing now
_lock = threading.RLock()
_done = False
_busy = False


def _executing() -> int:
    return getattr(_state, "depth", 0)


def _watched(name: str) -> bool:
    return name == TRIGGER or name.startswith("radistill.")


class _CountingLoader(importlib.abc.Loader):
    """The module's own loader, counting its execution; everything else (resources, source) is the original's."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        _state.depth = _executing() + 1
        try:
            self._loader.exec_module(module)
        finally:
            _state.depth -= 1
        register_if_ready()


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if _done or not _watched(name):
            return None
        for finder in sys.meta_path:  # the finders after this one decide where the module comes from
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CountingLoader(spec.loader)
                return spec
        return None


_hook = _Hook()


def register_if_ready() -> bool:
    """Import :mod:`radistill.hybrid.auto` (registering it) when transformers is loaded and no watched module is
    executing; returns whether the hybrid is registered."""
    global _done, _busy
    if _done:
        return True
    if _executing() or TRIGGER not in sys.modules:
        return False
    with _lock:
        if _done or _busy:
            return _done
        _busy = True  # the import below goes through the hook again
        try:
            importlib.import_module(TARGET)
            _done = True
            if _hook in sys.meta_path:
                sys.meta_path.remove(_hook)
        finally:
            _busy = False
    return True


def install() -> None:
    """Register now if transformers is imported, else when it is (see the module docstring)."""
    if register_if_ready():
        return
    if _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


def registered() -> bool:
    return _done
