"""A distillation run's folder is never overwritten, its checkpoints never execute code, and resume survives a
damaged latest.json, a torn metrics line and deleted checkpoints."""

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from radistill.distill import checkpoint as ckpt
from radistill.distill.checkpoint import CheckpointError, latest
from radistill.distill.trainer import Trainer
from radistill.utils.errors import RadistillError
from distill_helpers import (
    Interrupt, fresh_pair, params_of, stop_at, tiny_recipe, tiny_student, tiny_teacher, write_corpus,
)


def interrupted(corpus, tokenizer, run, recipe, stop=(3, 5)):
    teacher, student = fresh_pair()
    with pytest.raises(Interrupt):
        Trainer(student, teacher, tokenizer, recipe, run, "cpu", step_hook=stop_at(stop)).run()


def resumed(tokenizer, run, recipe):
    teacher, student = fresh_pair()
    Trainer(student, teacher, tokenizer, recipe, run, "cpu").run(resume=True)
    return params_of(student)


@pytest.fixture(scope="module")
def uninterrupted(tokenizer, tmp_path_factory):
    """The stage-3 student after an uninterrupted run (6 steps, checkpoints every 2) on the ``corpus`` fixture's
    documents (the same generator and seed)."""
    where = tmp_path_factory.mktemp("whole")
    write_corpus(where / "corpus.txt", docs=50)
    teacher, student = fresh_pair()
    Trainer(student, teacher, tokenizer, tiny_recipe(where / "corpus.txt", stages=(3,)), where / "run", "cpu").run()
    return params_of(student)


def printed(capsys) -> str:
    """What the run printed (the console writes to stderr), with rich's line wrapping undone."""
    captured = capsys.readouterr()
    return " ".join((captured.out + captured.err).split())


