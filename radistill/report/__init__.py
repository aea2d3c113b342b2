"""The run report: one self-contained HTML page (images embedded) and PNGs, from whatever parts of a run exist."""

from radistill.utils.lazy import lazy_exports

# imported on first use, so that importing this package (as `radistill --help` does) does not import torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "radistill.report.build": ("build_report",),
    "radistill.report.inputs": ("RunInputs", "RunLayout", "discover"),
})

__all__ = ["RunInputs", "RunLayout", "build_report", "discover"]
