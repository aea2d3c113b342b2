"""``radistill finetune`` end to end: load a student, add adapters, train, save the adapter, optionally merge.

``OUT/`` holds the adapter as PEFT writes it (``adapter_config.json``, ``adapter_model.safetensors``; load it with
``PeftModel.from_pretrained(student, OUT)``), the tokenizer and ``finetune.json`` (settings, targeted modules,
parameter counts, losses). ``--merge`` adds ``OUT/merged/``: a plain radistill student (adapters folded into the
weights, ``selection.json`` carried over) that ``AutoModelForCausalLM.from_pretrained`` loads without PEFT.
Directories are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from radistill.finetune.data import batches, replay_batches, with_replay
from radistill.finetune.lora import add_lora, load_adapter, merge_lora
from radistill.finetune.train import FinetuneConfig, FinetuneResult, train
from radistill.models.access import load_model, resolve_device
from radistill.utils.errors import RadistillError
from radistill.utils.io import write_json_atomic


class _Publish:
    """A temporary sibling directory that is renamed onto ``out`` when the block succeeds."""

    def __init__(self, out: Path, overwrite: bool):
        if out.exists() and not overwrite:
            raise RadistillError(f"{out} already exists: choose another --out or pass --overwrite")
        self.out, self.overwrite = out, overwrite

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
        return self.tmp

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            if self.out.exists():
                old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
                os.replace(self.out, old)
                os.replace(self.tmp, self.out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.out)
        shutil.rmtree(self.tmp, ignore_errors=True)


def save_merged(peft_model, tokenizer, student_dir: str | os.PathLike | None, out: Path) -> Path:
    """Merge the adapters and write a plain student checkpoint to ``out`` (an existing one is replaced)."""
    merged = merge_lora(peft_model)
    with _Publish(out, overwrite=True) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        selection = Path(student_dir) / "selection.json" if student_dir is not None else None
        if selection is not None and selection.exists():
            shutil.copy2(selection, tmp / "selection.json")
    return out


def merge_adapter(student_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Fold a saved adapter into its student (in fp32 on the CPU, so nothing is rounded twice)."""
    student, tokenizer = load_model(student_dir, dtype="fp32", device="cpu")
    return save_merged(load_adapter(student, adapter_dir), tokenizer, student_dir, Path(out))


def finetune_student(student_dir: str | os.PathLike, data: str, out: str | os.PathLike, cfg: FinetuneConfig,
                     device: str = "auto", merge: bool = False, overwrite: bool = False) -> FinetuneResult:
    """Fine-tune ``student_dir`` on ``data`` following ``cfg``; write ``out`` (module docstring)."""
    out = Path(out)
    if out.exists() and not overwrite:  # before any loading or training
        raise RadistillError(f"{out} already exists: choose another --out or pass --overwrite")
    device = resolve_device(device)
    cuda = device.startswith("cuda")
    # LoRA: frozen base in bf16 on a GPU (adapters are fp32: PEFT upcasts them); full fine-tuning: fp32 master
    dtype = "bf16" if cuda and cfg.lora is not None else "fp32"
    model, tokenizer = load_model(student_dir, dtype=dtype, device=device)
    record: dict = {"student": str(student_dir), "data": str(data), "config": cfg.to_dict()}
    if cfg.lora is not None:
        model, summary = add_lora(model, cfg.lora)
        record["lora"] = summary.to_dict()
    torch.manual_seed(cfg.seed)
    stream = batches(tokenizer, data, cfg.batch_size, cfg.seq_len, cfg.seed)
    if cfg.replay is not None:
        replay = replay_batches(tokenizer, cfg.replay, cfg.batch_size, cfg.seq_len, cfg.seed + 1)
        stream = with_replay(stream, replay, cfg.replay_share, cfg.seed)
    result = train(model, stream, cfg, device, autocast=cuda)
    record["result"] = result.to_dict()
    with _Publish(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "finetune.json", record)
    if merge:
        if cfg.lora is None:
            raise RadistillError("--merge applies to LoRA adapters; a full fine-tune is already a plain checkpoint")
        model = model.float() if cuda else model
        save_merged(model, tokenizer, student_dir, out / "merged")
    return result


__all__ = ["finetune_student", "merge_adapter", "save_merged"]
