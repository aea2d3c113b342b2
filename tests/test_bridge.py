"""Bridges: a closed gate changes nothing, aligned memory is causal, only the bridge trains, save/load, the chunk
autoencoder learns, the fast attention matches its reference, and the CLI's errors are one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import radistill  # noqa: F401  (Auto-class registration)
from radistill.bridge.chunk_ae import (ChunkAEConfig, ChunkAutoencoder, chunk_batches, load_chunk_ae,
                                       round_trip_accuracy, train_chunk_ae)
from radistill.bridge.module import (CONFIG_NAME, FullWidthBridge, KeptHeadBridge, load_bridge, make_bridge,
                                     memory_attention)
from radistill.bridge.sources import ChunkSource, HiddenStateSource, parse_source
from radistill.bridge.task import OutsideItem
from radistill.bridge.train import accuracy, train_bridge
from radistill.models.presets import random_model, tiny_config
from radistill.utils.errors import RadistillError
from test_hybrid import MIXED, make_student, make_teacher

D_AUG = 12


@pytest.fixture(scope="module")
def teacher():
    return make_teacher()


@pytest.fixture(scope="module")
def student(teacher):
    return make_student(teacher, MIXED).eval()


def _open(bridge, value=0.8):
    with torch.no_grad():
        for gate in bridge.gate.values():
            gate.fill_(value)


def _ids(batch=2, length=7, seed=0):
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["kept-head", "full-width", "teacher"])
@pytest.mark.parametrize("aligned", [True, False])
def test_closed_gate_is_bit_identical_and_an_open_one_is_not(kind, aligned, teacher, student):
    model = teacher if kind == "teacher" else student
    bridge = make_bridge(model, d_aug=D_AUG, aligned=aligned, every=2 if kind == "full-width" else 0,
                         heads=MIXED if kind == "teacher" else None)
    ids, memory = _ids(), torch.randn(2, 7 if aligned else 5, D_AUG)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with bridge.use(memory):
            closed = model(input_ids=ids).logits
        _open(bridge)
        with bridge.use(memory):
            opened = model(input_ids=ids).logits
        bridge.detach()
        detached = model(input_ids=ids).logits
    assert torch.equal(plain, closed)
    assert not torch.allclose(plain, opened)
    assert torch.equal(plain, detached)


@pytest.mark.parametrize("kind", ["kept-head", "full-width"])
def test_aligned_memory_is_causal_and_unaligned_memory_is_seen_everywhere(kind, student):
    every = 2 if kind == "full-width" else 0
    ids, memory = _ids(), torch.randn(2, 7, D_AUG)
    changed = memory.clone()
    changed[:, 4] += 2.0
    for aligned in (True, False):
        bridge = make_bridge(student, d_aug=D_AUG, aligned=aligned, every=every)
        _open(bridge)
        with torch.no_grad():
            with bridge.use(memory):
                a = student(input_ids=ids).logits
            with bridge.use(changed):
                b = student(input_ids=ids).logits
        bridge.detach()
        diff = (a - b).abs().amax(-1)  # [B, T]
        if aligned:
            assert torch.equal(a[:, :4], b[:, :4]), "position t read a memory position after t"
            assert bool((diff[:, 4:] > 0).all())
        else:
            assert bool((diff > 0).all()), "an outside document must reach every position"


def test_aligned_memory_with_a_cache_matches_the_full_forward(student):
    """Decoding token by token, row t of the chunk sees the memory up to its own absolute position."""
    from radistill.hybrid import HybridCache

    ids, memory = _ids(1, 6), torch.randn(1, 6, D_AUG)
    bridge = make_bridge(student, d_aug=D_AUG, aligned=True)
    _open(bridge)
    with torch.no_grad():
        with bridge.use(memory):
            full = student(input_ids=ids).logits
        cache = HybridCache(student.config)
        steps = []
        for t in range(6):
            with bridge.use(memory[:, :t + 1]):
                steps.append(student(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    bridge.detach()
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("aligned", [True, False])
def test_fast_memory_attention_matches_the_reference(aligned):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 3, 7, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 3, 7, 8, generator=g, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    outs, grads = [], []
    for reference in (False, True):
        out = memory_attention(q, k, v, aligned=aligned, memory_mask=mask, reference=reference)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_parameter_counts(student):
    kept = make_bridge(student, d_aug=D_AUG)
    hd = student.config.head_dim
    assert isinstance(kept, KeptHeadBridge)
    assert kept.trainable_parameters() == sum(len(h) * (2 * D_AUG * hd + 1) for h in MIXED)
    full = make_bridge(student, d_aug=D_AUG, every=2)
    assert isinstance(full, FullWidthBridge) and full.layers == [1, 3]
    D, width = student.config.hidden_size, student.config.num_attention_heads * hd
    assert full.trainable_parameters() == 2 * (2 * D * width + 2 * D_AUG * width + D + 1)
    kept.detach(), full.detach()


def _items(n=8, pairs=2, seed=0):
    """Random token items: the answer is the source's first token; the prompt does not contain it."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        source = torch.randint(3, 100, (5,), generator=g).tolist()
        choices = [[source[0]], [(source[0] + 7) % 100 + 3]]
        items.append(OutsideItem(source, torch.randint(3, 100, (4,), generator=g).tolist(), choices[:pairs], 0))
    return items


