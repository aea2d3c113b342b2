"""teacher + scan -> student: ``radistill build`` and :func:`build_student`.

Steps: choose the kept heads (the scan's top K, or ``--heads``), derive the :class:`HybridConfig` from the teacher,
copy the teacher's weights (embeddings, norms, MLPs, ``o_proj``, the kept heads' q rows and their KV heads' k/v
rows), initialise every layer's recurrent heads with ``MixerClass.from_attention`` from those heads' own q/k/v
rows, calibrate the static normaliser on calibration text, and write the HF checkpoint plus ``selection.json``
into a temporary directory that is renamed onto ``--out`` at the end (a reader never sees half a student).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from radistill.hybrid.card import write_model_card
from radistill.hybrid.configuration import HybridConfig
from radistill.hybrid.memory import attention_windows, takes_setting, takes_window, with_build_defaults
from radistill.hybrid.modeling import HybridForCausalLM, mixer_class
from radistill.hybrid.calibrate import DEFAULT_TOKENS, calibrate, calibration_batches
from radistill.models.access import (
    HeadLayout,
    UnsupportedModelError,
    _resolve_dtype,
    decoder_layers,
    load_config,
    load_model,
    model_layout,
    weights_fingerprint,
)
from radistill.utils.console import console
from radistill.utils.errors import RadistillError
from radistill.utils.io import refuse_existing, write_json_atomic

Head = tuple[int, int]  # (layer, query head)

@dataclass
class Selection:
    """Which heads the student keeps, and why (written to ``selection.json``)."""

    heads: list[Head]  # in selection order (scan rank order, or as given)
    source: str  # "scan" or "heads"
    scan_path: str | None = None
    scan_model: str | None = None
    scan_metric: str | None = None
    rank: dict[Head, int] = field(default_factory=dict)  # 1-based scan rank
    score: dict[Head, float] = field(default_factory=dict)

    def kept_per_layer(self, num_layers: int) -> list[list[int]]:
        kept = [[] for _ in range(num_layers)]
        for layer, head in self.heads:
            kept[layer].append(head)
        return [sorted(heads) for heads in kept]


# ---- head selection -----------------------------------------------------------------------------------------------


def parse_heads(spec: str, layout: HeadLayout) -> list[Head]:
    """``"8.3,0.6"`` -> ``[(8, 3), (0, 6)]``, checked against ``layout``."""
    heads: list[Head] = []
    for piece in (p.strip() for p in spec.split(",")):
        if not piece:
            continue
        match = re.fullmatch(r"(\d+)\.(\d+)", piece)
        if match is None:
            raise RadistillError(
                f"--heads: '{piece}' is not a head; write heads as LAYER.HEAD separated by commas, e.g. 8.3,0.6"
            )
        head = (int(match.group(1)), int(match.group(2)))
        layout.check_head(*head)
        if head in heads:
            raise RadistillError(f"--heads names {piece} twice: list each head once")
        heads.append(head)
    return heads


def _same_layout(a: HeadLayout, b: HeadLayout) -> bool:
    keys = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _fingerprint_matches(model: nn.Module, fingerprint: str) -> bool:
    """Whether the scan's fingerprint is this model's, in any of the dtypes the scan may have loaded it in
    (``weights_fingerprint`` hashes the dtype and the values: a bf16 GPU scan of an fp32-loaded teacher differs)."""
    if weights_fingerprint(model) == fingerprint:
        return True

    class _Cast:  # weights_fingerprint only calls state_dict(); the cast copy lives in CPU memory, not the GPU's
        def __init__(self, dtype):
            self.dtype = dtype

        def state_dict(self):
            return {k: v.to("cpu", self.dtype) for k, v in model.state_dict().items()}

    current = next(model.parameters()).dtype
    return any(
        weights_fingerprint(_Cast(dtype)) == fingerprint
        for dtype in (torch.bfloat16, torch.float32, torch.float16)
        if dtype != current
    )


def select_heads(
    model: nn.Module,
    *,
    scan: str | os.PathLike | None = None,
    keep: int | None = None,
    heads: str | Sequence[Head] | None = None,
) -> Selection:
    """The heads to keep: the scan's top ``keep``, or ``heads`` (``"8.3,0.6"`` or pairs), checked against ``model``."""
    layout = model_layout(model)
    if heads is not None and keep is not None:
        raise RadistillError("give either --keep K (top K of the scan) or --heads L.H,... (by hand), not both")
    if heads is None and (scan is None or keep is None):
        raise RadistillError("say which heads to keep: --scan DIR/scan.json with --keep K, or --heads L.H,...")

    result = None
    if scan is not None:
        from radistill.scan.result import load_scan

        result = load_scan(scan)
        if not _same_layout(result.layout, layout):
            raise RadistillError(
                f"{scan} is a scan of another model ({result.model}: {result.layout.num_layers} layers x "
                f"{result.layout.num_heads} heads, {result.layout.num_kv_heads} KV heads, head_dim "
                f"{result.layout.head_dim}), but the teacher has {layout.num_layers} x {layout.num_heads}, "
                f"{layout.num_kv_heads} KV heads, head_dim {layout.head_dim}: scan this teacher first "
                "(`radistill scan TEACHER --out DIR`)"
            )
        if not _fingerprint_matches(model, result.fingerprint):
            raise RadistillError(
                f"{scan} was made on other weights ({result.model}, fingerprint {result.fingerprint}) than this "
                f"teacher's (fingerprint {weights_fingerprint(model)}); the ranking may not hold for it: scan this "
                "teacher (`radistill scan TEACHER --out DIR`) and build from that scan.json"
            )

    if heads is not None:
        chosen = parse_heads(heads, layout) if isinstance(heads, str) else [tuple(h) for h in heads]
        for layer, head in chosen:
            layout.check_head(layer, head)
        if len(set(chosen)) != len(chosen):
            raise RadistillError("the heads to keep name a head twice: list each head once")
    else:
        if keep < 0 or keep > layout.total_heads:
            raise RadistillError(
                f"--keep {keep} is out of range: the teacher has {layout.total_heads} heads "
                f"({layout.num_layers} layers x {layout.num_heads}); choose 0..{layout.total_heads}"
            )
        if keep > len(result.heads):
            raise RadistillError(
                f"--keep {keep} but {scan} ranks only {len(result.heads)} heads: keep fewer, or rescan all heads"
            )
        chosen = [(h.layer, h.head) for h in result.top(keep)]

    selection = Selection(heads=list(chosen), source="heads" if heads is not None else "scan")
    if result is not None:
        selection.scan_path, selection.scan_model, selection.scan_metric = str(scan), result.model, result.metric
        for rank, h in enumerate(result.heads, start=1):
            selection.rank[(h.layer, h.head)] = rank
            selection.score[(h.layer, h.head)] = h.score
    return selection


