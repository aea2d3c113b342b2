"""A run's training record: ``RUN/metrics.jsonl`` (one JSON record per logged step) and, with ``tensorboard``, the
same scalars in ``RUN/tensorboard/``. Rank 0 alone writes; on the other ranks every call does nothing.

A record: ``stage``, ``step`` (over the whole stage), ``steps``, ``tokens``, ``loss``, ``lr``, ``grad_norm``,
``tokens_per_s`` (since the previous record), ``elapsed`` (seconds since the stage began) and ``block``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from radistill.distill import checkpoint as ckpt
from radistill.utils.console import console, is_main_process, progress
from radistill.utils.errors import RadistillError

SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s")  # what tensorboard gets of each record


class MetricsLog:
    """``RUN/metrics.jsonl``, append-only (a resume trims it back to its checkpoint), and the tensorboard writer.

    ``tensorboard``: a missing package fails here, before any training; the writer (and its folder) is made only by
    :meth:`open`, so that a refused run folder gets none.
    """

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.tensorboard = tensorboard and is_main_process()
        self._writer = None
        if self.tensorboard:
            _summary_writer_class()

    def open(self) -> None:
        if self.tensorboard:
            self._writer = _summary_writer_class()(self.run_dir / "tensorboard")

    def clear(self) -> None:
        """Drop the records of an attempt that never checkpointed (nothing of it is continued)."""
        if is_main_process():
            self.path.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        if not is_main_process():
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key in SCALARS:
                self._writer.add_scalar(f"stage{record['stage']}/{key}", record[key], record["tokens"])

    def trim(self, stage: int, step: int) -> None:
        """Drop records written after the checkpoint being resumed (they will be logged again), and a torn last
        line (the process was killed mid-write; said in one line). A damaged line before the end is refused."""
        if not is_main_process() or not self.path.exists():
            return
        if ckpt.trim_metrics(self.path, (stage, step)):
            console.print(f"[yellow]{self.path}: dropped a torn last line (the run was killed while writing it)[/]")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class StageMeter:
    """One stage's per-step bookkeeping: tokens trained, the last loss, the progress bar, and a record for
    :class:`MetricsLog` at the steps that log. A context manager (the progress bar's lifetime).

    ``steps``: the stage's optimizer steps, of which ``step`` are done, holding ``tokens`` tokens (a resume starts
    inside the stage); ``tokens_per_step``: what each step adds.
    """

    def __init__(self, log: MetricsLog, stage: int, steps: int, tokens_per_step: int, step: int = 0, tokens: int = 0):
        self.log, self.stage, self.steps, self.tokens_per_step = log, stage, steps, tokens_per_step
        self.tokens, self.loss = tokens, float("nan")
        self.started = time.perf_counter()
        self._lap_start, self._lap_tokens = self.started, 0  # tokens per second are measured since the last record
        self._done_before = step
        self._bar = progress()

    def __enter__(self) -> StageMeter:
        self._bar.__enter__()
        self._task = self._bar.add_task(f"stage {self.stage}", total=self.steps, completed=self._done_before,
                                        status="")
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def stepped(self, step: int, loss: float, grad_norm: float, lr: float, block: int, record: bool) -> None:
        """Optimizer step ``step`` (1-based, over the stage) of layer block ``block`` is done; ``record``: log it."""
        self.tokens += self.tokens_per_step
        self._lap_tokens += self.tokens_per_step
        self.loss = loss
        if not record:
            return
        now = time.perf_counter()
        rate = self._lap_tokens / max(now - self._lap_start, 1e-9)
        self.log.write(dict(stage=self.stage, step=step, steps=self.steps, tokens=self.tokens, loss=loss, lr=lr,
                            grad_norm=grad_norm, tokens_per_s=rate, elapsed=now - self.started, block=block))
        self._bar.update(self._task, completed=step, status=f"loss {loss:.4f} · {rate:,.0f} tok/s")
        self._lap_start, self._lap_tokens = now, 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise RadistillError("--tensorboard needs the tensorboard package: pip install tensorboard (or drop the flag; "
                             "metrics.jsonl has the same numbers)") from exc
    return SummaryWriter