@pytest.mark.parametrize("every", [0, 2])
def test_only_the_bridge_trains(every, student):
    model = copy.deepcopy(student)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = ChunkSource(ChunkAutoencoder(ChunkAEConfig(vocab_size=100, chunk=2, d_model=8, d_latent=D_AUG,
                                                       hidden=16)))
    ae_before = {k: v.clone() for k, v in source.ae.state_dict().items()}
    bridge = make_bridge(model, d_aug=D_AUG, every=every)
    initial = {k: v.clone() for k, v in bridge.state_dict().items()}
    history = train_bridge(model, bridge, source, _items(), steps=3, batch=4, lr=1e-2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, ae_before[k]) for k, v in source.ae.state_dict().items())
    assert all(not torch.equal(v, initial[k]) for k, v in bridge.state_dict().items()), "a bridge part did not train"
    assert all(p.grad is None for p in model.parameters())
    assert history["tokens"] > 0 and len(history["losses"]) == 3
    bridge.detach()


def test_stop_ends_training_early_and_counts_the_steps_taken(student):
    """``stop`` is asked before every step; the history reports the steps taken, not the steps asked for."""
    model = copy.deepcopy(student)
    source = ChunkSource(ChunkAutoencoder(ChunkAEConfig(vocab_size=100, chunk=2, d_model=8, d_latent=D_AUG,
                                                       hidden=16)))
    bridge = make_bridge(model, d_aug=D_AUG, every=0)
    asked = []
    history = train_bridge(model, bridge, source, _items(), steps=5, batch=2, lr=1e-2,
                           stop=lambda: asked.append(1) or len(asked) > 2)
    assert history["steps"] == 2 and len(history["losses"]) == 2 and len(asked) == 3
    assert train_bridge(model, bridge, source, _items(), steps=5, batch=2, stop=lambda: True)["steps"] == 0
    assert train_bridge(model, bridge, source, _items(), steps=3, batch=2)["steps"] == 3
    bridge.detach()


def test_bridge_learns_to_read_the_outside_memory(student):
    """A few dozen steps on items whose answer is only in the memory move accuracy above the model alone."""
    model = copy.deepcopy(student)
    torch.manual_seed(0)
    source = HiddenStateSource(random_model(tiny_config("llama", num_hidden_layers=1, vocab_size=128)), 1)
    items = _items(16)
    alone = accuracy(model, None, None, items)
    bridge = make_bridge(model, d_aug=source.d_aug, every=0)
    train_bridge(model, bridge, source, items, steps=60, batch=8, lr=2e-2)
    assert accuracy(model, bridge, source, items) > alone
    bridge.detach()


