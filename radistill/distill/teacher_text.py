"""Text the teacher wrote itself, generated once and kept as token ids, for mixing into the training data.

``data.teacher_share`` > 0: that share of the training sequences is packed from these texts instead of the
``--data`` documents (``PackedStream``). Each text continues a prompt: the first ``teacher_prompt_tokens`` tokens of
a training document (held-out documents never serve), after the tokenizer's BOS when it has one, sampled with
``teacher_temperature`` / ``teacher_top_p`` for ``teacher_new_tokens`` tokens or until the teacher writes EOS
(``model.generate``, batched, with the KV cache). A text is the prompt plus its continuation, without BOS/EOS (the
stream frames it like any document).

Layout (``data.teacher_dir``, by default ``RUN/teacher_text/``; another run may point at the same directory)::

    index.json                  settings (teacher and tokenizer fingerprints, data source, prompt and sampling
                                settings, seed), texts done, and per shard its texts and sha256; replaced atomically
                                after every shard
    shard-000000.safetensors    tokens [total] int32 (the shard's texts back to back), offsets [texts + 1] int64

One shard per ``generate`` call, written whole (``atomic_path``) before the index lists it, and each call seeded from
(seed, shard number): an interrupted generation continues after the last shard listed and ends with the files an
uninterrupted one writes (on the same device and versions: sampling is not bitwise portable). The reader refuses an
index made for other settings or a shard whose checksum or shape disagrees with it; a set made for more
documents with every other setting the same serves a run that needs fewer once it holds that many (its first
texts: a smaller budget asks for fewer: ``radistill.distill.recipe.with_recommended``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from radistill.distill.checkpoint import sha256
from radistill.distill.recipe import DataConfig
from radistill.models.access import weights_fingerprint
from radistill.utils.console import console
from radistill.utils.errors import RadistillError
from radistill.utils.io import atomic_path, write_json_atomic

INDEX = "index.json"
FORMAT = 1
GENERATION_FIELDS = ("teacher_documents", "teacher_prompt_tokens", "teacher_new_tokens", "teacher_temperature",
                     "teacher_top_p")


class TeacherTextError(RadistillError):
    """Generated teacher text is missing, damaged, or was made for other settings."""


def text_settings(teacher: nn.Module, tokenizer, data: DataConfig, seed: int) -> dict:
    """What the generated texts depend on (the index's ``settings``); the batch size is not among them."""
    from radistill.distill.data import eos_id

    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items())) + f"/eos {eos_id(tokenizer)}"
    return {
        "teacher": weights_fingerprint(teacher),
        "tokenizer": hashlib.sha256(vocabulary.encode()).hexdigest()[:16],
        "source": data.source, "text_field": data.text_field, "split": data.split, "name": data.name,
        "heldout_docs": data.heldout_docs, "heldout_stride": data.heldout_stride,
        **{k: getattr(data, k) for k in GENERATION_FIELDS}, "seed": seed,
    }


def _load_index(root: Path, settings: dict | None) -> dict | None:
    path = root / INDEX
    if not path.exists():
        return None
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise TeacherTextError(f"{path} has format {index.get('format')}, this radistill writes {FORMAT}: move it away")
    if settings is not None and index["settings"] != settings:
        changed = sorted(k for k in settings if index["settings"].get(k) != settings.get(k))
        if changed != ["teacher_documents"] or not _serves(index, settings["teacher_documents"]):
            raise TeacherTextError(f"{root} holds teacher text generated with other settings ({', '.join(changed)}): "
                                   "point data.teacher_dir elsewhere, or move that directory away")
    return index


def _serves(index: dict, wanted: int) -> bool:
    """Whether texts made for at least ``wanted`` documents, and holding that many already, serve a run that needs
    ``wanted``: their first ``wanted`` texts are then the run's (a run of a smaller budget asks for fewer texts;
    otherwise every setting matches), rather than generating a second set."""
    return index["settings"]["teacher_documents"] >= wanted and index["documents"] >= wanted


def _prompts(tokenizer, data: DataConfig, skip: int):
    """Prompt token ids [teacher_prompt_tokens] of training documents long enough, in the source's order."""
    from radistill.distill.data import _training_documents

    need, seen = data.teacher_prompt_tokens, 0
    for doc in _training_documents(data):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) < need:
            continue
        seen += 1
        if seen > skip:
            yield ids[:need]


