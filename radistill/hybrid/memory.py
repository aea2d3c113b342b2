"""Cache bytes per sequence -- KV cache, SSM state, conv state -- from a config alone, and measured from a real cache.

Accounting (docs/hybrid.md, /work/shared/notes/method.md):
- KV: per cached KV head and token, K and V of ``head_dim`` values: ``2 * head_dim * dtype_bytes``.
- recurrent heads: whatever the mixer's ``state_bytes`` says (DiscreteMamba2: SSM ``heads * state_size * head_dim``,
  conv ``heads * (head_dim + 2 * state_size) * (conv_width - 1)`` values), independent of the length. Every kind is
  counted at the one ``dtype`` asked for (the paper's convention: all bf16). :class:`HybridCache` itself keeps the
  SSM state at float32 for accuracy (docs/hybrid.md, "The cache"), so a measured bf16 cache holds twice the SSM
  bytes of the bf16 row; ``measure_cache_bytes`` reports what is really held. Every part of a mixer's state other
  than ``conv`` counts in the state column (labelled SSM): e.g. the ``window`` mixer's ring of the last
  ``window`` tokens' K/V per KV head (GQA-shared as in the teacher), its slot mask and its ring position.
- sliding-window attention (Mistral; Qwen2's ``sliding_attention`` layers): a layer keeps the K/V of its last
  ``window - 1`` positions (the next token brings the window's last), as transformers' sliding-window cache layers and
  :class:`HybridCache` do, so its KV bytes stop growing there.
- ``total_bytes`` = KV + SSM, as in the paper's table; the conv state is real memory too and has its own column
  (it is small: ~1/3 of the SSM state at state_size 64, but larger than it at state_size 8).

Rows:
- ``teacher``: every KV head of every layer.
- a built student (a ``radistill_hybrid`` config): exactly what :class:`HybridCache` allocates -- the kept KV heads
  of each layer (GQA: shared by the kept heads of one group) and the state of the recurrent heads.
- a hypothetical student of a teacher config (``keep``/``state_size``): which heads are kept is not known yet, so
  every kept head is counted with its own KV head (an upper bound that GQA sharing can only lower) and the
  ``total - keep`` recurrent heads carry state. The ``paper`` variant counts like the paper's table: the SSM state of
  *every* head (the authors' student runs a full-width SSM branch beside the kept heads), which reproduces its
  Llama-3.2-1B numbers (10 heads, d_state 8: 0.85 / 5.77 / 11.01 MB at 128 / 2048 / 4096, bf16).
- ``mil-P``: a layer-level hybrid baseline (Mamba-in-Llama style): round(P% of the layers) keep full attention
  (all KV heads), the others are DiscreteMamba2 layers of all heads at d_state 64 (Llama-3.2-1B, ``mil-50``:
  4.19 / 35.65 / 69.21 MB).
"""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from radistill.models.access import HeadLayout, layout_from_config
from radistill.utils.errors import RadistillError

DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}
BASELINE_STATE_SIZE = 64  # the paper's layer-level baseline: DiscreteMamba2 layers with d_state 64
DEFAULT_MIXER = "discrete_mamba2"


