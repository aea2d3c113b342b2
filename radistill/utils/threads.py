"""Thread-count helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one intra-op CPU thread, then restore the count.

    For small CPU linear-algebra calls (a QR or SVD of a few hundred x 48 per head): LAPACK splits them into many
    short OpenMP regions, too short to gain from more threads, each waiting at a barrier for every thread. On the
    project's 2-core machine with other work running, the 20 QRs of a teacher-19m build took 3.9 s with 2 threads
    (most of its 6 s convert step, in a cProfile of ``radistill build``) and 0.04 s with one."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


__all__ = ["one_thread"]