def test_save_load_round_trip(student, tmp_path):
    ids, memory = _ids(), torch.randn(2, 3, D_AUG)
    for every in (0, 2):
        model = copy.deepcopy(student)
        bridge = make_bridge(model, d_aug=D_AUG, every=every, source="chunk-ae:4")
        _open(bridge, 0.3)
        with torch.no_grad(), bridge.use(memory):
            want = model(input_ids=ids).logits
        bridge.detach()
        bridge.save(tmp_path / str(every))
        other = copy.deepcopy(student)
        loaded = load_bridge(other, tmp_path / str(every))
        assert loaded.config == bridge.config
        with torch.no_grad(), loaded.use(memory):
            torch.testing.assert_close(other(input_ids=ids).logits, want, atol=0, rtol=0)
        loaded.detach()
    config = json.loads((tmp_path / "0" / CONFIG_NAME).read_text())
    assert config["kind"] == "kept-head" and config["heads"] == MIXED


def test_load_refuses_what_does_not_fit(student, teacher, tmp_path):
    with pytest.raises(RadistillError, match="holds no bridge"):
        load_bridge(student, tmp_path)
    make_bridge(student, d_aug=D_AUG).save(tmp_path)
    wide = make_teacher(hidden_size=128)
    with pytest.raises(RadistillError, match="trained on a model shaped"):
        load_bridge(wide, tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"kind": "kept-head", "d_aug": "wide"}))
    with pytest.raises(RadistillError, match="d_aug"):
        load_bridge(student, tmp_path)


def test_bad_heads_and_memory_are_refused(student):
    with pytest.raises(RadistillError, match="not all kept"):
        make_bridge(student, d_aug=D_AUG, heads=[[2], [], [], []])
    with pytest.raises(RadistillError, match="not a radistill student"):
        make_bridge(make_teacher(), d_aug=D_AUG)
    bridge = make_bridge(student, d_aug=D_AUG, aligned=True)
    with pytest.raises(RadistillError, match=r"\[batch, positions, 12\]"):
        with bridge.use(torch.randn(2, 7, 5)):
            pass
    with pytest.raises(RadistillError, match="aligned memory"), bridge.use(torch.randn(2, 3, D_AUG)):
        student(input_ids=_ids())
    bridge.detach()
    for spec in ("chunk-ae:x", "model", "model@top"):
        with pytest.raises(RadistillError):
            parse_source(spec)
    assert parse_source("a/b@3") == ("model", "a/b", 3) and parse_source("chunk-ae:4") == ("chunk-ae", "", 4)


def test_chunk_autoencoder_round_trip_improves_with_training(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 50, (10,), generator=g).tolist() for _ in range(24)]
    ae = ChunkAutoencoder(ChunkAEConfig(vocab_size=50, chunk=4, d_model=16, d_latent=32, hidden=64))
    chunks = chunk_batches(sequences, ae)
    assert chunks.shape == (24 * 3, 4)  # 10 tokens -> 3 chunks of 4 (the last padded)
    before = round_trip_accuracy(ae, chunks)
    losses = train_chunk_ae(ae, chunks, steps=150, batch=32, lr=1e-2)
    after = round_trip_accuracy(ae, chunks)
    assert losses[-1] < losses[0] and after > max(before + 0.3, 0.9)
    ae.save(tmp_path)
    assert round_trip_accuracy(load_chunk_ae(tmp_path), chunks) == after
    memory, mask = ae.encode(torch.tensor([sequences[0], sequences[1][:5] + [0] * 5]),
                             torch.tensor([[True] * 10, [True] * 5 + [False] * 5]))
    assert memory.shape == (2, 3, 32) and mask.tolist() == [[True, True, True], [True, True, False]]


def test_hidden_state_source_reads_a_layer():
    model = random_model(tiny_config("llama", num_hidden_layers=2))
    source = HiddenStateSource(model, 1)
    ids = _ids()
    memory, mask = source.encode(ids)
    assert memory.shape == (2, 7, model.config.hidden_size) and bool(mask.all())
    want = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(memory, want)
    with pytest.raises(RadistillError, match="out of range"):
        HiddenStateSource(model, 5)


