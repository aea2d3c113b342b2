"""radistill: retrieval-aware distillation of Transformers into head-level Transformer-SSM hybrids.

After ``import radistill``, ``AutoModelForCausalLM.from_pretrained(student_dir)`` works without
``trust_remote_code``: the hybrid model is registered with transformers' Auto classes.

The registration imports torch and transformers (seconds), so it is lazy: it runs as soon as transformers has been
imported (now, if it already is; otherwise right after ``import transformers`` and the radistill imports around it
have finished). ``radistill --help`` and a usage error therefore never load torch, while anything that can call an
Auto class (which means it imported transformers) finds the hybrid registered. See :mod:`radistill._autoregister`.
"""

__version__ = "0.1.0"

from radistill._autoregister import install as _install_autoregister  # noqa: E402

_install_autoregister()


def register_mixer(name: str, cls: type) -> None:
    """Register a head module under ``name`` for ``build --mixer NAME`` / ``--kept-mixer NAME`` (see docs/hybrid.md,
    "Writing a mixer"). Imported here lazily: the mixers import torch."""
    from radistill.hybrid.mixers import register_mixer as register

    register(name, cls)


__all__ = ["__version__", "register_mixer"]
