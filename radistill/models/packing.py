"""Packed sequences: several documents in one row, told apart by their position ids restarting.

A row holds documents back to back; each document's positions count from 0. transformers' masking utilities
(``find_packed_sequence_indices``) read the same position ids to keep attention inside each document (when no
attention mask and no cache is given), so a teacher and a student fed the same position ids see the same documents;
the hybrid's recurrent heads reset their state where a document starts (:func:`document_starts`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def document_position_ids(input_ids: Tensor, bos: int | None, eos: int) -> Tensor:
    """[B, T] position ids that restart at 0 where a document starts: at each ``bos`` token when documents begin with
    one (``bos`` not None), else right after each ``eos`` token (documents end with one); a row's first token always
    starts one (a document cut by the previous row goes on as if it began there)."""
    T = input_ids.shape[-1]
    if bos is not None:
        starts = input_ids == bos
    else:
        starts = torch.zeros_like(input_ids, dtype=torch.bool)
        starts[..., 1:] = input_ids[..., :-1] == eos
    starts[..., 0] = True
    index = torch.arange(T, device=input_ids.device).expand_as(input_ids)
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - last_start


def document_ids(position_ids: Tensor) -> Tensor:
    """[B, T] -> [B, T] int64: which document of its row each token belongs to (0, 1, ...); a new document starts
    wherever a position does not follow the previous one by 1 (transformers' rule for packed sequences)."""
    previous = torch.cat([position_ids[..., :1] - 1, position_ids[..., :-1]], dim=-1)
    return (position_ids - previous != 1).long().cumsum(-1)


def document_resets(position_ids: Tensor) -> Tensor:
    """[B, T] bool: True where a document starts after an earlier one in the row (the recurrent state resets there;
    the first column is False: the row's first document starts from whatever state it is given)."""
    previous = torch.cat([position_ids[..., :1] - 1, position_ids[..., :-1]], dim=-1)
    reset = position_ids - previous != 1
    reset[..., 0] = False
    return reset


__all__ = ["document_ids", "document_position_ids", "document_resets"]
