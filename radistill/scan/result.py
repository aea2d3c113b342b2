"""A scan's result: ``scan.json`` (the contract read by ``build``), ``scan.csv`` and ``heads.png``.

``scan.json``::

    {"model": str, "fingerprint": str, "layout": HeadLayout fields,
     "probe": {"kind": "kv"|"jsonl", ...settings, "items": int, "max_tokens": int},
     "metric": "logprob"|"accuracy", "ablation": "zero"|"mean",
     "baseline": {"accuracy": float, "logprob": float},
     "heads": [{"layer", "head", "kv_head", "score", "accuracy_drop", "logprob_drop"}, ...]}   # best first

``score`` is the ranking metric's drop (``logprob_drop`` or ``accuracy_drop``); larger = the probe depends more
on the head. ``logprob`` is the mean over items of the answer's log-prob normalised over the choices.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from radistill.models.access import HeadLayout
from radistill.utils.errors import RadistillError
from radistill.utils.io import atomic_path, write_json_atomic, write_text_atomic

METRICS = ("logprob", "accuracy")


@dataclass(frozen=True)
class HeadScore:
    layer: int
    head: int
    kv_head: int
    score: float
    accuracy_drop: float
    logprob_drop: float

    @property
    def name(self) -> str:
        """CLI spelling ``L.H``."""
        return f"{self.layer}.{self.head}"


@dataclass
class ScanResult:
    model: str
    fingerprint: str
    layout: HeadLayout
    probe: dict
    metric: str
    ablation: str
    baseline: dict  # {"accuracy", "logprob"}
    heads: list[HeadScore] = field(default_factory=list)  # best first

    def top(self, k: int) -> list[HeadScore]:
        return self.heads[:k]

    def to_dict(self) -> dict:
        return {
            "model": self.model, "fingerprint": self.fingerprint, "layout": self.layout.to_dict(),
            "probe": self.probe, "metric": self.metric, "ablation": self.ablation, "baseline": self.baseline,
            "heads": [asdict(h) for h in self.heads],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ScanResult":
        layout_fields = {f.name for f in fields(HeadLayout)}
        return cls(
            model=data["model"], fingerprint=data["fingerprint"],
            layout=HeadLayout(**{k: v for k, v in data["layout"].items() if k in layout_fields}),
            probe=data["probe"], metric=data["metric"], ablation=data["ablation"], baseline=data["baseline"],
            heads=[HeadScore(**h) for h in data["heads"]],
        )

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``scan.json``, ``scan.csv`` and ``heads.png`` into ``out_dir`` (atomically); returns scan.json."""
        out = Path(out_dir)
        write_json_atomic(out / "scan.json", self.to_dict())
        write_text_atomic(out / "scan.csv", self.to_csv())
        plot_heads(self, out / "heads.png")
        return out / "scan.json"

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        columns = [f.name for f in fields(HeadScore)]
        writer.writerow(["rank", *columns])
        for rank, head in enumerate(self.heads, start=1):
            writer.writerow([rank, *(getattr(head, c) for c in columns)])
        return buffer.getvalue()


def rank_heads(layout: HeadLayout, baseline: dict, ablated: dict, metric: str) -> list[HeadScore]:
    """Heads best-first from ``{(layer, head): {"accuracy", "logprob"}}`` of the ablated model.

    Ties in the ranking metric (common for accuracy) are broken by the other drop, then by position.
    """
    if metric not in METRICS:
        raise RadistillError(f"unknown metric '{metric}': use logprob or accuracy")
    other = "accuracy" if metric == "logprob" else "logprob"
    scored = []
    for (layer, head), m in ablated.items():
        drops = {k: baseline[k] - m[k] for k in METRICS}
        scored.append(HeadScore(layer, head, layout.kv_head(head), drops[metric], drops["accuracy"], drops["logprob"]))
    def order(h: HeadScore):
        return -getattr(h, f"{metric}_drop"), -getattr(h, f"{other}_drop"), h.layer, h.head

    return sorted(scored, key=order)


def load_scan(path: str | os.PathLike) -> ScanResult:
    """Read a ``scan.json`` (or the directory holding one), with errors that say what is wrong and what to do."""
    path = Path(path)
    if path.is_dir():
        path = path / "scan.json"
    if not path.exists():
        raise RadistillError(
            f"no scan result at {path}: run `radistill scan MODEL --out DIR` first, then pass DIR/scan.json"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RadistillError(f"{path} is not valid JSON ({exc}): rerun `radistill scan` to rewrite it") from exc
    required = ("model", "fingerprint", "layout", "probe", "metric", "ablation", "baseline", "heads")
    missing = [k for k in required if k not in data] if isinstance(data, dict) else list(required)
    if missing:
        raise RadistillError(
            f"{path} is not a radistill scan result (missing {', '.join(missing)}): rerun `radistill scan`"
        )
    try:
        result = ScanResult.from_dict(data)
    except (TypeError, KeyError) as exc:
        raise RadistillError(f"{path} has a malformed field ({exc}): rerun `radistill scan` to rewrite it") from exc
    if not result.heads:
        raise RadistillError(f"{path} lists no heads: rerun `radistill scan` without restricting the heads")
    return result


def plot_heads(result: ScanResult, path: Path) -> None:
    """Layers × heads heatmap of ``score`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((result.layout.num_layers, result.layout.num_heads), np.nan)
    for h in result.heads:
        grid[h.layer, h.head] = h.score
    width = min(16.0, 2.5 + 0.3 * result.layout.num_heads)
    height = min(12.0, 1.5 + 0.3 * result.layout.num_layers)
    fig, ax = plt.subplots(figsize=(width, height))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    name = Path(result.model).name or result.model
    ax.set_title(f"{name}\n{result.metric} drop when one head is {result.ablation}-ablated", fontsize=9)
    fig.colorbar(image, ax=ax, label=f"{result.metric} drop")
    for rank, h in enumerate(result.heads[:10], start=1):
        ax.text(h.head, h.layer, str(rank), ha="center", va="center", color="white", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
