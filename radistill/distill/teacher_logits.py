"""Stage 3's teacher, precomputed once: its top-k log-probabilities at every position of exactly the sequences stage 3
reads, in safetensors shards under ``RUN/teacher_logits/``, so that stage 3 trains with the teacher off the GPU.

Layout::

    manifest.json               settings (teacher and tokenizer fingerprints, vocabulary, data, stream seed, seq_len,
                                k, temperature), sequences and tokens done, the stream position after the last shard,
                                and per shard its first sequence, sequences, bytes and sha256; replaced atomically
                                after every round of shards
    shard-000000.safetensors    sequences [first, first + n) of stage 3's PackedStream:
                                  logprobs       [n, seq_len, k]  fp16   log p_T of the teacher's k likeliest tokens
                                  indices        [n, seq_len, k]  int32  their token ids (descending probability)
                                  lse            [n, seq_len]     fp32   log-sum-exp of the whole row of logits / T
                                  sequence_hash  [n]              int64  of each sequence's token ids

Disk per token: k * (2 + 4) + 4 bytes (and 8 per sequence). Sequence i is the i-th sequence stage 3's stream
(``PackedStream(data, tokenizer, seq_len, seed * 1000 + 3)``) emits; a rank's micro-batch reads the same sequences
its online twin would (:meth:`TeacherLogits.read`).

Log-probabilities, not raw logits, and in fp16, not bf16 (both 2 bytes): log p lies in (-inf, 0], where fp16's range
is ample and its 11 significant bits (bf16: 8) move a probability by at most 0.03% at log p = -1 and 0.2% at -5
(bf16: 0.2% and 1.6%; a raw logit of 20 in bf16 would move its probability by up to 6%). The raw logits stay
recoverable: z_i = T (logprobs_i + lse).

A shard is written whole or not at all (``atomic_path``) and enters the manifest only after it is on disk, so an
interrupted precompute continues after the last shard the manifest lists, and its files equal an uninterrupted
run's. Under torchrun the ranks compute the shards of a round in parallel (every rank walks the stream; rank r
computes the r-th shard of each round) and rank 0 writes the manifest. The reader refuses a manifest made for
other settings, a missing, truncated or altered shard and a shard that disagrees with the manifest or with the
tokens the run reads, naming the problem and the fix.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from radistill.distill.checkpoint import sha256
from radistill.distill.data import PackedStream, eos_id
from radistill.distill.losses import teacher_topk
from radistill.distill.parallel import barrier
from radistill.distill.recipe import DataConfig
from radistill.distill.stages import final_hidden, head_weight
from radistill.models.access import weights_fingerprint
from radistill.scan.distributed import rank, world_size
from radistill.utils.console import console, is_main_process
from radistill.utils.errors import RadistillError
from radistill.utils.io import atomic_path, write_json_atomic

MANIFEST = "manifest.json"
FORMAT = 1
SHARD_BYTES = 256 << 20  # a shard's size on disk, about: the unit of resumption and of checksum verification
# shard tensors: name -> (dtype, shape after [n]: "T" = seq_len, "k" = top k)
TENSORS = {"logprobs": ("F16", ("T", "k")), "indices": ("I32", ("T", "k")), "lse": ("F32", ("T",)),
           "sequence_hash": ("I64", ())}


class TeacherLogitsError(RadistillError):
    """Precomputed teacher logits are missing, damaged, or were made for other settings or other tokens."""


def bytes_per_token(k: int) -> int:
    """Disk bytes per token position: k fp16 log-probabilities, k int32 ids and one fp32 log-sum-exp."""
    return k * (2 + 4) + 4


def logits_settings(teacher: nn.Module, tokenizer, data: DataConfig, seed: int, seq_len: int, k: int,
                    temperature: float) -> dict:
    """What stored teacher logits depend on (the manifest's ``settings``); names are informative, not compared."""
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if k > vocab:
        raise RadistillError(f"stage 3: teacher_topk {k} is more than the vocabulary ({vocab}); use at most {vocab} "
                             "(= the full KL)")
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items())) + f"/eos {eos_id(tokenizer)}"
    return {
        "teacher": {"name": str(getattr(teacher.config, "_name_or_path", "")),
                    "fingerprint": weights_fingerprint(teacher)},
        "tokenizer": {"name": str(getattr(tokenizer, "name_or_path", "")),
                      "fingerprint": hashlib.sha256(vocabulary.encode()).hexdigest()[:16]},
        "vocab_size": vocab, "data": dataclasses.asdict(data), "seed": seed, "seq_len": seq_len, "topk": k,
        "temperature": temperature,
    }