@dataclass(frozen=True)
class MemoryRow:
    """Cache bytes of one sequence of ``length`` tokens for one model."""

    model: str
    length: int
    kv_bytes: int
    ssm_bytes: int
    conv_bytes: int

    @property
    def total_bytes(self) -> int:
        """KV + SSM (the paper's total; conv has its own column)."""
        return self.kv_bytes + self.ssm_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def dtype_bytes(dtype: str | torch.dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if dtype not in DTYPE_BYTES:
        raise RadistillError(f"unknown --dtype '{dtype}': use bf16, fp16 or fp32")
    return DTYPE_BYTES[dtype]


def _window_span(mixer: str, settings: dict) -> int | None:
    """The window a mixer's heads see (``settings`` or its default), None for a mixer without one."""
    if "window" in settings:
        return settings["window"]
    from radistill.hybrid.modeling import mixer_class

    default = inspect.signature(mixer_class(mixer).state_bytes).parameters.get("window")
    return None if default is None else default.default


def _state_bytes(mixer: str, num_heads: int, head_dim: int, nbytes: int, settings: dict,
                 kv_heads: int | None = None) -> dict[str, int]:
    """The mixer's per-sequence state bytes for ``num_heads`` heads (0 heads: nothing): ``{"ssm": every part but
    the conv, "conv": ...}``. ``kv_heads``: distinct teacher KV heads among them, for mixers that share K/V."""
    if num_heads == 0:
        return {"ssm": 0, "conv": 0}
    from radistill.hybrid.modeling import mixer_class

    cls = mixer_class(mixer)
    extra = {"kv_heads": kv_heads} if cls.shares_kv and kv_heads is not None else {}
    sizes = cls.state_bytes(num_heads, head_dim, nbytes, **settings, **extra)
    return {"ssm": sum(v for k, v in sizes.items() if k != "conv"), "conv": sizes.get("conv", 0)}


def takes_setting(mixer: str, name: str) -> bool:
    """Whether the mixer called ``mixer`` has a setting ``name`` (e.g. ``window``, what ``--window`` sets)."""
    from radistill.hybrid.modeling import mixer_class

    return name in inspect.signature(mixer_class(mixer)).parameters


def with_build_defaults(mixer: str, settings: dict) -> dict:
    """``settings`` with what ``radistill build`` adds for a new student of ``mixer``: attention sinks
    (``DEFAULT_SINK``) for a mixer with window heads, unless ``settings`` say otherwise."""
    from radistill.hybrid.mixers.window import DEFAULT_SINK

    if takes_setting(mixer, "sink") and "sink" not in settings:
        return {**settings, "sink": DEFAULT_SINK}
    return dict(settings)


def takes_window(mixer: str) -> bool:
    """Whether the mixer called ``mixer`` has a ``window`` setting (what ``--window`` sets)."""
    return takes_setting(mixer, "window")


def attention_windows(config) -> list[int | None]:
    """Per layer, the attention window (None: full attention), read as the model and transformers' cache read it:
    from ``layer_types`` where the config has them (Qwen2: ``sliding_attention`` from ``max_window_layers`` on), else
    ``sliding_window`` for every layer (Mistral, a hybrid student). A multimodal config: its ``text_config``'s."""
    config = getattr(config, "text_config", None) or config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        # a config without a layer count fails in layout_from_config, with the message that explains it
        return [window] * getattr(config, "num_hidden_layers", 0)
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def one_window(windows: list[int | None]) -> int | None:
    """The window of layers that all share it; None (count every position: an upper bound) when they differ."""
    return windows[0] if windows and len(set(windows)) == 1 else None


def _kv_bytes(kv_heads: int, head_dim: int, nbytes: int, length: int, window: int | None = None) -> int:
    """K/V bytes of ``kv_heads`` KV heads after ``length`` tokens (a sliding window holds ``window - 1``)."""
    held = length if window is None else min(length, window - 1)
    return kv_heads * 2 * head_dim * nbytes * held


def teacher_rows(
    layout: HeadLayout, lengths: list[int], nbytes: int, name: str = "teacher", windows: list[int | None] | None = None
) -> list[MemoryRow]:
    """Every KV head of every layer; ``windows``: per layer, as :func:`attention_windows` (default: full)."""
    windows = windows or [None] * layout.num_layers
    return [
        MemoryRow(name, n, sum(_kv_bytes(layout.num_kv_heads, layout.head_dim, nbytes, n, w) for w in windows), 0, 0)
        for n in lengths
    ]


def student_rows(config, lengths: list[int], nbytes: int, name: str = "student") -> list[MemoryRow]:
    """Rows for a built student's :class:`~radistill.hybrid.HybridConfig` (what its HybridCache allocates)."""
    kv_heads = sum(len(config.kv_sources(i)) for i in range(config.num_hidden_layers))  # private_kv: per kept head
    window = config.sliding_window
    ssm = conv = 0
    for i in range(config.num_hidden_layers):
        for (mixer, settings, heads), kv_groups in zip(config.mixer_groups(i), config.mixer_kv_groups(i)):
            sizes = _state_bytes(mixer, len(heads), config.head_dim, nbytes, settings, kv_heads=len(set(kv_groups)))
            ssm, conv = ssm + sizes["ssm"], conv + sizes["conv"]
    return [MemoryRow(name, n, _kv_bytes(kv_heads, config.head_dim, nbytes, n, window), ssm, conv) for n in lengths]


def planned_student_rows(
    layout: HeadLayout,
    lengths: list[int],
    nbytes: int,
    keep: int,
    mixer: str = DEFAULT_MIXER,
    settings: dict | None = None,
    paper: bool = False,
    window: int | None = None,
) -> list[MemoryRow]:
    """Rows for a student of ``layout`` keeping ``keep`` heads (not yet chosen): see the module docstring.
    ``window``: the teacher's attention window (:func:`one_window`), or None."""
    if not 0 <= keep <= layout.total_heads:
        raise RadistillError(f"--keep {keep} is out of range: the model has {layout.total_heads} heads")
    settings = dict(settings or {})
    recurrent = layout.total_heads if paper else layout.total_heads - keep
    from radistill.hybrid.modeling import mixer_class

    if recurrent and mixer_class(mixer).shares_kv:
        # K/V shared per GQA group (window): the heads spread evenly over the layers, each layer holding one ring per
        # KV head its heads could read (an upper bound); per-head parts (window_recurrent's SSM) count every head
        sizes = {"ssm": 0, "conv": 0}
        for layer in range(layout.num_layers):
            heads = recurrent // layout.num_layers + (layer < recurrent % layout.num_layers)
            part = _state_bytes(mixer, heads, layout.head_dim, nbytes, settings,
                                kv_heads=min(heads, layout.num_kv_heads))
            sizes = {k: sizes[k] + part[k] for k in sizes}
    else:
        sizes = _state_bytes(mixer, recurrent, layout.head_dim, nbytes, settings)
    label = f"student K={keep}" + (f" N={settings['state_size']}" if "state_size" in settings else "")
    window_span = _window_span(mixer, settings)
    label += f" W={window_span}" if window_span is not None else ""
    label += " (paper accounting)" if paper else ""
    return [
        MemoryRow(label, n, _kv_bytes(keep, layout.head_dim, nbytes, n, window), sizes["ssm"], sizes["conv"])
        for n in lengths
    ]


def baseline_rows(
    layout: HeadLayout, lengths: list[int], nbytes: int, spec: str, window: int | None = None
) -> list[MemoryRow]:
    """A layer-level hybrid baseline ``mil-P`` (P% attention layers, with the teacher's ``window``, the rest
    DiscreteMamba2 d_state 64)."""
    match = re.fullmatch(r"mil-(\d+(?:\.\d+)?)", spec)
    if match is None or not 0 <= float(match.group(1)) <= 100:
        raise RadistillError(
            f"unknown --baseline '{spec}': use mil-P, a layer-level hybrid with P% attention layers (e.g. mil-50)"
        )
    attention_layers = round(layout.num_layers * float(match.group(1)) / 100)
    ssm_layers = layout.num_layers - attention_layers
    sizes = _state_bytes(DEFAULT_MIXER, layout.num_heads, layout.head_dim, nbytes,
                         {"state_size": BASELINE_STATE_SIZE})
    kv_heads = attention_layers * layout.num_kv_heads
    return [
        MemoryRow(spec, n, _kv_bytes(kv_heads, layout.head_dim, nbytes, n, window), ssm_layers * sizes["ssm"],
                  ssm_layers * sizes["conv"])
        for n in lengths
    ]


def load_any_config(model_or_config: str | os.PathLike):
    """An HF config from a model directory/id, a config.json path, or a shape name from presets (llama-3.2-1b)."""
    from radistill.models import presets
    from radistill.models.access import load_config

    path = Path(str(model_or_config))
    if not path.exists() and str(model_or_config) in presets.SHAPES:
        return presets.shape_config(str(model_or_config))
    if path.is_file() and path.name.endswith(".json"):
        path = path.parent
    import radistill.hybrid.auto  # noqa: F401  (registers the hybrid classes with the Auto factories)

    return load_config(path if path.exists() else model_or_config)


def memory_rows(
    model_or_config,
    lengths: list[int],
    dtype: str | torch.dtype = "bf16",
    keep: int | None = None,
    state_size: int | None = None,
    mixer: str = DEFAULT_MIXER,
    baselines: list[str] | None = None,
    window: int | None = None,
    sink: int | None = None,
) -> list[MemoryRow]:
    """All rows of ``radistill memory``: the teacher, the student (built, or planned with ``keep``), baselines.
    ``mixer``/``window``/``sink``: the planned student's other heads (``window``: sliding-window heads of that many
    tokens; ``sink``: and the first tokens they also keep, the build's default when None).

    ``model_or_config``: a path/id/shape name, or an HF config object.
    """
    config = model_or_config if hasattr(model_or_config, "to_dict") else load_any_config(model_or_config)
    if not lengths or any(n < 0 for n in lengths):
        raise RadistillError("--lengths must be a comma-separated list of non-negative token counts, e.g. 128,2048")
    nbytes = dtype_bytes(dtype)
    windows = attention_windows(config)
    rows: list[MemoryRow] = []
    if getattr(config, "model_type", None) == "radistill_hybrid":
        if keep is not None or state_size is not None:
            raise RadistillError(
                "--keep/--state-size describe a student yet to be built; this is a built student, whose config "
                "already says both: drop them (or pass its teacher's config)"
            )
        layout = config.layout
        rows += teacher_rows(layout, lengths, nbytes, name=f"teacher ({config.teacher_model_type})", windows=windows)
        state = config.mixer_settings.get("state_size")
        rows += student_rows(config, lengths, nbytes,
                             name=f"student K={config.num_kept_heads}" + (f" N={state}" if state else ""))
    else:
        layout = layout_from_config(config)
        rows += teacher_rows(layout, lengths, nbytes, windows=windows)
        if keep is not None:
            settings = {} if state_size is None else {"state_size": state_size}
            if window is not None:
                if not takes_window(mixer):
                    raise RadistillError("--window is the window mixer's span: pass --mixer window (or "
                                         "window_recurrent) with it")
                settings["window"] = window
            if sink is not None:
                if not takes_setting(mixer, "sink"):
                    raise RadistillError("--sink is a setting of window heads: pass --mixer window (or "
                                         "window_recurrent) with it")
                settings["sink"] = sink
            settings = with_build_defaults(mixer, settings)
            # the paper's accounting (an SSM state on every head) describes its SSM student only
            for paper in (False, True) if mixer == DEFAULT_MIXER else (False,):
                rows += planned_student_rows(layout, lengths, nbytes, keep, mixer, settings, paper, one_window(windows))
        elif state_size is not None:
            raise RadistillError("--state-size needs --keep K (the student's kept heads) for a teacher config")
    for spec in baselines or []:
        rows += baseline_rows(layout, lengths, nbytes, spec, one_window(windows))
    return rows


# ---- measured --------------------------------------------------------------------------------------------------------


def cache_nbytes(cache) -> dict[str, int]:
    """Bytes held by a cache object, by kind: HybridCache ``{"kv", "ssm", "conv", "total"}``; a transformers
    KV cache ``{"kv", "total"}``."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    kv = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                kv += t.numel() * t.element_size()
    return {"kv": kv, "total": kv}


@torch.no_grad()
def measure_cache_bytes(model, length: int, batch_size: int = 1) -> dict[str, int]:
    """Bytes per sequence of the cache a real prefill of ``length`` tokens leaves, by kind (``cache_nbytes``).

    On CUDA also ``"allocated"``: the growth of ``torch.cuda.memory_allocated`` across the prefill once
    everything but the cache is freed (includes allocator rounding), per sequence. A first, unmeasured prefill
    lets one-time allocations (cuBLAS workspaces, compiled kernels' buffers) happen outside the measurement.
    """
    from radistill.hybrid.modeling import output_cache

    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch_size, length), device=device)
    cuda = device.type == "cuda"
    if cuda:
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    output = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = output_cache(output)
    del output
    sizes = {k: v // batch_size for k, v in cache_nbytes(cache).items()}
    if cuda:
        torch.cuda.synchronize(device)
        sizes["allocated"] = (torch.cuda.memory_allocated(device) - before) // batch_size
    return sizes


__all__ = [
    "MemoryRow",
    "attention_windows",
    "baseline_rows",
    "cache_nbytes",
    "dtype_bytes",
    "load_any_config",
    "measure_cache_bytes",
    "memory_rows",
    "one_window",
    "planned_student_rows",
    "student_rows",
    "takes_setting",
    "takes_window",
    "with_build_defaults",
    "teacher_rows",
]
