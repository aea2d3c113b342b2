"""GGUF teachers: a tiny random Llama written as GGUF (radistill.models.gguf) loads through transformers' GGUF
reader with the source's exact weights and tokenizer, and scan, build and the config-only paths take it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from radistill.models.access import ModelLoadError, gguf_source, load_config, load_model  # noqa: E402
from radistill.utils.errors import RadistillError  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TEXT = ("The quick brown fox jumps over the lazy dog. Keys and values: apple 12, river 7, stone 48. "
        "Retrieval heads copy a value from far back in the context. ") * 4


def tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer (the kind GGUF stores as ``gpt2``) trained in memory on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """``(directory with model.gguf and an HF copy in hf/, the model, its tokenizer)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from radistill.models.gguf import write_gguf

    tok = tiny_bpe_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5, rope_theta=10000.0)
    model = LlamaForCausalLM(config).eval()
    where = tmp_path_factory.mktemp("gguf")
    write_gguf(model, tok, where / "model.gguf")
    model.save_pretrained(where / "hf")
    tok.save_pretrained(where / "hf")
    return where, model, tok


def test_model_id_spellings(tmp_path):
    assert gguf_source("a/b/model.Q4_1.gguf") == ("a/b", "model.Q4_1.gguf")
    assert gguf_source("org/repo::model.gguf") == ("org/repo", "model.gguf")
    assert gguf_source("HuggingFaceTB/SmolLM2-135M") is None and gguf_source(tmp_path) is None
    with pytest.raises(ModelLoadError, match="DIR::FILE form is for GGUF"):
        gguf_source("dir::weights.bin")


def test_loads_the_exact_weights_and_tokenizer(source):
    where, model, tok = source
    for spec in (where / "model.gguf", f"{where}::model.gguf"):
        loaded, loaded_tok = load_model(spec, dtype="fp32", device="cpu")
        ours, theirs = model.state_dict(), loaded.state_dict()
        assert set(ours) == set(theirs)
        for name in ours:  # q/k rows went through GGML's rotary permutation and back
            torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=0, msg=name)
        assert loaded.config._name_or_path == str(spec)  # records name what reloads it, not the file's title
        text = "apple 12, river 7 and a stone"
        assert loaded_tok(text).input_ids == tok(text).input_ids
        assert loaded_tok.decode(loaded_tok(text).input_ids) == text
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            # the file stores rms_norm_eps as float32 (1e-5 -> 9.99999975e-06), so allow rounding noise
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_config_only_paths_read_the_gguf(source):
    from radistill.hybrid.memory import load_any_config
    from radistill.memplan.scan import load_config_and_tokenizer
    from radistill.models.access import layout_from_config

    where, model, tok = source
    layout = layout_from_config(load_config(where / "model.gguf"))
    assert (layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.head_dim) == (2, 4, 2, 16)
    assert layout_from_config(load_any_config(where / "model.gguf")) == layout
    config, loaded_tok = load_config_and_tokenizer(f"{where}::model.gguf")
    assert config.num_key_value_heads == 2 and len(loaded_tok) == len(tok)


def test_scan_and_build_on_a_gguf_teacher(source, tmp_path):
    from radistill.hybrid.build import build_student, load_selection
    from radistill.scan.run import run_scan

    where, model, _ = source
    kwargs = dict(pairs=3, samples=4, device="cpu", dtype="fp32", batch_size=8)
    from_gguf = run_scan(where / "model.gguf", tmp_path / "scan", **kwargs)
    from_hf = run_scan(where / "hf", None, **kwargs)
    # same weights, same tokenizer, same probe: the same ranking and scores
    assert [h.name for h in from_gguf.heads] == [h.name for h in from_hf.heads]
    torch.testing.assert_close(torch.tensor([h.score for h in from_gguf.heads]),
                               torch.tensor([h.score for h in from_hf.heads]))
    assert json.loads((tmp_path / "scan" / "scan.json").read_text())["model"] == str(where / "model.gguf")

    student = build_student(where / "model.gguf", tmp_path / "student", scan=tmp_path / "scan" / "scan.json",
                            keep=2, state_size=4, device="cpu", dtype="fp32")
    kept = load_selection(student)["kept_heads"]
    assert [h["name"] for h in kept] == [h.name for h in from_gguf.heads[:2]]
    loaded, _ = load_model(student, dtype="fp32", device="cpu")
    # the student keeps the teacher's embeddings and MLPs unchanged
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    torch.testing.assert_close(loaded.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)