def sequence_hashes(ids: Tensor) -> Tensor:
    """[n] int64: a 64-bit hash of each sequence of ``ids`` [n, seq_len] (CPU)."""
    rows = ids.to(torch.int64).numpy()
    return torch.tensor([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little", signed=True)
                         for row in rows], dtype=torch.int64)


# --- writing ----------------------------------------------------------------------------------------------
def precompute(teacher: nn.Module, tokenizer, root: Path, settings: dict, sequences: int, *, batch_size: int,
               chunk_tokens: int, autocast: bool) -> None:
    """Make ``root`` hold the teacher's top-k of the first ``sequences`` sequences of the stream ``settings`` name,
    continuing after the last shard already there (an interrupted or shorter precompute). All ranks call it.

    ``batch_size`` sequences per teacher forward (on the device the teacher is on, under bf16 autocast with
    ``autocast``), the LM head applied ``chunk_tokens`` rows at a time: no [tokens, vocab] tensor whole.
    """
    root = Path(root)
    manifest = _load_manifest(root, settings)
    if manifest is None:
        per_sequence = settings["seq_len"] * bytes_per_token(settings["topk"])
        manifest = {"format": FORMAT, "settings": settings, "bytes_per_token": bytes_per_token(settings["topk"]),
                    "shard_sequences": max(1, SHARD_BYTES // per_sequence), "sequences": 0, "tokens": 0,
                    "stream": None, "shards": []}
    done = manifest["sequences"]
    if is_main_process():
        _announce(root, manifest, sequences)
    if done >= sequences:
        return
    stream = PackedStream(DataConfig(**settings["data"]), tokenizer, settings["seq_len"], settings["seed"])
    if manifest["stream"] is not None:
        stream.load_state_dict(manifest["stream"])
    per_shard = manifest["shard_sequences"]
    while done < sequences:
        # one round: a shard per rank, rank r computing the r-th (every rank walks the stream past all of them)
        counts = [c for c in (min(per_shard, sequences - done - r * per_shard) for r in range(world_size())) if c > 0]
        shards = []
        for j, count in enumerate(counts):
            index, ids = len(manifest["shards"]) + j, stream.next_batch(count)
            shards.append({"name": f"shard-{index:06d}.safetensors", "first": done, "sequences": count})
            if j == rank():
                _write_shard(root / shards[-1]["name"], _shard_tensors(teacher, ids, settings, batch_size,
                                                                       chunk_tokens, autocast, stream.position_ids))
            done += count
        barrier()
        if is_main_process():
            for shard in shards:
                path = root / shard["name"]
                shard.update(bytes=path.stat().st_size, sha256=sha256(path))
            manifest["shards"] += shards
            manifest.update(sequences=done, tokens=done * settings["seq_len"], stream=stream.state_dict())
            write_json_atomic(root / MANIFEST, manifest)
        else:
            manifest["shards"] += shards
        barrier()


def _announce(root: Path, manifest: dict, sequences: int) -> None:
    settings, done = manifest["settings"], manifest["sequences"]
    per_token = bytes_per_token(settings["topk"])
    size = sequences * settings["seq_len"] * per_token / (1 << 30)
    what = (f"teacher top-{settings['topk']} logits of {sequences:,} sequences x {settings['seq_len']:,} tokens in "
            f"{root}: {per_token:,} B/token ({settings['topk']} x (2 B log-prob + 4 B id) + 4 B lse), {size:.2f} GiB")
    if done >= sequences:
        console.print(f"stage 3: reusing the {what}")
    else:
        console.print(f"stage 3: precomputing the {what}" + (f"; {done:,} sequences done" if done else ""))


def _shard_tensors(teacher: nn.Module, ids: Tensor, settings: dict, batch_size: int, chunk_tokens: int,
                   autocast: bool, positions=lambda ids: None) -> dict[str, Tensor]:
    """The shard's tensors (module docstring) for ``ids`` [n, seq_len]; ``positions(ids)``: their position ids (packed
    documents, ``data.packing``) or None."""
    device = next(teacher.parameters()).device
    head = head_weight(teacher)
    k, temperature = settings["topk"], settings["temperature"]
    logprobs, indices, lse = [], [], []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for batch in ids.split(batch_size):
            position_ids = positions(batch)
            position_ids = None if position_ids is None else position_ids.to(device)
            hidden = final_hidden(teacher, batch.to(device), position_ids).flatten(0, 1)
            for rows in hidden.split(chunk_tokens):
                values, ids_k, norm = teacher_topk((rows.to(head.dtype) @ head.t()).float(), k, temperature)
                logprobs.append(values.to(torch.float16).cpu())
                indices.append(ids_k.to(torch.int32).cpu())
                lse.append(norm.cpu())
    n, seq_len = ids.shape
    return {"logprobs": torch.cat(logprobs).view(n, seq_len, k), "indices": torch.cat(indices).view(n, seq_len, k),
            "lse": torch.cat(lse).view(n, seq_len), "sequence_hash": sequence_hashes(ids)}


def _write_shard(path: Path, tensors: dict[str, Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


# --- reading ----------------------------------------------------------------------------------------------
def _fix(root: Path) -> str:
    return f"delete {root} and rerun radistill distill (stage 3 recomputes it), or restore the file from a copy"


def _load_manifest(root: Path, settings: dict) -> dict | None:
    """The manifest of ``root`` checked against ``settings`` and its shard files' sizes; None if there is none."""
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        shards, saved = manifest["shards"], manifest["settings"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise TeacherLogitsError(f"{path} is damaged ({exc}): {_fix(root)}") from exc
    if manifest.get("format") != FORMAT:
        raise TeacherLogitsError(f"{path} has format {manifest.get('format')}, this radistill reads {FORMAT}: "
                                 f"{_fix(root)}")
    differences = [f"{key} {old!r} (this run: {new!r})" for key, old, new in _differences(saved, settings)]
    if differences:
        raise TeacherLogitsError(
            f"{root} holds teacher logits made for other settings: {'; '.join(differences)}. Delete {root} to "
            "recompute them for this run, or run with the settings they were made for"
        )
    first = 0
    for shard in shards:
        file = root / shard["name"]
        if shard["first"] != first:
            raise TeacherLogitsError(f"{path} is inconsistent: {shard['name']} starts at sequence {shard['first']}, "
                                     f"the shards before it end at {first}; {_fix(root)}")
        first += shard["sequences"]
        if not file.exists():
            raise TeacherLogitsError(f"{file} is missing (its manifest lists it); {_fix(root)}")
        if file.stat().st_size != shard["bytes"]:
            raise TeacherLogitsError(f"{file} has {file.stat().st_size} bytes, its manifest says {shard['bytes']} "
                                     f"(truncated or half-copied); {_fix(root)}")
    if first != manifest["sequences"]:
        raise TeacherLogitsError(f"{path} is inconsistent: its shards hold {first} sequences, it says "
                                 f"{manifest['sequences']}; {_fix(root)}")
    return manifest


def _differences(saved: dict, wanted: dict, prefix: str = ""):
    """(dotted key, saved, wanted) where the two settings differ; the teacher's and tokenizer's names are not
    compared (their directories may move: the fingerprints say whether they are the same)."""
    for key in sorted(set(saved) | set(wanted)):
        old, new = saved.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            yield from _differences(old, new, f"{prefix}{key}.")
        elif f"{prefix}{key}" not in ("teacher.name", "tokenizer.name") and old != new:
            yield f"{prefix}{key}", old, new


class TeacherLogits:
    """The precomputed top-k of ``root``, checked against ``settings`` (:func:`logits_settings`), holding at least
    ``sequences`` sequences. Each shard's sha256 and tensor shapes are checked when it is first read."""

    def __init__(self, root: Path, settings: dict, sequences: int):
        self.root = Path(root)
        manifest = _load_manifest(self.root, settings)
        if manifest is None:
            raise TeacherLogitsError(f"{self.root} has no {MANIFEST}: its teacher logits were never finished or were "
                                     f"damaged; {_fix(self.root)}")
        if manifest["sequences"] < sequences:
            raise TeacherLogitsError(f"{self.root} holds the teacher logits of {manifest['sequences']:,} sequences, "
                                     f"stage 3 needs {sequences:,}: rerun radistill distill to extend it")
        self.shards, self.settings = manifest["shards"], settings
        self._firsts = [shard["first"] for shard in self.shards]
        self._open: tuple[int, object] | None = None  # the shard being read and its handle
        self._verified: set[int] = set()  # shards checked by :meth:`_verify`

    def read(self, first: int, ids: Tensor) -> tuple[Tensor, Tensor]:
        """The stored top-k of sequences [first, first + n) = ``ids`` [n, seq_len] (CPU): log-probabilities
        [n, seq_len, k] fp16 and token ids [n, seq_len, k] int32. Raises if they were made from other tokens."""
        parts = {"logprobs": [], "indices": [], "sequence_hash": []}
        position, end = first, first + len(ids)
        while position < end:
            index = bisect.bisect_right(self._firsts, position) - 1
            shard = self.shards[index]
            stop = min(end, shard["first"] + shard["sequences"])
            handle = self._handle(index)
            rows = slice(position - shard["first"], stop - shard["first"])
            for name, part in parts.items():
                part.append(handle.get_slice(name)[rows])
            position = stop
        if not torch.equal(torch.cat(parts["sequence_hash"]), sequence_hashes(ids)):
            raise TeacherLogitsError(
                f"the teacher logits of sequences {first:,}-{end - 1:,} in {self.root} were made from other tokens "
                f"than stage 3 reads there (did the data file or the tokenizer change?); {_fix(self.root)}"
            )
        return torch.cat(parts["logprobs"]), torch.cat(parts["indices"])

    def _handle(self, index: int):
        if self._open is None or self._open[0] != index:
            path = self.root / self.shards[index]["name"]
            if index not in self._verified:
                self._verify(index, path)
            self._open = (index, safe_open(str(path), framework="pt"))
        return self._open[1]

    def _verify(self, index: int, path: Path) -> None:
        """The shard's sha256, then its tensors' dtypes and shapes, against the manifest (once per shard: hashing
        reads the whole file)."""
        shard = self.shards[index]
        if sha256(path) != shard["sha256"]:
            raise TeacherLogitsError(f"{path} does not match its sha256 in the manifest (corrupted); {_fix(self.root)}")
        handle = safe_open(str(path), framework="pt")
        sizes = {"T": self.settings["seq_len"], "k": self.settings["topk"]}
        for name, (dtype, dims) in TENSORS.items():
            want = [shard["sequences"], *(sizes[d] for d in dims)]
            got = handle.get_slice(name) if name in handle.keys() else None
            if got is None or got.get_dtype() != dtype or list(got.get_shape()) != want:
                found = "nothing" if got is None else f"{got.get_dtype()} {list(got.get_shape())}"
                raise TeacherLogitsError(f"{path} does not match its manifest: '{name}' should be {dtype} {want}, "
                                         f"it holds {found}; {_fix(self.root)}")
        self._verified.add(index)


__all__ = ["TeacherLogits", "TeacherLogitsError", "bytes_per_token", "logits_settings", "precompute",
           "sequence_hashes"]
