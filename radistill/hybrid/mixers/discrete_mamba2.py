"""DiscreteMamba2 heads (Llamba / MOHAWK; public reference: goombalab/phi-mamba), built from the attention heads
they replace.

Per head, from the layer's normed hidden state u_t (P = head_dim, N = state_size):
    [x, b, c, z, A_log] = in_proj(u_t)                         x, z: [P];  b, c: [N];  A_log: scalar
    x, b, c <- causal depthwise conv over time (width 4, bias, no activation)
    a_t = exp(-softplus(A_log_t));  h_t = a_t h_{t-1} + b_t x_tᵀ;  y_t = (c_tᵀ h_t + D x_t) · silu(z_t)
No out_proj: the layer's o_proj columns of the replaced heads map y back to the hidden size.

Initialisation (from_attention), each choice so that the fresh mixer is the replaced head minus what a linear
recurrence cannot carry (softmax normalisation and RoPE):
- x <- the head's V rows, b <- its K rows, c <- its Q rows / sqrt(P) (biases too; GQA: the K/V rows of its KV head).
  Then c_t·b_s is the head's own attention logit q_t·k_s/sqrt(P) without RoPE, and with decay 1, gate 1 and D 0 the
  mixer is exactly the head's un-normalised causal linear attention (tests/test_mixers.py checks this identity).
  RoPE is dropped: the logit is the one at relative distance 0, which is what position-free keys can match.
- N < P: b and c are the best rank-N factorisation of the head's bilinear score form. With u' = [u, 1] (so biases
  are included) the logit is u'ᵀ M u'' with M = W_qᵀ W_k / sqrt(P), of rank <= P; its truncated SVD
  M ≈ U_N S_N V_Nᵀ (Eckart-Young: optimal in Frobenius norm, i.e. for isotropic inputs) gives
  c-rows = S_N^½ U_Nᵀ and b-rows = S_N^½ V_Nᵀ, so c_t·b_s is the closest rank-N score to q_t·k_s.
  N >= P: the rows are copied and the extra N - P rows are zero (exact).
- conv: identity (last tap 1, bias 0), so it starts as a no-op and learns local mixing.
- decay: A_log weights 0 and a per-head bias giving half-lives spread geometrically over the layer's heads between
  min_half_life and max_half_life (default 1 to 16 tokens): a data-independent, recency-biased start (most
  non-retrieval heads are local) that training makes selective. `radistill build` then sets each head's half-life
  from its teacher head's attention distance (`set_half_lives`, radistill/hybrid/calibrate.py); on teacher-19m
  8-1024 tokens gave a fresh student 50x the perplexity of 1-16 (docs/hybrid.md, "Initial quality").
- gate: z weights 0, bias Z_OPEN with silu(Z_OPEN) = 1, so the gate starts at exactly 1 and is trainable.
- D: 0, so the start is the head's linear attention and nothing else (Llamba's D = 1 suits a random init, where the
  skip is the only clean signal path; here it would add the raw value x_t at a scale unrelated to attention's).

Padding (attention_mask 0): the conv inputs, x, b, c and log_a are zeroed there, so a padded position neither
writes to nor decays the state and its output is 0; the conv state kept is the last conv_width - 1 real inputs.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radistill.hybrid.mixers.base import RecurrentMixer
from radistill.ops.ssd import BACKENDS, ssd, ssd_matrix
from radistill.ops.ssd.naive import wide
from radistill.utils.errors import RadistillError
from radistill.utils.threads import one_thread

Z_OPEN = 1.278464542761074  # the root of z·sigmoid(z) = 1: silu(Z_OPEN) = 1
ALIGN = 8  # output widths that are a multiple of this keep bf16 rows 16-byte aligned for cuBLAS (split_linear)


class DiscreteMamba2(RecurrentMixer):
    """num_heads DiscreteMamba2 heads of head_dim values and state_size keys each (module docstring)."""

    has_half_lives = True
    supports_reset = True  # packed documents: -inf log-decay and masked conv taps at each document start

    def __init__(
        self, hidden_size: int, num_heads: int, head_dim: int, state_size: int = 64, conv_width: int = 4,
        chunk_size: int = 64, backend: str = "auto", min_half_life: float = 1.0, max_half_life: float = 16.0,
    ):
        super().__init__(
            hidden_size, num_heads, head_dim, state_size=state_size, conv_width=conv_width, chunk_size=chunk_size,
            backend=backend, min_half_life=min_half_life, max_half_life=max_half_life,
        )
        if min(num_heads, head_dim, state_size, conv_width, chunk_size) < 1:
            raise RadistillError(
                f"DiscreteMamba2 needs num_heads, head_dim, state_size, conv_width and chunk_size >= 1, got "
                f"{num_heads}, {head_dim}, {state_size}, {conv_width}, {chunk_size}: fix the mixer settings"
            )
        if backend not in BACKENDS:
            raise RadistillError(
                f"unknown ssd backend {backend!r} in the mixer settings: use one of {', '.join(BACKENDS)}"
            )
        if not 0 < min_half_life <= max_half_life:
            raise RadistillError(
                f"half-lives must satisfy 0 < min_half_life <= max_half_life, got {min_half_life}, {max_half_life}"
            )
        H, P, N = num_heads, head_dim, state_size
        self.state_size, self.conv_width, self.chunk_size, self.backend = N, conv_width, chunk_size, backend
        self.sizes = {"x": H * P, "b": H * N, "c": H * N, "z": H * P, "a": H}  # in_proj's output, in this order
        self.conv_channels = H * (P + 2 * N)  # x, b and c go through the conv
        self.in_proj = nn.Linear(hidden_size, sum(self.sizes.values()))
        self.conv1d = nn.Conv1d(self.conv_channels, self.conv_channels, conv_width, groups=self.conv_channels)
        self.D = nn.Parameter(torch.zeros(H))
        self.reset_parameters()

    def _rows(self, name: str) -> slice:
        """The in_proj output rows of one part ("x", "b", "c", "z" or "a")."""
        names = list(self.sizes)
        start = sum(self.sizes[n] for n in names[: names.index(name)])
        return slice(start, start + self.sizes[name])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random x/b/c projections (nn.Linear's init) and the structural init of everything else (docstring)."""
        self.in_proj.reset_parameters()
        self.in_proj.bias.zero_()
        for part in ("z", "a"):
            self.in_proj.weight[self._rows(part)] = 0.0
        self.in_proj.bias[self._rows("z")] = Z_OPEN
        position = (torch.arange(self.num_heads, dtype=torch.float64) + 0.5) / self.num_heads
        lo, hi = self.settings["min_half_life"], self.settings["max_half_life"]
        self.set_half_lives(lo * (hi / lo) ** position)
        self.conv1d.weight.zero_()
        self.conv1d.weight[:, 0, -1] = 1.0
        self.conv1d.bias.zero_()
        self.D.zero_()

    @torch.no_grad()
    def set_half_lives(self, half_lives: Tensor) -> None:
        """Set each head's initial decay through its A_log bias: a^half_life = 1/2, i.e. softplus(bias) = ln2/half_life.
        half_lives [heads] in tokens (> 0)."""
        rate = math.log(2.0) / torch.as_tensor(half_lives, dtype=torch.float64)
        self.in_proj.bias[self._rows("a")] = torch.log(torch.expm1(rate)).to(self.in_proj.bias)

    @torch.no_grad()
    def half_lives(self) -> Tensor:
        """[heads] each head's half-life in tokens as its A_log bias sets it (the decay of an input whose A_log
        projection is 0, i.e. exactly the decay at initialisation)."""
        return math.log(2.0) / F.softplus(self.in_proj.bias[self._rows("a")].double())

    def _project(
        self, hidden_states: Tensor, attention_mask: Tensor | None, conv_state: Tensor | None,
        reset: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """-> x [B, T, H, P], log_a [B, T, H] float32/64, b/c [B, T, H, N], z [B, T, H, P], and the conv's input window
        [B, conv_width - 1 + T, channels] (past inputs, then these). ``reset`` [B, T] bool: a document starts there,
        so its log-decay is -inf (the state before it is multiplied by 0) and the conv reads no input before it.

        Everything stays token-major ([B, T, channels], as in_proj writes it): x, b, c and z are row views of one
        buffer, so the scan's inputs and the gate's elementwise work read contiguous rows. (A channel-major conv
        would hand them transposed views, which every consumer then copies or reads uncoalesced.)"""
        B, T, _ = hidden_states.shape
        H, P, N = self.num_heads, self.head_dim, self.state_size
        # The split product reads in_proj's weight directly, so only a plain Linear may take it: a wrapped in_proj
        # (a LoRA layer, a quantised linear) must run its own forward, or its adapter would be skipped silently.
        # Only a misaligned width needs it (split_linear): an aligned one (e.g. 32 heads) stays one product, one
        # launch and a few host operators fewer per layer.
        if T > 1 and type(self.in_proj) is nn.Linear and self.in_proj.out_features % ALIGN:
            xbcz, a_log = split_linear(hidden_states, self.in_proj, self.conv_channels + self.sizes["z"])
            xbc, z = xbcz.split([self.conv_channels, self.sizes["z"]], dim=-1)
        else:  # one token (a matrix-vector product: the row alignment does not matter), an aligned width, a wrapped one
            xbc, z, a_log = self.in_proj(hidden_states).split(
                [self.conv_channels, self.sizes["z"], self.sizes["a"]], dim=-1
            )
        pad = None if attention_mask is None else ~attention_mask[:, -T:].bool().unsqueeze(-1)  # [B, T, 1]
        if pad is not None:
            xbc = xbc.masked_fill(pad, 0.0)
        if conv_state is None:
            past = xbc.new_zeros(B, self.conv_width - 1, self.conv_channels)
        else:
            past = conv_state.transpose(1, 2).to(xbc.dtype)  # the state keeps nn.Conv1d's [B, channels, W - 1]
        window = torch.cat([past, xbc], dim=1)  # [B, W - 1 + T, channels]
        documents = None
        if reset is not None:  # [B, W - 1 + T]: which document each window row belongs to (past rows: the first)
            documents = torch.cat([reset.new_zeros(B, self.conv_width - 1), reset[:, -T:]], dim=-1).int().cumsum(-1)
        xbc = causal_conv(window, self.conv1d.weight[:, 0, :], self.conv1d.bias, documents)
        if documents is not None:  # the conv state kept for a next call holds only inputs of the last document
            window = window * (documents == documents[:, -1:]).unsqueeze(-1).to(window.dtype)
        log_a = -F.softplus(a_log.to(wide(a_log.dtype)))
        if reset is not None:
            log_a = log_a.masked_fill(reset[:, -T:].unsqueeze(-1), float("-inf"))
        if pad is not None:  # the conv bias would make padded x, b, c nonzero again
            xbc, log_a = xbc.masked_fill(pad, 0.0), log_a.masked_fill(pad, 0.0)
        x, b, c = xbc.split([H * P, H * N, H * N], dim=-1)
        return x.view(B, T, H, P), log_a, b.view(B, T, H, N), c.view(B, T, H, N), z.view(B, T, H, P), window

    def _last_real_inputs(self, window: Tensor, attention_mask: Tensor | None) -> Tensor:
        """The next conv state [B, channels, W - 1]: the last conv_width - 1 rows of window [B, W - 1 + T, channels]
        that are real tokens (the past rows count as real), so padding anywhere leaves it as if it were absent."""
        keep = self.conv_width - 1
        if attention_mask is None:
            return window[:, window.shape[1] - keep :].transpose(1, 2)
        B, length = window.shape[0], window.shape[1]
        real = torch.cat([attention_mask.new_ones(B, keep), attention_mask[:, keep - length :]], dim=-1).bool()
        latest = real * torch.arange(1, length + 1, device=window.device)  # later real rows rank higher
        index = latest.topk(keep, dim=-1).indices.sort(dim=-1).values
        return window.gather(1, index.unsqueeze(-1).expand(-1, -1, window.shape[-1])).transpose(1, 2)

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, state: dict[str, Tensor] | None = None,
        reset: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """hidden_states [B, T, hidden]; attention_mask [B, T] (or [B, past + T]: its last T columns are used), 1 =
        token, 0 = padding; state from empty_state() or None; reset [B, T] bool (packed documents start there) or
        None. -> (y [B, T, H, P], state advanced in place or None).

        With resets the scan runs in PyTorch (the -inf log-decays are exact there; fla's kernels take no resets here):
        training already does on Hopper, where fla's chunked backward is refused."""
        conv_state, ssm_state = (None, None) if state is None else (state["conv"], state["ssm"])
        x, log_a, b, c, z, window = self._project(hidden_states, attention_mask, conv_state, reset)
        backend = self.backend if reset is None else "torch"
        y, final = ssd(x, log_a, b, c, ssm_state, backend=backend, chunk_size=self.chunk_size)
        y = torch.addcmul(y, x, self.D[:, None].to(x.dtype)) * F.silu(z)  # (y + D x) silu(z), one pass fewer
        if state is not None:
            state["ssm"].copy_(final)
            state["conv"].copy_(self._last_real_inputs(window, attention_mask))
        return y, state

    def mixing_matrix(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                      reset: Tensor | None = None) -> Tensor:
        """[B, H, T, T]: M with y_t = sum_s M[t, s] x_s, x being the conv'd value stream, before the D skip and the
        gate (what MOHAWK stage 1 aligns with the teacher's attention). Padded rows and columns are 0, and so are
        entries across a reset (packed documents)."""
        _, log_a, b, c, _, _ = self._project(hidden_states, attention_mask, None, reset)
        return ssd_matrix(log_a, b, c)

    def empty_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, Tensor]:
        """{"conv": [B, channels = H (P + 2N), conv_width - 1] past conv inputs in ``dtype``, "ssm": [B, H, N, P] in
        float32 (float64 for float64)}, zeros. The SSM state is what the scan accumulates in float32; storing it in
        bf16 would re-round it after every decoded token, an error that compounds (docs/hybrid.md, "State
        precision"). The conv state holds past inputs, exact in ``dtype``."""
        return {
            "conv": torch.zeros(batch_size, self.conv_channels, self.conv_width - 1, device=device, dtype=dtype),
            "ssm": torch.zeros(batch_size, self.num_heads, self.state_size, self.head_dim, device=device,
                               dtype=wide(dtype)),
        }

    @staticmethod
    def state_bytes(
        num_heads: int, head_dim: int, dtype_bytes: int, state_size: int = 64, conv_width: int = 4, **_: object
    ) -> dict[str, int]:
        """Bytes of one sequence's state (as empty_state allocates it); other settings do not matter here."""
        return {
            "ssm": num_heads * state_size * head_dim * dtype_bytes,
            "conv": num_heads * (head_dim + 2 * state_size) * (conv_width - 1) * dtype_bytes,
        }

    @classmethod
    def from_attention(
        cls, hidden_size: int, q_weight: Tensor, k_weight: Tensor, v_weight: Tensor,
        q_bias: Tensor | None = None, k_bias: Tensor | None = None, v_bias: Tensor | None = None,
        q_norm_weight: Tensor | None = None, k_norm_weight: Tensor | None = None, **settings: object,
    ) -> DiscreteMamba2:
        """q/k/v_weight [heads, head_dim, hidden] of the replaced query heads (k/v repeated per query head under
        GQA), biases [heads, head_dim] or None; settings as __init__. Parameters take q_weight's device and dtype.
        q/k_norm_weight (Qwen3's qk-norm) are not used: a per-token RMSNorm of b and c is not a linear map, so the
        score factorisation above starts from the un-normed projections."""
        H, P, D = q_weight.shape
        for name, w in (("k_weight", k_weight), ("v_weight", v_weight)):
            if w.shape != q_weight.shape:
                raise RadistillError(f"{name} has shape {tuple(w.shape)}, q_weight {tuple(q_weight.shape)}: pass the "
                                     "K/V rows of each replaced query head's KV head, repeated per query head")
        if D != hidden_size:
            raise RadistillError(
                f"q_weight's input size {D} is not hidden_size {hidden_size}: pass [heads, head_dim, hidden]"
            )
        for name, bias in (("q_bias", q_bias), ("k_bias", k_bias), ("v_bias", v_bias)):
            if bias is not None and bias.shape != (H, P):
                raise RadistillError(f"{name} has shape {tuple(bias.shape)}, expected {(H, P)}")
        mixer = cls(hidden_size, H, P, **settings).to(device=q_weight.device, dtype=q_weight.dtype)
        mixer.reset_parameters()  # again, in the target dtype: Z_OPEN and the half-lives are then exact there

        def with_bias(w: Tensor, bias: Tensor | None) -> Tensor:  # [H, P, D] -> [H, P, D + 1]: the input gets a 1
            return torch.cat([w, (bias if bias is not None else w.new_zeros(H, P)).unsqueeze(-1)], dim=-1).double()

        c_rows, b_rows = score_factors(with_bias(q_weight, q_bias) / math.sqrt(P), with_bias(k_weight, k_bias),
                                       mixer.state_size)
        with torch.no_grad():
            w, bias = mixer.in_proj.weight, mixer.in_proj.bias
            for part, rows in (("x", with_bias(v_weight, v_bias)), ("b", b_rows), ("c", c_rows)):
                rows = rows.reshape(-1, D + 1).to(w)
                w[mixer._rows(part)], bias[mixer._rows(part)] = rows[:, :D], rows[:, D]
        return mixer


