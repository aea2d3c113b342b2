"""Multiple-choice probe items: text form (what users write) and token form (what models score).

A probe item is ``{"prompt", "choices", "answer"}``: the model scores each choice as the summed
log-probability of its tokens after the prompt; the prediction is the argmax. Choices may span several
tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from radistill.utils.errors import RadistillError


@dataclass(frozen=True)
class ProbeItem:
    prompt: str
    choices: tuple[str, ...]
    answer: int

    def __post_init__(self):
        if not self.choices:
            raise RadistillError("a probe item needs at least one choice")
        if not 0 <= self.answer < len(self.choices):
            raise RadistillError(f"answer index {self.answer} is outside its {len(self.choices)} choices")

    def to_dict(self) -> dict:
        return {**asdict(self), "choices": list(self.choices)}


@dataclass(frozen=True)
class EncodedItem:
    """Token ids of one item: ``prompt_ids`` followed by any one of ``choice_ids``."""

    prompt_ids: tuple[int, ...]
    choice_ids: tuple[tuple[int, ...], ...]
    answer: int

    @property
    def max_length(self) -> int:
        """Tokens of the prompt plus the longest choice."""
        return len(self.prompt_ids) + max(len(c) for c in self.choice_ids)


def encode_items(tokenizer, items: list[ProbeItem], max_length: int | None = None) -> list[EncodedItem]:
    """Tokenise items; a choice's tokens are those the tokenizer gives it *after* the prompt.

    Raises before any compute if an item (prompt + longest choice) exceeds ``max_length``.
    """
    encoded = []
    for index, item in enumerate(items):
        prompt_ids = tuple(tokenizer(item.prompt).input_ids)
        choices = tuple(_continuation_ids(tokenizer, item.prompt, prompt_ids, c) for c in item.choices)
        enc = EncodedItem(prompt_ids, choices, item.answer)
        if max_length is not None and enc.max_length > max_length:
            raise RadistillError(
                f"probe item {index} is {enc.max_length} tokens long but the model's context is {max_length}: "
                "use fewer pairs (--pairs) or a shorter probe"
            )
        encoded.append(enc)
    return encoded


def _continuation_ids(tokenizer, prompt: str, prompt_ids: tuple[int, ...], choice: str) -> tuple[int, ...]:
    joint = tuple(tokenizer(prompt + choice).input_ids)
    if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        ids = joint[len(prompt_ids) :]
    else:  # the tokenizer merged across the prompt/choice boundary: score the choice's own tokens
        ids = tuple(tokenizer(choice, add_special_tokens=False).input_ids)
    if not ids:
        raise RadistillError(f"choice {choice!r} tokenises to nothing")
    return ids


def load_jsonl(path: str | os.PathLike) -> list[ProbeItem]:
    """Read a user probe: one JSON object per line with ``prompt``, ``choices`` and ``answer`` (an index).

    ``answer`` may also be the text of the right choice.
    """
    path = Path(path)
    if not path.exists():
        raise RadistillError(f"probe file {path} does not exist")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            choices = tuple(str(c) for c in row["choices"])
            answer = row["answer"]
            if isinstance(answer, str):
                answer = choices.index(answer)
            items.append(ProbeItem(str(row["prompt"]), choices, int(answer)))
        except (json.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
            raise RadistillError(
                f"{path}:{number}: expected {{\"prompt\": str, \"choices\": [str, ...], \"answer\": int}} ({exc})"
            ) from exc
    if not items:
        raise RadistillError(f"probe file {path} holds no items")
    return items
