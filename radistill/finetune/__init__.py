"""LoRA fine-tuning of students: adapters on the recurrent heads and the kept heads, or everywhere."""

from radistill.utils.lazy import lazy_exports

# imported on first use, so that importing this package (as `radistill --help` does) does not import torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "radistill.finetune.lora": ("LoraSpec", "LoraSummary", "adapter_norms", "adapter_parameters", "add_lora",
                                "check_adapter_gradients", "load_adapter", "merge_lora"),
    "radistill.finetune.targets": ("DEFAULT_TARGETS", "parse_targets", "target_modules"),
    "radistill.finetune.train": ("FinetuneConfig", "FinetuneResult", "causal_lm_loss", "lm_loss", "make_optimizer",
                                 "train"),
})

__all__ = [
    "DEFAULT_TARGETS", "FinetuneConfig", "FinetuneResult", "LoraSpec", "LoraSummary", "adapter_norms",
    "adapter_parameters", "add_lora", "causal_lm_loss", "check_adapter_gradients", "lm_loss", "load_adapter",
    "make_optimizer", "merge_lora", "parse_targets", "target_modules", "train",
]
