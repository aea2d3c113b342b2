"""Resumable training checkpoints: written whole or not at all, verified before use, and never executable.

Layout under ``RUN/checkpoints/``::

    stage2-step00000400/        one checkpoint (a directory)
        model.safetensors       student state dict (fp32), one tensor per parameter/buffer name
        model.json              the state dict's structure (names -> tensors; tied weights stored once)
        trainer.json            stage, step, tokens, data position, world size, recipe, layer blocks
        rank0.safetensors, rank0.json, rank1.safetensors, ...
                                each process's RNG states and optimizer state (its own layers' state in stages 1/2
                                across ranks; rank 0 alone holds it in stage 3, where ranks agree): every tensor in
                                the .safetensors file, the structure around them (step counters, param groups,
                                Python's RNG state) in the .json index
        manifest.json           format, sha256 and size of every file above; written last
    latest.json                 {"checkpoint": "stage2-step00000400"}; replaced atomically

Nothing here is ever unpickled: tensors are read with safetensors and everything else with ``json``, so a crafted
file can at worst be refused, never run code. The JSON index (:func:`save_state`) writes tensors as references into
the safetensors file, tuples and non-string dict keys tagged, numpy arrays as tensors with their dtype, and the few
tensor subclasses 8-bit optimizers keep (torchao's quantised states) as their inner tensors plus the class's name,
which must be on a fixed allow-list to be rebuilt. Checkpoints of the older pickle format (``*.pt``) are refused.

A checkpoint is assembled in a hidden ``.NAME.partial`` directory, and renamed into place only once every file and
the manifest are on disk, then ``latest.json`` moves to it: a run killed at any moment (``kill -9`` included)
leaves ``latest.json`` naming a complete checkpoint. Loading re-hashes every file against the manifest, so a
truncated, altered or half-copied checkpoint is refused with a message that says which file and what to do. When
``latest.json`` is damaged, or names a checkpoint that was deleted, :func:`resumable` takes the newest checkpoint
(by stage and step) that verifies.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_tensors
from safetensors.torch import save_file as save_tensors

from radistill.utils.errors import RadistillError
from radistill.utils.io import atomic_path, write_json_atomic, write_text_atomic

MANIFEST = "manifest.json"
LATEST = "latest.json"
FORMAT = 2  # 1 (no "format" in the manifest): pickled *.pt files, no longer loaded
_NAME = re.compile(r"^stage(\d+)-step(\d+)$")
# tensor subclasses an optimizer state may hold, rebuilt from their inner tensors (``__tensor_unflatten__``); a
# class not named here is refused, so a checkpoint cannot make us import or construct anything else
_SUBCLASSES = {
    "torchao.optim.subclass_8bit.OptimState8bit",
    "torchao.optim.subclass_4bit.OptimState4bit",
    "torchao.optim.subclass_fp8.OptimStateFp8",
}


class CheckpointError(RadistillError):
    """A checkpoint is missing, incomplete or corrupted."""


def checkpoint_name(stage: int, step: int) -> str:
    return f"stage{stage}-step{step:08d}"


def checkpoint_order(name: str) -> tuple[int, int] | None:
    """(stage, step) of a checkpoint directory's name; None for anything else (partials, stray folders)."""
    match = _NAME.match(name)
    return (int(match[1]), int(match[2])) if match else None


