"""Two user mixers written against radistill's mixer contract (radistill/hybrid/mixers/base.py, docs/hybrid.md).

- ``SlotMemory``: a small addressable slot memory, meant for the *kept* heads (``--kept-mixer slot_memory``):
  each head holds ``slots`` key/value slots; token t writes (k_t, v_t) into the slots its key addresses
  (softmax over learned slot addresses), then reads them with its query (softmax over the slots' keys).
- ``GatedMatrixMemory``: a gated matrix memory (linear attention with a per-token forget gate), meant for the
  *recurrent* heads (``--mixer gated_matrix``): S_t = g_t S_{t-1} + phi(k_t) v_t^T, y_t = phi(q_t)^T S_t /
  (phi(q_t)^T z_t + 1), z_t = g_t z_{t-1} + phi(k_t), phi = elu + 1, g_t = sigmoid(w_g . u_t + b_g).

Both start from the replaced teacher heads' Q/K/V rows (RoPE dropped) and are plain PyTorch loops over tokens:
a reference, not a fast path. Use them with::

    import radistill
    from slot_bank import GatedMatrixMemory, SlotMemory
    radistill.register_mixer("slot_memory", SlotMemory)
    radistill.register_mixer("gated_matrix", GatedMatrixMemory)

or from a package, by entry points: ``[project.entry-points."radistill.mixers"] gated_matrix = "pkg.mod:Class"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from radistill.hybrid.mixers import RecurrentMixer


class _FromAttention(RecurrentMixer):
    """Shared: q/k/v projections [heads * head_dim, hidden] copied from the teacher rows (k/v repeated per head)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, **settings):
        super().__init__(hidden_size, num_heads, head_dim, **settings)
        self.qkv = nn.Linear(hidden_size, 3 * num_heads * head_dim, bias=True)

    @classmethod
    def from_attention(cls, hidden_size, q_weight, k_weight, v_weight, q_bias=None, k_bias=None, v_bias=None,
                       q_norm_weight=None, k_norm_weight=None, **settings):
        H, P, _ = q_weight.shape
        mixer = cls(hidden_size, H, P, **settings).to(device=q_weight.device, dtype=q_weight.dtype)
        zeros = q_weight.new_zeros(H, P)
        with torch.no_grad():
            mixer.qkv.weight.copy_(torch.cat([q_weight, k_weight, v_weight]).reshape(3 * H * P, hidden_size))
            biases = [b if b is not None else zeros for b in (q_bias, k_bias, v_bias)]
            mixer.qkv.bias.copy_(torch.cat(biases).reshape(-1))
        return mixer

    def _project(self, u: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> q, k, v [B, T, H, P] and real [B, T] (1 = token)."""
        B, T, _ = u.shape
        q, k, v = self.qkv(u).view(B, T, 3, self.num_heads, self.head_dim).unbind(2)
        real = u.new_ones(B, T) if mask is None else mask[:, -T:].to(u.dtype)
        return q, k, v, real


class SlotMemory(_FromAttention):
    """``slots`` addressable key/value slots per head (module docstring)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, slots: int = 16):
        super().__init__(hidden_size, num_heads, head_dim, slots=slots)
        self.slots = slots
        self.addresses = nn.Parameter(torch.randn(num_heads, slots, head_dim) / head_dim**0.5)

    def forward(self, hidden_states, attention_mask=None, state=None):
        q, k, v, real = self._project(hidden_states, attention_mask)
        B, T, H, P = q.shape
        mem = state if state is not None else self.empty_state(B, q.device, q.dtype)
        keys, values, outputs = mem["keys"], mem["values"], []
        for t in range(T):  # write token t where its key points, then read with its query
            write = torch.softmax(torch.einsum("bhp,hsp->bhs", k[:, t], self.addresses) / P**0.5, -1)
            write = (write * real[:, t, None, None]).unsqueeze(-1)  # [B, H, S, 1]; padding writes nothing
            keys = (1 - write) * keys + write * k[:, t, :, None]
            values = (1 - write) * values + write * v[:, t, :, None]
            read = torch.softmax(torch.einsum("bhp,bhsp->bhs", q[:, t], keys) / P**0.5, -1)
            outputs.append(torch.einsum("bhs,bhsp->bhp", read, values))
        if state is not None:
            state["keys"].copy_(keys)
            state["values"].copy_(values)
        return torch.stack(outputs, 1), state

    def empty_state(self, batch_size, device, dtype):
        shape = (batch_size, self.num_heads, self.slots, self.head_dim)
        return {"keys": torch.zeros(shape, device=device, dtype=dtype),
                "values": torch.zeros(shape, device=device, dtype=dtype)}

    @staticmethod
    def state_bytes(num_heads, head_dim, dtype_bytes, slots=16, **_):
        return {"slots": 2 * num_heads * slots * head_dim * dtype_bytes}


class GatedMatrixMemory(_FromAttention):
    """Gated linear attention with a normaliser (module docstring); ``gate_bias`` sets the initial forget gate."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, gate_bias: float = 3.0):
        super().__init__(hidden_size, num_heads, head_dim, gate_bias=gate_bias)
        self.gate = nn.Linear(hidden_size, num_heads)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, gate_bias)  # sigmoid(3) = 0.95: a half-life of ~14 tokens

    def _streams(self, hidden_states, attention_mask):
        q, k, v, real = self._project(hidden_states, attention_mask)
        log_g = F.logsigmoid(self.gate(hidden_states).float()) * real[..., None]  # padding: no decay ...
        k = (F.elu(k) + 1) * real[..., None, None]  # ... and no write
        return F.elu(q) + 1, k, v, log_g  # [B, T, H, P] x3, [B, T, H]

    def forward(self, hidden_states, attention_mask=None, state=None):
        q, k, v, log_g = self._streams(hidden_states, attention_mask)
        B, T, H, P = q.shape
        mem = state if state is not None else self.empty_state(B, q.device, q.dtype)
        S, z, outputs = mem["matrix"], mem["norm"], []
        for t in range(T):
            g = log_g[:, t].exp().to(q.dtype)[..., None]  # [B, H, 1]
            S = g[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, P, P]
            z = g * z + k[:, t]
            y = torch.einsum("bhp,bhpq->bhq", q[:, t], S) / ((q[:, t] * z).sum(-1, keepdim=True) + 1)
            outputs.append(y)
        if state is not None:
            state["matrix"].copy_(S)
            state["norm"].copy_(z)
        return torch.stack(outputs, 1), state

    def mixing_matrix(self, hidden_states, attention_mask=None):
        """[B, H, T, T] with y_t = sum_s M[t, s] v_s (from an empty state)."""
        q, k, _, log_g = self._streams(hidden_states, attention_mask)
        cum = log_g.cumsum(1).transpose(1, 2)  # [B, H, T]
        decay = (cum[..., :, None] - cum[..., None, :]).tril().exp().tril()  # prod of g_{s+1..t}
        scores = torch.einsum("bthp,bshp->bhts", q, k) * decay.to(q.dtype)
        return scores / (scores.sum(-1, keepdim=True) + 1)

    def empty_state(self, batch_size, device, dtype):
        return {"matrix": torch.zeros(batch_size, self.num_heads, self.head_dim, self.head_dim, device=device,
                                      dtype=dtype),
                "norm": torch.zeros(batch_size, self.num_heads, self.head_dim, device=device, dtype=dtype)}

    @staticmethod
    def state_bytes(num_heads, head_dim, dtype_bytes, **_):
        return {"matrix": num_heads * head_dim * (head_dim + 1) * dtype_bytes}
