"""The fine-tuning loop: LoRA adapters (or every weight) on prompt/answer pairs or text, chunked cross-entropy.

The LM head's logits are made ``loss_chunk`` positions at a time under activation checkpointing, so the
[tokens, vocab] float32 logits never exist whole (166k vocabulary x 2048 tokens would be 1.4 GB per sequence).
After the first backward every adapter must have a gradient (:func:`check_adapter_gradients`), which catches
targets whose forward bypasses the adapted module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from radistill.finetune.data import IGNORE
from radistill.finetune.lora import LoraSpec, adapter_parameters, check_adapter_gradients
from radistill.utils.errors import RadistillError
from radistill.utils.optim import make_adamw


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run.

    ``lora``: the adapters :func:`radistill.finetune.run.finetune_student` adds (None: full fine-tuning there).
    :func:`train` itself trains whatever requires grad in the model it is given, so callers that add adapters
    themselves pass ``lora=None``.
    """

    lora: LoraSpec | None = field(default_factory=LoraSpec)
    steps: int = 100
    lr: float = 2e-4
    batch_size: int = 8
    seq_len: int = 512
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | adamw8bit (torchao or bitsandbytes)
    checkpointing: bool = False  # activation checkpointing of the decoder layers
    loss_chunk: int = 1024  # positions whose logits exist at once
    seed: int = 0
    log_every: int = 10
    replay: str | None = None  # general text whose steps go between the task's (finetune.data.with_replay)
    replay_share: float = 0.5  # with ``replay``: the fraction of steps on it

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoraSpec.from_dict(self.lora)
        if self.replay is not None and not 0.0 < self.replay_share < 1.0:
            raise RadistillError(f"finetune: --replay-share must be between 0 and 1 (got {self.replay_share}): the "
                                 "fraction of steps on the replay text")
        for name in ("steps", "batch_size", "seq_len", "loss_chunk", "log_every"):
            if getattr(self, name) < 1:
                raise RadistillError(f"finetune: {name} must be at least 1 (got {getattr(self, name)})")
        if self.lr <= 0:
            raise RadistillError(f"finetune: lr must be > 0 (got {self.lr})")

    def to_dict(self) -> dict:
        return {**asdict(self), "lora": None if self.lora is None else self.lora.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneConfig":
        return cls(**data)


@dataclass
class FinetuneResult:
    steps: int
    tokens: int  # target tokens (those with a loss)
    losses: list[float]  # per step
    seconds: float
    trainable_params: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def make_optimizer(params: list, lr: float, weight_decay: float, kind: str = "adamw"):
    """AdamW or 8-bit AdamW (:func:`radistill.utils.optim.make_adamw`); ``params``: parameters or param groups."""
    return make_adamw(params, lr, weight_decay=weight_decay, kind=kind, what="finetune")


def causal_lm_loss(hidden: Tensor, head_weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
    """Mean next-token cross-entropy over labelled positions, ``chunk`` positions of logits at a time.

    hidden [batch, seq, dim] (final-norm output), head_weight [vocab, dim], labels [batch, seq] (IGNORE = no loss;
    position t predicts labels[t + 1]). Each chunk's logits are recomputed in backward instead of being kept.
    """
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1).flatten()
    flat = hidden.flatten(0, 1)
    count = (targets != IGNORE).sum()
    if int(count) == 0:
        raise RadistillError("a batch has no target tokens: every answer is empty or cut off; check --data")
    total = flat.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk):
        part = targets[start : start + chunk]
        if bool((part != IGNORE).any()):  # prompt-only chunks (most of a teaching batch) cost nothing
            total = total + checkpoint(_chunk_loss, flat[start : start + chunk], head_weight, part, use_reentrant=False)
    return total / count


def _chunk_loss(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    logits = (hidden @ weight.to(hidden.dtype).t()).float()  # [chunk, vocab]
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of every decoder layer (non-reentrant: frozen embeddings need no input grads)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _base(model: nn.Module) -> nn.Module:
    """The causal LM under a PEFT wrapper (PEFT injects its layers in place, so its modules are the live ones)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_loss(model: nn.Module, batch: dict[str, Tensor], chunk: int) -> Tensor:
    """Loss of one batch: the decoder's final hidden states, then :func:`causal_lm_loss` against the LM head."""
    base = _base(model)
    decoder = getattr(base, base.base_model_prefix)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     use_cache=False).last_hidden_state
    head = base.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise RadistillError("finetune needs a bias-free nn.Linear LM head (an adapter on lm_head is not supported: "
                             "its weight would be read directly, bypassing the adapter)")
    return causal_lm_loss(hidden, head.weight, batch["labels"], chunk)


def train(model: nn.Module, batches: Iterator[dict[str, Tensor]], cfg: FinetuneConfig, device: str,
          autocast: bool = False, on_step: Callable[[int, float], None] | None = None) -> FinetuneResult:
    """``cfg.steps`` optimizer steps on the parameters of ``model`` that require grad (adapters, or all)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RadistillError("nothing to train: no parameter requires grad (add adapters, or unfreeze the model)")
    if cfg.checkpointing:
        enable_checkpointing(_base(model))
    optimizer = make_optimizer(params, cfg.lr, cfg.weight_decay, cfg.optimizer)
    has_adapters = bool(adapter_parameters(model))
    model.train()
    losses, tokens, started = [], 0, time.perf_counter()
    for step in range(1, cfg.steps + 1):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            loss = lm_loss(model, batch, cfg.loss_chunk)
        if not torch.isfinite(loss):
            raise RadistillError(f"finetune step {step}: the loss is {loss.item()}; lower --lr (or check the student: "
                                 "does it give finite logits?)")
        loss.backward()
        if step == 1 and has_adapters:
            check_adapter_gradients(model)
        optimizer.step()
        losses.append(loss.item())
        tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return FinetuneResult(cfg.steps, tokens, losses, time.perf_counter() - started, sum(p.numel() for p in params))


__all__ = ["FinetuneConfig", "FinetuneResult", "causal_lm_loss", "enable_checkpointing", "lm_loss", "make_optimizer",
           "train"]
