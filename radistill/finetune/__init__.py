"""LoRA fine-tuning of students (issue 7): adapters on the recurrent heads and the kept heads, or everywhere."""

from radistill.finetune.lora import (LoraSpec, LoraSummary, adapter_norms, adapter_parameters, add_lora,
                                     check_adapter_gradients, load_adapter, merge_lora)
from radistill.finetune.targets import DEFAULT_TARGETS, parse_targets, target_modules
from radistill.finetune.train import FinetuneConfig, FinetuneResult, causal_lm_loss, lm_loss, make_optimizer, train

__all__ = [
    "DEFAULT_TARGETS", "FinetuneConfig", "FinetuneResult", "LoraSpec", "LoraSummary", "adapter_norms",
    "adapter_parameters", "add_lora", "causal_lm_loss", "check_adapter_gradients", "lm_loss", "load_adapter",
    "make_optimizer", "merge_lora", "parse_targets", "target_modules", "train",
]
