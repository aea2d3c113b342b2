"""Training and scoring a bridge on the ``kv-outside`` task. Only the bridge's parameters train."""

from __future__ import annotations

import random
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from radistill.bridge.module import Bridge
from radistill.bridge.task import OutsideItem, pad


def _memory(source, items: list[OutsideItem], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad([it.source_ids for it in items], pad_id)
    memory, memory_mask = source.encode(ids.to(device), mask.to(device))
    return memory.detach(), memory_mask


def _choice_logprobs(model, bridge, rows: list[list[int]], starts: list[int], memory, memory_mask, pad_id, device):
    """Sum of log-probs of tokens rows[i][starts[i]:] given what precedes them -> [len(rows)]."""
    ids, mask = pad(rows, pad_id)
    ids = ids.to(device)
    ctx = bridge.use(memory, memory_mask) if bridge is not None and memory is not None else nullcontext()
    with ctx:
        logits = model(input_ids=ids).logits.float()  # right padding: no mask needed (causal)
    logp = F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]  # [B, L-1]
    pos = torch.arange(ids.shape[1] - 1, device=device)[None]
    scored = (pos >= torch.tensor(starts, device=device)[:, None] - 1) & mask[:, 1:].to(device)
    return (logp * scored).sum(-1)


def train_bridge(model: nn.Module, bridge: Bridge, source, items: list[OutsideItem], *, steps: int, batch: int = 16,
                 lr: float = 1e-3, seed: int = 0, pad_id: int = 0, log=None, stop=None) -> dict:
    """AdamW on the bridge only, cross-entropy of the target value's tokens. Returns losses, tokens seen and the
    steps taken: ``stop()`` (checked before each step) ends training early, e.g. at a time limit."""
    device = next(model.parameters()).device
    model.requires_grad_(False)
    bridge.requires_grad_(True)
    optimizer = torch.optim.AdamW(bridge.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    losses, tokens = [], 0
    done = 0
    for step in range(steps):
        if stop is not None and stop():
            break
        chosen = [items[rng.randrange(len(items))] for _ in range(batch)]
        memory, memory_mask = _memory(source, chosen, pad_id, device)
        rows = [it.prompt_ids + it.choice_ids[it.target] for it in chosen]
        starts = [len(it.prompt_ids) for it in chosen]
        loss = -_choice_logprobs(model, bridge, rows, starts, memory, memory_mask, pad_id, device).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        done = step + 1
        tokens += sum(len(r) for r in rows) + int(memory_mask.sum())
        if log is not None and (step + 1) % max(1, steps // 10) == 0:
            log(f"step {step + 1}/{steps}: loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    return {"losses": losses, "tokens": tokens, "steps": done, "batch": batch, "lr": lr}


@torch.no_grad()
def accuracy(model: nn.Module, bridge: Bridge | None, source, items: list[OutsideItem], *, pad_id: int = 0,
             batch: int = 8) -> float:
    """Multiple-choice accuracy over each item's values; ``bridge=None`` (or no source): the model alone."""
    device = next(model.parameters()).device
    right = 0
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        memory = memory_mask = None
        if bridge is not None and source is not None:
            memory, memory_mask = _memory(source, chunk, pad_id, device)
        rows, starts, owner = [], [], []
        for j, it in enumerate(chunk):
            for choice in it.choice_ids:
                rows.append(it.prompt_ids + choice)
                starts.append(len(it.prompt_ids))
                owner.append(j)
        if memory is not None:
            index = torch.tensor(owner, device=device)
            memory, memory_mask = memory[index], memory_mask[index]
        scores = _choice_logprobs(model, bridge, rows, starts, memory, memory_mask, pad_id, device)
        k = 0
        for it in chunk:
            n = len(it.choice_ids)
            right += int(int(scores[k:k + n].argmax()) == it.target)
            k += n
    return right / len(items)
