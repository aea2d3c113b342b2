"""The head-level Transformer-SSM hybrid (issue 3). Registration with the Auto classes happens here.

After ``import radistill`` (or ``import radistill.hybrid``), ``AutoConfig`` / ``AutoModel`` /
``AutoModelForCausalLM`` ``.from_pretrained(student_dir)`` load a student without ``trust_remote_code``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from radistill.hybrid.cache import HybridCache, HybridLayerCache
from radistill.hybrid.card import write_model_card
from radistill.hybrid.configuration import MODEL_TYPE, HybridConfig
from radistill.hybrid.modeling import (
    HybridDecoderLayer,
    HybridForCausalLM,
    HybridMixer,
    HybridModel,
    HybridPreTrainedModel,
    KeptHeadAttention,
    output_cache,
)
from radistill.hybrid.normalizer import StaticNormalizer

AutoConfig.register(MODEL_TYPE, HybridConfig, exist_ok=True)
AutoModel.register(HybridConfig, HybridModel, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)

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
    "write_model_card",
]
