"""Several mixers side by side in one layer (e.g. window heads next to recurrent heads): one module, one state."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from radistill.hybrid.mixers.base import RecurrentMixer, mixer_kwargs


class MixerBank(nn.Module):
    """The mixers of one layer's head groups, used like one mixer (the hybrid layer and the cache see one).

    Heads come out group after group, in the order of ``groups``; the state is one flat dict whose keys are
    ``"<group index>.<the group's own key>"`` (the cache stores and batch-reorders it as it is). Built by the hybrid
    layer only when a layer has two or more groups; a layer with one group holds that mixer itself, so checkpoints
    of single-mixer students keep their parameter names.
    """

    def __init__(self, groups: list[RecurrentMixer]):
        super().__init__()
        self.groups = nn.ModuleList(groups)
        self.num_heads = sum(g.num_heads for g in groups)
        self.head_dim = groups[0].head_dim
        self.needs_positions = any(getattr(g, "needs_positions", False) for g in groups)
        self.supports_reset = all(getattr(g, "supports_reset", False) for g in groups)
        self.has_half_lives = any(getattr(g, "has_half_lives", False) for g in groups)

    def _sub_states(self, state: dict[str, Tensor] | None) -> list[dict[str, Tensor] | None]:
        if state is None:
            return [None] * len(self.groups)
        return [{k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(i)}
                for i in range(len(self.groups))]

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                state: dict[str, Tensor] | None = None, position_embeddings=None,
                reset: Tensor | None = None) -> tuple[Tensor, dict | None]:
        """As :meth:`RecurrentMixer.forward`: y [B, T, heads of all groups, head_dim]."""
        outputs = []
        for i, (group, sub) in enumerate(zip(self.groups, self._sub_states(state))):
            y, sub = group(hidden_states, attention_mask=attention_mask, state=sub,
                           **mixer_kwargs(group, position_embeddings, reset))
            if state is not None:  # a mixer may also replace its tensors rather than write them in place
                state.update({f"{i}.{k}": v for k, v in sub.items()})
            outputs.append(y)
        return torch.cat(outputs, dim=2), state

    def mixing_matrix(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                      position_embeddings=None, reset: Tensor | None = None) -> Tensor:
        """[B, heads, T, T], group after group (every group needs a mixing matrix)."""
        return torch.cat([g.mixing_matrix(hidden_states, attention_mask, **mixer_kwargs(g, position_embeddings, reset))
                          for g in self.groups], dim=1)

    def empty_state(self, batch_size: int, device, dtype) -> dict[str, Tensor]:
        return {f"{i}.{k}": v for i, g in enumerate(self.groups)
                for k, v in g.empty_state(batch_size, device, dtype).items()}

    def _decaying(self):
        start = 0
        for g in self.groups:
            if getattr(g, "has_half_lives", False):
                yield g, slice(start, start + g.num_heads)
            start += g.num_heads

    def set_half_lives(self, half_lives: Tensor) -> None:
        """half_lives [heads of all groups]: each group that has half-lives takes its heads' values."""
        for g, heads in self._decaying():
            g.set_half_lives(half_lives[heads])

    def half_lives(self) -> Tensor:
        """[heads of the groups that have half-lives], group after group."""
        return torch.cat([g.half_lives() for g, _ in self._decaying()])

    def normalized_heads(self) -> list[bool]:
        return [flag for g in self.groups for flag in g.normalized_heads()]
