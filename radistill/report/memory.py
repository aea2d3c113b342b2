"""Cache bytes per sequence against context length for the report: teacher vs each student, from their configs
(numbers from :mod:`radistill.hybrid.memory`, bf16 as in the paper's table)."""

from __future__ import annotations

from pathlib import Path

from radistill.hybrid.memory import memory_rows
from radistill.report import html
from radistill.utils.errors import RadistillError

LENGTHS = (128, 512, 2048, 4096, 16384, 65536)
TABLE_LENGTHS = (128, 2048, 4096)  # the paper's columns
DTYPE = "bf16"


def memory_curves(students: dict[str, Path]) -> dict[str, dict[int, int]] | None:
    """``{model: {length: KV + SSM bytes}}`` for the teacher and each student (``name -> checkpoint dir``)."""
    curves: dict[str, dict[int, int]] = {}
    for name, directory in students.items():
        try:
            rows = memory_rows(directory, list(LENGTHS), DTYPE)
        except RadistillError:
            continue  # a checkpoint that is not a hybrid student: nothing to account
        teacher, student = rows[: len(LENGTHS)], rows[len(LENGTHS) : 2 * len(LENGTHS)]
        curves.setdefault("teacher", {r.length: r.total_bytes for r in teacher})
        curves[name] = {r.length: r.total_bytes for r in student}
    return curves or None


def memory_table(curves: dict[str, dict[int, int]]) -> str:
    header = ["model"] + [f"{n:,} tokens" for n in TABLE_LENGTHS] + ["÷ teacher at 4,096"]
    teacher = curves["teacher"][4096]
    rows = [[name] + [f"{points[n] / 1e6:.3f} MB" for n in TABLE_LENGTHS] + [f"{points[4096] / teacher:.3f}"]
            for name, points in curves.items()]
    note = html.para(f"{DTYPE}; KV cache + SSM state per sequence (MB = 10⁶ B), as in the paper's table; the small "
                     "conv state is left out. Computed from the configs by radistill.hybrid.memory.", "note")
    return html.table(header, rows) + "\n" + note