def split_linear(inputs: Tensor, linear: nn.Linear, rows: int) -> tuple[Tensor, Tensor]:
    """``linear(inputs)`` [..., out] as two products, output rows ``[:rows]`` and ``[rows:]`` (the same values, the
    same gradients; ``tests/test_mixers.py`` compares them with ``linear(inputs).split``).

    Why: in_proj has H (2P + 2N + 1) output rows, odd whenever the head count H is (e.g. 31 recurrent heads in a
    layer that keeps one of 32: 4,991 rows), and an odd output width leaves cuBLAS only unaligned bf16 kernels. In an
    8k-token prefill profile on the H200 (Llama-3.2-1B shape, five layers with 31 recurrent heads) five calls of an
    sm75 ``cutlass ... s1688gemm`` kernel took 1.5 ms each, while the other in_proj products averaged ~0.35 ms; the
    output rows' odd stride then also reaches everything reading them. The first ``rows`` (x, b, c, z: H (2P + 2N))
    keep the width a multiple of 8 for the usual head and state sizes; the H decay rows take a second, small product."""
    weight, bias = linear.weight, linear.bias
    head = F.linear(inputs, weight[:rows], None if bias is None else bias[:rows])
    tail = F.linear(inputs, weight[rows:], None if bias is None else bias[rows:])
    return head, tail


