"""radistill: retrieval-aware distillation of Transformers into head-level Transformer-SSM hybrids.

Importing the package registers the hybrid model with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(student_dir)`` works without ``trust_remote_code``.
"""

__version__ = "0.1.0"

from radistill import hybrid as _hybrid  # noqa: E402,F401  (Auto-class registration)
from radistill.hybrid.mixers import register_mixer  # noqa: E402

__all__ = ["__version__", "register_mixer"]
