"""Where a benchmark ran, as its results record it: the device in words and the versions that matter."""

from __future__ import annotations

import platform
from importlib import metadata

import torch


def device_label(device: str) -> str:
    """``NVIDIA H200`` for a CUDA device, ``cpu (x86_64, 2 threads)`` for the CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions(*packages: str) -> dict[str, str]:
    """Python, torch and transformers, plus each of ``packages`` that is installed (by distribution name)."""
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
