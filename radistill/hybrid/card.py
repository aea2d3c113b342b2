"""A student folder's ``README.md``: a Hugging Face model card written from the folder's own files.

:func:`write_model_card` reads only JSON (``config.json``; ``selection.json``, ``eval.json`` and the distillation
run's ``recipe.json`` when present) and (re)writes ``README.md`` atomically, so ``radistill build`` writes it and
distill/eval can refresh it after they add their files. Nothing in the folder is executed or unpickled.

Where the recipe is looked for: ``MODEL_DIR/recipe.json``, else, for a distill stage output (``RUN/stageN/``), the
run's ``RUN/recipe.json``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from radistill.hybrid.configuration import HybridConfig, LOADER_MODULE
from radistill.hybrid.memory import dtype_bytes, student_rows, teacher_rows
from radistill.utils.errors import RadistillError
from radistill.utils.io import write_text_atomic

CARD = "README.md"
LENGTHS = (2048, 4096)  # sequence lengths of the card's cache table
TAGS = ("radistill", "hybrid", "ssm", "mamba2", "distillation", "text-generation")


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RadistillError(f"{path} is not readable JSON ({exc}): fix or remove it, then write the card again") \
            from exc


def _recipe_path(model_dir: Path) -> Path | None:
    for path in (model_dir / "recipe.json",
                 model_dir.parent / "recipe.json" if re.fullmatch(r"stage\d+", model_dir.name) else None):
        if path is not None and path.exists():
            return path
    return None


def _dtype_name(config: HybridConfig) -> str:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(dtype).removeprefix("torch.")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def _cache_section(config: HybridConfig, dtype: str) -> list[str]:
    """Cache bytes per token (KV) and per sequence (recurrent state), student vs teacher, in the saved dtype."""
    nbytes = dtype_bytes(dtype)
    layout = config.layout
    windows = [config.sliding_window] * layout.num_layers
    student = student_rows(config, [1, *LENGTHS], nbytes)
    teacher = teacher_rows(layout, [1, *LENGTHS], nbytes, windows=windows)
    kv_token, teacher_token = student[0].kv_bytes, teacher[0].kv_bytes
    state = student[0].ssm_bytes + student[0].conv_bytes
    kept_kv = sum(len(config.kv_sources(i)) for i in range(layout.num_layers))  # private_kv: one per kept head
    ratio = f"{teacher_token / kv_token:.1f}x less" if kv_token else "no KV cache at all"
    lines = [
        "## Cache",
        "",
        f"In {dtype}: the KV cache grows by **{kv_token:,} bytes per token** ({kept_kv} K/V heads cached, "
        f"the teacher {layout.num_layers * layout.num_kv_heads}) against the teacher's {teacher_token:,} "
        f"({ratio}); the recurrent heads hold a fixed {state:,} bytes per sequence (SSM state "
        f"{student[0].ssm_bytes:,} + conv state {student[0].conv_bytes:,}), whatever the length.",
        "",
        "| tokens | student KV MB | student SSM + conv MB | student total MB | teacher KV MB |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s, t in zip(student[1:], teacher[1:]):
        lines.append(f"| {s.length} | {_mb(s.kv_bytes)} | {_mb(s.ssm_bytes + s.conv_bytes)} | "
                     f"{_mb(s.kv_bytes + s.ssm_bytes + s.conv_bytes)} | {_mb(t.kv_bytes)} |")
    lines += ["", "(MB = 10^6 bytes; `radistill memory MODEL_DIR` gives other lengths.)", ""]
    return lines


def _heads_section(config: HybridConfig, selection: dict | None) -> list[str]:
    layout = config.layout
    kept = [f"{layer}.{head}" for layer, heads in enumerate(config.kept_heads) for head in heads]
    lines = [
        "## Architecture",
        "",
        f"A head-level Transformer/SSM hybrid of a {layout.model_type} teacher ({layout.num_layers} layers x "
        f"{layout.num_heads} query heads, {layout.num_kv_heads} KV heads, head_dim {layout.head_dim}). "
        f"**{len(kept)} of {layout.total_heads} heads are kept** as softmax attention with the teacher's weights; "
        f"the other {layout.total_heads - len(kept)} are recurrent `{config.mixer}` heads.",
        "",
        f"- kept heads (LAYER.HEAD): {', '.join(kept) if kept else 'none'}",
        f"- mixer: `{config.mixer}`, settings: `{json.dumps(config.mixer_settings, sort_keys=True)}`",
    ]
    if "state_size" in config.mixer_settings:
        lines.append(f"- state size N: {config.mixer_settings['state_size']}")
    params = (selection or {}).get("parameters")
    if params:  # selection.json of a build before this record existed: no line
        lines.append(f"- parameters: {params['student'] / 1e6:.1f}M against the teacher's "
                     f"{params['teacher'] / 1e6:.1f}M ({params['student'] / params['teacher']:.2f}x); at short "
                     "contexts a decode step mostly reads weights, so expect no more speed than that ratio allows")
    if selection is not None:
        how = (f"the top {selection.get('keep')} of the scan {selection.get('scan')} (metric "
               f"{selection.get('scan_metric')})" if selection.get("source") == "scan" else "given by hand (--heads)")
        lines.append(f"- heads chosen: {how}; `selection.json` lists each head's rank and score")
        calibration = selection.get("calibration") or {}
        if calibration:
            lines.append(f"- calibration: {calibration.get('tokens')} tokens of {calibration.get('source')}, "
                         f"half-lives {calibration.get('half_lives')}")
    lines.append("")
    return lines


def _recipe_section(path: Path | None) -> list[str]:
    if path is None:
        return ["## Training", "", "Not distilled: this is the student as `radistill build` initialised it from the "
                "teacher (kept heads copied, recurrent heads initialised from their attention heads' Q/K/V and "
                "calibrated). `radistill distill` trains it.", ""]
    recipe = _read_json(path)
    return ["## Training", "", f"Distilled with `radistill distill`; the recipe ({path.name}):", "", "```json",
            json.dumps(recipe, indent=2, sort_keys=True), "```", ""]


def _eval_section(report: dict | None) -> list[str]:
    if not report or not report.get("tasks"):
        return []
    lines = ["## Evaluation", "", "From `eval.json` (`radistill eval`):", "",
             "| task | group | metric | student | teacher | student / teacher |", "|---|---|---|---:|---:|---:|"]
    for name, row in report["tasks"].items():
        value, teacher = row.get("value"), row.get("teacher_value")
        ratio = None
        if value is not None and teacher:
            ratio = value / teacher if row.get("higher_is_better", True) else (teacher / value if value else None)
        lines.append(f"| {name} | {row.get('group') or '-'} | {row.get('metric')} | {_num(value)} | {_num(teacher)} "
                     f"| {_num(ratio)} |")
    coverage = {k: v for k, v in (report.get("coverage") or {}).items() if v is not None}
    if coverage:
        lines += ["", "Coverage (student / teacher, by group): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in coverage.items())]
    lines.append("")
    return lines


def _num(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _loading_section() -> list[str]:
    return [
        "## Loading",
        "",
        "The model code is the `radistill` library's; install it, import it, then use the Auto classes:",
        "",
        "```bash",
        "pip install radistill",
        "```",
        "",
        "```python",
        "import radistill  # registers the radistill_hybrid model type with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        'batch = tokenizer(["first prompt", "second"], return_tensors="pt", padding=True)  # pads on the left',
        'out = model.generate(**batch, max_new_tokens=64, cache_implementation="static")  # its fast path on CUDA',
        "```",
        "",
        "Without `import radistill`, `from_pretrained(path, trust_remote_code=True)` also works with radistill "
        f"installed: `{LOADER_MODULE}.py` in this folder only imports radistill and re-exports its classes (and "
        "says `pip install radistill` when it is missing). `radistill serve path/to/this/folder` puts it behind an "
        "OpenAI-compatible endpoint.",
        "",
    ]


def model_card(model_dir: str | os.PathLike) -> str:
    """The text of ``model_dir``'s model card (module docstring says which files it reads)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    raw = _read_json(config_path)
    if raw is None:
        raise RadistillError(f"{config_path} does not exist: is {model_dir} a student folder (`radistill build`)?")
    if raw.get("model_type") != HybridConfig.model_type:
        raise RadistillError(f"{model_dir} holds a '{raw.get('model_type')}' model, not a radistill student: "
                             "model cards are written for student folders")
    config = HybridConfig.from_dict({k: v for k, v in raw.items() if k != "auto_map"})
    selection = _read_json(model_dir / "selection.json")
    teacher = (selection or {}).get("teacher") or config.teacher_model_type
    dtype = _dtype_name(config)
    front = ["---", "library_name: radistill", f"base_model: {json.dumps(str(teacher))}", "tags:",
             *[f"- {tag}" for tag in TAGS], "pipeline_tag: text-generation", "---", ""]
    intro = [f"# radistill student of {teacher}", "",
             f"A radistill student of **{teacher}**: the teacher's retrieval-critical attention heads kept, every other "
             f"head replaced by a recurrent head with a fixed-size state. Weights in {dtype}.", ""]
    body = (_heads_section(config, selection) + _cache_section(config, dtype)
            + _recipe_section(_recipe_path(model_dir)) + _eval_section(_read_json(model_dir / "eval.json"))
            + _loading_section())
    return "\n".join(front + intro + body)


def write_model_card(model_dir: Path) -> Path:
    """(Re)write ``model_dir/README.md`` from the folder's files; returns its path."""
    path = Path(model_dir) / CARD
    write_text_atomic(path, model_card(model_dir))
    return path


__all__ = ["model_card", "write_model_card"]
