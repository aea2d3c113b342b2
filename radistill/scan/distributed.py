"""Splitting a scan's heads across ``torchrun`` ranks and gathering the results (no-ops in one process)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> str | None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns this rank's device, or None.

    NCCL on CUDA (one GPU per rank, by ``LOCAL_RANK``), gloo on CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def shard(values: list) -> list:
    """This rank's share: every ``world_size``-th value from ``rank`` (interleaved, so layers balance)."""
    return values[rank() :: world_size()]


def gather_dict(local: dict) -> dict:
    """Union of every rank's dict, on every rank (plain Python values; sent as objects)."""
    if not active():
        return dict(local)
    parts: list[dict | None] = [None] * world_size()
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged
