"""The head-level Transformer-SSM hybrid (issue 3).

After ``import radistill``, ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` ``.from_pretrained(student_dir)``
load a student without ``trust_remote_code``: :mod:`radistill.hybrid.auto` registers the classes as soon as
transformers is imported (:mod:`radistill._autoregister`).
"""

from radistill.utils.lazy import lazy_exports

# imported on first use, so that importing this package (as `radistill --help` does) does not import torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "radistill.hybrid.cache": ("HybridCache", "HybridLayerCache"),
    "radistill.hybrid.configuration": ("MODEL_TYPE", "HybridConfig"),
    "radistill.hybrid.modeling": ("HybridDecoderLayer", "HybridForCausalLM", "HybridMixer", "HybridModel",
                                  "HybridPreTrainedModel", "KeptHeadAttention", "output_cache"),
    "radistill.hybrid.normalizer": ("StaticNormalizer",),
})

__all__ = [
    "HybridCache",
    "HybridConfig",
    "HybridDecoderLayer",
    "HybridForCausalLM",
    "HybridLayerCache",
    "HybridMixer",
    "HybridModel",
    "HybridPreTrainedModel",
    "KeptHeadAttention",
    "MODEL_TYPE",
    "StaticNormalizer",
    "output_cache",
]
