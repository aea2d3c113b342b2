"""Bridges: learned cross-attention from a frozen model into an outside memory of M vectors [B, M, d_aug].

:class:`KeptHeadBridge` attaches to the *kept* (retrieval) heads only: each bridged head's own query (after
qk-norm and RoPE, as its attention computes it) also attends over the memory through learned K_b / V_b
[d_aug -> head_dim], and the head's output becomes ``attn_out + tanh(gate) * bridge_out`` with a per-head gate
initialised at 0, so an untrained bridge changes nothing. Cost: 2 x d_aug x head_dim + 1 parameters per head.

:class:`FullWidthBridge` is the composition-paper baseline (Bansal et al. 2024): a cross-attention block over the
whole hidden state after every N-th decoder layer (q [D -> H*hd], k/v [d_aug -> H*hd], o [H*hd -> D], one gate).

Both attach with PyTorch hooks, so neither the student's modeling code nor a plain teacher's changes:

* a forward pre-hook on ``layer.self_attn`` records its input (normed hidden states [B, T, D] and RoPE cos/sin);
* a forward pre-hook on ``layer.self_attn.o_proj`` adds the gated bridge output to the bridged heads' slices of
  o_proj's input [B, T, H*hd], which is in teacher head order for the hybrid (``HybridMixer`` reorders kept and
  recurrent heads before o_proj) and for a plain Llama-like teacher alike.

The query is recomputed from the bridged rows of q_proj (k x hd x D multiply-adds per token, small next to the
layer) rather than read out of the attention module: that needs no change to ``KeptHeadAttention``.

Memory alignment: ``aligned=True`` when memory position j belongs to input position j (a second model reading
the same tokens): query t sees memory positions <= t (the released composition code is not causal; we are).
With a cache the current T tokens are the last T of the M memory positions: row t sees j <= M - T + t.
``aligned=False``: an outside document; every position sees all of it (minus ``memory_mask`` padding).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from radistill.utils.errors import RadistillError
from radistill.utils.io import atomic_path, write_json_atomic
from radistill.utils.typed import check_fields

WEIGHTS_NAME = "bridge.safetensors"
CONFIG_NAME = "bridge_config.json"
KINDS = ("kept-head", "full-width")


@dataclass
class BridgeConfig:
    """What a saved bridge is: enough to rebuild it on the same model (``bridge_config.json``)."""

    kind: str  # "kept-head" | "full-width"
    d_aug: int  # width of the memory vectors
    heads: list[list[int]] = field(default_factory=list)  # kept-head: per layer, the bridged query heads
    every: int = 0  # full-width: a cross-attention block after layers every-1, 2*every-1, ...
    aligned: bool = False  # memory position j belongs to input position j (causal) or not (an outside document)
    source: str = ""  # what made the memory (``MODEL@LAYER``, ``chunk-ae:K``); informational
    model_layout: dict = field(default_factory=dict)  # num_layers, num_heads, head_dim, hidden_size of the model
    version: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = CONFIG_NAME) -> "BridgeConfig":
        try:
            return cls(**check_fields(cls, values, where))
        except TypeError as exc:
            raise RadistillError(f"{where}: {exc}") from None


def memory_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, aligned: bool,
                     memory_mask: torch.Tensor | None, reference: bool = False) -> torch.Tensor:
    """q [B, n, T, hd], k/v [B, n, M, hd], memory_mask [B, M] bool (True = real) -> [B, n, T, hd].

    Fast path: ``F.scaled_dot_product_attention`` with a boolean mask; ``reference=True``: explicit softmax
    (tests compare the two)."""
    T, M = q.shape[-2], k.shape[-2]
    allowed = None
    if aligned:
        if M < T:
            raise RadistillError(f"an aligned memory needs a vector per input position: {M} memory positions for "
                                 f"{T} tokens")
        t = torch.arange(T, device=q.device)[:, None] + (M - T)
        allowed = (torch.arange(M, device=q.device)[None, :] <= t)[None, None]  # [1, 1, T, M]
    if memory_mask is not None:
        real = memory_mask.bool()[:, None, None, :]  # [B, 1, 1, M]
        allowed = real if allowed is None else allowed & real
    if reference:
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return (scores.softmax(-1) @ v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def _check_memory(memory: torch.Tensor, memory_mask: torch.Tensor | None, d_aug: int) -> None:
    if memory.ndim != 3 or memory.shape[-1] != d_aug:
        raise RadistillError(f"the bridge's memory must be [batch, positions, {d_aug}], got {list(memory.shape)}")
    if memory_mask is not None:
        if memory_mask.shape != memory.shape[:2]:
            raise RadistillError(f"memory_mask must be [batch, positions] = {list(memory.shape[:2])}, got "
                                 f"{list(memory_mask.shape)}")
        if not bool(memory_mask.bool().any(-1).all()):
            raise RadistillError("every row of the memory needs at least one real (unmasked) position")


def _layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a student or a Llama-like teacher (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(l.self_attn, "o_proj") for l in layers):
        raise RadistillError(f"{type(model).__name__} has no `model.layers[i].self_attn.o_proj`: a bridge attaches "
                             "to a radistill student or a Llama-like decoder")
    return layers


def _layout(model: nn.Module) -> dict:
    c = model.config
    return {"num_layers": len(_layers(model)), "num_heads": c.num_attention_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "hidden_size": c.hidden_size}


class Bridge(nn.Module):
    """Shared plumbing: the memory in use, hooks, save. Subclasses add parameters and the hooks they need."""

    def __init__(self, config: BridgeConfig):
        super().__init__()
        self.config = config
        self._memory: torch.Tensor | None = None
        self._memory_mask: torch.Tensor | None = None
        self._handles: list = []
        self.reference = False  # explicit-softmax attention instead of SDPA (tests)

    @contextmanager
    def use(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None):
        """Within the block, forwards of the attached model read ``memory`` [B, M, d_aug] (``memory_mask`` [B, M],
        True = real; a batch of 1 serves every row of the model's batch). Outside it the bridge adds nothing."""
        _check_memory(memory, memory_mask, self.config.d_aug)
        self._memory, self._memory_mask = memory, memory_mask
        try:
            yield self
        finally:
            self._memory = self._memory_mask = None

    def detach(self) -> None:
        """Remove the hooks: the model is as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _attend(self, q, k, v):
        return memory_attention(q, k, v, aligned=self.config.aligned, memory_mask=self._memory_mask,
                                reference=self.reference)

    def save(self, directory: str | Path) -> None:
        """``bridge.safetensors`` + ``bridge_config.json`` in ``directory``, each written atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        write_json_atomic(directory / CONFIG_NAME, self.config.to_dict())

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _query_rows(attn: nn.Module, heads: list[int], head_dim: int) -> tuple[nn.Linear, torch.Tensor]:
    """The q_proj holding ``heads`` (teacher query head ids) and the row indices [k*hd] of those heads in it:
    the hybrid's ``attention.q_proj`` holds the kept heads only, a teacher's ``q_proj`` every head."""
    kept = getattr(attn, "attention", None)
    if getattr(attn, "kept_heads", None) is not None:  # a HybridMixer
        if kept is None or any(h not in kept.head_ids for h in heads):
            raise RadistillError(f"layer {attn.layer_idx}: heads {heads} are not all kept (kept: "
                                 f"{list(attn.kept_heads)}); a kept-head bridge attaches to attention heads only")
        proj, order = kept.q_proj, [kept.head_ids.index(h) for h in heads]
    else:
        proj, order = attn.q_proj, list(heads)
    rows = torch.cat([torch.arange(i * head_dim, (i + 1) * head_dim) for i in order])
    return proj, rows


def _q_norm(attn: nn.Module):
    kept = getattr(attn, "attention", None)
    return getattr(kept if kept is not None else attn, "q_norm", None)


class KeptHeadBridge(Bridge):
    """Cross-attention from the bridged (kept) heads' own queries into the memory.

    Parameters per bridged layer l with heads h_1..h_k: ``k_b[l]``, ``v_b[l]``: Linear(d_aug, k*hd, no bias),
    ``gate[l]``: [k] zeros."""

    def __init__(self, config: BridgeConfig, model: nn.Module | None = None):
        super().__init__(config)
        hd = config.model_layout["head_dim"]
        self.k_b, self.v_b = nn.ModuleDict(), nn.ModuleDict()
        self.gate = nn.ParameterDict()
        for layer, heads in enumerate(config.heads):
            if heads:
                self.k_b[str(layer)] = nn.Linear(config.d_aug, len(heads) * hd, bias=False)
                self.v_b[str(layer)] = nn.Linear(config.d_aug, len(heads) * hd, bias=False)
                self.gate[str(layer)] = nn.Parameter(torch.zeros(len(heads)))
        if model is not None:
            self.attach(model)

    def attach(self, model: nn.Module) -> "KeptHeadBridge":
        from radistill.models.access import hidden_input

        self.detach()
        hd = self.config.model_layout["head_dim"]
        for layer, heads in enumerate(self.config.heads):
            if not heads:
                continue
            attn = _layers(model)[layer].self_attn
            proj, rows = _query_rows(attn, heads, hd)
            seen = {}

            def record(module, args, kwargs, seen=seen):
                seen["hidden"] = hidden_input(args, kwargs)
                rope = kwargs.get("position_embeddings")
                seen["rope"] = args[1] if rope is None and len(args) > 1 else rope

            def add(module, args, layer=layer, heads=heads, proj=proj, rows=rows, attn=attn, seen=seen):
                if self._memory is None:
                    return None
                x = args[0]  # [B, T, H*hd], teacher head order
                out = self._bridge_heads(layer, attn, proj, rows, seen["hidden"], seen["rope"])  # [B, T, k, hd]
                B, T = x.shape[:2]
                x = x.view(B, T, -1, hd)
                idx = torch.tensor(heads, device=x.device)
                gated = torch.tanh(self.gate[str(layer)]).to(x.dtype)[None, None, :, None] * out.to(x.dtype)
                x = x.index_add(2, idx, gated)
                return (x.reshape(B, T, -1), *args[1:])

            self._handles.append(attn.register_forward_pre_hook(record, with_kwargs=True))
            self._handles.append(attn.o_proj.register_forward_pre_hook(add))
        return self

    def _bridge_heads(self, layer, attn, proj, rows, hidden, rope) -> torch.Tensor:
        """hidden [B, T, D] -> bridge output of this layer's bridged heads [B, T, k, hd]."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        hd = self.config.model_layout["head_dim"]
        rows = rows.to(hidden.device)
        bias = None if proj.bias is None else proj.bias[rows]
        B, T, _ = hidden.shape
        q = F.linear(hidden, proj.weight[rows], bias).view(B, T, -1, hd)  # [B, T, k, hd]
        norm = _q_norm(attn)
        if norm is not None:
            q = norm(q)
        q = q.transpose(1, 2)  # [B, k, T, hd]
        if rope is not None:
            cos, sin = rope
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        memory = self._memory.to(hidden.dtype).expand(B, -1, -1)  # a batch-1 memory serves every row
        M = memory.shape[1]
        k = self.k_b[str(layer)](memory).view(B, M, -1, hd).transpose(1, 2)  # [B, k, M, hd]
        v = self.v_b[str(layer)](memory).view(B, M, -1, hd).transpose(1, 2)
        return self._attend(q, k, v).transpose(1, 2)  # [B, T, k, hd]


class FullWidthBridge(Bridge):
    """The composition-paper baseline: after decoder layers every-1, 2*every-1, ... the hidden state [B, T, D]
    gets ``+ tanh(gate) * o(attn(q(norm(h)), k(mem), v(mem)))`` with the model's H heads of hd."""

    def __init__(self, config: BridgeConfig, model: nn.Module | None = None):
        super().__init__(config)
        lay = config.model_layout
        D, width = lay["hidden_size"], lay["num_heads"] * lay["head_dim"]
        if config.every < 1:
            raise RadistillError("--full-width-every must be at least 1")
        self.layers = [i for i in range(lay["num_layers"]) if (i + 1) % config.every == 0]
        if not self.layers:
            raise RadistillError(f"--full-width-every {config.every} is more than the model's "
                                 f"{lay['num_layers']} layers: no layer would be bridged")
        self.blocks = nn.ModuleDict({str(i): nn.ModuleDict({
            "norm": nn.RMSNorm(D, eps=1e-6), "q": nn.Linear(D, width, bias=False),
            "k": nn.Linear(config.d_aug, width, bias=False), "v": nn.Linear(config.d_aug, width, bias=False),
            "o": nn.Linear(width, D, bias=False)}) for i in self.layers})
        self.gate = nn.ParameterDict({str(i): nn.Parameter(torch.zeros(())) for i in self.layers})
        if model is not None:
            self.attach(model)

    def attach(self, model: nn.Module) -> "FullWidthBridge":
        self.detach()
        for i in self.layers:
            def add(module, args, output, i=i):
                if self._memory is None:
                    return None
                h = output[0] if isinstance(output, tuple) else output
                h = h + self._block(i, h)
                return (h, *output[1:]) if isinstance(output, tuple) else h

            self._handles.append(_layers(model)[i].register_forward_hook(add))
        return self

    def _block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, D] -> gated cross-attention output [B, T, D]."""
        block, hd = self.blocks[str(i)], self.config.model_layout["head_dim"]
        B, T, _ = h.shape
        memory = self._memory.to(h.dtype).expand(B, -1, -1)
        M = memory.shape[1]
        q = block["q"](block["norm"](h)).view(B, T, -1, hd).transpose(1, 2)
        k = block["k"](memory).view(B, M, -1, hd).transpose(1, 2)
        v = block["v"](memory).view(B, M, -1, hd).transpose(1, 2)
        out = self._attend(q, k, v).transpose(1, 2).reshape(B, T, -1)
        return torch.tanh(self.gate[str(i)]).to(h.dtype) * block["o"](out)


def kept_heads_of(model: nn.Module) -> list[list[int]]:
    """A hybrid student's kept heads per layer (``config.kept_heads``); a plain model has none to offer."""
    kept = getattr(model.config, "kept_heads", None)
    if kept is None:
        raise RadistillError(f"{type(model).__name__} is not a radistill student: say which heads to bridge "
                             "(--heads L.H,..., e.g. a scan's top heads)")
    return [list(h) for h in kept]


