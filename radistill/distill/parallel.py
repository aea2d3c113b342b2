"""What the trainer needs from ``torch.distributed`` beyond the process group (radistill.scan.distributed):
spreading a block of layers over ranks, syncing them back, reductions that are no-ops in one process, and stage 3's
data parallelism — DDP, or FSDP2 (``fully_shard``) over the student and optionally the frozen teacher, applied
from here so that the models and the trainer know nothing of it (:func:`stage_student`), with the optimizer state
each rank checkpoints and restores (:func:`optimizer_state_to_save`, :func:`load_optimizer_state`)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from radistill.models.access import decoder_layers
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


# --- stage 3: DDP or FSDP2 ---------------------------------------------------------------------------------
def stage_student(stage: int, student: nn.Module, *, fsdp: bool, device: str, bf16: bool,
                  compile_layers: Callable[[list[nn.Module]], None]
                  ) -> tuple[nn.Module, Callable[[nn.Module], nn.Module] | None]:
    """The student ``stage``'s objective trains and how its module spreads over the ranks (the wrapper the objective
    applies): in stage 3 over several ranks DDP, or FSDP2 on a copy (sharding replaces the parameters and the
    modules' classes in place, with no way back; the trainer copies the weights back with :func:`copy_full`, and
    ``compile_layers`` compiles the copy's layers, which a deep copy leaves uncompiled). Otherwise the student,
    unwrapped (stages 1/2 split the layers instead)."""
    from radistill.distill.stages import student_layers  # stages imports this module

    if stage != 3 or world_size() == 1:
        return student, None
    if not fsdp:
        return student, functools.partial(data_parallel, device=device)
    student = copy.deepcopy(student)
    compile_layers(student_layers(student))
    return student, functools.partial(fully_shard_training, layers=student_layers(student), bf16=bf16)


def optimizer_state_to_save(model: nn.Module, optimizer: torch.optim.Optimizer, layerwise: bool) -> dict | None:
    """What this rank checkpoints of the optimizer (every rank must call): stages 1/2 over several ranks each rank
    its own layers' state; stage 3 rank 0 alone, the state being the same on every rank under DDP, and gathered
    whole onto rank 0 under FSDP2 (so the checkpoint looks like DDP's). None where the rank saves nothing."""
    if is_sharded(model):
        return full_optimizer_state(model, optimizer)
    return optimizer.state_dict() if (layerwise and world_size() > 1) or rank() == 0 else None


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore :func:`optimizer_state_to_save`'s ``state`` (this rank's, or rank 0's in stage 3) into the optimizer of
    ``model``, sharded or not."""
    if is_sharded(model):
        load_full_optimizer_state(model, optimizer, state)
    else:
        optimizer.load_state_dict(state)


def data_parallel(module: nn.Module, device: str) -> nn.Module:
    """``module`` under DDP: replicated on every rank, gradients all-reduced."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(module, device_ids=ids)


def fully_shard_training(module: nn.Module, layers: nn.ModuleList, bf16: bool) -> nn.Module:
    """``module`` under FSDP2, in place: each of ``layers`` one group (all-gathered for its forward and again for its
    backward), the rest of ``module`` the root's, moved to this rank's device. With ``bf16`` the fp32 shards (master
    weights) are gathered in bf16 and gradients reduced in fp32; autocast then finds bf16 weights and casts nothing
    again."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    # the root's float inputs (stored teacher log-probabilities) stay fp32, as under DDP
    return fully_shard(module, mp_policy=dataclasses.replace(policy, cast_forward_inputs=False))


def shard_frozen(model: nn.Module, device: str) -> None:
    """A frozen causal LM's decoder layers, then the rest of its base model (embeddings, final norm), sharded over the
    ranks in place and moved to ``device``: each group is gathered for its forward and freed right after. The LM head
    stays whole on every rank: stage 3's loss reads its weight outside any forward."""
    from torch.distributed.fsdp import fully_shard

    model.get_output_embeddings().to(device)
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(getattr(model, model.base_model_prefix), reshard_after_forward=True)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool):
    """A backward under DDP or FSDP2 that reduces gradients over the ranks only if ``sync`` (the last micro-batch of
    an optimizer step); the others accumulate locally (FSDP2: unsharded, in fp32)."""
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(sync)
    no_sync = getattr(module, "no_sync", None)
    with contextlib.nullcontext() if sync or no_sync is None else no_sync():
        yield


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor (e.g. the gradient norm of sharded parameters) gathered whole."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def copy_full(sharded: nn.Module, plain: nn.Module) -> None:
    """Copy a fully_shard'ed copy of ``plain`` back into it, whole, one tensor at a time (every rank must call)."""
    target = plain.state_dict()
    with torch.no_grad():
        for name, value in sharded.state_dict().items():
            target[name].copy_(full_value(value))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimizer state of a sharded ``model``, gathered whole into CPU memory on rank 0 (None on the others;
    every rank must call). Keyed by parameter name, for :func:`load_full_optimizer_state`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    return state if rank() == 0 else None


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load :func:`full_optimizer_state`'s ``state`` (on every rank) into the optimizer of a sharded ``model``: each
    rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
