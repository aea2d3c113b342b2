"""Resumable training checkpoints: written whole or not at all, verified before use.

Layout under ``RUN/checkpoints/``::

    stage2-step00000400/        one checkpoint (a directory)
        model.pt                student state dict (fp32)
        trainer.pt              stage, step, tokens, data position, world size
        rank0.pt, rank1.pt, ... each process's RNG states and optimizer state (its own layers' state in
                                stages 1/2 across ranks; rank 0 alone holds it in stage 3, where ranks agree)
        manifest.json           sha256 and size of every file above; written last
    latest.json                 {"checkpoint": "stage2-step00000400"}; replaced atomically

A checkpoint is assembled in a hidden ``.NAME.partial`` directory, and renamed into place only once every file and
the manifest are on disk, then ``latest.json`` moves to it: a run killed at any moment (``kill -9`` included)
leaves ``latest.json`` naming a complete checkpoint. Loading re-hashes every file against the manifest, so a
truncated, altered or half-copied checkpoint is refused with a message that says which file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from radistill.utils.errors import RadistillError
from radistill.utils.io import atomic_path, write_json_atomic

MANIFEST = "manifest.json"
LATEST = "latest.json"


class CheckpointError(RadistillError):
    """A checkpoint is missing, incomplete or corrupted."""


def checkpoint_name(stage: int, step: int) -> str:
    return f"stage{stage}-step{step:08d}"


def partial_dir(root: Path, name: str) -> Path:
    """Where the files of checkpoint ``name`` are written before it is published."""
    return root / f".{name}.partial"


def save_file(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def publish(root: Path, name: str, meta: dict, keep: int) -> Path:
    """Hash the partial directory's files into its manifest, rename it into place, point ``latest.json`` at it,
    and delete all but the newest ``keep`` checkpoints. Call once every file is written (rank 0 only)."""
    partial = partial_dir(root, name)
    files = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size} for p in sorted(partial.iterdir())}
    write_json_atomic(partial / MANIFEST, {**meta, "files": files})
    final = root / name
    if final.exists():  # re-saving a step (e.g. after a resume that rewrote the same step)
        shutil.rmtree(final)
    os.replace(partial, final)
    write_json_atomic(root / LATEST, {"checkpoint": name})
    for old in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[:-keep]:
        if old.name != name:
            shutil.rmtree(old)
    return final


def latest(root: Path) -> Path | None:
    """The checkpoint ``latest.json`` names, or None when the run has none yet."""
    pointer = root / LATEST
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{pointer} is damaged ({exc}); delete it to resume from scratch") from exc
    return root / name


def verify(path: Path) -> dict:
    """The manifest of checkpoint ``path`` after checking every file's size and sha256; raises CheckpointError."""
    others = sorted(p.name for p in path.parent.iterdir() if p.is_dir() and p != path and not p.name.startswith("."))
    fallback = (
        f"delete {path} and point {path.parent / LATEST} at an older checkpoint ({', '.join(others)}), "
        "or start a fresh run" if others else f"delete {path.parent} and start a fresh run"
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
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{manifest_path} is damaged ({exc}); {fallback}") from exc
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


def load_file(path: Path) -> Any:
    # our own files, verified against the manifest first; they hold RNG states (numpy arrays, tuples)
    return torch.load(path, map_location="cpu", weights_only=False)
