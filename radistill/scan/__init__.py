"""The scan: rank every attention head by how much in-context KV retrieval depends on it.

``run_scan(model_id, out)`` does it all (what ``radistill scan`` runs); ``scan_model`` for a loaded model;
``load_scan`` reads a ``scan.json``. See :mod:`radistill.scan.fast` for how it is fast.
"""

from radistill.utils.lazy import lazy_exports

# imported on first use, so that importing this package (as `radistill --help` does) does not import torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "radistill.scan.result": ("HeadScore", "ScanResult", "load_scan"),
    "radistill.scan.run": ("run_scan", "scan_model"),
})

__all__ = ["HeadScore", "ScanResult", "load_scan", "run_scan", "scan_model"]