# ---- config and weights -------------------------------------------------------------------------------------------


def student_config(
    teacher: nn.Module, kept_heads: list[list[int]], mixer: str, mixer_settings: dict | None = None,
    head_mixers: list[dict] | None = None, kept_mixer: str | None = None, kept_mixer_settings: dict | None = None,
    private_kv: bool = False,
) -> HybridConfig:
    """The student's config: the teacher's architecture fields, read off its config and its modules.

    ``head_mixers`` / ``kept_mixer``: other head groups (:class:`HybridConfig`); every mixer's settings are
    completed with what it reads off the teacher (``teacher_settings``) and its defaults. ``private_kv``: see
    :class:`HybridConfig`."""
    t = teacher.config
    layout = model_layout(teacher)
    if len(set(getattr(t, "layer_types", None) or ["full_attention"])) > 1:
        raise UnsupportedModelError(
            f"this {layout.model_type} teacher mixes attention types across layers ({sorted(set(t.layer_types))}); "
            "radistill builds students of teachers whose layers all use the same (full or one sliding) attention"
        )
    attn = decoder_layers(teacher)[0].self_attn
    mlp = decoder_layers(teacher)[0].mlp
    architecture = {"attention_bias": attn.q_proj.bias is not None,
                    "qk_norm": getattr(attn, "q_norm", None) is not None, "rms_norm_eps": t.rms_norm_eps}

    def complete(name: str, given: dict | None) -> dict:
        defaults = mixer_class(name).teacher_settings(**architecture)
        return mixer_settings_with_defaults(name, t.hidden_size, layout.head_dim, {**defaults, **(given or {})})

    settings = complete(mixer, mixer_settings)
    head_mixers = None if not head_mixers else [
        {"mixer": g["mixer"], "settings": complete(g["mixer"], g.get("settings")), "heads": g["heads"]}
        for g in head_mixers
    ]
    kept_settings = None if kept_mixer is None else complete(kept_mixer, kept_mixer_settings)
    return HybridConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=layout.num_layers,
        num_attention_heads=layout.num_heads,
        num_key_value_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        hidden_act=getattr(t, "hidden_act", "silu"),
        max_position_embeddings=t.max_position_embeddings,
        initializer_range=getattr(t, "initializer_range", 0.02),
        rms_norm_eps=t.rms_norm_eps,
        pad_token_id=t.pad_token_id,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
        tie_word_embeddings=bool(getattr(t, "tie_word_embeddings", False)),
        rope_parameters=copy.deepcopy(t.rope_parameters),
        attention_bias=attn.q_proj.bias is not None,
        o_proj_bias=attn.o_proj.bias is not None,
        qk_norm=getattr(attn, "q_norm", None) is not None,
        mlp_bias=getattr(mlp.gate_proj, "bias", None) is not None,
        attention_dropout=float(getattr(t, "attention_dropout", 0.0) or 0.0),
        sliding_window=attention_windows(t)[0],  # one window for every layer (mixed layers are refused above)
        teacher_model_type=layout.model_type,
        kept_heads=kept_heads,
        mixer=mixer,
        mixer_settings=settings,
        head_mixers=head_mixers,
        kept_mixer=kept_mixer,
        kept_mixer_settings=kept_settings,
        private_kv=private_kv,
    )


