"""Recipes: defaults, JSON/YAML round trips, CLI overrides, and the `radistill distill` command end to end."""

import json

import pytest
import typer
from typer.testing import CliRunner

from radistill.distill.cli import overrides_from_flags, register, resolve_recipe
from radistill.distill.recipe import DistillRecipe, merge
from radistill.utils.errors import RadistillError
from distill_helpers import (
    char_tokenizer, tiny_student, tiny_teacher, write_corpus,
)


def test_defaults_follow_the_authors():
    recipe = DistillRecipe()
    assert recipe.enabled_stages() == [2, 3]  # stage 1 off for hybrids, as the paper
    s2, s3 = recipe.stage(2), recipe.stage(3)
    assert (s2.tokens, s2.lr, s3.tokens, s3.lr) == (5_000_000_000, 1e-4, 20_000_000_000, 1e-5)
    assert (s3.seq_len, s3.batch_size * s3.grad_accum, s3.betas, s3.weight_decay) == (2048, 128, (0.9, 0.95), 0.1)
    assert (s3.schedule, s3.warmup, s3.decay) == ("wsd", 0.1, 0.1)


def test_round_trips_through_json_and_yaml(tmp_path):
    recipe = merge(DistillRecipe(), {"stages": {"3": {"lr": 3e-5, "loss": {"ce_weight": 0.2}}}, "seed": 7})
    recipe.save(tmp_path / "r.json")
    assert DistillRecipe.load(tmp_path / "r.json") == recipe
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe.to_dict()))
    assert DistillRecipe.load(tmp_path / "r.yaml") == recipe
    assert json.loads((tmp_path / "r.json").read_text())["stages"]["3"]["loss"]["ce_weight"] == 0.2


@pytest.mark.parametrize("bad, match", [
    ({"stages": {"2": {"lr_max": 1}}}, "unknown recipe key 'recipe.stages.2.lr_max'"),
    ({"stages": {"3": {"schedule": "linear"}}}, "schedule 'linear'"),
    ({"stages": {"2": {"trainable": "heads"}}}, "trainable 'heads'"),
    ({"stages": {"2": {"warmup": 0.7, "decay": 0.5}}}, "warmup"),
    ({"dtype": "fp8"}, "dtype 'fp8'"),
    ({"parallel": "zero3"}, "parallel 'zero3'"),
    ({"shard_teacher": True}, "set parallel to fsdp"),
    ({"parallel": "fsdp", "shard_teacher": True}, "shard_teacher is for stage 3 only"),  # stage 2 is on
    ({"parallel": "fsdp", "stages": {"3": {"trainable": "lora"}}}, "'lora' does not run with parallel fsdp"),
    ({"parallel": "fsdp", "stages": {"3": {"optimizer": "adamw8bit"}}}, "adamw8bit does not run with parallel fsdp"),
])
def test_invalid_recipes_are_rejected(bad, match):
    with pytest.raises(RadistillError, match=match):
        merge(DistillRecipe(), bad)


def test_flags_override_the_recipe_file(tmp_path):
    (tmp_path / "r.yaml").write_text("stages:\n  3:\n    lr: 2.0e-5\n    seq_len: 512\nseed: 3\n")
    flags = overrides_from_flags(stages="1,3", seq_len=1024, tokens={3: 1000}, lr={1: 5e-4}, data="x.txt")
    recipe = resolve_recipe(tmp_path / "run", tmp_path / "r.yaml", flags, resume=False)
    assert recipe.enabled_stages() == [1, 3]
    assert (recipe.stage(3).lr, recipe.stage(3).seq_len, recipe.stage(3).tokens) == (2e-5, 1024, 1000)
    assert (recipe.stage(1).lr, recipe.seed, recipe.data.source) == (5e-4, 3, "x.txt")
    with pytest.raises(RadistillError, match="--stages"):
        overrides_from_flags(stages="2,4")
    flags = overrides_from_flags(stages="3", parallel="fsdp", shard_teacher=True)
    sharded = resolve_recipe(tmp_path / "run", None, flags, resume=False)
    assert (sharded.parallel, sharded.shard_teacher, sharded.enabled_stages()) == ("fsdp", True, [3])


