"""``import radistill`` keeps ``AutoModelForCausalLM.from_pretrained(student)`` working although the registration
is lazy (``radistill.cli`` must not import torch): each import order is checked in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill_helpers import tiny_student, tiny_teacher

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("student")
    tiny_student(tiny_teacher()).save_pretrained(path)
    return path


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


LOAD = ("from transformers import AutoModelForCausalLM; "
        "print(type(AutoModelForCausalLM.from_pretrained({path!r})).__name__)")


@pytest.mark.parametrize("first", [
    # transformers imported afterwards, by the user; the CLI module alone registers nothing
    "import radistill.cli, radistill._autoregister as r; assert not r.registered()",
    pytest.param("import transformers; import radistill", marks=pytest.mark.slow),  # registered at once
    "import radistill.models.access",  # transformers imported inside a radistill module (the cycle case)
], ids=["radistill-first", "transformers-first", "inside-radistill"])
def test_auto_classes_load_a_student(first, student_dir):
    assert _python(f"{first}; " + LOAD.format(path=str(student_dir))) == "HybridForCausalLM"


@pytest.mark.slow
def test_without_radistill_transformers_does_not_know_the_student(student_dir):
    """The check above can fail: without radistill, the student's model type is unknown to transformers.

    The folder's auto_map names its loader module, so transformers would otherwise ask (on stdin) whether to run it;
    ``trust_remote_code=False`` is the answer a user without radistill gives (``test_student_folder`` checks what the
    loader says when it is trusted)."""
    code = ("from transformers import AutoConfig\ntry:\n"
            "    AutoConfig.from_pretrained({path!r}, trust_remote_code=False); print('known')\n"
            "except (ValueError, KeyError):\n    print('unknown')").format(path=str(student_dir))
    assert _python(code) == "unknown"

