"""What the trainer needs from ``torch.distributed`` beyond the process group (radistill.scan.distributed):
spreading layers over ranks, syncing them back, and reductions that are no-ops in one process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from radistill.scan.distributed import active, rank, world_size


def layer_owners(num_layers: int, world: int) -> list[int]:
    """The rank that trains each layer in stages 1/2: contiguous blocks, as even as the count allows."""
    return [layer * world // num_layers for layer in range(num_layers)]


def owned_layers(num_layers: int) -> list[int]:
    return [i for i, owner in enumerate(layer_owners(num_layers, world_size())) if owner == rank()]


def broadcast_layers(layers: nn.ModuleList) -> None:
    """Give every rank every layer's parameters and buffers, each from the rank that trained it."""
    if not active():
        return
    for layer, owner in zip(layers, layer_owners(len(layers), world_size())):
        for tensor in [*layer.parameters(), *layer.buffers()]:
            dist.broadcast(tensor.data, src=owner)


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
