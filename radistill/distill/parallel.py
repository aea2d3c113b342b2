"""What the trainer needs from ``torch.distributed`` beyond the process group (radistill.scan.distributed):
spreading a block of layers over ranks, syncing them back, and reductions that are no-ops in one process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from radistill.scan.distributed import active, rank, world_size


def layer_owners(block: list[int], world: int) -> dict[int, int]:
    """The rank that trains each layer of ``block`` (stages 1/2): contiguous runs, as even as the count allows.
    A block smaller than the world leaves some ranks without a layer (they still read the batches)."""
    return {layer: j * world // len(block) for j, layer in enumerate(block)}


def owned_layers(block: list[int]) -> list[int]:
    """This rank's layers of ``block``."""
    return [layer for layer, owner in layer_owners(block, world_size()).items() if owner == rank()]


def broadcast_layers(modules: dict[int, nn.Module]) -> None:
    """Give every rank the parameters and buffers of a block's trained modules (layer index -> the part of that
    layer that trains), each from the rank that trained it.

    Only those: the rest of the student is the same on every rank already (untouched, or broadcast when its own
    block ended), and may sit in CPU memory, which NCCL cannot send.
    """
    if not active():
        return
    owners = layer_owners(list(modules), world_size())
    for index, module in modules.items():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=owners[index])


def all_reduce_sum(values: torch.Tensor) -> list[float]:
    """Element-wise sum of a 1-D tensor over ranks, as Python floats (one collective, one host sync)."""
    if active():
        values = values.clone()
        dist.all_reduce(values)
    return values.tolist()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
