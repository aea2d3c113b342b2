"""Capability suites written as JSONL multiple-choice files (``radistill eval --tasks PATH.jsonl`` scores them).

``facts``    for ANY teacher: facts it has memorised, mined from its own confident generations. The teacher samples
             documents (from its beginning-of-text token, or from prompts of a text file); at every word start
             where its greedy next word has probability >= ``confident`` and that word does not occur in the text
             before it (so it is recalled, not copied), the text so far is a question and the word its answer.
             The distractors are other mined answers of the same *slot* (the prompt's last two words, e.g.
             "lives in" -> towns, "colour is" -> colours), so a model must know which town, not that a town comes;
             slots with fewer than ``choices`` distinct answers (template words such as "every spring") give no
             items. Seeded; the teacher's samples come from a seeded generator.
``records``  reading structured records in the prompt, in the format teacher-19m was trained on (found by sampling
             it from its beginning-of-text token; see docs/eval.md): ``Name: X; Job: Y; Phone: 123-4567`` lines, then
             ``The phone number of X is`` (choices: every record's phone). Seeded; needs no model.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from radistill.eval.choice import model_device
from radistill.probes.items import ProbeItem
from radistill.probes.kv import words
from radistill.utils.errors import RadistillError
from radistill.utils.io import write_text_atomic

# The testbed teacher's record vocabulary (from its own samples): jobs it writes in records and facts.
JOBS = ("astronomer", "baker", "banker", "brewer", "butcher", "carpenter", "cartographer", "chemist", "clerk", "cook",
        "doctor", "farmer", "fisher", "glassblower", "guard", "hunter", "jeweler", "judge", "knight", "lawyer",
        "librarian", "mason", "miner", "monk", "nurse", "painter", "pilot", "potter", "priest", "sailor", "singer",
        "smith", "tailor", "weaver")
RECORD = "Name: {name}; Job: {job}; Phone: {phone}\n"
PHONE_QUESTION = "The phone number of {name} is"


@dataclass(frozen=True)
class RecordsConfig:
    items: int = 200
    min_records: int = 3
    max_records: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.items < 1 or not 2 <= self.min_records <= self.max_records <= len(JOBS):
            raise RadistillError(f"records suite: need items >= 1 and 2 <= min_records <= max_records <= {len(JOBS)}")


def records_suite(config: RecordsConfig = RecordsConfig()) -> list[ProbeItem]:
    """Phone lookups, each over a fresh set of records: choices are every record's phone number.

    Only the phone is asked: it is the question teacher-19m was trained to answer from records. Asked for a job
    (``X works as a``), it answers from its memorised world instead of the records (measured: 0.10 on 40 items,
    phone 1.00), so such items would test the prompt's ambiguity, not reading."""
    rng = random.Random(config.seed)
    names = [w.capitalize() for w in words()]
    items = []
    for _ in range(config.items):
        count = rng.randint(config.min_records, config.max_records)
        people = rng.sample(names, count)
        jobs = [rng.choice(JOBS) for _ in people]
        phones: list[str] = []
        while len(phones) < count:  # distinct numbers: one right choice
            phone = f"{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
            if phone not in phones:
                phones.append(phone)
        body = "".join(RECORD.format(name=n, job=j, phone=p) for n, j, p in zip(people, jobs, phones))
        target = rng.randrange(count)
        items.append(ProbeItem(body + PHONE_QUESTION.format(name=people[target]), tuple(f" {p}" for p in phones),
                               target))
    return items


@dataclass(frozen=True)
class FactsConfig:
    items: int = 200
    choices: int = 4
    documents: int = 256  # teacher samples mined
    tokens: int = 160  # sampled tokens per document
    confident: float = 0.9  # the teacher's probability of the whole answer word
    min_prefix: int = 4  # tokens of text before a question's answer
    max_per_answer: int = 3  # items with the same answer at most (no one frequent word dominates)
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.items < 1 or self.choices < 2 or self.documents < 1 or self.tokens < 2:
            raise RadistillError("facts suite: need items >= 1, choices >= 2, documents >= 1 and tokens >= 2")
        if not 0.0 < self.confident < 1.0:
            raise RadistillError(f"facts suite: confident must be between 0 and 1 (got {self.confident})")


@dataclass
class Fact:
    prompt: str
    answer: str  # with its leading space, as it follows the prompt
    probability: float
    slot: str


def _starts_word(piece: str) -> bool:
    return piece[:1].isspace()


def _is_word(text: str) -> bool:
    return len(text.strip()) >= 3 and text.strip().isalpha() and _starts_word(text)


