"""``radistill build``: teacher + scan -> student directory, its record, calibration, and its errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import typer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode
from typer.testing import CliRunner

import radistill  # noqa: F401
from radistill.hybrid.build import build_student, convert, load_selection, student_config
from radistill.hybrid.calibrate import calibrate, calibration_batches, half_life_for_distance
from radistill.hybrid.normalizer import ChannelMoments
from radistill.models.access import model_layout, weights_fingerprint
from radistill.models.presets import random_model, tiny_config
from radistill.utils.errors import RadistillError

VOCAB = 260  # 256 bytes + 3 special tokens


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (no merges, no files, no network): 256 byte tokens + <eos>, <pad>, <bos>."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def short_text(tmp_path):
    """A short calibration file (one 256-token window): most tests need a calibrated student, not good statistics."""
    path = tmp_path / "short.txt"
    path.write_text("A short text to calibrate on, and a second sentence of it. " * 5)
    return path


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = random_model(tiny_config("llama", vocab_size=VOCAB))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def saved_teacher_and_cli(tmp_path):
    """A tiny random Llama teacher and its byte tokenizer saved in ``tmp_path/teacher``, its scan.json
    (:func:`write_scan`), and a typer app with the hybrid commands: -> (app, teacher, scan path)."""
    from radistill.hybrid.cli import register

    torch.manual_seed(0)
    teacher, tokenizer = random_model(tiny_config("llama", vocab_size=VOCAB)), byte_tokenizer()
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    scan = write_scan(tmp_path / "scan.json", teacher)
    app = typer.Typer()
    register(app)
    return app, teacher, scan


def write_scan(path, model, **changes) -> str:
    """A scan.json as `radistill scan` writes it: every head, ranked by a made-up score."""
    layout = model_layout(model)
    heads = [(l, h) for l in range(layout.num_layers) for h in range(layout.num_heads)]
    order = [(2, 1), (0, 3), (0, 0), (1, 2)] + [h for h in heads if h not in {(2, 1), (0, 3), (0, 0), (1, 2)}]
    data = {
        "model": "tiny-llama", "fingerprint": weights_fingerprint(model), "layout": layout.to_dict(),
        "probe": {"kind": "kv"}, "metric": "logprob", "ablation": "zero",
        "baseline": {"accuracy": 1.0, "logprob": -0.1},
        "heads": [{"layer": l, "head": h, "kv_head": layout.kv_head(h), "score": 1.0 / (i + 1),
                   "accuracy_drop": 0.0, "logprob_drop": 1.0 / (i + 1)} for i, (l, h) in enumerate(order)],
    }
    data.update(changes)
    path.write_text(json.dumps(data))
    return str(path)


def test_build_writes_a_loadable_student_and_its_record(tmp_path, teacher, tokenizer):
    scan = write_scan(tmp_path / "scan.json", teacher)
    tokenizer.save_pretrained(tmp_path / "tokenizer")  # loaded from a folder, as a teacher's is
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer", local_files_only=True)
    out = build_student(teacher, tmp_path / "student", scan=scan, keep=3, state_size=8, tokenizer=tokenizer)
    assert {"config.json", "model.safetensors", "selection.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind

    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.kept_heads == [[0, 3], [], [1]]
    assert student.config.mixer_settings["state_size"] == 8 and "conv_width" in student.config.mixer_settings
    record = load_selection(out)
    assert [h["name"] for h in record["kept_heads"]] == ["2.1", "0.3", "0.0"]
    assert [h["rank"] for h in record["kept_heads"]] == [1, 2, 3]
    assert [layer["kv_heads_cached"] for layer in record["layers"]] == [[0, 1], [], [0]]
    assert record["kv_heads_cached"] == {"total": 3, "teacher_total": 6}
    assert record["scan"] == scan and record["calibration"]["tokens"] > 500
    assert record["parameters"] == {"student": sum(p.numel() for p in student.parameters()),
                                    "teacher": sum(p.numel() for p in teacher.parameters())}
    card = (out / "README.md").read_text()
    ratio = record["parameters"]["student"] / record["parameters"]["teacher"]
    assert f"- parameters: {record['parameters']['student'] / 1e6:.1f}M against" in card and f"({ratio:.2f}x)" in card
    # the normaliser was calibrated (not the identity any more)
    assert not torch.allclose(student.model.layers[1].self_attn.normalizer.teacher_std, torch.ones(4, 16))
    ids = tokenizer("The value of the key is", return_tensors="pt").input_ids
    assert student.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    # its tokenizer pads on the left (the recurrent heads take no padding after a row's tokens), so a padded batch
    # goes straight into generate(); the caller's tokenizer is left as it was
    assert tokenizer.padding_side == "right"
    student_tokenizer = AutoTokenizer.from_pretrained(out)
    assert student_tokenizer.padding_side == "left"
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(saved)  # how the teacher's was loaded is not the student's
    batch = student_tokenizer(["The value", "The value of the key is"], return_tensors="pt", padding=True)
    alone = student.generate(ids, max_new_tokens=4, do_sample=False)
    together = student.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(together[1], alone[0])


def test_heads_by_hand_and_keeping_all_or_none(tmp_path, teacher, tokenizer, short_text):
    everything = ",".join(f"{l}.{h}" for l in range(3) for h in range(4))
    full = build_student(teacher, tmp_path / "all", heads=everything, tokenizer=tokenizer)
    none = build_student(teacher, tmp_path / "none", scan=write_scan(tmp_path / "scan.json", teacher), keep=0,
                         tokenizer=tokenizer, calibration_data=short_text)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = teacher(ids).logits
        assert (AutoModelForCausalLM.from_pretrained(full)(ids).logits - expected).abs().max() <= 1e-5
        pure = AutoModelForCausalLM.from_pretrained(none)
        assert torch.isfinite(pure(ids).logits).all()
    assert load_selection(none)["kv_heads_cached"]["total"] == 0
    assert load_selection(full)["source"] == "heads"


def test_calibration_matches_teacher_statistics(teacher, tokenizer):
    student = convert(teacher, student_config(teacher, [[0], [], [2, 3]], "discrete_mamba2", {"state_size": 8}))
    batches = calibration_batches(tokenizer)
    calibrate(student, teacher, batches)
    # Re-measure on the same text: the normalised mixer output has the teacher head's per-channel mean and std.
    layer, block = teacher.model.layers[1], student.model.layers[1].self_attn
    got, want = ChannelMoments(4, 16), ChannelMoments(4, 16)
    with torch.no_grad():
        for batch in batches:
            out = teacher(**batch, output_hidden_states=True)
            normed = layer.input_layernorm(out.hidden_states[1])
            y, _ = block.recurrent(normed, attention_mask=batch["attention_mask"])
            got.add(block.normalizer(y), batch["attention_mask"])
            captured = {}
            handle = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.update(x=a[0]))
            teacher(**batch)
            handle.remove()
            want.add(captured["x"].view(*captured["x"].shape[:2], 4, 16), batch["attention_mask"])
    (gm, gs), (wm, ws) = got.mean_std(), want.mean_std()
    assert torch.allclose(gm, wm, atol=1e-4) and torch.allclose(gs, ws, rtol=1e-3, atol=1e-5)


def test_calibration_data_is_packed_training_text(tmp_path, tokenizer):
    from radistill.distill.data import DOC_SEPARATOR

    docs = ["held out " * 40, "first training document. " * 12, "second training document. " * 12]
    source = tmp_path / "corpus.txt"
    source.write_text(DOC_SEPARATOR.join(docs))
    batches = calibration_batches(tokenizer, source, max_tokens=512, seq_len=128, batch_size=2)
    ids = torch.cat([b["input_ids"] for b in batches])
    assert ids.shape == (4, 128) and all(bool(b["attention_mask"].all()) for b in batches)
    text = tokenizer.decode(ids.flatten())
    assert "held out" not in text and text.startswith("first training document.")  # document 0 is held out
    single = tmp_path / "single.txt"
    single.write_text(docs[0])  # only held-out text: used rather than refused
    assert calibration_batches(tokenizer, single, seq_len=128)[0]["input_ids"].shape == (2, 128)
    with pytest.raises(RadistillError, match="fewer than one window"):
        calibration_batches(tokenizer, single, seq_len=4096, max_tokens=4096)
    with pytest.raises(RadistillError, match="does not exist"):
        calibration_batches(tokenizer, tmp_path / "missing.txt")


def test_half_life_for_distance_inverts_the_kernel_mean():
    half_life = torch.tensor([0.7, 1.0, 3.0, 40.0, 900.0], dtype=torch.float64)
    decay = 0.5 ** (1 / half_life)
    assert torch.allclose(half_life_for_distance(decay / (1 - decay)), half_life, rtol=1e-9)


def test_half_lives_follow_the_teachers_attention_distance(teacher, tokenizer):
    # q = 0 makes every head attend uniformly, so its typical distance is known in closed form.
    uniform = copy.deepcopy(teacher)
    for layer in uniform.model.layers:
        layer.self_attn.q_proj.weight.data.zero_()
    ids = torch.randint(0, 256, (2, 64))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    student = convert(uniform, student_config(uniform, [[0], [], [2, 3]], "discrete_mamba2", {"state_size": 8}))
    record = calibrate(student, uniform, batches)
    # query t sees keys 1..t (the first key is left out) uniformly: distances 0..t-1
    log_mean = torch.stack([torch.log1p(torch.arange(t, dtype=torch.float64)).mean() for t in range(1, 64)]).mean()
    expected = half_life_for_distance(torch.expm1(log_mean))
    got = student.model.layers[2].self_attn.recurrent.half_lives()
    assert torch.allclose(got, expected.expand_as(got), rtol=1e-5)
    assert record.half_lives == "attention" and len(record.half_life_tokens) == 3 and record.tokens == 128
    fixed = convert(uniform, student_config(uniform, [[0], [], [2, 3]], "discrete_mamba2", {"state_size": 8}))
    calibrate(fixed, uniform, batches, half_lives="fixed")
    spread = fixed.model.layers[0].self_attn.recurrent.half_lives()  # the mixer's default, 1 to 16 tokens
    assert spread.min() > 1 and spread.max() < 16 and torch.all(spread.diff() > 0)
    with pytest.raises(RadistillError, match="half_lives"):
        calibrate(fixed, uniform, batches, half_lives="long")


@pytest.mark.shared
@pytest.mark.slow
def test_calibrated_start_is_far_better_on_the_real_teacher(teacher_19m_path):
    """The init finding (docs/hybrid.md, "Initial quality") as a check: on teacher-19m, a fresh top-8 student's
    perplexity with half-lives from attention on prose is far below the old 8-1024 start's."""
    from radistill.eval.perplexity import read_text
    from radistill.models.access import load_model

    model, tok = load_model(teacher_19m_path, device="cpu", dtype="fp32")
    examples = Path(__file__).resolve().parents[1] / "examples" / "data"
    held = torch.tensor(tok(read_text(examples / "prose-heldout.txt.xz", 40_000)).input_ids[: 8 * 256]).view(8, 256)
    keep = [[6, 5, 1, 2], [7, 1], [], [], [], [], [], [], [3, 2], []]

    def perplexity(half_lives, settings):
        student = convert(model, student_config(model, keep, "discrete_mamba2", {"state_size": 16, **settings}))
        batches = calibration_batches(tok, examples / "prose-train.txt.xz", max_tokens=2048)
        calibrate(student, model, batches, half_lives=half_lives)
        with torch.no_grad():
            logits = student(input_ids=held).logits
        return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), held[:, 1:].flatten()).exp())

    old = perplexity("fixed", {"min_half_life": 8.0, "max_half_life": 1024.0})
    new = perplexity("attention", {})
    assert new < old / 4 and new < 100, (old, new)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(heads="3.0"), "layer 3 is out of range"),
        (dict(heads="0.4"), "head 4 .* out of range"),
        (dict(heads="0.1,zero.2"), "'zero.2' is not a head"),
        (dict(heads="0-1"), "LAYER.HEAD"),
        (dict(heads="0.1,0.1"), "twice"),
        (dict(keep=13, scan=True), "--keep 13 is out of range"),
        (dict(keep=-1, scan=True), "out of range"),
        (dict(keep=2, heads="0.1", scan=True), "not both"),
        (dict(keep=2), "say which heads"),
        (dict(heads="0.1", mixer="mamba9"), "unsupported mixer 'mamba9'"),
        (dict(heads="0.1", mixer_settings={"state_dim": 8}), "does not take the settings"),
        (dict(heads="0.1", state_size=0), "state_size"),
    ],
)
def test_clear_errors(tmp_path, teacher, tokenizer, kwargs, message):
    if kwargs.pop("scan", False):
        kwargs["scan"] = write_scan(tmp_path / "scan.json", teacher)
    with pytest.raises(RadistillError, match=message):
        build_student(teacher, tmp_path / "student", tokenizer=tokenizer, **kwargs)
    assert not (tmp_path / "student").exists()


