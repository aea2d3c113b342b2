"""Registers the hybrid with transformers' Auto classes (imported for that effect by :mod:`radistill._autoregister`).

After it, ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` ``.from_pretrained(student_dir)`` load a
student without ``trust_remote_code``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from radistill.hybrid.configuration import MODEL_TYPE, HybridConfig
from radistill.hybrid.modeling import HybridForCausalLM, HybridModel

AutoConfig.register(MODEL_TYPE, HybridConfig, exist_ok=True)
AutoModel.register(HybridConfig, HybridModel, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