@torch.no_grad()
def teacher_documents(model, tokenizer, config: FactsConfig, prompts: list[list[int]] | None = None,
                      batch_size: int = 16) -> list[list[int]]:
    """Seeded samples of ``config.tokens`` tokens (end-of-text ends a document), from the beginning-of-text token or
    from ``prompts`` (token ids; prompts' tokens are part of the returned documents)."""
    from transformers import GenerationConfig

    device = model_device(model)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prompts is None:
        if start is None:
            raise RadistillError("facts suite: the tokenizer has no beginning- or end-of-text token to sample from; "
                                 "pass --text FILE to start the samples from its text")
        prompts = [[start]] * config.documents
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    documents: list[list[int]] = []
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(batch):  # left-padded
                ids[r, width - len(p) :] = torch.tensor(p)
                mask[r, width - len(p) :] = 1
            generation = GenerationConfig(max_new_tokens=config.tokens, do_sample=True, temperature=config.temperature,
                                          top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=generation).cpu()
            for r, p in enumerate(batch):
                row = out[r, width:].tolist()
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                documents.append([t for t in p if t != start] + row)
    return documents


@torch.no_grad()
def confident_facts(model, tokenizer, document: list[int], config: FactsConfig) -> list[Fact]:
    """Word starts of ``document`` where the teacher's greedy next word is confident and not in the text before."""
    if len(document) <= config.min_prefix:
        return []
    device = model_device(model)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    lead = [start] if start is not None else []
    ids = torch.tensor([lead + document], device=device)
    probs = torch.softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1).cpu()  # [len, vocab]
    offset = len(lead)
    facts = []
    for t in range(config.min_prefix, len(document)):
        p_first, first = probs[offset + t - 1].max(-1)
        if float(p_first) < config.confident or first.item() != document[t]:
            continue  # only where the sampled token is the teacher's confident choice: the sample continues it
        if not _starts_word(tokenizer.decode([document[t]])):
            continue
        # the rest of the word: following tokens of the sample that do not start a new word, while confident
        answer, probability, end = [document[t]], float(p_first), t + 1
        while end < len(document) and not _starts_word(tokenizer.decode([document[end]])):
            piece = tokenizer.decode([document[end]])
            if not piece.isalpha():
                break
            p_next = float(probs[offset + end - 1, document[end]])
            if probs[offset + end - 1].argmax().item() != document[end]:
                break
            answer.append(document[end])
            probability *= p_next
            end += 1
        text = tokenizer.decode(answer)
        prompt = tokenizer.decode(document[:t])
        if probability < config.confident or not _is_word(text) or text.strip().lower() in prompt.lower():
            continue
        slot = " ".join(prompt.split()[-2:])
        facts.append(Fact(prompt, text, probability, slot))
    return facts


def facts_suite(model, tokenizer, config: FactsConfig = FactsConfig(), prompts: list[list[int]] | None = None,
                batch_size: int = 16) -> tuple[list[ProbeItem], dict]:
    """Multiple-choice items of the teacher's confident recalled facts and a summary of how they were mined."""
    documents = teacher_documents(model, tokenizer, config, prompts, batch_size)
    mined = [fact for doc in documents for fact in confident_facts(model, tokenizer, doc, config)]
    rng = random.Random(config.seed)
    rng.shuffle(mined)
    by_slot: dict[str, set[str]] = defaultdict(set)
    for fact in mined:
        by_slot[fact.slot].add(fact.answer)
    items, used, per_answer = [], set(), defaultdict(int)
    for fact in mined:
        others = sorted(by_slot[fact.slot] - {fact.answer})
        if len(others) < config.choices - 1 or fact.prompt in used or per_answer[fact.answer] >= config.max_per_answer:
            continue
        choices = [fact.answer, *rng.sample(others, config.choices - 1)]
        rng.shuffle(choices)
        items.append(ProbeItem(fact.prompt, tuple(choices), choices.index(fact.answer)))
        used.add(fact.prompt)
        per_answer[fact.answer] += 1
        if len(items) == config.items:
            break
    if not items:
        raise RadistillError(f"facts suite: no confident recalled facts in {len(documents)} teacher samples "
                             "(with enough distinct answers per slot); sample more --documents or lower --confident")
    summary = {"documents": len(documents), "mined": len(mined), "items": len(items),
               "slots": sorted({f.slot for f in mined if len(by_slot[f.slot]) >= config.choices}),
               "config": asdict(config)}
    return items, summary


def write_suite(path: str | os.PathLike, items: list[ProbeItem], header: dict | None = None) -> None:
    """The items as JSONL (``{"prompt", "choices", "answer"}``) and, beside it, ``PATH.meta.json``: how it was made."""
    text = "".join(json.dumps(item.to_dict(), ensure_ascii=False) + "\n" for item in items)
    write_text_atomic(path, text)
    if header is not None:
        meta = str(path)[: -len(".jsonl")] if str(path).endswith(".jsonl") else str(path)
        write_text_atomic(meta + ".meta.json", json.dumps(header, indent=2, ensure_ascii=False) + "\n")