def make_bridge(model: nn.Module, *, d_aug: int, heads: list[list[int]] | None = None, every: int = 0,
                aligned: bool = False, source: str = "") -> Bridge:
    """A fresh bridge attached to ``model``: full-width when ``every`` > 0, else kept-head on ``heads``
    (default: the student's kept heads)."""
    layout = _layout(model)
    if every:
        config = BridgeConfig("full-width", d_aug, [], every, aligned, source, layout)
        return FullWidthBridge(config, model)
    heads = kept_heads_of(model) if heads is None else heads
    if len(heads) != layout["num_layers"]:
        raise RadistillError(f"heads name {len(heads)} layers but the model has {layout['num_layers']}")
    if not any(heads):
        raise RadistillError("no head to bridge: the model keeps no attention head (give --heads L.H,...)")
    config = BridgeConfig("kept-head", d_aug, [sorted(h) for h in heads], 0, aligned, source, layout)
    return KeptHeadBridge(config, model)


def load_bridge(model: nn.Module, path: str | Path) -> Bridge:
    """The bridge saved in ``path`` (``bridge_config.json`` + ``bridge.safetensors``), attached to ``model``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise RadistillError(f"{path} holds no bridge ({CONFIG_NAME} and {WEIGHTS_NAME} expected)")
    try:
        values = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise RadistillError(f"{path / CONFIG_NAME} is not valid JSON: {exc}") from None
    config = BridgeConfig.from_dict(values, str(path / CONFIG_NAME))
    if config.kind not in KINDS:
        raise RadistillError(f"{path / CONFIG_NAME}: unknown bridge kind {config.kind!r} (one of {', '.join(KINDS)})")
    layout = _layout(model)
    if layout != config.model_layout:
        raise RadistillError(f"{path} was trained on a model shaped {config.model_layout}, this one is {layout}")
    bridge = (FullWidthBridge if config.kind == "full-width" else KeptHeadBridge)(config)
    missing, unexpected = bridge.load_state_dict(load_file(str(path / WEIGHTS_NAME)), strict=False)
    if missing or unexpected:
        raise RadistillError(f"{path / WEIGHTS_NAME} does not match its config (missing {missing}, unexpected "
                             f"{unexpected})")
    param = next(model.parameters())
    bridge.to(device=param.device)
    return bridge.attach(model)
