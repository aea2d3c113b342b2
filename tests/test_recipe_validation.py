"""Recipe values of the wrong type are one error naming the key and what it expects (exit 2), for `radistill
distill --recipe` and `radistill run`; numbers written unambiguously as strings are converted."""

from __future__ import annotations

from pathlib import Path

import pytest

from radistill.cli import main
from radistill.distill.recipe import DistillRecipe
from radistill.pipeline import Recipe
from radistill.utils.errors import RadistillError

# (YAML of the distill section, the key named, what is expected)
BAD = [
    ("stages: {2: {tokens: lots}}", "stages.2.tokens", "a whole number"),
    ("stages: {2: {lr: [1, 2]}}", "stages.2.lr", "a number"),
    ("stages: {2: {seq_len: 128.5}}", "stages.2.seq_len", "a whole number"),
    ("seed: abc", "seed", "a whole number"),
    ("stages: [1, 2]", "stages", "a mapping"),
    ('stages: {2: {enabled: "no"}}', "stages.2.enabled", "true or false"),
    ("stages: {2: {tokens: 1024.9}}", "stages.2.tokens", "a whole number"),
    ("stages: {3: {loss: {temperature: hot}}}", "stages.3.loss.temperature", "a number"),
    ("stages: {2: {betas: 0.9}}", "stages.2.betas", "a list of 2 numbers"),
    ("compile: 1", "compile", "true or false"),
    # the capability candidates' options (data packing, BOS, teacher text, stage 1 recalibration)
    ('data: {bos: "yes"}', "data.bos", "true or false"),
    ("data: {packing: [documents]}", "data.packing", "a string"),
    ("data: {teacher_share: lots}", "data.teacher_share", "a number"),
    ("data: {teacher_documents: 2.5}", "data.teacher_documents", "a whole number"),
    ("stages: {1: {recalibrate: 1}}", "stages.1.recalibrate", "true or false"),
]


def _run(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("text,key,expected", BAD, ids=[b[1] + ":" + b[0] for b in BAD])
def test_distill_recipe_file(text, key, expected, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text + "\n")
    code, err = _run(["distill", tmp_path / "student", "--teacher", tmp_path / "teacher", "--out",
                      tmp_path / "run", "--recipe", recipe], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"'{key}'" in err and expected in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,key,expected", BAD[:4], ids=[b[1] for b in BAD[:4]])
def test_run_recipe_distill_section(text, key, expected, tmp_path, capsys):
    recipe = tmp_path / "run.yaml"
    indented = text.replace("\n", "\n  ")
    recipe.write_text(f"teacher: {tmp_path / 'teacher'}\nout: out\ndistill:\n  {indented}\n")
    code, err = _run(["run", recipe], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"'{key}'" in err and expected in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,key", [
    ("students: x", "students"), ("students: [{name: a, keep: many}]", "students.0.keep"),
    ("scan: {pairs: abc}", "scan.pairs"), ("threads: 1.5", "threads"), ("students: [3]", "students.0"),
    ("distill: [1]", "distill"), ("scan: {samples: 8.5}", "scan.samples"),
])
def test_run_recipe_sections(text, key, tmp_path, capsys):
    recipe = tmp_path / "run.yaml"
    recipe.write_text(f"teacher: {tmp_path / 'teacher'}\nout: out\n{text}\n")
    code, err = _run(["run", recipe], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"'{key}'" in err, err


def test_numbers_spelled_as_strings_are_converted():
    # YAML 1.1 reads 1e-4 (no dot) as a string; these spell a number unambiguously
    recipe = DistillRecipe.from_dict({"stages": {2: {"tokens": "50e6", "lr": "1e-4", "seq_len": 512.0}}})
    assert (recipe.stages[2].tokens, recipe.stages[2].lr, recipe.stages[2].seq_len) == (50_000_000, 1e-4, 512)
    assert type(recipe.stages[2].tokens) is int and type(recipe.stages[2].lr) is float
    assert DistillRecipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_dict({"teacher": "t", "scan": {"pairs": "20"}}).scan.pairs == 20


def test_enabled_no_does_not_run_the_stage():
    with pytest.raises(RadistillError, match="stages.3.enabled"):
        DistillRecipe.from_dict({"stages": {3: {"enabled": "no"}}})
