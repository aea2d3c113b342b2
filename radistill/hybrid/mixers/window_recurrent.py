"""Window + recurrence in one head: the teacher head over its last ``window`` tokens, plus a gated DiscreteMamba2
head built from the same teacher head (LoLCATs / Based: an exact short window beside a linear recurrence).

Per head h, from the layer's normed hidden states u (P = head_dim):

    y_t = window_t(u) + gate_h * norm_h(recurrence_t(u)),   gate_h = gate_scale * (a parameter that starts at 0)

- ``window``: :class:`~radistill.hybrid.mixers.window.WindowAttention`, the teacher head's exact softmax over the
  last ``window`` real tokens (teacher Q/K/V, RoPE, qk-norm, GQA-shared ring buffer).
- ``recurrence``: :class:`~radistill.hybrid.mixers.discrete_mamba2.DiscreteMamba2` made by its own
  ``from_attention`` from the same head's Q/K/V rows (its init, half-lives from the teacher's attention distance).
- ``norm``: a :class:`~radistill.hybrid.normalizer.StaticNormalizer` on the recurrence alone, fitted at build time
  (``calibrate_part``) to map the fresh recurrence's per-channel output onto the replaced head's spread, centred:
  an un-normalised linear attention's scale grows with the context (on teacher-19m the fresh recurrence's spread
  is 7-22x the replaced head's in the first layers), so without this every gate step would add that much more. The
  window part already is the head's scale.
- ``gate``: one learned scalar per head, ``gate_scale`` times its parameter, which is initialised to exactly 0. So
  the built, untrained student *is* the training-free window student (bit for bit: y + 0 * finite = y), and
  distillation can only add the recurrence. At 0 the recurrence's parameters get no gradient; the gate's does (the
  product's other factor), and the first optimiser step that moves it opens the recurrence to training. Why the
  scale: Adam moves a parameter by ~lr per step whatever its gradient's size, so a plain gate at the recipes' 5e-4
  to 1e-3 reached only 0.014 in the 60 steps of a small CPU run, and could reach at most ~0.2 in a 13.8M-token
  testbed run (~420 steps): the recurrence could hardly enter. ``gate_scale`` (default 16) moves the gate that
  many times faster.

Why the recurrence sees *all* tokens, not only those older than the window (LoLCATs' split with a shared softmax
normaliser): the split needs the recurrence to lag ``window`` tokens behind, i.e. a token enters the state only
when it leaves the ring, so the cache would also have to hold the recurrence's inputs (x, b, conv inputs) of the
last ``window`` tokens, and chunked prefill / packed resets would have to replay them. Summing over all tokens keeps
the two parts independent mixers with their own exact states (cache = ring + SSM state, chunking and resets each
part's own, already tested code), and loses nothing a learned correction needs: the recurrence is trained on the
residual (teacher head minus window), which depends on the window's tokens too (the window renormalises over them),
so a recurrence blind to them could not learn it anyway. A shared normaliser also would make the start inexact
(the window's softmax would change by the recurrence's mass); here the start is the window head exactly.

State: the window's ``{"k", "v", "valid"}`` and the recurrence's ``{"conv", "ssm"}``, prefixed ``window.`` and
``recurrence.``; ``state_bytes`` is the sum of the two parts'. Shapes: B batch, T new tokens, H heads, P head_dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from radistill.hybrid.mixers.base import RecurrentMixer
from radistill.hybrid.mixers.discrete_mamba2 import DiscreteMamba2
from radistill.hybrid.mixers.window import WindowAttention
from radistill.hybrid.normalizer import StaticNormalizer
from radistill.utils.errors import RadistillError

WINDOW_SETTINGS = ("window", "sink", "bias", "qk_norm", "rms_norm_eps", "block_size")
RECURRENCE_SETTINGS = ("state_size", "conv_width", "chunk_size", "backend", "min_half_life", "max_half_life")


class WindowRecurrent(RecurrentMixer):
    """num_heads heads, each a sliding-window softmax head plus a gated DiscreteMamba2 head (module docstring).

    settings: the window's (window, sink, bias, qk_norm, rms_norm_eps, block_size) and the recurrence's (state_size,
    conv_width, chunk_size, backend, min_half_life, max_half_life), with their defaults (window 16, state_size 64);
    gate_scale (the gate is gate_scale times its parameter: module docstring).
    """

    needs_positions = True  # the window part applies the teacher's RoPE
    supports_reset = True  # both parts restart at a packed document's start
    shares_kv = True  # the window part keeps the teacher's GQA sharing (the recurrence has its own rows per head)
    has_half_lives = True  # the recurrence's decays (the build sets them from the teacher's attention distance)
    calibrate_normalizer = False  # the layer's normaliser stays the identity: the start is the window head exactly
    knows_fresh_state = True  # handed to the window part, whose ring and sinks a first prefill need not lay out

    def __init__(
        self, hidden_size: int, num_heads: int, head_dim: int, window: int = 16, sink: int = 0, bias: bool = False,
        qk_norm: bool = False, rms_norm_eps: float = 1e-6, block_size: int = 256, state_size: int = 64,
        conv_width: int = 4, chunk_size: int = 64, backend: str = "auto", min_half_life: float = 1.0,
        max_half_life: float = 16.0, gate_scale: float = 16.0, kv_groups: list[int] | None = None,
    ):
        window_settings = dict(window=window, sink=sink, bias=bias, qk_norm=qk_norm, rms_norm_eps=rms_norm_eps,
                               block_size=block_size)
        recurrence_settings = dict(state_size=state_size, conv_width=conv_width, chunk_size=chunk_size,
                                   backend=backend, min_half_life=min_half_life, max_half_life=max_half_life)
        super().__init__(hidden_size, num_heads, head_dim, **window_settings, **recurrence_settings,
                         gate_scale=gate_scale)
        if not gate_scale > 0:
            raise RadistillError(f"the window_recurrent mixer needs gate_scale > 0, got {gate_scale}")
        self.gate_scale = float(gate_scale)
        self.window = WindowAttention(hidden_size, num_heads, head_dim, kv_groups=kv_groups, **window_settings)
        self.recurrence = DiscreteMamba2(hidden_size, num_heads, head_dim, **recurrence_settings)
        self.kv_groups, self.num_kv_heads = self.window.kv_groups, self.window.num_kv_heads
        self.gate = nn.Parameter(torch.zeros(num_heads))  # the gates are gate_scale * gate (see gates())
        self.normalizer = StaticNormalizer(num_heads, head_dim)

    @classmethod
    def teacher_settings(cls, *, attention_bias: bool, qk_norm: bool, rms_norm_eps: float) -> dict:
        return WindowAttention.teacher_settings(attention_bias=attention_bias, qk_norm=qk_norm,
                                                rms_norm_eps=rms_norm_eps)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Both parts' own init, the gate at 0 and the recurrence's normaliser at the identity."""
        self.window.reset_parameters()
        self.recurrence.reset_parameters()
        self.gate.zero_()
        self.normalizer.reset_statistics()

    # the recurrence's scan backend (calibration and benchmarks switch it, as on a plain DiscreteMamba2)
    @property
    def backend(self) -> str:
        return self.recurrence.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.recurrence.backend = value

    def set_half_lives(self, half_lives: Tensor) -> None:
        self.recurrence.set_half_lives(half_lives)

    def half_lives(self) -> Tensor:
        return self.recurrence.half_lives()

    def normalized_heads(self) -> list[bool]:
        return [False] * self.num_heads

    def gates(self) -> Tensor:
        """[heads] each head's gate on its recurrence: gate_scale times the parameter ``gate``."""
        return self.gate * self.gate_scale

    # ---- the computation ------------------------------------------------------------------------------------------

    @staticmethod
    def _part(state: dict[str, Tensor] | None, name: str) -> dict[str, Tensor] | None:
        if state is None:
            return None
        prefix = name + "."
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, state: dict[str, Tensor] | None = None,
        position_embeddings: tuple[Tensor, Tensor] | None = None, reset: Tensor | None = None, fresh: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """hidden_states [B, T, hidden]; attention_mask [B, T] (or [B, past + T]), 1 = token; state from
        empty_state() or None; position_embeddings (cos, sin) [B or 1, T, P]; reset [B, T] bool or None; fresh: the
        state was just made (``knows_fresh_state``). -> (y [B, T, H, P] = window + gate * norm(recurrence), state)."""
        y, window_state = self.window(hidden_states, attention_mask, self._part(state, "window"),
                                      position_embeddings=position_embeddings, reset=reset, fresh=fresh)
        r, recurrence_state = self.recurrence(hidden_states, attention_mask, self._part(state, "recurrence"),
                                              reset=reset)
        if state is not None:  # the parts advance their tensors in place; kept in the flat dict either way
            state.update({f"window.{k}": v for k, v in window_state.items()})
            state.update({f"recurrence.{k}": v for k, v in recurrence_state.items()})
        return y + self.gates()[:, None].to(y.dtype) * self.normalizer(r).to(y.dtype), state

    def part_output(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **_: Any) -> Tensor:
        """[B, T, H, P]: the recurrence alone, before its normaliser and gate (``calibrate_part`` fits on it)."""
        return self.recurrence(hidden_states, attention_mask)[0]

    def mixing_matrix(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None,
        position_embeddings: tuple[Tensor, Tensor] | None = None, reset: Tensor | None = None,
    ) -> Tensor:
        """[B, H, T, T]: the window's banded softmax + gate * the recurrence's matrix. The two parts read different
        value streams (the window the teacher's V, the recurrence its conv'd x, which starts as the same V rows) and
        the recurrence's per-channel normaliser has no place in one matrix per head, so this is the forward's mixing
        only where the gate is 0 or the parts agree: what stage 1 can align, not an identity (docs/hybrid.md)."""
        window = self.window.mixing_matrix(hidden_states, attention_mask, position_embeddings=position_embeddings,
                                           reset=reset)
        recurrence = self.recurrence.mixing_matrix(hidden_states, attention_mask, reset=reset)
        return window + self.gates()[:, None, None].to(window.dtype) * recurrence.to(window.dtype)

    def empty_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, Tensor]:
        """{"window.k", "window.v": [B, G, W, P], "window.valid": [B, W], "window.next": [B] (with sinks also
        "window.sink_k", "window.sink_v", "window.seen"),
        "recurrence.conv": [B, H (P + 2N), conv_width - 1], "recurrence.ssm": [B, H, N, P] (float32 for 16-bit
        dtypes)}."""
        return {**{f"window.{k}": v for k, v in self.window.empty_state(batch_size, device, dtype).items()},
                **{f"recurrence.{k}": v for k, v in self.recurrence.empty_state(batch_size, device, dtype).items()}}

    @staticmethod
    def state_bytes(num_heads: int, head_dim: int, dtype_bytes: int, window: int = 16, sink: int = 0,
                    kv_heads: int | None = None, state_size: int = 64, conv_width: int = 4,
                    **_: object) -> dict[str, int]:
        """The window's ring and sinks (per KV head) plus the recurrence's SSM and conv states (per head)."""
        return {**WindowAttention.state_bytes(num_heads, head_dim, dtype_bytes, window=window, sink=sink,
                                              kv_heads=kv_heads),
                **DiscreteMamba2.state_bytes(num_heads, head_dim, dtype_bytes, state_size=state_size,
                                             conv_width=conv_width)}

    @classmethod
    def from_attention(
        cls, hidden_size: int, q_weight: Tensor, k_weight: Tensor, v_weight: Tensor,
        q_bias: Tensor | None = None, k_bias: Tensor | None = None, v_bias: Tensor | None = None,
        q_norm_weight: Tensor | None = None, k_norm_weight: Tensor | None = None,
        kv_groups: list[int] | None = None, **settings: Any,
    ) -> WindowRecurrent:
        """Both parts by their own ``from_attention`` from the same heads (base contract); gate 0, normaliser the
        identity until ``calibrate_part``."""
        unknown = set(settings) - set(WINDOW_SETTINGS) - set(RECURRENCE_SETTINGS) - {"gate_scale"}
        if unknown:
            raise RadistillError(f"the window_recurrent mixer does not take the settings {sorted(unknown)}: drop or "
                                 "rename them")
        settings.setdefault("bias", q_bias is not None)
        settings.setdefault("qk_norm", q_norm_weight is not None)
        H, P, _ = q_weight.shape
        mixer = cls(hidden_size, H, P, kv_groups=kv_groups, **settings).to(device=q_weight.device,
                                                                         dtype=q_weight.dtype)
        qkv = dict(q_weight=q_weight, k_weight=k_weight, v_weight=v_weight, q_bias=q_bias, k_bias=k_bias,
                   v_bias=v_bias)
        window = WindowAttention.from_attention(
            hidden_size, **qkv, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, kv_groups=kv_groups,
            **{k: v for k, v in settings.items() if k in WINDOW_SETTINGS})
        recurrence = DiscreteMamba2.from_attention(
            hidden_size, **qkv, **{k: v for k, v in settings.items() if k in RECURRENCE_SETTINGS})
        mixer.window.load_state_dict(window.state_dict())
        mixer.recurrence.load_state_dict(recurrence.state_dict())
        return mixer

    # ---- calibration of the recurrence's normaliser -----------------------------------------------------------------

    def calibrate_part(self, student, teacher) -> None:
        """Fit the recurrence's normaliser: ``student`` / ``teacher`` are
        :class:`~radistill.hybrid.normalizer.ChannelMoments` of :meth:`part_output` and of the replaced
        teacher heads' outputs on the same tokens. The map keeps the teacher's spread but not its mean (the window
        part already carries the head's mean; the recurrence adds a centred correction)."""
        self.normalizer.calibrate(student, teacher)
        with torch.no_grad():
            self.normalizer.teacher_mean.zero_()


__all__ = ["WindowRecurrent"]
