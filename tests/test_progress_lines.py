"""Off a terminal (a log file, CI), distillation prints a plain progress line every ``log_every`` steps."""

from __future__ import annotations

import re

from radistill.distill.trainer import Trainer
from radistill.utils.console import console, progress
from distill_helpers import tiny_recipe, tiny_student, tiny_teacher


def test_a_line_per_log_step_off_a_terminal(corpus, tokenizer, tmp_path, capsys):
    assert not console.is_terminal  # pytest captures stderr: as in a log file
    per_step = 16 * 2 * 2
    recipe = tiny_recipe(corpus, stages=(2,), tokens=6 * per_step, log_every=2, checkpoint_every=100)
    teacher = tiny_teacher()
    Trainer(tiny_student(teacher), teacher, tokenizer, recipe, tmp_path / "run", "cpu").run()
    lines = re.findall(r"^stage 2: (\d+)/6 · loss (\d+\.\d+) · [\d,]+ tok/s · \d+ s$", capsys.readouterr().err, re.M)
    assert [int(step) for step, _ in lines] == [2, 4, 6]


def test_updates_without_a_status_print_nothing(capsys):
    """The scan advances its bar per batch without a status: no line each (only the bar's own final state)."""
    with progress(plain_lines=True) as bar:
        task = bar.add_task("scanning", total=100, status="")
        for _ in range(100):
            bar.update(task, advance=1)
        bar.update(task, status="done")
    err = capsys.readouterr().err
    assert err.count("scanning: ") == 1 and "scanning: 100/100 · done" in err
