"""Training text: documents from a file or an HF dataset, tokenised and packed into fixed-length sequences.

Order and resumption (what makes a run reproducible):

* A source yields *documents* in its own order: ``.txt`` / ``.txt.xz`` files are split on
  ``\\n<|endoftext|>\\n``; ``.jsonl`` / ``.jsonl.xz`` and ``.parquet`` give one document per row (the
  ``text_field`` column); anything else is taken as an HF ``datasets`` id and streamed.
* Held out for perplexity: every ``heldout_stride``-th document from the start, ``heldout_docs`` of them. The
  rest are training documents.
* Shuffling happens within consecutive windows of ``shuffle_window`` training documents, with a permutation
  drawn from ``(seed, epoch, window)``: the order is fixed by the seed, costs no more memory than one window,
  and needs no pass over the whole corpus. Each epoch reshuffles.
* Each document is tokenised with the teacher's tokenizer (no special tokens), preceded by BOS with ``data.bos``
  and followed by EOS (not both when they are one token: the next BOS then ends it), and appended to a buffer that
  is cut into ``seq_len``-token sequences; documents run across sequence boundaries (no padding).
* ``data.packing``: with ``concat`` a sequence is one stretch of positions 0..seq_len-1; with ``documents``
  :meth:`PackedStream.position_ids` restarts the positions at every document start, from which teacher and student
  keep attention and recurrent state inside each document (``radistill/models/packing.py``).
* ``data.teacher_share`` > 0: sequence i is packed from the teacher's generated texts (``teacher_text.py``) instead
  when a draw seeded by (seed, i) falls below the share; those texts are framed like documents, packed into their own
  buffer and cycled in a shuffled order per pass, so the share holds in expectation and per sequence index exactly.
* The position is ``{"epoch", "docs_done", "buffer", "sequences"}`` (and ``"teacher"``: the generated texts' pass,
  texts done and buffer): documents consumed in this epoch's
  order, the tokens left over after the last emitted sequence, and the number of sequences emitted. Resuming
  skips ``docs_done`` documents without tokenising them, re-tokenises the current window, and restores the
  buffer, so it yields exactly the sequences an uninterrupted stream would have.
"""

from __future__ import annotations

import json
import lzma
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from radistill.distill.recipe import DataConfig
from radistill.utils.errors import RadistillError

DOC_SEPARATOR = "\n<|endoftext|>\n"
_READ_CHARS = 1 << 20


# --- documents --------------------------------------------------------------------------------------------
def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """All documents of the source, in its order (held-out ones included)."""
    source = cfg.source
    if not source:
        raise RadistillError("no training data: pass --data FILE_OR_DATASET_ID")
    path = Path(source)
    name = path.name
    if name.endswith((".txt", ".txt.xz")):
        yield from _text_documents(path)
    elif name.endswith((".jsonl", ".jsonl.xz")):
        yield from _jsonl_documents(path, cfg.text_field)
    elif name.endswith(".parquet"):
        yield from _parquet_documents(path, cfg.text_field)
    elif path.exists():
        raise RadistillError(
            f"--data {source}: unknown file type; use .txt, .txt.xz, .jsonl, .jsonl.xz, .parquet or an HF dataset id"
        )
    else:
        yield from _hf_documents(cfg)


LOCAL_SUFFIXES = (".txt", ".txt.xz", ".jsonl", ".jsonl.xz", ".parquet")


def is_local_source(source: str) -> bool:
    """Whether ``source`` names a local file (by its suffix, or because it exists) rather than an HF dataset id."""
    return Path(source).name.endswith(LOCAL_SUFFIXES) or Path(source).exists()