def checkpoints(root: Path) -> list[Path]:
    """The published checkpoints under ``root``, oldest first by (stage, step) — never by name or file time."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_order(p.name) is not None]
    return sorted(found, key=lambda p: checkpoint_order(p.name))


def partial_dir(root: Path, name: str) -> Path:
    """Where the files of checkpoint ``name`` are written before it is published."""
    return root / f".{name}.partial"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# --- tensors in safetensors, the rest in JSON ------------------------------------------------------------------
def save_state(obj: Any, directory: Path, stem: str) -> None:
    """Write ``obj`` (nested dicts/lists/tuples of tensors, numpy arrays, numbers, strings, None) as
    ``stem.safetensors`` (every tensor, once even when several entries share it) and ``stem.json`` (the structure)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}

    def tensor_ref(t: torch.Tensor, path: str) -> str:
        t = t.detach()
        identity = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.storage_offset())
        if t.numel() and identity in seen:  # tied weights: one tensor, two names
            return seen[identity]
        key = path or "tensor"
        while key in tensors:
            key += "_"
        tensors[key] = t.to("cpu").contiguous()
        if t.numel():
            seen[identity] = key
        return key

    def encode(value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.Tensor):
            if type(value) is not torch.Tensor and not isinstance(value, torch.nn.Parameter):
                return encode_subclass(value, path)
            return {"tensor": tensor_ref(value, path)}
        if isinstance(value, np.ndarray):
            return {"ndarray": tensor_ref(torch.from_numpy(value.astype(np.int64) if value.dtype.kind == "u"
                                                           else value), path), "dtype": str(value.dtype)}
        if isinstance(value, np.generic):
            return encode(value.item(), path)
        if isinstance(value, torch.dtype):
            return {"dtype": str(value).removeprefix("torch.")}
        if isinstance(value, (tuple, torch.Size)):
            return {"tuple": [encode(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return {"list": [encode(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, dict):
            items = []
            for k, v in value.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise TypeError(f"checkpoint state: dict key {k!r} at {path or 'top'} is not a str or int")
                items.append([k, encode(v, f"{path}.{k}" if path else str(k))])
            return {"dict": items}
        raise TypeError(f"checkpoint state: {type(value).__name__} at {path or 'top'} cannot be stored without pickle")

    def encode_subclass(value: torch.Tensor, path: str) -> dict:
        name = f"{type(value).__module__}.{type(value).__qualname__}"
        if name not in _SUBCLASSES or not hasattr(value, "__tensor_flatten__"):
            raise TypeError(f"checkpoint state: tensor subclass {name} at {path} is not supported")
        attrs, context = value.__tensor_flatten__()
        return {"subclass": name, "inner": {a: encode(getattr(value, a), f"{path}.{a}") for a in attrs},
                "context": encode(context, f"{path}.context")}

    index = {"format": FORMAT, "state": encode(obj, "")}
    with atomic_path(directory / f"{stem}.safetensors") as tmp:
        save_tensors(tensors, str(tmp))
    write_json_atomic(directory / f"{stem}.json", index)


def load_state(directory: Path, stem: str) -> Any:
    """Read what :func:`save_state` wrote; tensors come back on the CPU. Raises CheckpointError on anything it does
    not recognise (nothing in the files is ever executed or imported by name beyond the allow-list)."""
    index_path, tensor_path = directory / f"{stem}.json", directory / f"{stem}.safetensors"
    try:
        index = json.loads(index_path.read_text())
        tensors = load_tensors(str(tensor_path))
        return _decode(index["state"], tensors)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise CheckpointError(f"{directory / stem}.{{json,safetensors}} cannot be read ({exc})") from exc


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if not isinstance(value, dict) or len(value) < 1:
        raise TypeError(f"unexpected entry {value!r}")
    if "tensor" in value:
        return tensors[value["tensor"]]
    if "ndarray" in value:
        return tensors[value["ndarray"]].numpy().astype(np.dtype(value["dtype"]))
    if "dtype" in value:
        dtype = getattr(torch, value["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"unknown dtype {value['dtype']!r}")
        return dtype
    if "tuple" in value:
        return tuple(_decode(v, tensors) for v in value["tuple"])
    if "list" in value:
        return [_decode(v, tensors) for v in value["list"]]
    if "dict" in value:
        return {k: _decode(v, tensors) for k, v in value["dict"]}
    if "subclass" in value:
        name = value["subclass"]
        if name not in _SUBCLASSES:
            raise TypeError(f"tensor subclass {name!r} is not on the allow-list")
        module, _, cls_name = name.rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
        inner = {k: _decode(v, tensors) for k, v in value["inner"].items()}
        return cls.__tensor_unflatten__(inner, list(_decode(value["context"], tensors)), None, None)
    raise TypeError(f"unexpected entry {value!r}")


def save_json(obj: dict, path: Path) -> None:
    write_json_atomic(path, obj)


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} cannot be read ({exc})") from exc


# --- publishing and finding checkpoints -------------------------------------------------------------------------
def publish(root: Path, name: str, meta: dict, keep: int) -> Path:
    """Hash the partial directory's files into its manifest, rename it into place, point ``latest.json`` at it,
    and rotate (rank 0 only, once every file is written).

    Rotation orders checkpoints by (stage, step): it keeps the newest ``keep`` up to this one, and deletes any
    *beyond* this one, which can only be left from an abandoned attempt (a resume from an older checkpoint) and
    must never be taken for this run's newest.
    """
    partial = partial_dir(root, name)
    files = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size} for p in sorted(partial.iterdir())}
    write_json_atomic(partial / MANIFEST, {**meta, "format": FORMAT, "files": files})
    final = root / name
    if final.exists():  # re-saving a step (e.g. after a resume that rewrote the same step)
        shutil.rmtree(final)
    os.replace(partial, final)
    write_json_atomic(root / LATEST, {"checkpoint": name})
    here = checkpoint_order(name)
    ordered = checkpoints(root)
    upto = [p for p in ordered if checkpoint_order(p.name) <= here]
    stale = [p for p in ordered if checkpoint_order(p.name) > here]
    for old in stale + upto[:-keep]:
        if old.name != name:
            shutil.rmtree(old)
    return final


def latest(root: Path) -> Path | None:
    """The checkpoint ``latest.json`` names, or None when the run has none yet; raises CheckpointError when
    ``latest.json`` is damaged (:func:`resumable` then falls back to the newest intact checkpoint)."""
    pointer = root / LATEST
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
        if not isinstance(name, str) or checkpoint_order(name) is None:
            raise TypeError(f"not a checkpoint name: {name!r}")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer} is damaged ({exc})") from exc
    return root / name


def resumable(root: Path) -> tuple[Path | None, str | None]:
    """The checkpoint a resume continues from, verified, and a one-line note when it is not the one ``latest.json``
    names (None, None when there is none).

    ``latest.json`` names it normally; when that file is damaged or missing, or names a checkpoint that is gone, the
    newest checkpoint by (stage, step) that verifies is taken instead. A checkpoint ``latest.json`` names that fails
    verification is refused (CheckpointError), not skipped: the files were damaged, and the user decides.
    """
    try:
        named, problem = latest(root), None
    except CheckpointError as exc:
        named, problem = None, str(exc)
    if named is not None and named.is_dir():
        verify(named)
        return named, None
    found = checkpoints(root)
    if not found:
        if named is not None:
            raise CheckpointError(f"{root / LATEST} names {named.name}, which does not exist, and {root} holds no "
                                  "other checkpoint: start a fresh run (a new --out)")
        return None, None
    if problem is None:
        problem = f"{root / LATEST} names {named.name}, which does not exist" if named is not None else \
            f"{root / LATEST} is missing"
    refused = []
    for path in reversed(found):
        try:
            verify(path)
        except CheckpointError as exc:
            refused.append(str(exc))
            continue
        return path, f"{problem}: resuming from {path.name}, the newest intact checkpoint"
    raise CheckpointError(f"{problem}, and no checkpoint in {root} is intact ({'; '.join(refused)}): start a fresh "
                          "run (a new --out)")


def verify(path: Path) -> dict:
    """The manifest of checkpoint ``path`` after checking its format and every file's size and sha256; raises
    CheckpointError with advice that works (deleting a damaged checkpoint makes --resume take the newest intact
    older one)."""
    order = checkpoint_order(path.name)
    older = [p.name for p in checkpoints(path.parent) if order is None or checkpoint_order(p.name) < order]
    fallback = (
        f"delete {path} and --resume again to continue from the newest intact older checkpoint "
        f"({', '.join(reversed(older))}), or start a fresh run" if older else
        "no older checkpoint exists: start a fresh run (a new --out)"
    )
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist: {fallback}")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(
            f"checkpoint {path} has no {MANIFEST}: it was never finished or was damaged; {fallback}"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        version = manifest.get("format", 1)
    except (json.JSONDecodeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is damaged ({exc}); {fallback}") from exc
    if version != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is in an older format (pickled *.pt files), which radistill no longer loads because "
            f"unpickling can run code: finish it with the radistill version that wrote it, or start a fresh run"
        )
    for name, want in files.items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"checkpoint {path} lacks {name}, which its manifest lists; {fallback}")
        size = file.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(
                f"checkpoint file {file} has {size} bytes, its manifest says {want['bytes']} (truncated or "
                f"half-copied); {fallback}"
            )
        if sha256(file) != want["sha256"]:
            raise CheckpointError(f"checkpoint file {file} does not match its sha256 in the manifest (corrupted); "
                                  f"{fallback}")
    return manifest


# --- the run folder around the checkpoints ----------------------------------------------------------------------
RUN_ARTIFACTS = ("recipe.json", "metrics.jsonl", "checkpoints", "stage*")


def run_artifacts(run_dir: Path) -> list[str]:
    """What of a distillation run ``run_dir`` already holds (names, sorted); empty for a new folder or one holding
    only other files."""
    found = {p.name for pattern in RUN_ARTIFACTS for p in Path(run_dir).glob(pattern) if not p.name.startswith(".")}
    return sorted(found)


def trim_metrics(path: Path, upto: tuple[int, int]) -> bool:
    """Keep the records of ``metrics.jsonl`` up to (stage, step) ``upto``, rewritten atomically; a torn last line (a
    kill mid-write) is dropped, and True returned so the caller can say so. A damaged line before the end is not
    something a kill makes: refused (RadistillError) rather than silently dropped."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    kept, torn = [], False
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            key = (record["stage"], record["step"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            if number == len(lines):
                torn = True
                break
            raise RadistillError(f"{path} line {number} is damaged ({exc}), not just torn at the end: repair or "
                                 "delete that line, then --resume again") from exc
        if key <= upto:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return torn


# --- what the trainer writes and reads --------------------------------------------------------------------------
def save_model(state_dict: dict, directory: Path) -> None:
    save_state(state_dict, directory, "model")


def load_model_state(checkpoint: Path) -> dict:
    return load_state(checkpoint, "model")


def save_trainer(state: dict, directory: Path) -> None:
    save_json(state, directory / "trainer.json")


def load_trainer(checkpoint: Path) -> dict:
    return load_json(checkpoint / "trainer.json")


def save_rank(state: dict, directory: Path, rank: int) -> None:
    """One process's RNG states and optimizer state (None where it holds none)."""
    save_state(state, directory, f"rank{rank}")


def load_rank(checkpoint: Path, rank: int) -> dict:
    return load_state(checkpoint, f"rank{rank}")
