"""Stage 3 on the teacher's top-k logits stored on disk: the coarsened KL against a whole-logits oracle, the
precompute (exact stream, resumable, refused when damaged or foreign), and training on it without the teacher."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import typer
from typer.testing import CliRunner

import radistill.distill.teacher_logits as tl
from radistill.distill.checkpoint import sha256
from radistill.distill.cli import overrides_from_flags, register
from radistill.distill.data import PackedStream
from radistill.distill.losses import (
    distillation_loss, reference_topk_distillation_loss, teacher_topk, topk_distillation_loss,
)
from radistill.distill.recipe import DataConfig, DistillRecipe, LossConfig, merge
from radistill.distill.stages import make_objective
from radistill.distill.trainer import Trainer
from radistill.memplan.distill import plan_distill, recipe_overrides
from radistill.memplan.estimate import GiB
from radistill.memplan.shapes import Shapes
from radistill.models import presets
from radistill.utils.errors import RadistillError
from distill_helpers import (
    char_tokenizer, run_two_gloo_processes, tiny_recipe, tiny_student, tiny_teacher, write_corpus,
)

TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 1e-2)}  # rtol, atol relative to the largest value


class Interrupt(Exception):
    pass


def assert_close(got, want, dtype):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * want.abs().max().item())


# ---- the loss --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 5, 22])
@pytest.mark.parametrize("cfg", [LossConfig(chunk_tokens=5), LossConfig(ce_weight=0.5, temperature=2.0, chunk_tokens=7),
                                 LossConfig(kl_weight=0.0, ce_weight=1.0, chunk_tokens=64)])
def test_topk_loss_and_gradients_match_the_whole_logits_reference(dtype, k, cfg):
    batch, seq, hidden, vocab = 2, 9, 8, 23
    h = torch.randn(batch, seq, hidden, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=dtype, requires_grad=True)
    teacher_logits = 3 * torch.randn(batch, seq, vocab)
    ids = torch.randint(0, vocab, (batch, seq))
    logprobs, indices, lse = teacher_topk(teacher_logits.flatten(0, 1), k, cfg.temperature)
    torch.testing.assert_close(cfg.temperature * (logprobs + lse[:, None]),  # the logits are recoverable
                               teacher_logits.flatten(0, 1).gather(1, indices), rtol=1e-5, atol=1e-5)
    if dtype == torch.bfloat16:  # as stored on disk
        logprobs = logprobs.half()

    fused = topk_distillation_loss(h, w, logprobs.view(batch, seq, k), indices.view(batch, seq, k).int(), ids, cfg)
    got = torch.autograd.grad(fused * 3.0, (h, w))
    ref = reference_topk_distillation_loss(h @ w.t(), teacher_logits, ids, k, cfg)
    want = torch.autograd.grad(ref * 3.0, (h, w))
    assert_close(fused, ref, dtype)
    for g, r in zip(got, want):
        assert g.dtype == dtype
        assert_close(g, r, dtype)


def test_topk_loss_with_every_token_is_the_full_kl():
    batch, seq, hidden, vocab = 2, 9, 8, 23
    cfg = LossConfig(ce_weight=0.3, temperature=1.5, chunk_tokens=4)
    h = torch.randn(batch, seq, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    th, tw = torch.randn(batch, seq, hidden), torch.randn(vocab, hidden)
    ids = torch.randint(0, vocab, (batch, seq))
    logprobs, indices, _ = teacher_topk((th @ tw.t()).flatten(0, 1), vocab, cfg.temperature)
    topk = topk_distillation_loss(h, w, logprobs.view(batch, seq, vocab), indices.view(batch, seq, vocab), ids, cfg)
    full = distillation_loss(h, w, th, tw, ids, cfg)
    torch.testing.assert_close(topk, full, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(topk, (h, w)), torch.autograd.grad(full, (h, w))):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_topk_loss_stays_finite_when_the_student_leaves_no_tail():
    """A student 200 nats surer of the top k than of anything else: 1 - sum q_i would be 0 in fp32 (log 0 = -inf);
    the tail summed off the top k, from its own maximum, gives the finite loss and gradient of the reference."""
    vocab, k = 23, 4
    teacher_logits = torch.randn(1, 6, vocab)
    logprobs, indices, _ = teacher_topk(teacher_logits.flatten(0, 1), k)
    student_logits = torch.zeros(6, vocab).scatter_(1, indices, 200.0)
    h = student_logits[None].clone().requires_grad_(True)  # hidden = logits: the head is the identity
    head = torch.eye(vocab)
    ids = torch.zeros(1, 6, dtype=torch.long)
    loss = topk_distillation_loss(h, head, logprobs[None], indices[None], ids, LossConfig())
    (grad,) = torch.autograd.grad(loss, h)
    ref_h = student_logits[None].clone().requires_grad_(True)
    ref = reference_topk_distillation_loss(ref_h, teacher_logits, ids, k, LossConfig())
    (ref_grad,) = torch.autograd.grad(ref, ref_h)
    assert torch.isfinite(loss) and loss > 50  # the teacher's tail mass costs ~200 nats per unit
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


# ---- the precompute --------------------------------------------------------------------------------------------------
SEQ, K = 16, 8


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 5 sequences (16 tokens, top 8: 100 B/token)."""
    monkeypatch.setattr(tl, "SHARD_BYTES", 5 * SEQ * tl.bytes_per_token(K))


