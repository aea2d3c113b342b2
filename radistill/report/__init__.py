"""The run report: one self-contained HTML page (images embedded) and PNGs, from whatever parts of a run exist."""

from radistill.report.build import build_report
from radistill.report.inputs import RunInputs, RunLayout, discover

__all__ = ["RunInputs", "RunLayout", "build_report", "discover"]
