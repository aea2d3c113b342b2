"""Evaluation: KV retrieval (log-likelihood and generation), perplexity, user JSONL tasks, lm-eval tasks, and
coverage = student ÷ teacher in the paper's knowledge-focused and retrieval-heavy groups."""

from radistill.utils.lazy import lazy_exports

# imported on first use, so that importing this package (as `radistill --help` does) does not import torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "radistill.eval.coverage": ("EvalReport", "TaskResult", "coverage"),
    "radistill.eval.kv": ("KVEvalConfig",),
    "radistill.eval.runner": ("EvalConfig", "evaluate", "evaluate_model", "evaluate_path"),
})

__all__ = ["EvalConfig", "EvalReport", "KVEvalConfig", "TaskResult", "coverage", "evaluate", "evaluate_model",
           "evaluate_path"]