def mixer_settings_with_defaults(mixer: str, hidden_size: int, head_dim: int, settings: dict) -> dict:
    """``settings`` checked by the mixer and completed with its defaults, so a saved student does not change when
    a mixer's defaults do (a one-head mixer is built to ask it)."""
    try:
        return dict(mixer_class(mixer)(hidden_size, 1, head_dim, **settings).settings)
    except TypeError as exc:
        raise RadistillError(f"mixer '{mixer}' does not take the settings {sorted(settings)} ({exc}): drop or "
                             "rename them") from exc


def _rows(weight: torch.Tensor, heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Rows of a q/k/v weight [heads*hd, ...] or bias [heads*hd] belonging to ``heads``, in that order."""
    return weight.view(-1, head_dim, *weight.shape[1:])[list(heads)].reshape(-1, *weight.shape[1:])


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def convert(teacher: nn.Module, config: HybridConfig) -> HybridForCausalLM:
    """A student with the teacher's weights and freshly initialised recurrent heads (normaliser = identity).

    The student has the teacher's device and dtype; recurrent heads come from ``from_attention`` on their own
    q/k/v rows (k/v: their GQA KV head's rows, repeated per query head).
    """
    param = next(teacher.parameters())
    hd, group = config.head_dim, config.num_attention_heads // config.num_key_value_heads
    # made in the teacher's dtype from the start: an fp32 copy first would cost 4 bytes/param extra (16 GB at 3B)
    with torch.device(param.device), _default_dtype(param.dtype):
        student = HybridForCausalLM(config)
    teacher_state = teacher.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        state[name] = teacher_state[name]

    for i, layer in enumerate(decoder_layers(teacher)):
        prefix, attn = f"model.layers.{i}.", layer.self_attn
        for sub in ("input_layernorm", "post_attention_layernorm", "mlp"):
            for key, value in getattr(layer, sub).state_dict().items():
                state[f"{prefix}{sub}.{key}"] = value
        for key, value in attn.o_proj.state_dict().items():
            state[f"{prefix}self_attn.o_proj.{key}"] = value

        # private_kv: kv_kept repeats a KV head once per kept query head, each copy its own rows
        kept, kv_kept, groups = config.attention_heads(i), config.kv_sources(i), config.mixer_groups(i)
        if kept:
            target = f"{prefix}self_attn.attention."
            for proj, heads in (("q_proj", kept), ("k_proj", kv_kept), ("v_proj", kv_kept)):
                for key, value in getattr(attn, proj).state_dict().items():
                    state[f"{target}{proj}.{key}"] = _rows(value, heads, hd)
            if config.qk_norm:
                state[f"{target}q_norm.weight"] = attn.q_norm.weight
                state[f"{target}k_norm.weight"] = attn.k_norm.weight
        for index, ((name, settings, heads), kv_groups) in enumerate(zip(groups, config.mixer_kv_groups(i))):
            kv_of = [h // group for h in heads]
            qkv = {
                "q": (attn.q_proj, heads),
                "k": (attn.k_proj, kv_of),
                "v": (attn.v_proj, kv_of),
            }
            weights = {f"{n}_weight": _rows(p.weight, h, hd).view(len(heads), hd, -1) for n, (p, h) in qkv.items()}
            biases = {
                f"{n}_bias": None if p.bias is None else _rows(p.bias, h, hd).view(len(heads), hd)
                for n, (p, h) in qkv.items()
            }
            cls = mixer_class(name)
            extra = {"kv_groups": kv_groups} if cls.shares_kv else {}
            if config.qk_norm:
                extra.update(q_norm_weight=attn.q_norm.weight, k_norm_weight=attn.k_norm.weight)
            mixer = cls.from_attention(config.hidden_size, **weights, **biases, **extra, **settings)
            target = f"{prefix}self_attn.recurrent." + (f"groups.{index}." if len(groups) > 1 else "")
            for key, value in mixer.state_dict().items():
                state[f"{target}{key}"] = value

    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    missing, unexpected = student.load_state_dict(state, strict=False)
    # The normaliser's statistics are the only student state not taken from the teacher (calibrate() sets them).
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in missing if ".normalizer." not in k and k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"teacher -> student weight mapping is incomplete: missing {missing}, "
                           f"unexpected {unexpected}")
    if config.tie_word_embeddings:
        student.tie_weights()
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval()


def checkpoint_dtype(config, fallback: torch.dtype) -> torch.dtype:
    """The dtype a teacher's checkpoint is stored in (its config's ``dtype``, ``torch_dtype`` before transformers 5),
    or ``fallback`` when the config does not say."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, value.removeprefix("torch."))
    return fallback


# ---- the whole build ----------------------------------------------------------------------------------------------


def selection_record(selection: Selection, config: HybridConfig, teacher_id: str, fingerprint: str, **extra) -> dict:
    """The content of ``selection.json``."""
    layout = config.layout
    kv_per_layer = [config.kv_sources(i) for i in range(config.num_hidden_layers)]
    return {
        "teacher": teacher_id,
        "teacher_fingerprint": fingerprint,
        "source": selection.source,
        "scan": selection.scan_path,
        "scan_model": selection.scan_model,
        "scan_metric": selection.scan_metric,
        "keep": len(selection.heads),
        "kept_heads": [
            {
                "name": f"{layer}.{head}",
                "layer": layer,
                "head": head,
                "kv_head": layout.kv_head(head),
                "rank": selection.rank.get((layer, head)),
                "score": selection.score.get((layer, head)),
            }
            for layer, head in selection.heads
        ],
        "layers": [
            {
                "layer": i,
                "kept_heads": config.kept_heads[i],
                "kv_heads_cached": kv_per_layer[i],
                "recurrent_heads": len(config.recurrent_heads(i)),
                "mixers": {name: heads for name, _, heads in config.mixer_groups(i)},
            }
            for i in range(config.num_hidden_layers)
        ],
        "kv_heads_cached": {
            "total": sum(len(kv) for kv in kv_per_layer),
            "teacher_total": layout.num_layers * layout.num_kv_heads,
        },
        "mixer": config.mixer,
        "mixer_settings": config.mixer_settings,
        "head_mixers": config.head_mixers,
        "kept_mixer": config.kept_mixer,
        "kept_mixer_settings": config.kept_mixer_settings,
        **extra,
    }


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` directory onto ``out``; an existing ``out`` is swapped out, then deleted."""
    if out.exists():
        if not overwrite:
            raise RadistillError(f"{out} already exists: choose another --out or pass --overwrite")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def build_student(
    teacher: str | os.PathLike | nn.Module,
    out: str | os.PathLike,
    *,
    scan: str | os.PathLike | None = None,
    keep: int | None = None,
    heads: str | Sequence[Head] | None = None,
    mixer: str = "discrete_mamba2",
    state_size: int | None = None,
    mixer_settings: dict | None = None,
    window: int | None = None,
    sink: int | None = None,
    window_heads: int = 0,
    kept_mixer: str | None = None,
    kept_mixer_settings: dict | None = None,
    tokenizer=None,
    calibration_data: str | os.PathLike | None = None,
    calibration_tokens: int = DEFAULT_TOKENS,
    half_lives: str = "attention",
    device: str | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    overwrite: bool = False,
    private_kv: bool = False,
) -> Path:
    """Build a student directory from a teacher (HF id, path, or loaded model + ``tokenizer``); returns ``out``.

    Heads: the scan's top ``keep`` (``scan`` + ``keep``) or ``heads`` (``"8.3,0.6"`` or ``[(8, 3), ...]``; a
    ``scan`` alongside only adds ranks and scores to ``selection.json``). ``state_size`` is a shortcut for
    ``mixer_settings["state_size"]``. ``calibration_data`` (what ``radistill distill --data`` takes; use the
    distillation data) supplies up to ``calibration_tokens`` tokens for :func:`~radistill.hybrid.calibrate.calibrate`
    (``half_lives``: ``"attention"`` or ``"fixed"``); without it a small built-in text is used, fit for tests only.
    ``dtype``: ``"auto"`` computes in bf16 on GPU and fp32 on CPU and saves in the dtype of the teacher's checkpoint
    (its config's ``dtype``); any other value (``bf16``, ``fp16``, ``fp32``) is both the compute and the saved dtype.
    The folder gets a model card (``README.md``, :func:`~radistill.hybrid.card.write_model_card`).

    Mixers: ``mixer`` serves every head not kept; ``window_heads`` M > 0 gives the scan's next M heads (ranks
    K+1..K+M) to sliding-window heads of ``window`` tokens (the ``window`` mixer) instead; ``window`` is also the
    setting of a ``mixer`` that has a window (``window``, ``window_recurrent``), and ``sink`` (attention sinks: every
    window head also sees its document's first ``sink`` tokens; default ``DEFAULT_SINK``, 4) theirs.
    ``kept_mixer``: a registered mixer in place of the kept heads' softmax attention.
    ``private_kv``: each kept query head gets its own copy of its GQA group's K/V projection (the paper's choice).
    """
    # before loading anything: a refusal after the work would waste it
    refuse_existing([out], overwrite, "choose another --out or pass --overwrite")
    if isinstance(teacher, nn.Module):
        if tokenizer is None:
            raise RadistillError("build_student got a loaded teacher but no tokenizer: pass tokenizer=...")
        model, teacher_id = teacher.eval(), getattr(teacher.config, "_name_or_path", "") or type(teacher).__name__
        stored = checkpoint_dtype(teacher.config, next(teacher.parameters()).dtype)
    else:
        # the config as stored: a loaded model's config says the dtype it was loaded in, not the checkpoint's
        stored = checkpoint_dtype(load_config(teacher), torch.float32)
        model, tokenizer = load_model(teacher, dtype=dtype, device=device)
        teacher_id = str(teacher)
    save_dtype = stored if dtype in (None, "auto") else _resolve_dtype(dtype, "cpu")
    settings = dict(mixer_settings or {})
    if state_size is not None:
        settings["state_size"] = state_size
    if window is not None and window < 1:
        raise RadistillError(f"--window {window}: a window holds at least 1 token")
    if window is not None and takes_window(mixer):
        settings["window"] = window
    elif window is not None and not window_heads:
        raise RadistillError("--window sets the window mixer's span: pass --mixer window or --window-heads M (or "
                             "--mixer window_recurrent)")
    if sink is not None and sink < 0:
        raise RadistillError(f"--sink {sink}: the number of first tokens every window head sees is >= 0")
    if sink is not None and takes_setting(mixer, "sink"):
        settings["sink"] = sink
    elif sink is not None and not window_heads:
        raise RadistillError(f"--sink is a setting of window heads; the {mixer} mixer has none: pass --mixer window "
                             "or window_recurrent, or --window-heads M")
    settings = with_build_defaults(mixer, settings)

    selection = select_heads(model, scan=scan, keep=keep, heads=heads)
    layout = model_layout(model)
    head_mixers = None
    if window_heads:
        windowed = next_heads(selection, window_heads)
        per_layer = [sorted(h for l, h in windowed if l == layer) for layer in range(layout.num_layers)]
        window_settings = {k: v for k, v in (("window", window), ("sink", sink)) if v is not None}
        head_mixers = [{"mixer": "window", "settings": with_build_defaults("window", window_settings),
                        "heads": per_layer}]
    config = student_config(model, selection.kept_per_layer(layout.num_layers), mixer, settings,
                            head_mixers=head_mixers, kept_mixer=kept_mixer, kept_mixer_settings=kept_mixer_settings,
                            private_kv=private_kv)
    student = convert(model, config)
    # a student whose mixers all start exact (e.g. only window heads) has nothing to calibrate
    needs_calibration = any(
        getattr(m, "has_half_lives", False) or any(getattr(m, "normalized_heads", lambda: [True])())
        for m in (layer.self_attn.recurrent for layer in student.model.layers) if m is not None
    )
    if calibration_data is None and needs_calibration:
        console.print("[yellow]no --calibration-data: calibrating on a small built-in text; pass the distillation "
                      "data for a better start[/]")
    batches = calibration_batches(tokenizer, calibration_data, calibration_tokens)
    calibration = calibrate(student, model, batches, half_lives=half_lives)

    record = selection_record(
        selection,
        config,
        teacher_id,
        weights_fingerprint(model),
        calibration={"source": str(calibration_data) if calibration_data else "builtin", **calibration.to_dict()},
        # a mixer can carry more weights than the heads it replaces (window_recurrent: the teacher's Q/K/V for its
        # window and the recurrence's projections): the card and the build say how many, against the teacher
        parameters={"student": sum(p.numel() for p in student.parameters()),
                    "teacher": sum(p.numel() for p in model.parameters())},
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        # calibrated in the compute dtype, saved in the teacher's: an fp32 CPU build is not twice a bf16 teacher
        student.to(save_dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # the student's recurrent heads take padding before a row's tokens only (a gap after them would enter the
        # state), so its tokenizer pads on the left: tokenizer(batch, padding=True) then feeds generate() directly.
        # Written into the saved file (transformers saves padding_side only from the tokenizer's init arguments),
        # which leaves the caller's tokenizer alone. transformers 5.25 also saves how the teacher's tokenizer was
        # loaded ("is_local", and "local_files_only": true when offline), which says nothing about the student's.
        settings = json.loads((tmp / "tokenizer_config.json").read_text())
        settings = {k: v for k, v in settings.items() if k not in ("is_local", "local_files_only")}
        write_json_atomic(tmp / "tokenizer_config.json", {**settings, "padding_side": "left"})
        write_json_atomic(tmp / "selection.json", record)
        write_model_card(tmp)
        _publish(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def next_heads(selection: Selection, count: int) -> list[Head]:
    """The ``count`` best-ranked heads of the selection's scan that it does not keep (window heads)."""
    if count < 0:
        raise RadistillError(f"--window-heads {count}: give a count >= 0")
    if not selection.rank:
        raise RadistillError("--window-heads takes the scan's next heads after the kept ones: pass --scan")
    rest = sorted((rank, head) for head, rank in selection.rank.items() if head not in set(selection.heads))
    if count > len(rest):
        raise RadistillError(f"--window-heads {count} but the scan ranks only {len(rest)} heads beyond the kept ones")
    return [head for _, head in rest[:count]]


def load_selection(student_dir: str | os.PathLike) -> dict:
    """``selection.json`` of a student directory."""
    path = Path(student_dir) / "selection.json"
    if not path.exists():
        raise RadistillError(f"{path} does not exist: is {student_dir} a student built by `radistill build`?")
    return json.loads(path.read_text())


__all__ = [
    "Selection",
    "build_student",
    "checkpoint_dtype",
    "convert",
    "load_selection",
    "next_heads",
    "parse_heads",
    "select_heads",
    "student_config",
]
