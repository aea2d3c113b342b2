"""lm-evaluation-harness, offline: a local task YAML over a JSON file written here, on the shipped teacher and on a
hybrid student, with the model object handed to lm-eval (no registration, no hub)."""

import json
from pathlib import Path

import pytest

from eval_helpers import constant_model
from radistill.eval.harness import lm_eval_tasks, pick_metric
from radistill.eval.runner import EvalConfig, evaluate_model
from radistill.utils.errors import RadistillError

pytest.importorskip("lm_eval")

EXAMPLE_TEACHER = Path(__file__).resolve().parents[1] / "examples" / "teacher-19m"

TASK_YAML = """\
task: tiny_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A task whose right answer is always ' no' (one token), so a model favouring ' no' scores 1.0."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    rows = [{"question": f"Is {n} a prime number of the kernel?", "choices": [" yes", " no"], "answer": 1}
            for n in range(6)]
    (root / "tiny.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "tiny_capitals.yaml").write_text(TASK_YAML.format(data=root / "tiny.jsonl"))
    return root


@pytest.fixture(scope="module")
def teacher():
    from radistill.models.access import load_model

    return load_model(EXAMPLE_TEACHER, device="cpu", dtype="fp32")


def test_local_task_on_a_rigged_model(teacher, task_dir):
    _, tokenizer = teacher
    (no,) = tokenizer(" no", add_special_tokens=False).input_ids
    (result,) = lm_eval_tasks(constant_model(tokenizer, no), tokenizer, {"tiny_capitals": "knowledge"},
                              include_path=task_dir, batch_size=4)
    assert (result.name, result.metric, result.value, result.group, result.samples) == (
        "tiny_capitals", "acc", 1.0, "knowledge", 6)


def test_local_task_through_evaluate_model(teacher, task_dir):
    model, tokenizer = teacher
    config = EvalConfig(tasks=("tiny_capitals@retrieval",), include_path=str(task_dir), limit=3)
    (result,) = evaluate_model(model, tokenizer, config)
    assert result.group == "retrieval" and result.samples == 3 and 0.0 <= result.value <= 1.0


def test_local_task_on_a_hybrid_student(teacher, task_dir, tmp_path):
    from radistill.hybrid.build import build_student
    from radistill.models.access import load_model
    from radistill.models.presets import random_model, tiny_config

    _, tokenizer = teacher
    tiny = random_model(tiny_config("llama", vocab_size=len(tokenizer)))
    student_dir = build_student(tiny, tmp_path / "student", heads="1.0,2.3", tokenizer=tokenizer, state_size=8)
    student, _ = load_model(student_dir, device="cpu", dtype="fp32")
    assert student.config.model_type == "radistill_hybrid"
    (result,) = lm_eval_tasks(student, tokenizer, {"tiny_capitals": None}, include_path=task_dir, batch_size=3)
    assert result.samples == 6 and 0.0 <= result.value <= 1.0


def test_unknown_task_names_the_fix(teacher):
    model, tokenizer = teacher
    with pytest.raises(RadistillError, match="--include-path"):
        lm_eval_tasks(model, tokenizer, {"no_such_task_xyz": None})


def test_pick_metric_prefers_the_papers_metric():
    metrics = {"alias": "hs", "acc,none": 0.3, "acc_stderr,none": 0.01, "acc_norm,none": 0.4}
    assert pick_metric("hellaswag", metrics) == ("acc_norm", 0.4)
    assert pick_metric("piqa", metrics) == ("acc", 0.3)
    assert pick_metric("gsm8k", {"exact_match,strict-match": 0.1}) == ("exact_match", 0.1)
