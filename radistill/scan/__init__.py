"""The scan: rank every attention head by how much in-context KV retrieval depends on it.

``run_scan(model_id, out)`` does it all (what ``radistill scan`` runs); ``scan_model`` for a loaded model;
``load_scan`` reads a ``scan.json``. See :mod:`radistill.scan.fast` for how it is fast.
"""

from radistill.scan.result import HeadScore, ScanResult, load_scan
from radistill.scan.run import run_scan, scan_model

__all__ = ["HeadScore", "ScanResult", "load_scan", "run_scan", "scan_model"]