def assert_same(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


# --- nothing overwritten ---------------------------------------------------------------------------------------
def test_a_finished_run_without_checkpoints_is_refused_not_restarted(corpus, tokenizer, tmp_path):
    """The user's report: checkpoints/ deleted, then `distill` into the same --out started over silently."""
    recipe = tiny_recipe(corpus, stages=(3,))
    run = tmp_path / "run"
    teacher, student = fresh_pair()
    Trainer(student, teacher, tokenizer, recipe, run, "cpu").run()
    shutil.rmtree(run / "checkpoints")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(RadistillError, match=r"already holds a distillation run \(metrics.jsonl, recipe.json, "
                                             r"stage3\): pass --resume"):
        Trainer(student, teacher, tokenizer, recipe, run, "cpu").run()
    # and --resume cannot continue it either (its checkpoints are gone): refused, not started over
    teacher, student = fresh_pair()
    with pytest.raises(RadistillError, match="holds exported stages \\(stage3\\) but no checkpoint"):
        Trainer(student, teacher, tokenizer, recipe, run, "cpu").run(resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("artifact", ["recipe.json", "metrics.jsonl", "stage2", "checkpoints"])
def test_any_run_artifact_makes_a_fresh_run_refuse(corpus, tokenizer, tmp_path, artifact):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("the user's own file")  # not a run's: alone it would not be refused
    if "." in artifact:
        (run / artifact).write_text("{}\n")
    else:
        (run / artifact).mkdir()
    teacher, student = fresh_pair()
    with pytest.raises(RadistillError, match=f"already holds a distillation run \\({artifact}\\)"):
        Trainer(student, teacher, tokenizer, tiny_recipe(corpus, stages=(3,)), run, "cpu").run()
    assert sorted(p.name for p in run.iterdir()) == sorted([artifact, "notes.txt"])


def test_run_distill_refuses_before_loading_any_model(tmp_path, monkeypatch):
    from radistill.distill.run import run_distill

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("radistill.distill.run.load_model", no_loading)
    run = tmp_path / "run"
    (run / "stage2").mkdir(parents=True)
    with pytest.raises(RadistillError, match=r"already holds a distillation run \(stage2\): pass --resume"):
        run_distill("student", "teacher", tiny_recipe(tmp_path / "corpus.txt"), run, device="cpu")


def test_a_folder_with_other_files_only_is_used(corpus, tokenizer, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    teacher, student = fresh_pair()
    Trainer(student, teacher, tokenizer, tiny_recipe(corpus, stages=(3,), tokens=16 * 4 * 2), run, "cpu").run()
    assert (run / "notes.txt").read_text() == "mine" and (run / "stage3").is_dir()


def test_resume_without_a_checkpoint_refuses_another_recipe(corpus, tokenizer, tmp_path):
    recipe = tiny_recipe(corpus, stages=(3,), checkpoint_every=100)  # the only checkpoint would be at the end
    run = tmp_path / "run"
    interrupted(corpus, tokenizer, run, recipe, stop=(3, 3))
    assert not (run / "checkpoints").exists()
    saved = (run / "recipe.json").read_text()
    teacher, student = fresh_pair()
    with pytest.raises(RadistillError, match="not this run's recipe"):
        Trainer(student, teacher, tokenizer, tiny_recipe(corpus, stages=(3,), lr=1e-4), run, "cpu").run(resume=True)
    assert (run / "recipe.json").read_text() == saved
    # the same recipe starts the run again from the beginning, as before
    resumed(tokenizer, run, recipe)
    assert latest(run / "checkpoints").name == "stage3-step00000006"


# --- latest.json damaged, checkpoints deleted, rotation --------------------------------------------------------
@pytest.mark.parametrize("damage", ["garbage", "empty", "missing", "names_a_deleted_checkpoint"])
def test_a_damaged_latest_json_resumes_from_the_newest_intact_checkpoint(corpus, tokenizer, tmp_path, damage,
                                                                         uninterrupted, capsys):
    recipe = tiny_recipe(corpus, stages=(3,))
    run = tmp_path / "run"
    interrupted(corpus, tokenizer, run, recipe)  # checkpoints at steps 2 and 4
    pointer = run / "checkpoints" / "latest.json"
    if damage == "garbage":
        pointer.write_bytes(b'{"checkpoint": "stage3-st\x00')
    elif damage == "empty":
        pointer.write_text("")
    elif damage == "missing":
        pointer.unlink()
    else:
        pointer.write_text(json.dumps({"checkpoint": "stage3-step00000008"}))
    got = resumed(tokenizer, run, recipe)
    assert "resuming from stage3-step00000004, the newest intact checkpoint" in printed(capsys)
    assert_same(got, uninterrupted)
    assert latest(run / "checkpoints").name == "stage3-step00000006"


def test_the_advice_for_a_damaged_checkpoint_works(corpus, tokenizer, tmp_path, uninterrupted):
    """Following the error's advice (delete the damaged checkpoint, --resume again) continues from the older one,
    and the run then ends exactly as an uninterrupted one."""
    recipe = tiny_recipe(corpus, stages=(3,))
    run = tmp_path / "run"
    interrupted(corpus, tokenizer, run, recipe)
    damaged = run / "checkpoints" / "stage3-step00000004"
    (damaged / "model.safetensors").write_bytes(b"\0" * 10)
    teacher, student = fresh_pair()
    with pytest.raises(CheckpointError, match=f"delete {damaged} and --resume again to continue from the newest "
                                              "intact older checkpoint \\(stage3-step00000002\\)"):
        Trainer(student, teacher, tokenizer, recipe, run, "cpu").run(resume=True)
    shutil.rmtree(damaged)
    assert_same(resumed(tokenizer, run, recipe), uninterrupted)
    assert [p.name for p in ckpt.checkpoints(run / "checkpoints")] == ["stage3-step00000004", "stage3-step00000006"]


def test_no_intact_checkpoint_is_refused_with_what_to_do(corpus, tokenizer, tmp_path):
    recipe = tiny_recipe(corpus, stages=(3,))
    run = tmp_path / "run"
    interrupted(corpus, tokenizer, run, recipe)
    (run / "checkpoints" / "latest.json").write_text("not json")
    for path in ckpt.checkpoints(run / "checkpoints"):
        (path / "manifest.json").unlink()
    teacher, student = fresh_pair()
    with pytest.raises(CheckpointError, match=r"is damaged .*no checkpoint in .* is intact .*start a fresh run"):
        Trainer(student, teacher, tokenizer, recipe, run, "cpu").run(resume=True)


def _fake_checkpoint(root: Path, name: str) -> None:
    partial = ckpt.partial_dir(root, name)
    partial.mkdir(parents=True)
    (partial / "trainer.json").write_text("{}")
    ckpt.publish(root, name, {}, keep=100)


def test_rotation_orders_by_stage_and_step_and_never_deletes_the_new_ones(tmp_path):
    """An abandoned attempt left stage3-step4/6 behind; the run now resumed at stage 2 must keep its own newest
    checkpoints, and drop the abandoned ones (which a damaged latest.json would otherwise make it resume from)."""
    root = tmp_path / "checkpoints"
    for name in ("stage2-step00000002", "stage3-step00000004", "stage3-step00000006"):
        _fake_checkpoint(root, name)
    for step in (4, 6, 8, 10):
        name = ckpt.checkpoint_name(2, step)
        partial = ckpt.partial_dir(root, name)
        partial.mkdir()
        (partial / "trainer.json").write_text("{}")
        ckpt.publish(root, name, {}, keep=2)
        assert [p.name for p in ckpt.checkpoints(root)] == [ckpt.checkpoint_name(2, step - 2), name]
        assert latest(root).name == name
    # ordering is numeric: a step past the zero padding still sorts after the ones before it
    assert ckpt.checkpoint_order("stage2-step100000000") > ckpt.checkpoint_order("stage2-step99999999")
    assert ckpt.checkpoint_order(".stage2-step00000002.partial") is None


# --- metrics.jsonl torn by kill -9 -----------------------------------------------------------------------------
def test_a_torn_last_metrics_line_is_dropped_on_resume(corpus, tokenizer, tmp_path, uninterrupted, capsys):
    recipe = tiny_recipe(corpus, stages=(3,))
    run = tmp_path / "run"
    interrupted(corpus, tokenizer, run, recipe)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"stage": 3, "step": 6, "tokens": 3')  # killed mid-write
    got = resumed(tokenizer, run, recipe)
    assert "dropped a torn last line" in printed(capsys)
    assert_same(got, uninterrupted)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]


def test_a_damaged_metrics_line_before_the_end_is_refused(corpus, tokenizer, tmp_path):
    recipe = tiny_recipe(corpus, stages=(3,))
    run = tmp_path / "run"
    interrupted(corpus, tokenizer, run, recipe)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    teacher, student = fresh_pair()
    with pytest.raises(RadistillError, match="metrics.jsonl line 2 is damaged"):
        Trainer(student, teacher, tokenizer, recipe, run, "cpu").run(resume=True)


# --- checkpoints never execute code ----------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates the directory ``marker``: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _plant_pickles(checkpoint: Path, marker: Path, old_format: bool) -> None:
    """Crafted pickles under the old file names, listed in a manifest whose hashes match them."""
    for name in ("model.pt", "trainer.pt", "rank0.pt"):
        with open(checkpoint / name, "wb") as fh:
            pickle.dump({"payload": _Payload(marker)}, fh)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    if old_format:
        for path in checkpoint.iterdir():
            if path.suffix in (".json", ".safetensors") and path.name != "manifest.json":
                path.unlink()
        manifest.pop("format")
        manifest["files"] = {}
    for name in ("model.pt", "trainer.pt", "rank0.pt"):
        manifest["files"][name] = {"sha256": ckpt.sha256(checkpoint / name), "bytes": (checkpoint / name).stat().st_size}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_crafted_pickles_in_a_checkpoint_are_never_loaded(corpus, tokenizer, tmp_path, uninterrupted, monkeypatch):
    recipe = tiny_recipe(corpus, stages=(3,))
    run, marker = tmp_path / "run", tmp_path / "pwned"
    interrupted(corpus, tokenizer, run, recipe)
    _plant_pickles(latest(run / "checkpoints"), marker, old_format=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for target in ("torch.load", "pickle.load", "pickle.loads", "pickle.Unpickler"):
        monkeypatch.setattr(target, refuse)
    assert_same(resumed(tokenizer, run, recipe), uninterrupted)  # bit-exact from safetensors + JSON alone
    assert not marker.exists()


def test_an_old_pickle_checkpoint_is_refused_not_loaded(corpus, tokenizer, tmp_path):
    recipe = tiny_recipe(corpus, stages=(3,))
    run, marker = tmp_path / "run", tmp_path / "pwned"
    interrupted(corpus, tokenizer, run, recipe)
    _plant_pickles(latest(run / "checkpoints"), marker, old_format=True)
    teacher, student = fresh_pair()
    with pytest.raises(CheckpointError, match="older format .* no longer loads because unpickling can run code"):
        Trainer(student, teacher, tokenizer, recipe, run, "cpu").run(resume=True)
    assert not marker.exists()


def test_the_package_never_unpickles():
    """No loader in radistill may use pickle (torch.load, pickle, numpy's allow_pickle)."""
    package = Path(__file__).resolve().parents[1] / "radistill"
    offenders = [f"{path.relative_to(package)}: {needle}" for path in package.rglob("*.py")
                 for needle in ("torch.load(", "import pickle", "pickle.load", "allow_pickle=True", "weights_only=False")
                 if needle in path.read_text()]
    assert offenders == []


def test_state_round_trips_through_safetensors_and_json(tmp_path):
    shared = torch.randn(3, 4)
    state = {
        "state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.randn(3, 4, dtype=torch.bfloat16)}},
        "param_groups": [{"params": [0, 1], "betas": (0.9, 0.95), "lr": 1e-3, "foreach": None, "amsgrad": False}],
        "tied": {"embed": shared, "head": shared},  # stored once, both names come back
        "rng": {"python": (3, tuple(range(625)), None),
                "numpy": ("MT19937", np.arange(624, dtype=np.uint32), 5, 0, 0.0), "dtype": torch.float32},
        "nan": float("nan"),
    }
    ckpt.save_state(state, tmp_path, "rank0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json", "rank0.safetensors"]
    back = ckpt.load_state(tmp_path, "rank0")
    assert back["param_groups"] == state["param_groups"] and back["rng"]["python"] == state["rng"]["python"]
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["state"][0]["exp_avg"].dtype == torch.bfloat16 and back["state"][0]["step"].shape == ()
    assert back["tied"]["embed"] is back["tied"]["head"] and torch.equal(back["tied"]["head"], shared)
    numpy_state = back["rng"]["numpy"]
    assert numpy_state[1].dtype == np.uint32 and np.array_equal(numpy_state[1], state["rng"]["numpy"][1])
    assert back["rng"]["dtype"] is torch.float32 and np.isnan(back["nan"])
    with pytest.raises(TypeError, match="cannot be stored without pickle"):
        ckpt.save_state({"obj": object()}, tmp_path, "bad")


def test_a_json_index_cannot_name_a_class_to_construct(tmp_path):
    ckpt.save_state({"x": torch.zeros(2)}, tmp_path, "rank0")
    index = json.loads((tmp_path / "rank0.json").read_text())
    index["state"] = {"subclass": "os.system", "inner": {}, "context": {"list": []}}
    (tmp_path / "rank0.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not on the allow-list"):
        ckpt.load_state(tmp_path, "rank0")


def test_model_weights_and_adapters_in_pickle_are_never_loaded(tmp_path):
    """A model directory holding only a pickled pytorch_model.bin, and an adapter holding only adapter_model.bin,
    are refused (the adapter's payload never runs)."""
    from radistill.finetune.lora import load_adapter
    from radistill.models.access import load_model

    marker = tmp_path / "pwned"
    model_dir = tmp_path / "model"
    teacher = tiny_teacher()
    teacher.config.save_pretrained(model_dir)
    torch.save(teacher.state_dict(), model_dir / "pytorch_model.bin")  # genuine weights: still refused
    with pytest.raises(RadistillError, match="model.safetensors"):
        load_model(model_dir, device="cpu")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with open(adapter / "adapter_model.bin", "wb") as fh:
        pickle.dump({"payload": _Payload(marker)}, fh)
    with pytest.raises(RadistillError, match="holds no adapter_model.safetensors"):
        load_adapter(teacher, adapter)
    assert not marker.exists()


def test_an_unreadable_tensor_file_is_a_checkpoint_error(tmp_path):
    ckpt.save_state({"x": torch.zeros(2)}, tmp_path, "rank0")
    (tmp_path / "rank0.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="cannot be read"):
        ckpt.load_state(tmp_path, "rank0")
