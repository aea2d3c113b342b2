"""Peak memory of a piece of code, measured: the CUDA allocator's peak on a GPU, live tensor storage elsewhere.

On CPU there is no allocator counter that tracks tensors only (RSS includes the Python heap, freed-but-cached pages
and thread arenas), so :class:`LiveTensors` counts tensor storage itself: a ``TorchDispatchMode`` sees every tensor
an op creates (forward, autograd backward, optimizer), de-duplicates views by their storage and, after each op,
sums the storages still alive. What it cannot see is memory a kernel allocates and frees inside one op (matmul
workspaces, flash-attention scratch), which the CUDA allocator would count. The same mode also runs on the meta
device, where nothing is computed: that is how :mod:`radistill.memplan.estimate` sizes a layer's activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensors(TorchDispatchMode):
    """Bytes of distinct live tensor storages created while active (plus those ``add``-ed); ``peak`` is their max.

    ``live``/``peak`` are sampled after every op, when the op's outputs exist and its inputs are not freed yet
    (what an allocator sees at that moment). Cost: O(live tensors) per op, fine for one layer or a tiny model.
    """

    def __init__(self, exclude: Callable[[], int] | None = None) -> None:
        """exclude: bytes to leave out of each sample (e.g. parameter gradients, which a caller counts apart)."""
        super().__init__()
        self._storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self._exclude = exclude
        self.live = 0
        self.peak = 0

    def add(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count already existing tensors (weights, optimizer state) as live from now on."""
        for tensor in tensors:
            self._track(tensor)
        self._sample()

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        ref = StorageWeakRef(storage)
        if ref.cdata not in self._storages:
            self._storages[ref.cdata] = (ref, storage.nbytes())

    def _sample(self) -> None:
        dead = [key for key, (ref, _) in self._storages.items() if ref.expired()]
        for key in dead:
            del self._storages[key]
        self.live = sum(size for _, size in self._storages.values()) - (self._exclude() if self._exclude else 0)
        self.peak = max(self.peak, self.live)

    def reset_peak(self) -> None:
        self._sample()
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output sharing an input's storage is a view or an in-place result, not an allocation (and the input
        # may be a tensor from before, e.g. a weight, which must not start counting because a view of it was made)
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and StorageWeakRef(leaf.untyped_storage()).cdata not in inputs:
                self._track(leaf)
        self._sample()
        return out


def measure_peak(fn: Callable[[], object], resident: Iterable[torch.Tensor] = (), device: str = "cpu") -> int:
    """Peak bytes while ``fn()`` runs, counting ``resident`` tensors (weights...) as held throughout.

    CUDA: ``torch.cuda.max_memory_allocated`` over the call (everything allocated on the device counts, so
    ``resident`` is ignored); elsewhere: :class:`LiveTensors` (``resident`` + what ``fn`` creates).
    """
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    with LiveTensors() as tracker:
        tracker.add(resident)
        fn()
    return tracker.peak


__all__ = ["LiveTensors", "measure_peak"]