def causal_conv(window: Tensor, weight: Tensor, bias: Tensor | None, documents: Tensor | None = None) -> Tensor:
    """The depthwise causal conv, token-major: window [B, W - 1 + T, C] (W - 1 past inputs first), weight [C, W],
    bias [C] or None -> [B, T, C], out[t] = bias + sum_k weight[:, k] window[t + k]. ``documents`` [B, W - 1 + T]
    int (packed documents: each row's document number) or None: a tap reads its input only when that input is of
    the output's document, so no document sees the end of the one before it.

    Written as W shifted multiply-adds accumulated in place into one output, free of layout changes (``F.conv1d``
    wants [B, C, T], i.e. two transposing copies of a prefill-sized tensor) and of F.conv1d's seconds-long first
    call on CPU; one token (a decode step, whose host work is the cost) takes one product and a sum over the taps
    instead (4 operators, not 10). ``tests/test_mixers.py`` checks both against F.conv1d."""
    width, length = weight.shape[1], window.shape[1] - weight.shape[1] + 1
    if length == 1 and documents is None:  # one token (a decode step): one product and one sum over the W taps
        out = (window * weight.t()).sum(1, keepdim=True)
        return out if bias is None else out + bias

    def tap(k: int) -> Tensor:
        if documents is None:
            return window[:, k : k + length]
        same = documents[:, k : k + length] == documents[:, width - 1 :]  # [B, T]
        return window[:, k : k + length] * same.unsqueeze(-1).to(window.dtype)

    taps = weight.unbind(1)  # W column views in one operator (indexing each column is one per tap)
    # The bias is added on its own, not fused into the first product (addcmul(bias, ...)): with the fused form one
    # process of batch 2 and two of batch 1 trained apart beyond float tolerance (tests/test_distill_distributed.py;
    # most likely a rounding that depends on the batch's shape); one kernel fewer is not worth that.
    out = tap(0) * taps[0]
    if bias is not None:
        out.add_(bias)
    for k in range(1, width):
        out.addcmul_(tap(k), taps[k])
    return out