@pytest.fixture
def setup(corpus, tokenizer):
    recipe = tiny_recipe(corpus, stages=(3,))
    teacher = tiny_teacher()
    return teacher, tl.logits_settings(teacher, tokenizer, recipe.data, 3, SEQ, K, 1.0), recipe


def precompute(teacher, tokenizer, root, settings, sequences):
    tl.precompute(teacher, tokenizer, root, settings, sequences, batch_size=2, chunk_tokens=24, autocast=False)


def test_precompute_stores_the_teachers_topk_of_the_stream(setup, tokenizer, tmp_path, small_shards):
    teacher, settings, recipe = setup
    precompute(teacher, tokenizer, tmp_path / "logits", settings, 12)
    manifest = json.loads((tmp_path / "logits" / "manifest.json").read_text())
    assert [s["sequences"] for s in manifest["shards"]] == [5, 5, 2]
    assert (manifest["sequences"], manifest["tokens"], manifest["bytes_per_token"]) == (12, 12 * SEQ, K * 6 + 4)
    for shard in manifest["shards"]:  # k fp16 log-probs + k int32 ids + an fp32 lse per token, 8 B per sequence
        payload = shard["sequences"] * (SEQ * (K * 6 + 4) + 8)
        assert payload < shard["bytes"] < payload + 1024
    ids = PackedStream(recipe.data, tokenizer, SEQ, seed=3).next_batch(12)[3:9]  # across the first two shards
    logprobs, indices = tl.TeacherLogits(tmp_path / "logits", settings, 12).read(3, ids)
    with torch.no_grad():
        want_logprobs, want_indices, _ = teacher_topk(teacher(ids).logits.flatten(0, 1), K)
    assert (logprobs.dtype, indices.dtype, logprobs.shape) == (torch.float16, torch.int32, (6, SEQ, K))
    assert torch.equal(indices.flatten(0, 1).long(), want_indices)
    torch.testing.assert_close(logprobs.flatten(0, 1).float(), want_logprobs, rtol=1e-3, atol=1e-3)


def test_an_interrupted_precompute_resumes_to_the_same_files(setup, tokenizer, tmp_path, small_shards, monkeypatch):
    teacher, settings, _ = setup
    precompute(teacher, tokenizer, tmp_path / "whole", settings, 12)
    write = tl._write_shard

    def crash_after_the_second_shard(path, tensors):  # its file is written, the manifest does not list it yet
        write(path, tensors)
        if path.name == "shard-000001.safetensors":
            raise Interrupt

    monkeypatch.setattr(tl, "_write_shard", crash_after_the_second_shard)
    with pytest.raises(Interrupt):
        precompute(teacher, tokenizer, tmp_path / "cut", settings, 12)
    assert json.loads((tmp_path / "cut" / "manifest.json").read_text())["sequences"] == 5
    monkeypatch.setattr(tl, "_write_shard", write)
    precompute(teacher, tokenizer, tmp_path / "cut", settings, 12)
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "cut").iterdir())
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name
    # a longer stage extends a shorter precompute: other shard boundaries (and teacher batches), the same logits
    precompute(teacher, tokenizer, tmp_path / "grown", settings, 7)
    precompute(teacher, tokenizer, tmp_path / "grown", settings, 12)
    ids = PackedStream(DataConfig(**settings["data"]), tokenizer, SEQ, seed=3).next_batch(12)
    grown, whole = (tl.TeacherLogits(tmp_path / run, settings, 12).read(0, ids) for run in ("grown", "whole"))
    assert torch.equal(grown[1], whole[1])
    torch.testing.assert_close(grown[0], whole[0], rtol=0, atol=4e-3)  # at most an fp16 step apart


def _truncate(root, manifest):
    path = root / "shard-000001.safetensors"
    path.write_bytes(path.read_bytes()[:-10])