@torch.no_grad()
def generate_texts(teacher: nn.Module, tokenizer, data: DataConfig, root: str | Path, seed: int) -> int:
    """Make ``root`` hold ``data.teacher_documents`` teacher texts (module docstring), continuing after the shards
    already there; returns the texts generated now. The teacher runs where its weights are."""
    from radistill.distill.data import eos_id

    root = Path(root)
    settings = text_settings(teacher, tokenizer, data, seed)
    index = _load_index(root, settings) or {"format": FORMAT, "settings": settings, "documents": 0, "shards": []}
    total, done = data.teacher_documents, index["documents"]  # a larger set that serves (_serves): done >= total
    if done >= total:
        return 0
    console.print(f"generating {total - done:,} teacher texts ({data.teacher_new_tokens} tokens after "
                  f"{data.teacher_prompt_tokens}-token prompts) into {root}")
    device = next(teacher.parameters()).device
    eos = eos_id(tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompts = _prompts(tokenizer, data, done)
    was_training = teacher.training
    teacher.eval()
    try:  # generation draws from seeds of its own; the caller's random state (training's) is left as it was
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return _generate(teacher, data, root, seed, index, prompts, device, eos, bos)
    finally:
        teacher.train(was_training)


def _generate(teacher, data: DataConfig, root: Path, seed: int, index: dict, prompts, device, eos: int,
              bos: list[int]) -> int:
    """One ``generate`` call per shard until ``data.teacher_documents`` texts are listed in ``index``."""
    done, made, total = index["documents"], 0, data.teacher_documents
    while done < total:
        batch = [p for _, p in zip(range(min(data.teacher_batch_size, total - done)), prompts)]
        if not batch:
            raise TeacherTextError(f"--data {data.source} has only {done} training documents of at least "
                                   f"{data.teacher_prompt_tokens} tokens: lower data.teacher_documents or "
                                   "data.teacher_prompt_tokens")
        ids = torch.tensor([bos + p for p in batch], device=device)  # one prompt length: no padding
        torch.manual_seed(seed * 1_000_003 + len(index["shards"]))  # this shard's draw, whatever came before
        out = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                               temperature=data.teacher_temperature, top_p=data.teacher_top_p, top_k=0,
                               max_new_tokens=data.teacher_new_tokens, pad_token_id=eos, eos_token_id=eos)
        texts = []
        for prompt, row in zip(batch, out[:, ids.shape[1]:].tolist()):
            new = row[: row.index(eos)] if eos in row else row
            texts.append(np.asarray(prompt + new, dtype=np.int32))
        name = f"shard-{len(index['shards']):06d}.safetensors"
        offsets = np.cumsum([0] + [len(t) for t in texts]).astype(np.int64)
        with atomic_path(root / name) as tmp:
            save_file({"tokens": torch.from_numpy(np.concatenate(texts)), "offsets": torch.from_numpy(offsets)},
                      str(tmp))
        index["shards"].append({"name": name, "documents": len(texts), "sha256": sha256(root / name)})
        done += len(texts)
        made += len(texts)
        index["documents"] = done
        write_json_atomic(root / INDEX, index)  # after the shard is on disk: the unit of resumption
    return made


class TeacherTexts:
    """The generated texts of a finished ``root`` as token id arrays (checked against the index on load)."""

    def __init__(self, root: str | Path, data: DataConfig):
        root = Path(root)
        index = _load_index(root, None)
        if index is None:
            raise TeacherTextError(f"{root} holds no generated teacher text ({INDEX} is missing): the trainer makes it "
                                   "before training when data.teacher_share > 0")
        wanted = {k: getattr(data, k) for k in GENERATION_FIELDS if k != "teacher_documents"}
        if {k: index["settings"].get(k) for k in wanted} != wanted or index["settings"]["source"] != data.source \
                or index["settings"]["teacher_documents"] < data.teacher_documents:
            raise TeacherTextError(f"{root} holds teacher text generated with other data settings: point "
                                   "data.teacher_dir elsewhere, or move that directory away")
        if index["documents"] < data.teacher_documents:
            raise TeacherTextError(f"{root} holds {index['documents']} of {data.teacher_documents} teacher texts: an "
                                   "interrupted generation; resume the run to finish it")
        self.texts: list[np.ndarray] = []
        for shard in index["shards"]:
            path = root / shard["name"]
            if not path.exists() or sha256(path) != shard["sha256"]:
                raise TeacherTextError(f"{path} is missing or altered (checksum): delete {root} to generate again")
            with safe_open(str(path), "np") as fh:
                tokens, offsets = fh.get_tensor("tokens"), fh.get_tensor("offsets")
            if len(offsets) != shard["documents"] + 1 or offsets[-1] != len(tokens):
                raise TeacherTextError(f"{path} disagrees with {root / INDEX}: delete {root} to generate again")
            self.texts += [tokens[a:b].astype(np.int64) for a, b in zip(offsets[:-1], offsets[1:])]
        self.texts = self.texts[: data.teacher_documents]

    def __len__(self) -> int:
        return len(self.texts)


__all__ = ["TeacherTextError", "TeacherTexts", "generate_texts", "text_settings"]