def test_scan_of_another_model_is_refused(tmp_path, teacher, tokenizer, short_text):
    other = random_model(tiny_config("llama", vocab_size=VOCAB, num_attention_heads=8, num_key_value_heads=4,
                                     head_dim=8))
    with pytest.raises(RadistillError, match="scan of another model"):
        build_student(teacher, tmp_path / "s", scan=write_scan(tmp_path / "a.json", other), keep=2,
                      tokenizer=tokenizer)
    with pytest.raises(RadistillError, match="other weights"):
        build_student(teacher, tmp_path / "s", scan=write_scan(tmp_path / "b.json", teacher, fingerprint="0" * 16),
                      keep=2, tokenizer=tokenizer)
    # A scan of the same weights loaded in another dtype (bf16 on GPU) is a scan of this teacher.
    bf16 = write_scan(tmp_path / "c.json", teacher,
                      fingerprint=weights_fingerprint(copy.deepcopy(teacher).to(torch.bfloat16)))
    build_student(teacher, tmp_path / "s", scan=bf16, keep=1, tokenizer=tokenizer, calibration_data=short_text)


def test_existing_output_needs_overwrite(tmp_path, teacher, tokenizer, short_text):
    build_student(teacher, tmp_path / "s", heads="0.1", tokenizer=tokenizer, calibration_data=short_text)
    with pytest.raises(RadistillError, match="--overwrite"):
        build_student(teacher, tmp_path / "s", heads="0.2", tokenizer=tokenizer, calibration_data=short_text)
    build_student(teacher, tmp_path / "s", heads="0.2", tokenizer=tokenizer, overwrite=True,
                  calibration_data=short_text)
    assert load_selection(tmp_path / "s")["kept_heads"][0]["name"] == "0.2"


def test_cli_build(tmp_path, teacher, tokenizer, short_text):
    from radistill.hybrid.cli import register

    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    scan = write_scan(tmp_path / "scan.json", teacher)
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["build", str(tmp_path / "teacher"), "--scan", scan, "--keep", "2",
                                      "--state-size", "4", "--out", str(tmp_path / "student"), "--device", "cpu",
                                      "--dtype", "fp32", "--calibration-data", str(short_text)])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["model_type"] == "radistill_hybrid" and config["kept_heads"] == [[3], [], [1]]
    assert config["mixer_settings"]["state_size"] == 4