@pytest.mark.shared
def test_bridge_benchmark_quick_runs(tmp_path, teacher_19m_path):
    """benchmarks/bridge.py end to end at a tiny size: every row, the AE table, and the closed-gate equality."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    scan = root / "benchmarks" / "results" / "window-cpu-scan" / "scan.json"
    if not scan.exists():
        pytest.skip("the committed scan of teacher-19m is absent")
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "bridge.py"), "--quick", "--teacher",
                           str(teacher_19m_path), "--scan", str(scan), "--steps", "2", "--train-samples", "8",
                           "--eval-samples", "2", "--ae-steps", "2", "--ae-ks", "1,2", "--chunk", "2",
                           "--kv-samples", "2", "--ppl-tokens", "512", "--calibration-tokens", "2048",
                           "--results-dir", str(tmp_path), "--out", "b"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "b.json").read_text())
    assert [(r["bridge"], r["source"]) for r in result["rows"]] == [
        ("full-width every 2", "teacher@6"), ("kept-head", "teacher@6"), ("none", "-"), ("kept-head", "chunk-ae:2"),
        ("full-width every 2", "chunk-ae:2")]
    full, kept = result["rows"][0], result["rows"][1]
    assert all(r["steps"] == 2 and r["batch"] == 16 and not r["cut"] for r in result["rows"] if r["bridge"] != "none")
    assert 0 < kept["trainable_parameters"] < full["trainable_parameters"]
    assert result["gate_closed_equal"] and result["student_own"] == result["student_gate_closed"]
    assert result["complete"] is True
    assert [a["K"] for a in result["chunk_ae"]] == [1, 2]
    assert (tmp_path / "b.md").read_text().startswith("# Bridges on a teacher-19m student")


@pytest.mark.shared
@pytest.mark.slow  # four small runs of the script, about 40 s on two cores
def test_bridge_benchmark_merges_runs_refuses_to_overwrite_and_cuts_at_the_time_limit(tmp_path, teacher_19m_path):
    """A second run adds its rows to the first's file (--merge), a run without --merge refuses the file, and a row
    still training at the time limit stops and is recorded with the steps it took."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    scan = root / "benchmarks" / "results" / "window-cpu-scan" / "scan.json"
    if not scan.exists():
        pytest.skip("the committed scan of teacher-19m is absent")

    def run(*extra):
        return subprocess.run([sys.executable, str(root / "benchmarks" / "bridge.py"), "--quick", "--teacher",
                               str(teacher_19m_path), "--scan", str(scan), "--steps", "3", "--train-samples", "8",
                               "--eval-samples", "2", "--calibration-tokens", "2048", "--results-dir", str(tmp_path),
                               "--out", "b", *extra], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    first = run("--rows", "none")
    assert first.returncode == 0, first.stderr[-3000:]
    again = run("--rows", "none")
    assert again.returncode == 2 and "exists: pass --merge" in again.stderr
    merged = run("--rows", "kept-teacher", "--merge", "--time-limit", "1")
    assert merged.returncode == 0, merged.stderr[-3000:]
    result = json.loads((tmp_path / "b.json").read_text())
    assert [r["row"] for r in result["rows"]] == ["none", "kept-teacher"]
    assert len({r["run"] for r in result["rows"]}) == 2 and result["complete"] is True
    cut = result["rows"][1]
    assert cut["cut"] is True and cut["steps"] < cut["planned_steps"] == 3
    assert "(cut, of 3)" in (tmp_path / "b.md").read_text()
    assert "student_own" not in result  # no run asked for the gate-closed check
    wrong = run("--rows", "none", "--merge", "--pairs", "2")
    assert wrong.returncode == 2 and "would not line up" in wrong.stderr


def test_bridge_benchmark_upgrades_a_file_of_one_run():
    """Rows of a results file from before per-row settings take their file's steps, batch and lr."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bridge.py"
    spec = importlib.util.spec_from_file_location("bridge_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    old = {"steps": 600, "batch": 64, "lr": 3e-3, "train_samples": 4096, "eval_samples": 256, "device": "GPU",
           "rows": [{"bridge": "none", "source": "-", "trainable_parameters": 0, "training_tokens": 0,
                     "accuracy": {"2": 0.5}},
                    {"bridge": "kept-head", "source": "teacher@6", "trainable_parameters": 5, "training_tokens": 9,
                     "accuracy": {"2": 0.6}}]}
    rows = module.upgrade(old)["rows"]
    assert rows[0]["steps"] is None and rows[0]["row"] == "none"
    assert (rows[1]["steps"], rows[1]["batch"], rows[1]["lr"], rows[1]["eval_samples"]) == (600, 64, 3e-3, 256)
    assert module._settings(rows[1]) == "600 x 64, lr 0.003, 256 items"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tokenizer):
    """A tiny teacher and its student saved with teacher-19m's tokenizer (so the kv-outside items tokenize)."""
    root = tmp_path_factory.mktemp("bridge-models")
    teacher = make_teacher(vocab_size=len(tokenizer))
    student = make_student(teacher, MIXED)
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


@pytest.mark.shared
@pytest.mark.parametrize("source", ["chunk-ae:2", "teacher@2"])
def test_bridge_command_trains_saves_and_refuses_to_overwrite(source, tiny_dirs, tmp_path, capsys):
    from radistill.cli import main

    spec = source if source.startswith("chunk") else f"{tiny_dirs / 'teacher'}@2"
    out = tmp_path / "b"
    args = ["bridge", str(tiny_dirs / "student"), "--source", spec, "--out", str(out), "--steps", "3", "--pairs",
            "2,3", "--train-samples", "4", "--eval-samples", "3", "--ae-steps", "2", "--device", "cpu"]
    with pytest.raises(SystemExit) as done:
        main(args)
    first = capsys.readouterr()
    assert done.value.code == 0, first.err
    assert "kept-head bridge:" in first.err and "2 pairs: KV accuracy" in first.err  # the console is stderr
    result = json.loads((out / "bridge_results.json").read_text())
    assert result["bridge"] == "kept-head" and result["bridged_heads"] == sum(map(len, MIXED))
    assert set(result["accuracy_with_bridge"]) == {"2", "3"} and result["training_tokens"] > 0
    assert (out / "chunk_ae").exists() == source.startswith("chunk")
    from transformers import AutoModelForCausalLM

    load_bridge(AutoModelForCausalLM.from_pretrained(tiny_dirs / "student"), out).detach()
    weights = (out / "bridge.safetensors").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as again:
        main(args)
    err = capsys.readouterr().err
    assert again.value.code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert (out / "bridge.safetensors").read_bytes() == weights


@pytest.mark.parametrize("extra, message", [
    (["--task", "kv"], "not a bridge task"),
    (["--source", "chunk-ae:0"], "chunk-ae:K"),
    (["--source", "model@x"], "MODEL@LAYER"),
    (["--pairs", "2,x"], "whole numbers"),
    (["--heads", "1.1", "--full-width-every", "2"], "give one"),
])
def test_bridge_command_errors_are_one_line(extra, message, tmp_path, capsys):
    from radistill.cli import main

    args = ["bridge", str(tmp_path), "--source", "chunk-ae:4", "--out", str(tmp_path / "o"), *extra]
    with pytest.raises(SystemExit) as done:
        main(args)
    err = capsys.readouterr().err
    assert done.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_generate_with_an_outside_memory_matches_full_forwards(student):
    """generate() (cached decoding) inside ``bridge.use`` equals greedy decoding by full forwards."""
    ids, memory = _ids(1, 5), torch.randn(1, 6, D_AUG)
    bridge = make_bridge(student, d_aug=D_AUG, aligned=False)
    _open(bridge, 2.0)
    with torch.no_grad(), bridge.use(memory):
        generated = student.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        want = ids
        for _ in range(4):
            want = torch.cat([want, student(input_ids=want).logits[:, -1:].argmax(-1)], 1)
    bridge.detach()
    with torch.no_grad():
        plain = student.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, want)
    assert not torch.equal(generated, plain), "the memory did not reach generation"
