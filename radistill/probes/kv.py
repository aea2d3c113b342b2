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


def _space_is_own_token(tokenizer) -> bool:
    """True where ``" 42"`` starts with a token that is only the space (Llama-3, SmolLM2, Llama-2)."""
    pieces = tokenizer(" 42", add_special_tokens=False).input_ids
    return tokenizer.decode(pieces[:1]).strip() == ""


def value_prefix(tokenizer) -> str:
    """How a value follows ``is``: ``" "`` (``is 42``, natural text) or ``""`` (``is42``, the G&A code's way).

    GPT-2-style BPEs fold the space into the number (``" 42"`` is one token): ``" "``, as the mohawk generator
    writes it. Llama-3's tokenizer splits the space off and writes ``42`` as one token; there the
    Gather-and-Aggregate code appends the value with no space, and so do we (``""``). Where the number itself is
    several tokens (digit-by-digit tokenizers: SmolLM2, Llama-2), ``""`` scores every digit after an ``is4`` that
    text never contains: on SmolLM2-135M it halved KV accuracy (0.31 vs 0.62 at 5 pairs, 32 items), so there the
    value keeps its space (``" "``; :func:`spacing` moves that lone space token into the prompt). We test the
    tokenizer rather than guess.
    """
    if not _space_is_own_token(tokenizer):
        return " "
    return "" if len(tokenizer(" 42", add_special_tokens=False).input_ids) == 2 else " "


def spacing(tokenizer, prefix: str) -> tuple[str, str]:
    """``(end of the prompt, start of each value)`` for a value written ``is{prefix}{v}``.

    A leading space the tokenizer writes as a token of its own ends the prompt instead of starting every choice:
    the text and its tokens are the same, but the space is read once rather than scored once per choice (it would
    add the same log-prob to each, ranking nothing, and double the scored positions of two-digit values).
    """
    if prefix.startswith(" ") and _space_is_own_token(tokenizer):
        return " ", prefix[1:]
    return "", prefix


def value_range(tokenizer, prefix: str) -> range:
    """The values' range: 0-99 where every value is the same number of tokens after the question (one token in
    GPT-2-style and Llama-3 tokenizers), else 10-99.

    A choice scores the *sum* of its tokens' log-probs, so a one-digit value in a tokenizer that writes digits one
    by one (SmolLM2, Llama-2) would beat every two-digit value by the log-prob it does not have to pay for a second
    token: the probe would measure length, not retrieval. Two-digit values are all two tokens there.
    """
    end, prefix = spacing(tokenizer, prefix)
    stem = QUESTION.format(key="key") + end
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
    prompt_end, value_start = spacing(tokenizer, prefix)
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
        prompt = HEADER + body + QUESTION.format(key=keys[target]) + prompt_end
        items.append(ProbeItem(prompt, tuple(f"{value_start}{v}" for v in values), target))
    return items
