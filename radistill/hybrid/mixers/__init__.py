"""The registry of recurrent mixers: the only place the hybrid layer looks one up (docs/design.md)."""

from __future__ import annotations

from radistill.hybrid.mixers.base import RecurrentMixer
from radistill.hybrid.mixers.discrete_mamba2 import DiscreteMamba2
from radistill.utils.errors import RadistillError

MIXERS: dict[str, type[RecurrentMixer]] = {"discrete_mamba2": DiscreteMamba2}


def get_mixer(name: str) -> type[RecurrentMixer]:
    """The mixer class registered as `name`."""
    if name not in MIXERS:
        raise RadistillError(f"unknown mixer {name!r}: choose one of {', '.join(sorted(MIXERS))}")
    return MIXERS[name]


__all__ = ["MIXERS", "DiscreteMamba2", "RecurrentMixer", "get_mixer"]