def check_source(cfg: DataConfig) -> None:
    """Raise a :class:`RadistillError` now, before any model is loaded, if a local data file is missing, empty,
    unreadable (binary, not UTF-8, a broken .xz) or holds no training document; reads only up to the first
    training document. An HF dataset id is left to the hub (checking it means streaming it)."""
    if not cfg.source:
        raise RadistillError("no training data: pass --data FILE_OR_DATASET_ID")
    if not is_local_source(cfg.source):
        return
    path = Path(cfg.source)
    if not path.exists():
        raise RadistillError(f"--data {path} does not exist")
    if not path.is_file():
        raise RadistillError(f"--data {path} is not a file")
    if path.stat().st_size == 0:
        raise RadistillError(f"--data {path} is empty")
    try:
        for index, _ in enumerate(iter_documents(cfg)):
            if not is_heldout(index, cfg):
                return
    except (UnicodeDecodeError, lzma.LZMAError, EOFError) as exc:
        raise RadistillError(f"--data {path} is not UTF-8 text{' (.xz)' if path.suffix == '.xz' else ''}: "
                             f"{type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise RadistillError(f"--data {path} could not be read: {exc}") from exc
    except Exception as exc:  # pyarrow's errors for a file that is not parquet have no common base we can name
        if isinstance(exc, RadistillError):
            raise
        raise RadistillError(f"--data {path} could not be read: {type(exc).__name__}: {exc}") from exc
    raise RadistillError(f"--data {path} holds no training documents (none, or all held out for perplexity: "
                         f"data.heldout_docs {cfg.heldout_docs}, heldout_stride {cfg.heldout_stride})")


def _open_text(path: Path):
    if not path.exists():
        raise RadistillError(f"--data {path} does not exist")
    return lzma.open(path, "rt", encoding="utf-8") if path.suffix == ".xz" else open(path, encoding="utf-8")


def _text_documents(path: Path) -> Iterator[str]:
    with _open_text(path) as fh:
        tail = ""
        while chunk := fh.read(_READ_CHARS):
            parts = (tail + chunk).split(DOC_SEPARATOR)
            tail = parts.pop()
            yield from (p for p in parts if p.strip())
        # a file may end with the separator minus its final newline
        tail = tail.removesuffix(DOC_SEPARATOR.rstrip("\n"))
        if tail.strip():
            yield tail


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    with _open_text(path) as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[field]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise RadistillError(
                    f"{path}:{number}: expected a JSON object with a '{field}' string ({exc})"
                ) from exc
            if text:
                yield str(text)


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    if not path.exists():
        raise RadistillError(f"--data {path} does not exist")
    parquet = pq.ParquetFile(path)
    if field not in parquet.schema_arrow.names:
        raise RadistillError(f"{path} has no column '{field}' (columns: {', '.join(parquet.schema_arrow.names)})")
    for batch in parquet.iter_batches(columns=[field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t)


def _hf_documents(cfg: DataConfig) -> Iterator[str]:
    import datasets

    try:
        stream = datasets.load_dataset(cfg.source, cfg.name, split=cfg.split, streaming=True)
    except Exception as exc:
        raise RadistillError(
            f"--data {cfg.source}: not a local file, and the HF hub could not stream it "
            f"({type(exc).__name__}: {exc}). Check the id, or pass a local .txt/.jsonl/.parquet file"
        ) from exc
    for row in stream:
        if cfg.text_field not in row:
            raise RadistillError(f"dataset {cfg.source} has no '{cfg.text_field}' field: set data.text_field")
        if row[cfg.text_field]:
            yield row[cfg.text_field]


def is_heldout(index: int, cfg: DataConfig) -> bool:
    return index % cfg.heldout_stride == 0 and index // cfg.heldout_stride < cfg.heldout_docs


def heldout_documents(cfg: DataConfig) -> list[str]:
    """The held-out documents (read from the start of the source; stops once all are found)."""
    docs = []
    last = (cfg.heldout_docs - 1) * cfg.heldout_stride
    for index, doc in enumerate(iter_documents(cfg)):
        if index > last:
            break
        if is_heldout(index, cfg):
            docs.append(doc)
    return docs


def _training_documents(cfg: DataConfig) -> Iterator[str]:
    return (doc for i, doc in enumerate(iter_documents(cfg)) if not is_heldout(i, cfg))


# --- tokens -----------------------------------------------------------------------------------------------
def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise RadistillError("the teacher's tokenizer has no EOS token to separate documents with")
    return int(tokenizer.eos_token_id)


def bos_id(tokenizer) -> int:
    if tokenizer.bos_token_id is None:
        raise RadistillError("data.bos is set but the teacher's tokenizer has no BOS token: set data.bos to false")
    return int(tokenizer.bos_token_id)


def tokenize(tokenizer, docs: list[str], bos: bool = False) -> list[np.ndarray]:
    """Each document's token ids followed by EOS, and with ``bos`` preceded by BOS (one batched call: fast tokenizers
    parallelise it)."""
    if not docs:
        return []
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return [frame(row, tokenizer, bos) for row in ids]


def frame(row, tokenizer, bos: bool = False) -> np.ndarray:
    """One document's token ids as packed: [BOS] + row + [EOS], without the EOS when BOS is the same token (the next
    document's BOS then separates them, and a position reset after a lone EOS would cut a one-token document)."""
    eos = eos_id(tokenizer)
    if not bos:
        return np.asarray([*row, eos], dtype=np.int64)
    start = bos_id(tokenizer)
    return np.asarray([start, *row] if start == eos else [start, *row, eos], dtype=np.int64)


def packed_position_ids(cfg: DataConfig, tokenizer, input_ids: torch.Tensor) -> torch.Tensor | None:
    """[B, T] position ids of packed ``input_ids`` under ``cfg.packing``: None for ``concat`` (every model's default
    0..T-1), restarting at each document for ``documents``."""
    if cfg.packing == "concat":
        return None
    from radistill.models.packing import document_position_ids

    return document_position_ids(input_ids, bos_id(tokenizer) if cfg.bos else None, eos_id(tokenizer))


def heldout_sequences(cfg: DataConfig, tokenizer, seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """The held-out documents packed into ``[n, seq_len]`` (the last partial sequence is dropped)."""
    tokens = np.concatenate(tokenize(tokenizer, heldout_documents(cfg)) or [np.zeros(0, np.int64)])
    n = len(tokens) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise RadistillError(
            f"the held-out documents hold fewer than {seq_len} tokens: raise data.heldout_docs or lower --seq-len"
        )
    return torch.from_numpy(tokens[: n * seq_len].reshape(n, seq_len).copy())


class PackedStream:
    """Endless packed sequences ``[seq_len]`` of training documents, deterministic given the seed, resumable.

    ``next_batch(n)`` returns ``[n, seq_len]`` int64; ``state_dict()`` / ``load_state_dict()`` save and restore
    the exact position. Epochs follow one another without end; the trainer stops at its token budget.
    """

    def __init__(self, cfg: DataConfig, tokenizer, seq_len: int, seed: int):
        if seq_len < 1:
            raise RadistillError("seq_len must be at least 1")
        self.cfg, self.tokenizer, self.seq_len, self.seed = cfg, tokenizer, seq_len, seed
        self.epoch = 0
        self.docs_done = 0
        self.sequences = 0
        self._buffer = np.zeros(0, dtype=np.int64)
        self._docs: Iterator[np.ndarray] | None = None
        # the teacher's generated texts (data.teacher_share): loaded on first use, packed apart from the documents
        self._texts = None
        self.teacher = {"epoch": 0, "done": 0, "buffer": []}

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "docs_done": self.docs_done,
            "buffer": self._buffer.tolist(),
            "sequences": self.sequences,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "teacher": {**self.teacher, "buffer": list(self.teacher["buffer"])},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seq_len"] != self.seq_len or state["seed"] != self.seed:
            raise RadistillError(
                f"the saved data position is for seq_len {state['seq_len']} / seed {state['seed']}, but this run "
                f"uses {self.seq_len} / {self.seed}: resume with the recipe the run was started with"
            )
        self.epoch, self.docs_done, self.sequences = state["epoch"], state["docs_done"], state["sequences"]
        self._buffer = np.asarray(state["buffer"], dtype=np.int64)
        self._docs = None
        self.teacher = dict(state.get("teacher", {"epoch": 0, "done": 0, "buffer": []}))

    def next_batch(self, n: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([self._next_sequence() for _ in range(n)]))

    def position_ids(self, batch: torch.Tensor) -> torch.Tensor | None:
        """The position ids the models get with ``batch`` [B, seq_len] of this stream (None: their default)."""
        return packed_position_ids(self.cfg, self.tokenizer, batch)

    def _next_sequence(self) -> np.ndarray:
        share = self.cfg.teacher_share
        if share > 0 and random.Random(f"{self.seed}/mix/{self.sequences}").random() < share:
            self.sequences += 1
            return self._next_teacher_sequence()
        pieces, have = [self._buffer], len(self._buffer)
        while have < self.seq_len:
            doc = self._next_document()
            pieces.append(doc)
            have += len(doc)
        joined = np.concatenate(pieces)
        self._buffer = joined[self.seq_len :]
        self.sequences += 1
        return joined[: self.seq_len]

    def _next_teacher_sequence(self) -> np.ndarray:
        if self._texts is None:
            from radistill.distill.teacher_text import TeacherTexts

            if not self.cfg.teacher_dir:
                raise RadistillError("data.teacher_share is set but data.teacher_dir is not: the trainer sets it to "
                                     "RUN/teacher_text; set it when packing outside a run")
            self._texts = TeacherTexts(self.cfg.teacher_dir, self.cfg).texts
        state = self.teacher
        pieces = [np.asarray(state["buffer"], dtype=np.int64)]
        have = len(pieces[0])
        while have < self.seq_len:
            if state["done"] == len(self._texts):
                state["epoch"], state["done"] = state["epoch"] + 1, 0
            order = list(range(len(self._texts)))
            random.Random(f"{self.seed}/teacher/{state['epoch']}").shuffle(order)
            text = frame(self._texts[order[state["done"]]].tolist(), self.tokenizer, self.cfg.bos)
            state["done"] += 1
            pieces.append(text)
            have += len(text)
        joined = np.concatenate(pieces)
        state["buffer"] = joined[self.seq_len :].tolist()
        return joined[: self.seq_len]

    def _next_document(self) -> np.ndarray:
        if self._docs is None:
            self._docs = self._epoch_documents(self.epoch, self.docs_done)
        doc = next(self._docs, None)
        if doc is not None:
            self.docs_done += 1
            return doc
        if self.docs_done == 0:
            raise RadistillError(f"--data {self.cfg.source} holds no training documents (all held out or empty)")
        self.epoch, self.docs_done = self.epoch + 1, 0
        self._docs = self._epoch_documents(self.epoch, 0)
        return self._next_document()

    def _epoch_documents(self, epoch: int, skip: int) -> Iterator[np.ndarray]:
        """Tokenised training documents of ``epoch`` in shuffled order, starting after the first ``skip``."""
        window_size = self.cfg.shuffle_window
        window: list[str] = []
        position = 0  # training documents of this epoch before the current window
        for doc in _training_documents(self.cfg):
            window.append(doc)
            if len(window) == window_size:
                yield from self._window(window, epoch, position, skip)
                position += len(window)
                window = []
        if window:
            yield from self._window(window, epoch, position, skip)

    def _window(self, docs: list[str], epoch: int, position: int, skip: int) -> Iterator[np.ndarray]:
        if position + len(docs) <= skip:  # consumed before the resume point: no tokenising needed
            return
        order = list(range(len(docs)))
        random.Random(f"{self.seed}/{epoch}/{position}").shuffle(order)
        order = order[max(0, skip - position) :]
        yield from tokenize(self.tokenizer, [docs[i] for i in order], self.cfg.bos)