def test_clear_errors(source, monkeypatch):
    where, _, _ = source
    with pytest.raises(ModelLoadError, match="no GGUF file 'missing.gguf'"):
        load_config(f"{where}::missing.gguf")
    with pytest.raises(ModelLoadError, match="could not read the GGUF file"):
        (where / "broken.gguf").write_bytes(b"not a gguf file")
        load_config(where / "broken.gguf")
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_gguf_available", lambda *a, **k: False)
    with pytest.raises(RadistillError, match=r"pip install radistill\[gguf\]"):
        load_model(where / "model.gguf", device="cpu")


def test_writer_refuses_to_overwrite(source):
    from radistill.models.gguf import write_gguf

    where, model, tok = source
    before = (where / "model.gguf").read_bytes()
    with pytest.raises(RadistillError, match="not overwriting"):
        write_gguf(model, tok, where / "model.gguf")
    assert (where / "model.gguf").read_bytes() == before


@pytest.mark.slow
@pytest.mark.skipif(not (BENCHMARKS.parents[1] / "shared" / "fixtures" / "teacher-19m").exists(),
                    reason="needs ../shared/fixtures (teacher-19m's tokenizer and the prose corpus)")
def test_smollm2_benchmark_quick_parallel_processes_share_one_work_dir(tmp_path):
    """benchmarks/smollm2.py --quick on a tiny random GGUF teacher, as the GPU runs it: --scan-only prepares WORK
    (scan, teacher row, fidelity samples), two processes with disjoint --students (a window_recurrent and a
    discrete_mamba2 student) and one fixed --budget-tokens train side by side, --collect writes the results and
    fidelity.py's rows from WORK; a repeated call skips the finished student; another budget is refused."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out, work = tmp_path / "smollm2.json", tmp_path / "work"
    command = [sys.executable, str(BENCHMARKS / "smollm2.py"), "--quick", "--work", str(work), "--out", str(out),
               "--kv-items", "4", "--ppl-tokens", "512"]

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(command + list(extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)

    def finish(process: subprocess.Popen) -> str:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        return stdout + stderr

    finish(start("--scan-only"))
    assert {"scan", "teacher.json", "fidelity-samples.json", "setup.json"} <= {p.name for p in work.iterdir()}
    assert not (work / "plan.json").exists()  # no budget measured or fixed by the preparation
    teacher_before = (work / "teacher.json").read_text()
    parallel = [start("--students", name, "--budget-tokens", "1024", "--no-teacher")
                for name in ("top1-wr16-s8", "none-dm2-s8")]
    for process in parallel:
        finish(process)
    assert (work / "teacher.json").read_text() == teacher_before

    finish(start("--collect", "--fidelity-out", str(tmp_path / "fidelity.json")))
    result = json.loads(out.read_text())
    assert result["budget_tokens"] == 1024 and result["plan"]["seconds_per_token"] is None
    assert [s["name"] for s in result["students"]] == ["none-dm2-s8", "top1-wr16-s8"]  # the default order
    assert result["pending"] == ["top1-dm2-s8", "random-low1-dm2-s8", "none-wr16-s8", "random-low1-wr16-s8"]
    none, top = result["students"]
    assert (top["mixer"], top["window"], top["state_size"]) == ("window_recurrent", 16, 8)
    assert (none["mixer"], none["window"], none["kept_heads"]) == ("discrete_mamba2", None, [])
    assert top["kept_heads"] == result["scan"]["top"][:1] and top["tokens"] == none["tokens"] == 1024
    assert top["recipe"].startswith("stage 2: 512 tok") and set(top["kv_retrieval"]) == {"5", "10", "20"}
    assert 0 < top["fidelity"]["heldout"]["all"]["top1"] <= 1 and top["fidelity"]["greedy"]["of"] == 16
    assert json.loads((work / "top1-wr16-s8" / "config.json").read_text())["mixer"] == "window_recurrent"
    assert (work / "top1-wr16-s8" / "distilled" / "config.json").exists()

    rows = json.loads((tmp_path / "fidelity.json").read_text())
    assert [r["name"] for r in rows["rows"]] == ["teacher", "none-dm2-s8", "top1-wr16-s8"]
    assert rows["rows"][0]["kept_heads"] == 8 and rows["rows"][2]["heads"] == top["kept_heads"][0]
    assert rows["rows"][2]["fidelity"] == top["fidelity"] and rows["rows"][2]["mixer"] == "window_recurrent"
    sys.path.insert(0, str(BENCHMARKS))
    from fidelity import merge_runs

    other = {"teacher": "teacher-19m", "settings": {}, "device": "H200", "versions": {}, "date": "d",
             "rows": [{"name": "teacher"}, {"name": "top1-wr16-s8"}]}  # the same student name, another teacher
    merged = merge_runs([rows, other])
    assert merged["teachers"] == [rows["teacher"], "teacher-19m"] and len(merged["rows"]) == 5

    again = finish(start("--students", "top1-wr16-s8", "--budget-tokens", "1024", "--no-teacher"))
    assert "top1-wr16-s8: done in an earlier call, skipped" in again
    refused = start("--students", "top1-dm2-s8", "--budget-tokens", "2048", "--no-teacher")
    _, stderr = refused.communicate(timeout=600)
    assert refused.returncode != 0 and "one budget per --work" in stderr
    assert not (work / "top1-dm2-s8" / "row.json").exists()


def digit_splitting_tokenizer():
    """Byte-level BPE that writes numbers digit by digit, with the space as its own token (as SmolLM2's does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([TEXT + "The value of the key 'x' is 42. "], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def test_kv_values_are_equal_length_choices_for_a_digit_splitting_tokenizer():
    from radistill.probes.items import encode_items
    from radistill.probes.kv import KVProbeConfig, kv_items, value_prefix, value_range

    tok = digit_splitting_tokenizer()
    prefix = value_prefix(tok)
    assert prefix == " "  # natural "is 42": the digits are not scored after an "is4" no text contains
    assert value_range(tok, prefix) == range(10, 100)
    items = kv_items(tok, KVProbeConfig(pairs=20, samples=8, seed=3))
    assert all(10 <= int(c) <= 99 for item in items for c in item.choices)
    lengths = {len(c) for e in encode_items(tok, items) for c in e.choice_ids}
    assert lengths == {2}  # two digits each: no choice wins by being shorter
    # "is 42" as text: the lone space token ends the prompt (read once) instead of starting every choice
    assert all(item.prompt.endswith("' is ") and not item.choices[0].startswith(" ") for item in items)
    encoded = encode_items(tok, items[:1])[0]
    assert list(encoded.prompt_ids) + list(encoded.choice_ids[0]) == tok(items[0].prompt + items[0].choices[0]).input_ids
    assert len(kv_items(tok, KVProbeConfig(pairs=90, samples=1))[0].choices) == 90
    with pytest.raises(RadistillError, match="at most 90 for this tokenizer"):
        kv_items(tok, KVProbeConfig(pairs=91, samples=1))


@pytest.mark.shared
def test_kv_values_stay_0_to_99_where_numbers_are_one_token(teacher_19m_path):
    from transformers import AutoTokenizer

    from radistill.probes.kv import KVProbeConfig, kv_items, value_prefix, value_range

    tok = AutoTokenizer.from_pretrained(str(teacher_19m_path))
    assert value_range(tok, value_prefix(tok)) == range(100)
    assert len(kv_items(tok, KVProbeConfig(pairs=100, samples=1))[0].choices) == 100