def test_commands_add_the_recommended_teacher_text_unless_the_user_chose(tmp_path):
    """`radistill distill` / `radistill run` mix in teacher text (the measured winner) where the user set no share;
    DistillRecipe() itself stays the plain recipe; a resumed run keeps its recipe.json; sharded teachers get none."""
    assert DistillRecipe().data.teacher_share == 0.0
    small = resolve_recipe(tmp_path / "run", None, overrides_from_flags(tokens={2: 2048, 3: 8192}), resume=False)
    assert small.data.teacher_share == 0.25
    assert small.data.teacher_documents == 5  # ceil(0.25 * 10,240 / (32 + 480)): the texts the budget reads once
    big = resolve_recipe(tmp_path / "run", None, {}, resume=False)  # 25B tokens: capped at the default count
    assert (big.data.teacher_share, big.data.teacher_documents) == (0.25, DistillRecipe().data.teacher_documents)
    off = overrides_from_flags(tokens={3: 8192})
    off.setdefault("data", {})["teacher_share"] = 0.0  # --data teacher:0
    assert resolve_recipe(tmp_path / "run", None, off, resume=False).data.teacher_share == 0.0
    (tmp_path / "r.yaml").write_text("data:\n  teacher_share: 0.1\n  teacher_documents: 7\n")
    chosen = resolve_recipe(tmp_path / "run", tmp_path / "r.yaml", {}, resume=False)
    assert (chosen.data.teacher_share, chosen.data.teacher_documents) == (0.1, 7)
    sharded = resolve_recipe(tmp_path / "run", None, overrides_from_flags(stages="3", parallel="fsdp",
                                                                          shard_teacher=True), resume=False)
    assert sharded.data.teacher_share == 0.0
    run = tmp_path / "old-run"
    run.mkdir()
    DistillRecipe().save(run / "recipe.json")  # a run started without teacher text resumes without it
    assert resolve_recipe(run, None, {}, resume=True).data.teacher_share == 0.0


def test_distill_command_end_to_end(tmp_path):
    teacher = tiny_teacher()
    tokenizer = char_tokenizer()
    tiny_student(teacher).save_pretrained(tmp_path / "student")
    for model in ("teacher", "student"):
        tokenizer.save_pretrained(tmp_path / model)
    teacher.save_pretrained(tmp_path / "teacher")
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, docs=40)
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer's subcommand form
    args = ["distill", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--data", str(corpus),
            "--out", str(tmp_path / "run"), "--stages", "2,3", "--tokens-stage2", "128", "--tokens-stage3", "128",
            "--seq-len", "16", "--micro-batch", "2", "--grad-accum", "1", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    saved = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert saved["stages"]["3"]["tokens"] == 128 and saved["data"]["source"] == str(corpus)
    for stage in (2, 3):
        assert (tmp_path / "run" / f"stage{stage}" / "config.json").exists()
    # resuming a finished run does nothing more; resuming with other settings is refused
    assert CliRunner().invoke(app, [*args, "--resume"]).exit_code == 0
    changed = CliRunner().invoke(app, [*args, "--resume", "--lr-stage3", "1e-3"])
    assert isinstance(changed.exception, RadistillError) and "recipe differs" in str(changed.exception)


def test_budget_not_a_whole_number_of_steps_is_announced(corpus, tokenizer, tmp_path):
    """The note says exactly what the trainer then runs (rounded down to whole steps, up to one step)."""
    from distill_helpers import tiny_recipe, tiny_student, tiny_teacher
    from radistill.distill.run import whole_step_notes
    from radistill.distill.trainer import Trainer

    per_step = 16 * 2 * 2  # tiny_recipe: seq_len 16, batch 2, accum 2
    assert whole_step_notes(tiny_recipe(corpus, stages=(2,), tokens=3 * per_step), 1) == []
    small = whole_step_notes(tiny_recipe(corpus, stages=(2,), tokens=per_step // 2), 1)
    assert small == [f"stage 2: {per_step // 2} tokens is not a whole number of optimizer steps of {per_step} tokens "
                     f"(2 x 16 x 2 accum x 1 ranks); it runs 1 step = {per_step} tokens"]
    recipe = tiny_recipe(corpus, stages=(2, 3), tokens=per_step * 5 // 2)
    notes = whole_step_notes(recipe, 2)  # stage 3 splits its data over the ranks, stage 2 does not
    assert notes[0].endswith(f"it runs 2 steps = {2 * per_step} tokens")
    assert notes[1].endswith(f"it runs 1 step = {2 * per_step} tokens")
    teacher = tiny_teacher()
    recipe = tiny_recipe(corpus, stages=(2,), tokens=per_step * 5 // 2)
    results = Trainer(tiny_student(teacher), teacher, tokenizer, recipe, tmp_path / "run", "cpu").run()
    assert results[0].tokens == 2 * per_step
