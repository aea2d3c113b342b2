"""`radistill demo` and `radistill run` end with the results table, read from the eval results the run wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from radistill.cli import main
from radistill.eval.coverage import RETRIEVAL, EvalReport, TaskResult


def _fake_run(root: Path, teacher_dir: Path) -> None:
    """What a finished pipeline run leaves that the table reads: recipe, students' config/selection, eval JSONs."""
    teacher_dir.mkdir(parents=True, exist_ok=True)
    (teacher_dir / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 10, "num_attention_heads": 8, "num_key_value_heads": 4}))
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.json").write_text(json.dumps(
        {"teacher": str(teacher_dir), "students": [{"name": "top16"}, {"name": "no-heads"}]}))
    scores = {"teacher": (0.9, 12.5), "top16": (0.72, 14.0), "no-heads": (0.09, 15.25)}
    kept = {"top16": [[0, 1]] * 8, "no-heads": [[]] * 10}
    for name, (kv, ppl) in scores.items():
        tasks = [TaskResult("kv_ret", "acc", kv, group=RETRIEVAL), TaskResult("kv_ret@5", "acc", 1.0),
                 TaskResult("ppl", "perplexity", ppl, higher_is_better=False)]
        report = EvalReport(name, "f" * 16, tasks)
        if name != "teacher":
            student = root / "students" / name
            student.mkdir(parents=True)
            (student / "config.json").write_text(json.dumps({"kept_heads": kept[name]}))
            (student / "selection.json").write_text(json.dumps(
                {"keep": sum(map(len, kept[name])), "kv_heads_cached": {"total": 8 if kept[name][0] else 0}}))
            report = report.with_teacher(EvalReport("teacher", "t" * 16, [TaskResult("kv_ret", "acc", 0.9,
                                                                                     group=RETRIEVAL)]))
        report.save(root / "eval" / f"{name}.json")


@pytest.mark.parametrize("command", ["demo", "run"])
def test_results_table_at_the_end(command, tmp_path, monkeypatch, capsys):
    import radistill.pipeline as pipeline

    out = tmp_path / "out"

    def fake_run(self):  # the steps themselves are tested in test_pipeline.py; here only what is printed after
        _fake_run(self.layout.root, tmp_path / "teacher")
        return self.layout.root / "report" / "index.html"

    monkeypatch.setattr(pipeline.Pipeline, "run", fake_run)
    if command == "demo":
        args = ["demo", "--out", str(out), "--teacher", str(tmp_path / "teacher")]
    else:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"teacher: {tmp_path / 'teacher'}\nout: {out}\n")
        args = ["run", str(recipe)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 0, err
    rows = {line.split(bar)[1].strip(): [c.strip() for c in line.split(bar)[2:-1]]
            for line in err.splitlines() for bar in "│┃" if line.count(bar) > 4}
    assert rows["model"] == ["kept heads", "KV heads", "kv_ret", "ppl", "coverage"]
    assert rows["teacher"] == ["all 80", "40", "90.0", "12.50", "—"]
    assert rows["top16"] == ["16", "8", "72.0", "14.00", "80.0%"]
    assert rows["no-heads"] == ["0", "0", "9.0", "15.25", "10.0%"]
    assert err.index("results") < err.index("report:")