def score_factors(q: Tensor, k: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-`rank` factorisation of the bilinear forms qᵀk, per head: q/k [H, P, D] -> c, b [H, rank, D]
    with cᵀb ≈ qᵀk optimally (truncated SVD, split as S^½ on each side); rank >= P: q and k zero-padded (exact).

    qᵀk = Qq (Rq Rkᵀ) Qkᵀ from the thin QRs qᵀ = Qq Rq, kᵀ = Qk Rk, so only the P x P core needs an SVD.
    """
    P = q.shape[1]
    if rank >= P:
        return F.pad(q, (0, 0, 0, rank - P)), F.pad(k, (0, 0, 0, rank - P))
    with one_thread() if q.device.type == "cpu" else contextlib.nullcontext():  # small LAPACK calls: one_thread's why
        q_basis, q_tri = torch.linalg.qr(q.transpose(1, 2))
        k_basis, k_tri = torch.linalg.qr(k.transpose(1, 2))
        u, s, vh = torch.linalg.svd(q_tri @ k_tri.transpose(1, 2))
    root = s[:, :rank].sqrt().unsqueeze(-1)
    c = root * (q_basis @ u[:, :, :rank]).transpose(1, 2)
    b = root * (k_basis @ vh[:, :rank].transpose(1, 2)).transpose(1, 2)
    return c, b
