"""The paper's synthetic key-value retrieval probe.

    Memorize the following dictionary:
    scallops:84
    ...
    <blank line>
    The value of the key 'scallops' is

Keys are distinct random English words from an offline list, values distinct integers from 0-99 -- or from
10-99 where the tokenizer writes numbers in more than one token (see :func:`value_range`). The item is multiple
choice over the dictionary's values. Whether the value follows ``is`` with a space depends on the tokenizer
(see :func:`value_prefix`).
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
MAX_PAIRS = 100  # values are distinct integers 0-99 (10-99 for tokenizers that split digits: see value_range)


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


def value_range(tokenizer, prefix: str) -> range:
    """The values' range: 0-99 where every value is the same number of tokens after the question (one token in
    GPT-2-style and Llama-3 tokenizers), else 10-99.

    A choice scores the *sum* of its tokens' log-probs, so a one-digit value in a tokenizer that writes digits one
    by one (SmolLM2, Llama-2) would beat every two-digit value by the log-prob it does not have to pay for a second
    token: the probe would measure length, not retrieval. Two-digit values are all two tokens there.
    """
    stem = QUESTION.format(key="key")
    base = len(tokenizer(stem).input_ids)
    for values in (range(MAX_PAIRS), range(10, MAX_PAIRS)):
        if len({len(tokenizer(f"{stem}{prefix}{v}").input_ids) - base for v in values}) == 1:
            return values
    return range(MAX_PAIRS)  # no range of equal lengths: keep the paper's 0-99


def kv_items(tokenizer, config: KVProbeConfig) -> list[ProbeItem]:
    """``config.samples`` probe items of ``config.pairs`` pairs each, reproducible from ``config.seed``."""
    if not 1 <= config.pairs <= MAX_PAIRS:
        raise RadistillError(f"--pairs must be between 1 and {MAX_PAIRS} (values are distinct integers 0-99)")
    if config.samples < 1:
        raise RadistillError("--samples must be at least 1")
    prefix = value_prefix(tokenizer) if config.value_prefix is None else config.value_prefix
    candidates = value_range(tokenizer, prefix)
    if config.pairs > len(candidates):
        raise RadistillError(f"--pairs must be at most {len(candidates)} for this tokenizer: it writes numbers "
                             f"digit by digit, so values are the two-digit numbers {candidates.start}-99")
    rng = random.Random(config.seed)
    vocabulary = words()
    items = []
    for _ in range(config.samples):
        keys = rng.sample(vocabulary, config.pairs)
        values = rng.sample(candidates, config.pairs)
        target = rng.randrange(config.pairs)
        body = "".join(f"{k}:{v}\n" for k, v in zip(keys, values))
        prompt = HEADER + body + QUESTION.format(key=keys[target])
        items.append(ProbeItem(prompt, tuple(f"{prefix}{v}" for v in values), target))
    return items
