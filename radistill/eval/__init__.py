"""Evaluation: KV retrieval (log-likelihood and generation), perplexity, user JSONL tasks, lm-eval tasks, and
coverage = student ÷ teacher in the paper's knowledge-focused and retrieval-heavy groups."""

from radistill.eval.coverage import EvalReport, TaskResult, coverage
from radistill.eval.kv import KVEvalConfig
from radistill.eval.runner import EvalConfig, evaluate, evaluate_model, evaluate_path

__all__ = ["EvalConfig", "EvalReport", "KVEvalConfig", "TaskResult", "coverage", "evaluate", "evaluate_model",
           "evaluate_path"]
