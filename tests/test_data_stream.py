"""Training data: document sources, deterministic packing, exact resumption, held-out split."""

import json
import lzma

import pytest
import torch

from radistill.distill.data import PackedStream, heldout_documents, heldout_sequences, is_heldout, iter_documents
from radistill.distill.recipe import DataConfig
from radistill.utils.errors import RadistillError
from distill_helpers import write_corpus


def cfg_for(path, **kw):
    return DataConfig(source=str(path), **{"shuffle_window": 6, "heldout_docs": 3, "heldout_stride": 7, **kw})


def test_every_source_format_gives_the_same_documents(tmp_path, corpus_docs):
    path, docs = corpus_docs
    xz = tmp_path / "corpus.txt.xz"
    xz.write_bytes(lzma.compress(path.read_bytes()))
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": docs}), parquet)
    for source in (path, xz, jsonl, parquet):
        assert list(iter_documents(cfg_for(source))) == docs, source.name


def test_text_split_survives_read_chunk_boundaries(tmp_path, monkeypatch):
    import radistill.distill.data as data

    monkeypatch.setattr(data, "_READ_CHARS", 7)  # separators straddle chunk ends
    path = tmp_path / "c.txt"
    docs = write_corpus(path, docs=12)
    assert list(iter_documents(cfg_for(path))) == docs


def test_bad_sources_raise_clear_errors(tmp_path):
    with pytest.raises(RadistillError, match="does not exist"):
        list(iter_documents(cfg_for(tmp_path / "missing.txt")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(RadistillError, match="unknown file type"):
        list(iter_documents(cfg_for(tmp_path / "x.csv")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(RadistillError, match="bad.jsonl:1"):
        list(iter_documents(cfg_for(bad)))


def test_packing_is_deterministic_and_covers_every_training_document(corpus_docs, tokenizer):
    path, docs = corpus_docs
    cfg = cfg_for(path)
    a = PackedStream(cfg, tokenizer, seq_len=32, seed=5)
    b = PackedStream(cfg, tokenizer, seq_len=32, seed=5)
    c = PackedStream(cfg, tokenizer, seq_len=32, seed=6)
    first = a.next_batch(8)
    assert torch.equal(first, b.next_batch(8))
    assert not torch.equal(first, c.next_batch(8))
    assert first.shape == (8, 32) and first.dtype == torch.int64

    # the first epoch's sequences hold every training document exactly once, EOS-terminated, no held-out one
    stream = PackedStream(cfg, tokenizer, seq_len=32, seed=5)
    while stream.epoch == 0:
        stream.next_batch(1)
    ids = PackedStream(cfg, tokenizer, seq_len=32, seed=5).next_batch(stream.sequences).flatten().tolist()
    eos = tokenizer.eos_token_id
    pieces, current = [], []
    for token in ids:
        if token == eos:
            pieces.append(tuple(current))
            current = []
        else:
            current.append(token)
    training = [d for i, d in enumerate(docs) if not is_heldout(i, cfg)]
    expected = sorted(tuple(tokenizer(d, add_special_tokens=False).input_ids) for d in training)
    assert sorted(pieces[: len(training)]) == expected


@pytest.mark.parametrize("stop", [1, 5, 13, 29])  # inside windows, at epoch ends, in the second epoch
def test_resume_yields_exactly_the_uninterrupted_sequences(corpus_docs, tokenizer, stop):
    path, _ = corpus_docs
    cfg = cfg_for(path)
    whole = PackedStream(cfg, tokenizer, seq_len=24, seed=1).next_batch(stop + 12)

    first = PackedStream(cfg, tokenizer, seq_len=24, seed=1)
    head = first.next_batch(stop)
    state = json.loads(json.dumps(first.state_dict()))  # the position is plain JSON
    resumed = PackedStream(cfg, tokenizer, seq_len=24, seed=1)
    resumed.load_state_dict(state)
    assert torch.equal(torch.cat([head, resumed.next_batch(12)]), whole)
    assert resumed.sequences == stop + 12


def test_resume_refuses_another_seq_len(corpus_docs, tokenizer):
    path, _ = corpus_docs
    state = PackedStream(cfg_for(path), tokenizer, seq_len=24, seed=1).state_dict()
    with pytest.raises(RadistillError, match="seq_len 24"):
        PackedStream(cfg_for(path), tokenizer, seq_len=32, seed=1).load_state_dict(state)


def test_heldout_split(corpus_docs, tokenizer):
    path, docs = corpus_docs
    cfg = cfg_for(path)
    held = heldout_documents(cfg)
    assert held == [docs[0], docs[7], docs[14]]
    seqs = heldout_sequences(cfg, tokenizer, seq_len=16)
    assert seqs.shape[1] == 16 and seqs.shape[0] >= 1
    with pytest.raises(RadistillError, match="held-out"):
        heldout_sequences(cfg, tokenizer, seq_len=100_000)


def test_all_heldout_corpus_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "one.txt"
    write_corpus(path, docs=1)
    with pytest.raises(RadistillError, match="no training documents"):
        PackedStream(cfg_for(path), tokenizer, seq_len=8, seed=0).next_batch(1)
