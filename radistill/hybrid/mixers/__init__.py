"""The registry of mixers: the only place the hybrid layer looks one up (docs/hybrid.md, "Writing a mixer").

Built in: ``discrete_mamba2`` (recurrent), ``window`` (sliding-window softmax), ``window_recurrent`` (a window head
plus a gated DiscreteMamba2 head that starts closed). More come from
:func:`register_mixer`, or from installed packages through the entry point group ``radistill.mixers``
(``name = "package.module:Class"``), loaded the first time a name is not registered.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from radistill.hybrid.mixers.bank import MixerBank
from radistill.hybrid.mixers.base import RecurrentMixer, mixer_kwargs
from radistill.hybrid.mixers.discrete_mamba2 import DiscreteMamba2
from radistill.hybrid.mixers.window import WindowAttention
from radistill.hybrid.mixers.window_recurrent import WindowRecurrent
from radistill.utils.errors import RadistillError

ENTRY_POINT_GROUP = "radistill.mixers"
MIXERS: dict[str, type[RecurrentMixer]] = {"discrete_mamba2": DiscreteMamba2, "window": WindowAttention,
                                            "window_recurrent": WindowRecurrent}


def register_mixer(name: str, cls: type[RecurrentMixer], *, overwrite: bool = False) -> type[RecurrentMixer]:
    """Make ``cls`` (a :class:`RecurrentMixer` subclass) the mixer called ``name`` (in ``--mixer``, ``--kept-mixer``
    and config.json); returns ``cls``. A name already taken by another class is refused unless ``overwrite``."""
    if not (isinstance(cls, type) and issubclass(cls, RecurrentMixer)):
        raise RadistillError(f"register_mixer({name!r}, ...) needs a subclass of "
                             f"radistill.hybrid.mixers.RecurrentMixer, got {cls!r}")
    if not name or not isinstance(name, str):
        raise RadistillError(f"a mixer name must be a non-empty string, got {name!r}")
    if MIXERS.get(name, cls) is not cls and not overwrite:
        raise RadistillError(f"mixer name {name!r} is taken by {MIXERS[name].__qualname__}: choose another name or "
                             "pass overwrite=True")
    MIXERS[name] = cls
    return cls


def find_mixer(name: str) -> type[RecurrentMixer] | None:
    """The class registered as ``name``, else the one an installed ``radistill.mixers`` entry point of that name
    gives (registered on the way), else None."""
    if name not in MIXERS:
        for point in entry_points(group=ENTRY_POINT_GROUP, name=name):
            register_mixer(name, point.load())
            break
    return MIXERS.get(name)


def get_mixer(name: str) -> type[RecurrentMixer]:
    """The mixer class registered as `name`."""
    cls = find_mixer(name)
    if cls is None:
        raise RadistillError(f"unknown mixer {name!r}: choose one of {', '.join(sorted(MIXERS))}")
    return cls


__all__ = ["ENTRY_POINT_GROUP", "MIXERS", "DiscreteMamba2", "MixerBank", "RecurrentMixer", "WindowAttention",
           "WindowRecurrent", "find_mixer", "get_mixer", "mixer_kwargs", "register_mixer"]
