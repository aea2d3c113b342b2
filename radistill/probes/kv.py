"""The paper's synthetic key-value retrieval probe.

    Memorize the following dictionary:
    scallops:84
    ...
    <blank line>
    The value of the key 'scallops' is

Keys are distinct random English words from an offline list, values distinct integers from 0-99. The
item is multiple choice over the dictionary's values. Whether the value follows ``is`` with a space
depends on the tokenizer (see :func:`value_prefix`).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources

from radistill.probes.items import ProbeItem
from radistill.utils.errors import RadistillError

HEADER = "Memorize the following dictionary:\n"
QUESTION = "\nThe value of the key '{key}' is"
MAX_PAIRS = 100  # values are distinct integers 0-99


@dataclass(frozen=True)
class KVProbeConfig:
    pairs: int = 20
    samples: int = 64
    seed: int = 0
    value_prefix: str | None = None  # None: chosen per tokenizer

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=1)
def words() -> tuple[str, ...]:
    text = resources.files("radistill.assets").joinpath("words.txt").read_text()
    return tuple(w for w in text.split() if w.isalpha() and len(w) >= 3)


def value_prefix(tokenizer) -> str:
    """``" "`` if the tokenizer folds a leading space into a number's first token, else ``""``.

    GPT-2-style BPEs encode ``" 42"`` as one token, so ``is 42`` is natural text (the mohawk generator);
    Llama-3's tokenizer splits digits from the space, leaving a lone ``" "`` token, so the
    Gather-and-Aggregate code appends the value with no space. We test the tokenizer rather than guess.
    """
    pieces = tokenizer(" 42", add_special_tokens=False).input_ids
    first = tokenizer.decode(pieces[:1])
    return "" if first.strip() == "" else " "


def kv_items(tokenizer, config: KVProbeConfig) -> list[ProbeItem]:
    """``config.samples`` probe items of ``config.pairs`` pairs each, reproducible from ``config.seed``."""
    if not 1 <= config.pairs <= MAX_PAIRS:
        raise RadistillError(f"--pairs must be between 1 and {MAX_PAIRS} (values are distinct integers 0-99)")
    if config.samples < 1:
        raise RadistillError("--samples must be at least 1")
    prefix = value_prefix(tokenizer) if config.value_prefix is None else config.value_prefix
    rng = random.Random(config.seed)
    vocabulary = words()
    items = []
    for _ in range(config.samples):
        keys = rng.sample(vocabulary, config.pairs)
        values = rng.sample(range(MAX_PAIRS), config.pairs)
        target = rng.randrange(config.pairs)
        body = "".join(f"{k}:{v}\n" for k, v in zip(keys, values))
        prompt = HEADER + body + QUESTION.format(key=keys[target])
        items.append(ProbeItem(prompt, tuple(f"{prefix}{v}" for v in values), target))
    return items