def _corrupt(root, manifest):
    path = root / "shard-000001.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))


def _swap(root, manifest):  # another shard's file, with a manifest entry made to match its bytes
    shutil.copy(root / "shard-000000.safetensors", root / "shard-000002.safetensors")
    manifest["shards"][2].update(bytes=(root / "shard-000002.safetensors").stat().st_size,
                                 sha256=sha256(root / "shard-000002.safetensors"))
    (root / "manifest.json").write_text(json.dumps(manifest))


def _miscount(root, manifest):
    manifest["shards"][1]["sequences"] = 4
    (root / "manifest.json").write_text(json.dumps(manifest))


DAMAGE = {
    "truncated": (_truncate, r"has \d+ bytes, its manifest says \d+ \(truncated"),
    "corrupted": (_corrupt, "does not match its sha256 .*corrupted"),
    "missing": (lambda root, m: (root / "shard-000001.safetensors").unlink(), "shard-000001.safetensors is missing"),
    "no manifest": (lambda root, m: (root / "manifest.json").unlink(), "has no manifest.json"),
    "shard and manifest disagree": (_swap, r"'logprobs' should be F16 \[2, 16, 8\], it holds F16 \[5, 16, 8\]"),
    "manifest inconsistent": (_miscount, "inconsistent: shard-000002.safetensors starts at sequence 10"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_teacher_logits_are_refused_with_the_fix(setup, tokenizer, tmp_path, small_shards, damage):
    teacher, settings, recipe = setup
    root = tmp_path / "logits"
    precompute(teacher, tokenizer, root, settings, 12)
    spoil, match = DAMAGE[damage]
    spoil(root, json.loads((root / "manifest.json").read_text()))
    ids = PackedStream(recipe.data, tokenizer, SEQ, seed=3).next_batch(12)
    with pytest.raises(tl.TeacherLogitsError, match=match) as info:
        tl.TeacherLogits(root, settings, 12).read(0, ids)
    assert f"delete {root}" in str(info.value)


def test_teacher_logits_for_other_settings_or_tokens_are_refused(setup, tokenizer, tmp_path, small_shards):
    teacher, settings, recipe = setup
    root = tmp_path / "logits"
    precompute(teacher, tokenizer, root, settings, 12)
    other = tl.logits_settings(teacher, tokenizer, recipe.data, 3, SEQ, 4, 2.0)
    for attempt in (lambda: tl.TeacherLogits(root, other, 12), lambda: precompute(teacher, tokenizer, root, other, 12)):
        with pytest.raises(tl.TeacherLogitsError, match=r"other settings: temperature 1.0 \(this run: 2.0\); "
                                                        r"topk 8 \(this run: 4\)\. Delete"):
            attempt()
    retrained = tl.logits_settings(tiny_teacher(seed=1), tokenizer, recipe.data, 3, SEQ, K, 1.0)
    with pytest.raises(tl.TeacherLogitsError, match="teacher.fingerprint"):
        tl.TeacherLogits(root, retrained, 12)
    with pytest.raises(tl.TeacherLogitsError, match="holds the teacher logits of 12 sequences, stage 3 needs 20"):
        tl.TeacherLogits(root, settings, 20)
    ids = PackedStream(recipe.data, tokenizer, SEQ, seed=3).next_batch(12)
    with pytest.raises(tl.TeacherLogitsError, match="sequences 1-4 .* made from other tokens"):
        tl.TeacherLogits(root, settings, 12).read(1, ids[:4])  # sequences 0-3 read as if they were 1-4
    with pytest.raises(RadistillError, match="teacher_topk 300 is more than the vocabulary"):
        tl.logits_settings(teacher, tokenizer, recipe.data, 3, SEQ, 300, 1.0)


# ---- stage 3 on stored logits ----------------------------------------------------------------------------------------
def topk_recipe(corpus, k: int, **stage):
    recipe = tiny_recipe(corpus, stages=(3,), **stage)
    return merge(recipe, {"stages": {3: {"teacher_logits": "topk", "teacher_topk": k}}})


def fresh_pair():
    teacher = tiny_teacher()
    return teacher, tiny_student(teacher)


def test_stage3_learns_from_stored_logits_and_never_runs_the_teacher(corpus, tokenizer, tmp_path, monkeypatch):
    import radistill.distill.trainer as trainer

    recipe = topk_recipe(corpus, k=64, tokens=16 * 4 * 15, lr=1e-3)
    teacher, student = fresh_pair()
    online = make_objective(3, student, teacher, recipe.stage(3), [0, 1])
    probe = PackedStream(recipe.data, tokenizer, 16, seed=99).next_batch(8)

    def kl_now():
        value = float(online.step(probe, scale=0.0))
        student.zero_grad(set_to_none=True)
        return value

    inside = []
    real = trainer.precompute

    def watched(*args, **kwargs):
        inside.append(True)
        real(*args, **kwargs)
        inside.pop()

    monkeypatch.setattr(trainer, "precompute", watched)
    calls = []  # the objective and the precompute run the teacher's base model (its LM head is applied in chunks)
    teacher.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(bool(inside)), with_kwargs=True)
    before = kl_now()
    calls.clear()
    Trainer(student, teacher, tokenizer, recipe, tmp_path / "run", "cpu").run()
    assert calls and all(calls), "the teacher ran outside the precompute"
    assert kl_now() < 0.8 * before  # the full KL falls (to ~half), trained on the top 64 of 256
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 15 and all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    manifest = json.loads((tmp_path / "run" / "teacher_logits" / "manifest.json").read_text())
    assert manifest["sequences"] == 15 * 2 * 2 and manifest["settings"]["seed"] == 3


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_stage3_on_every_token_stored_ends_where_online_ends(corpus, tokenizer, tmp_path):
    """k = vocabulary: the same KL, only the teacher's log-probabilities rounded to fp16 on disk. That rounding moves
    two AdamW steps by ~3% of their length here (stored in fp32: < 0.1%; the top 128 of these 256: ~55%)."""
    results = {}
    for name, recipe in (("online", tiny_recipe(corpus, stages=(3,), tokens=16 * 4 * 2, lr=1e-3)),
                         ("topk", topk_recipe(corpus, k=256, tokens=16 * 4 * 2, lr=1e-3))):
        teacher, student = fresh_pair()
        start = params_of(student)
        Trainer(student, teacher, tokenizer, recipe, tmp_path / name, "cpu").run()
        results[name] = params_of(student)
    moved = torch.cat([(results["online"][n] - start[n]).flatten() for n in start]).norm()
    apart = torch.cat([(results["topk"][n] - results["online"][n]).flatten() for n in start]).norm()
    assert moved > 0 and apart < 0.05 * moved, (apart, moved)


def test_stage3_on_stored_logits_resumes_exactly(corpus, tokenizer, tmp_path, small_shards):
    recipe = topk_recipe(corpus, k=K)  # 6 steps of 4 sequences, checkpoints every 2; shards of 5 sequences
    teacher, student = fresh_pair()
    Trainer(student, teacher, tokenizer, recipe, tmp_path / "whole", "cpu").run()
    want = params_of(student)

    def hook(stage, step):
        if step == 3:
            raise Interrupt

    teacher, student = fresh_pair()
    with pytest.raises(Interrupt):
        Trainer(student, teacher, tokenizer, recipe, tmp_path / "cut", "cpu", step_hook=hook).run()
    teacher, student = fresh_pair()
    Trainer(student, teacher, tokenizer, recipe, tmp_path / "cut", "cpu").run(resume=True)
    got = params_of(student)
    assert all(torch.equal(got[n], want[n]) for n in want)


def train_topk(corpus, run_dir, world: int):
    tl.SHARD_BYTES = 3 * SEQ * tl.bytes_per_token(K)  # several shards, so that both ranks compute some
    teacher, student = fresh_pair()
    recipe = merge(topk_recipe(corpus, k=K, lr=1e-3), {"stages": {3: {"batch_size": 2 // world}}})
    Trainer(student, teacher, char_tokenizer(), recipe, run_dir, "cpu").run()
    return student


def train_topk_two_ranks(corpus, run_dir):
    return train_topk(corpus, run_dir, world=2)


def test_two_gloo_processes_on_stored_logits_agree_with_one(corpus, tokenizer, tmp_path, monkeypatch):
    """Two ranks compute the shards of each round and read their slices of each batch. The one-process run trains on
    their logits: the teachers' forwards at 1 and 2 sequences differ in the last fp32 bit, which fp16 storage can
    round to a whole step apart."""
    monkeypatch.setattr(tl, "SHARD_BYTES", tl.SHARD_BYTES)  # train_topk sets it: restored after the test
    two = run_two_gloo_processes(train_topk_two_ranks, (corpus, tmp_path / "run2"), tmp_path / "two.pt")
    shutil.copytree(tmp_path / "run2" / "teacher_logits", tmp_path / "run1" / "teacher_logits")
    one = train_topk(corpus, tmp_path / "run1", world=1).state_dict()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5, msg=name)  # 1% of a step
    manifest = json.loads((tmp_path / "run2" / "teacher_logits" / "manifest.json").read_text())
    assert [s["sequences"] for s in manifest["shards"]] == [3] * 8
    # what the ranks stored is what one process stores
    settings = manifest["settings"]
    precompute(tiny_teacher(), tokenizer, tmp_path / "one", settings, 24)
    ids = PackedStream(DataConfig(**settings["data"]), tokenizer, SEQ, seed=3).next_batch(24)
    mine, theirs = (tl.TeacherLogits(root, settings, 24).read(0, ids)
                    for root in (tmp_path / "one", tmp_path / "run2" / "teacher_logits"))
    assert torch.equal(mine[1], theirs[1])
    torch.testing.assert_close(mine[0], theirs[0], rtol=2e-3, atol=2e-3)


# ---- settings and the plan -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    ({3: {"teacher_logits": "disk"}}, "teacher_logits 'disk' is not one of online, topk"),
    ({2: {"teacher_logits": "topk"}}, "stage 2: teacher_logits 'topk' is for stage 3 only"),
    ({3: {"teacher_topk": 0}}, "teacher_topk must be a whole number >= 1"),
])
def test_teacher_logits_settings_are_validated(bad, match):
    with pytest.raises(RadistillError, match=match):
        merge(DistillRecipe(), {"stages": bad})


def test_teacher_logits_settings_round_trip_and_come_from_flags(tmp_path):
    flags = overrides_from_flags(teacher_logits="topk", teacher_topk=32)
    assert flags["stages"] == {3: {"teacher_logits": "topk", "teacher_topk": 32}}
    recipe = merge(DistillRecipe(), flags)
    recipe.save(tmp_path / "r.json")
    assert DistillRecipe.load(tmp_path / "r.json") == recipe
    assert (recipe.stage(3).teacher_logits, recipe.stage(2).teacher_logits) == ("topk", "online")


def test_distill_command_precomputes_and_trains_on_stored_logits(tmp_path):
    teacher, tokenizer = tiny_teacher(), char_tokenizer()
    tiny_student(teacher).save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    for model in ("teacher", "student"):
        tokenizer.save_pretrained(tmp_path / model)
    write_corpus(tmp_path / "corpus.txt", docs=40)
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer's subcommand form
    run = tmp_path / "run"
    args = ["distill", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--data",
            str(tmp_path / "corpus.txt"), "--out", str(run), "--stages", "3", "--tokens-stage3", "128", "--seq-len",
            "16", "--micro-batch", "2", "--grad-accum", "1", "--device", "cpu", "--teacher-logits", "topk",
            "--teacher-topk", "32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    stage3 = json.loads((run / "recipe.json").read_text())["stages"]["3"]
    assert (stage3["teacher_logits"], stage3["teacher_topk"]) == ("topk", 32)
    manifest = json.loads((run / "teacher_logits" / "manifest.json").read_text())
    assert (manifest["settings"]["topk"], manifest["sequences"], manifest["bytes_per_token"]) == (32, 8, 196)
    assert (run / "stage3" / "config.json").exists()


@pytest.fixture(scope="module")
def nanbeige_student():
    return Shapes(presets.shape_config("nanbeige4.1-3b"), keep=13, state_size=8).student_config


def test_the_plan_uses_stored_logits_only_when_the_recipe_asks(nanbeige_student):
    stage3 = {"stages": {2: {"enabled": False}, 3: {"tokens": 10**9}}}
    online = merge(DistillRecipe(), stage3)
    step = plan_distill(nanbeige_student, online, "12GiB").steps[0]
    assert not step.fits and step.strategy.teacher == "resident"  # never chosen by the plan ...
    assert any(n.startswith("fits with --teacher-logits topk (opt-in") for n in step.notes)  # ... but offered
    recipe = merge(online, {"stages": {3: {"teacher_logits": "topk"}}})
    plan = plan_distill(nanbeige_student, recipe, "12GiB")
    step = plan.steps[0]
    assert step.fits and step.strategy.teacher == "topk"
    # what stage 3 holds of the teacher: the micro-batch's stored top-64 and one chunk of them unpacked
    tokens, rows = step.strategy.micro_batch * 2048, step.strategy.logits_chunk
    assert step.memory.teacher == (tokens * 6 + rows * 24) * 64 < 0.1 * GiB
    assert any("388 B/token" in n for n in step.notes)
    assert any(n.startswith("before stage 3 the teacher alone") and "361.4 GiB on disk" in n for n in step.notes)
    assert merge(recipe, recipe_overrides(plan, recipe)).stage(3).teacher_logits == "topk"
