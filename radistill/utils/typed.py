"""Type checks for settings read from recipe files: each value against its dataclass field's annotation.

YAML and JSON give whatever the user wrote (``tokens: lots``, ``enabled: "no"``, ``seq_len: 128.5``); a dataclass
does not check, so a wrong type used to surface as a traceback deep in a run, or not at all (``"no"`` is truthy).
:func:`check_fields` turns each into one error naming the key and what it expects. Numbers written as strings
(``"50e6"``, ``"1e-4"``: YAML 1.1 reads ``1e-4`` without a dot as a string) and whole floats (``5.0e9``) are
converted, since they say a number unambiguously; a fraction where a count is expected (``1024.9``) is refused.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from radistill.utils.errors import RadistillError

_NONE = type(None)


def _number(value: Any) -> float | None:
    """``value`` as a finite float when it is a number or a string that spells one, else None (bools are not)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value.strip().replace("_", ""))
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _expected(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args if a is not _NONE) + " or null"
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    if tp is dict or origin is dict:
        return "a mapping of settings"
    if tp is list or origin is list:
        return "a list"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against ``tp`` (bool, int, float, str, ``X | None``, ``tuple[float, ...]``) and converted
    where that is unambiguous; other annotations pass the value through. Raises naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and _NONE in args:
            return None
        options = [a for a in args if a is not _NONE]
        if len(options) == 1:
            try:
                return coerce(value, options[0], key)
            except RadistillError:
                pass
        raise _wrong(key, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong(key, tp, value)
    if tp is int:
        number = _number(value)
        if number is None or not number.is_integer():
            raise _wrong(key, tp, value)
        return int(number)
    if tp is float:
        number = _number(value)
        if number is None:
            raise _wrong(key, tp, value)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise _wrong(key, tp, value)
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise _wrong(key, tp, value)
    if tp is list or origin is list:
        if isinstance(value, list):
            return value
        raise _wrong(key, tp, value)
    if origin is tuple and args and Ellipsis not in args:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _wrong(key, tp, value)
        return tuple(coerce(v, a, key) for v, a in zip(value, args))
    return value


def _wrong(key: str, tp: Any, value: Any) -> RadistillError:
    return RadistillError(f"recipe key '{key}' must be {_expected(tp)} (got {value!r})")


def check_fields(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` (keyword arguments for dataclass ``cls``) with each field's value checked and converted; keys
    that are not fields are left for ``cls(**values)`` to reject."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: coerce(v, hints[k], f"{where}.{k}" if where else k) if k in names else v for k, v in values.items()}
