"""Where a benchmark ran, as its results record it: the device in words and the versions that matter."""

from __future__ import annotations

import platform

import torch


def device_label(device: str) -> str:
    """``NVIDIA H200`` for a CUDA device, ``cpu (x86_64, 2 threads)`` for the CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict:
    """Python, torch, transformers and CUDA, and triton and fla where installed (fla None where not)."""
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import fla

        out["fla"] = getattr(fla, "__version__", "installed")
    except ImportError:
        out["fla"] = None
    return out
