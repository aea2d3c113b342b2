"""Old option spellings kept as hidden aliases: an option name means one thing across all commands.

``--batch-size`` used to mean sequences per micro-batch (distill, plan, finetune), (prompt, head) rows per forward
(scan) and prompts per forward (eval); the LoRA flags were ``--rank/--targets`` in finetune and
``--lora-rank/--lora-targets`` in plan. The new names (``--micro-batch``, ``--rows-per-forward``, ``--eval-batch``,
``--lora-*``) say which; the old ones still work, hidden from ``--help``, with a one-line note.
"""

from __future__ import annotations

from typing import Any

from radistill.utils.console import console
from radistill.utils.errors import RadistillError


def renamed(new_value: Any, old_value: Any, old: str, new: str, default: Any = None) -> Any:
    """The option's value: ``old_value`` when the old spelling ``old`` was given (it must not be given together
    with ``new``; ``default`` is ``new``'s default, i.e. "not given"), else ``new_value``."""
    if old_value is None:
        return new_value
    if new_value != default:
        raise RadistillError(f"{old} is the old name of {new}: give one of them")
    console.print(f"[yellow]note:[/] {old} is now {new}", soft_wrap=True)
    return old_value
