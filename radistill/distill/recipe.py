"""The distillation recipe: every setting of a run, typed, round-tripping through JSON and YAML.

A recipe is what a user keeps beside their results: ``RUN/recipe.json`` is the resolved recipe (file + CLI
flags) a run actually used, and ``--resume`` reads it back. Defaults are for a ~1B-parameter student and
follow the authors' released code (goombalab/mohawk) and MOHAWK; ``docs/distill.md`` lists each with its source.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radistill.utils.errors import RadistillError
from radistill.utils.io import write_json_atomic
from radistill.utils.typed import check_fields

STAGES = (1, 2, 3)
SCHEDULES = ("wsd", "cosine", "constant")
TRAINABLE = ("recurrent", "mixer", "all", "lora")
# parts of the student a stage can train, named one by one (``trainable: "recurrent,mlp"``); radistill/distill/stages.py
PARTS = ("recurrent", "kept-heads", "o-proj", "mlp", "norms", "embeddings", "lm-head")
PACKING = ("concat", "documents")
DTYPES = ("bf16", "fp32")
TEACHER_LOGITS = ("online", "topk")
PARALLEL = ("ddp", "fsdp")  # how stage 3 spreads over torchrun ranks (stages 1/2 always split the layers)


@dataclass
class LossConfig:
    """Stage 3 only: ``kl_weight * T^2 * KL(teacher_T || student_T) + ce_weight * CE(student, next token)``."""

    kl_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    chunk_tokens: int = 2048  # logits are materialised for this many positions at a time (bounds vocab memory)


@dataclass
class StageConfig:
    enabled: bool = True
    tokens: int = 1_000_000  # budget: steps = tokens // (seq_len * batch_size * grad_accum * world_size)
    lr: float = 1e-4
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio
    warmup: float = 0.1  # fraction of the steps
    decay: float = 0.1  # WSD only: fraction of the steps spent decaying at the end
    schedule: str = "wsd"
    # "lora": adapters only (stage 3), merged into every exported stageN/; or PARTS, comma-separated
    trainable: str = "all"
    lora_rank: int = 16
    lora_targets: str = "recurrent,kept-heads"  # groups of radistill/finetune/targets.py
    seq_len: int = 2048
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 16
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0  # max grad norm (per layer in stages 1/2, global in stage 3); 0 = off
    optimizer: str = "adamw"  # "adamw8bit": 8-bit moments from torchao or bitsandbytes (2 B/parameter, not 8)
    # stage 3: recompute each student decoder layer's forward in backward instead of keeping its activations
    activation_checkpointing: bool = False
    # stages 1/2: train the layers this many at a time, block after block, each block a whole pass over the stage's
    # tokens with only its layers on the GPU; None = all layers in one pass. Same result, less memory, more time.
    layer_block: int | None = None
    # stages 1/2: keep the teacher's weights in CPU memory and move each of its modules' weights to the GPU only for
    # that module's forward (accelerate's offload hooks). Same result, the teacher off the GPU, slower teacher forward.
    teacher_offload: bool = False
    # stage 3: "online" runs the teacher beside the student; "topk" precomputes its top-k logits once into
    # RUN/teacher_logits/ (teacher_topk per position, k * 6 + 4 bytes per token on disk) and trains against them
    # with the teacher off the GPU (the KL coarsened to the top k + the rest: radistill.distill.losses)
    teacher_logits: str = "online"
    teacher_topk: int = 64
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint_every: int = 500  # optimizer steps; checkpoints are also written at the end of each stage and block
    log_every: int = 10
    # stage 1 only: after it, measure the static normalisers' statistics again (stage 1 changed the mixers whose
    # output they map onto the teacher's scale); radistill.hybrid.calibrate.recalibrate_normalizers
    recalibrate: bool = False


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut; see ``radistill/distill/data.py``."""

    source: str = ""
    text_field: str = "text"
    split: str = "train"  # HF datasets only
    name: str | None = None  # HF dataset config name
    shuffle_window: int = 1024  # documents are shuffled within consecutive windows of this many
    heldout_docs: int = 200  # documents kept out of training, for perplexity
    heldout_stride: int = 50  # ... taken as every stride-th document from the start
    # "concat": documents run on across one position range per sequence, attention and recurrent state crossing
    # their boundaries; "documents": positions restart at 0 at each document, attention stays inside it and the
    # recurrent heads' state resets there (teacher and student alike; radistill/models/packing.py)
    packing: str = "concat"
    bos: bool = False  # start every document with the tokenizer's BOS token (as evaluation prompts do)
    # teacher-generated text mixed in: this share of the training sequences is packed from text the teacher wrote
    # (radistill/distill/teacher_text.py), continuing prompts cut from the training documents
    teacher_share: float = 0.0
    teacher_dir: str | None = None  # where the generated text is kept (None: RUN/teacher_text); reusable across runs
    teacher_documents: int = 2000  # texts generated (once; the mix cycles through them)
    teacher_prompt_tokens: int = 32  # prompt: the first tokens of a training document
    teacher_new_tokens: int = 480  # tokens sampled after each prompt (fewer where the teacher ends with EOS)
    teacher_temperature: float = 1.0
    teacher_top_p: float = 0.95
    teacher_batch_size: int = 64  # prompts per generate() call


def _default_stages() -> dict[int, StageConfig]:
    return {
        1: StageConfig(enabled=False, tokens=80_000_000, lr=1e-4, trainable="recurrent"),
        2: StageConfig(tokens=5_000_000_000, lr=1e-4, trainable="all"),
        3: StageConfig(tokens=20_000_000_000, lr=1e-5, trainable="all"),
    }


@dataclass
class DistillRecipe:
    stages: dict[int, StageConfig] = field(default_factory=_default_stages)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    dtype: str = "bf16"  # compute dtype under autocast on CUDA; master weights are always fp32. CPU runs fp32.
    compile: bool = False  # torch.compile the student's layers (CUDA)
    tensorboard: bool = False
    keep_checkpoints: int = 2  # resumable checkpoints kept on disk (the newest ones)
    gpu_memory: str | None = None  # e.g. "24GiB": plan the run for this GPU memory and apply the plan (memplan)
    parallel: str = "ddp"  # stage 3 over several ranks: "ddp" (replicated student) or "fsdp" (FSDP2, sharded)
    shard_teacher: bool = False  # fsdp: shard the frozen teacher (all but its LM head) over the ranks too; stage 3 only

    def __post_init__(self):
        self.validate()

    def stage(self, number: int) -> StageConfig:
        return self.stages[number]

    def enabled_stages(self) -> list[int]:
        return [s for s in STAGES if self.stages[s].enabled]

    def validate(self) -> None:
        if set(self.stages) != set(STAGES):
            raise RadistillError(f"a recipe has stages 1, 2 and 3 (got {sorted(self.stages)})")
        if self.dtype not in DTYPES:
            raise RadistillError(f"recipe dtype '{self.dtype}' is not one of {', '.join(DTYPES)}")
        for number, st in self.stages.items():
            where = f"stage {number}"
            if st.schedule not in SCHEDULES:
                raise RadistillError(f"{where}: schedule '{st.schedule}' is not one of {', '.join(SCHEDULES)}")
            _validate_trainable(st, number, where)
            if st.trainable == "lora" and number != 3:
                raise RadistillError(f"{where}: trainable 'lora' is for stage 3 only (stages 1/2 train layer by layer)")
            _validate_memory_fields(st, number, where)
            _validate_teacher_logits(st, number, where)
            if st.teacher_logits == "topk" and self.shard_teacher:
                raise RadistillError(f"{where}: teacher_logits 'topk' takes the teacher off the GPU for stage 3, and "
                                     "its precompute runs the whole teacher on each rank: drop shard_teacher")
            for name in ("tokens", "seq_len", "batch_size", "grad_accum", "checkpoint_every", "log_every", "lora_rank"):
                if getattr(st, name) < 1:
                    raise RadistillError(f"{where}: {name} must be at least 1 (got {getattr(st, name)})")
            if st.lr <= 0 or not 0 <= st.warmup < 1 or not 0 <= st.decay <= 1 or st.warmup + st.decay > 1:
                raise RadistillError(
                    f"{where}: need lr > 0, 0 <= warmup < 1, 0 <= decay <= 1 and warmup + decay <= 1 "
                    f"(got lr {st.lr}, warmup {st.warmup}, decay {st.decay})"
                )
            if st.loss.temperature <= 0 or st.loss.chunk_tokens < 1 or st.loss.kl_weight < 0 or st.loss.ce_weight < 0:
                raise RadistillError(f"{where}: loss needs temperature > 0, chunk_tokens >= 1, weights >= 0")
            if number == 3 and st.loss.kl_weight == 0 and st.loss.ce_weight == 0:
                raise RadistillError("stage 3: kl_weight and ce_weight are both 0, so nothing would be learned")
        if self.keep_checkpoints < 1:
            raise RadistillError("keep_checkpoints must be at least 1")
        _validate_data_options(self.data)
        if self.data.teacher_share > 0 and self.shard_teacher:
            raise RadistillError("data.teacher_share generates text with the whole teacher on one device: drop "
                                 "shard_teacher, or generate the text in a run without it and point data.teacher_dir "
                                 "at it")
        self._validate_parallel()

    def _validate_parallel(self) -> None:
        if self.parallel not in PARALLEL:
            raise RadistillError(f"recipe parallel '{self.parallel}' is not one of {', '.join(PARALLEL)}")
        _require_bool(self.shard_teacher, "shard_teacher")
        if self.shard_teacher and self.parallel != "fsdp":
            raise RadistillError("shard_teacher shards the teacher with FSDP2: set parallel to fsdp (--parallel fsdp)")
        if self.shard_teacher and (self.stages[1].enabled or self.stages[2].enabled):
            raise RadistillError(
                "shard_teacher is for stage 3 only: stages 1/2 run the whole teacher on every rank. Run them without "
                "it (--stages 2), then stage 3 on RUN/stage2 with --stages 3 --parallel fsdp --shard-teacher"
            )
        if self.parallel != "fsdp":
            return
        # FSDP2 shards each parameter as a DTensor: adapters beside bf16-held frozen weights (lora) and the 8-bit
        # moments (adamw8bit) are not wired for that; fsdp already divides AdamW's moments by the number of ranks
        st = self.stages[3]
        if st.trainable == "lora":
            raise RadistillError("stage 3: trainable 'lora' does not run with parallel fsdp; use parallel ddp for "
                                 "LoRA, or train all (or recurrent/mixer) parameters with fsdp")
        if st.optimizer == "adamw8bit":
            raise RadistillError("stage 3: optimizer adamw8bit does not run with parallel fsdp (which already shards "
                                 "AdamW's moments over the ranks); use optimizer adamw, or parallel ddp")

    # --- serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["stages"] = {str(k): {**v, "betas": list(v["betas"])} for k, v in out["stages"].items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DistillRecipe":
        return merge(cls(), data)

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DistillRecipe":
        return cls.from_dict(read_recipe_file(path))


def _validate_memory_fields(st: StageConfig, number: int, where: str) -> None:
    from radistill.utils.optim import OPTIMIZERS  # here: it imports torch, and the CLI reads recipes without it

    if st.optimizer not in OPTIMIZERS:
        raise RadistillError(f"{where}: optimizer '{st.optimizer}' is not one of {', '.join(OPTIMIZERS)}")
    _require_bool(st.activation_checkpointing, f"{where}: activation_checkpointing")
    if st.activation_checkpointing and number != 3:
        raise RadistillError(f"{where}: activation_checkpointing is for stage 3 only (stages 1/2 already run each "
                             "layer's backward right after its forward, so there is nothing to recompute)")
    _require_bool(st.teacher_offload, f"{where}: teacher_offload")
    if st.teacher_offload and number == 3:
        raise RadistillError(f"{where}: teacher_offload is for stages 1/2 only (stage 3 runs the whole teacher on "
                             "every micro-batch); to take the teacher off the GPU in stage 3 use teacher_logits: topk")
    if st.layer_block is None:
        return
    if number == 3:
        raise RadistillError(f"{where}: layer_block is for stages 1/2 only (stage 3 trains every layer through one "
                             "loss); for stage 3 memory use activation_checkpointing, optimizer adamw8bit or lora")
    if not _is_count(st.layer_block):
        raise RadistillError(f"{where}: layer_block must be a whole number of layers >= 1, or null for all layers "
                             f"at once (got {st.layer_block!r})")


def trainable_parts(trainable: str) -> tuple[str, ...] | None:
    """The PARTS a comma-separated ``trainable`` names (sorted as PARTS), or None for one of TRAINABLE's names."""
    if trainable in TRAINABLE:
        return None
    names = [p.strip() for p in trainable.split(",") if p.strip()]
    return tuple(p for p in PARTS if p in names)


def _validate_trainable(st: StageConfig, number: int, where: str) -> None:
    if not isinstance(st.trainable, str):
        raise RadistillError(f"{where}: trainable must be a string (got {st.trainable!r})")
    if st.trainable not in TRAINABLE:
        names = [p.strip() for p in st.trainable.split(",") if p.strip()]
        unknown = [p for p in names if p not in PARTS]
        if unknown or not names:
            raise RadistillError(
                f"{where}: trainable '{st.trainable}' is not one of {', '.join(TRAINABLE)} nor a comma-separated list "
                f"of parts from {', '.join(PARTS)}"
            )
        if number == 1 and set(names) != {"recurrent"}:
            raise RadistillError(f"{where}: trains only what shapes the recurrent heads' mixing matrices: use "
                                 "trainable recurrent, mixer or all")
        if number == 2 and {"embeddings", "lm-head"} & set(names):
            raise RadistillError(f"{where}: stage 2 aligns each layer's output and never runs the embeddings or the "
                                 "LM head: train them in stage 3")
    _require_bool(st.recalibrate, f"{where}: recalibrate")
    if st.recalibrate and number != 1:
        raise RadistillError(f"{where}: recalibrate is for stage 1 only (it re-measures the normalisers after stage 1 "
                             "has changed the recurrent heads)")


def _validate_data_options(data: DataConfig) -> None:
    """The packing and teacher-text options (the rest of the data section is checked where it is read)."""
    if data.packing not in PACKING:
        raise RadistillError(f"data.packing '{data.packing}' is not one of {', '.join(PACKING)}")
    _require_bool(data.bos, "data.bos")
    share = data.teacher_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise RadistillError(f"data.teacher_share must be a number in [0, 1) (got {share!r}): the share of training "
                             "sequences packed from teacher-generated text")
    for name in ("teacher_documents", "teacher_prompt_tokens", "teacher_new_tokens", "teacher_batch_size"):
        if not _is_count(getattr(data, name)):
            raise RadistillError(f"data.{name} must be a whole number >= 1 (got {getattr(data, name)!r})")
    if not data.teacher_temperature > 0 or not 0 < data.teacher_top_p <= 1:
        raise RadistillError(f"data: teacher_temperature must be > 0 and teacher_top_p in (0, 1] (got "
                             f"{data.teacher_temperature!r}, {data.teacher_top_p!r})")


def _require_bool(value, name: str) -> None:
    """YAML's yes/no and JSON's strings are not booleans here: a setting that switches something is true or false."""
    if not isinstance(value, bool):
        raise RadistillError(f"{name} must be true or false (got {value!r})")


def _is_count(value) -> bool:
    """A whole number >= 1 (bool is an int in Python, and not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _validate_teacher_logits(st: StageConfig, number: int, where: str) -> None:
    if st.teacher_logits not in TEACHER_LOGITS:
        raise RadistillError(f"{where}: teacher_logits '{st.teacher_logits}' is not one of {', '.join(TEACHER_LOGITS)}")
    if st.teacher_logits == "topk" and number != 3:
        raise RadistillError(f"{where}: teacher_logits 'topk' is for stage 3 only (stages 1/2 read the teacher's "
                             "hidden states, not its logits)")
    if not _is_count(st.teacher_topk):
        raise RadistillError(f"{where}: teacher_topk must be a whole number >= 1 (got {st.teacher_topk!r})")


def read_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe file's contents as a dict (JSON, or YAML for ``.yaml``/``.yml``)."""
    path = Path(path)
    if not path.exists():
        raise RadistillError(f"recipe file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:
        raise RadistillError(f"recipe file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise RadistillError(f"recipe file {path} must hold a mapping at the top level")
    return data


# The options the measured fidelity candidates chose (docs/distill.md, "Which recipe keeps what"): the commands
# (`radistill distill`, `radistill run`) apply them under whatever the user sets. DistillRecipe() itself stays the
# plain MOHAWK recipe that library code, benchmarks and tests build on, so a candidate is compared with it.
RECOMMENDED_TEACHER_SHARE = 0.25


def with_recommended(recipe: DistillRecipe, explicit: dict[str, Any]) -> DistillRecipe:
    """``recipe`` with the recommended options that ``explicit`` (the user's recipe file and flags, as a partial
    recipe) does not set: a quarter of the training sequences from text the teacher generates (``data.teacher_share``
    0.25; on teacher-19m it kept in-context record lookups best of all candidates, 0.84 against 0.69), with no more
    texts than the run's budget reads once (``data.teacher_documents`` at most its default). Not with
    ``shard_teacher``, where no rank holds the whole teacher to generate with (the user's explicit share is refused
    there with the reason)."""
    data = explicit.get("data") or {}
    if "teacher_share" in data or recipe.shard_teacher:
        return recipe
    update: dict[str, Any] = {"teacher_share": RECOMMENDED_TEACHER_SHARE}
    if "teacher_documents" not in data:
        tokens = sum(recipe.stage(s).tokens for s in recipe.enabled_stages())
        per_text = recipe.data.teacher_prompt_tokens + recipe.data.teacher_new_tokens
        needed = math.ceil(RECOMMENDED_TEACHER_SHARE * tokens / per_text)
        update["teacher_documents"] = max(1, min(recipe.data.teacher_documents, needed))
    return merge(recipe, {"data": update})


def merge(recipe: DistillRecipe, overrides: dict[str, Any]) -> DistillRecipe:
    """A new recipe: ``recipe`` with ``overrides`` (a partial nested dict, as in a recipe file) applied.

    Stage keys may be ints or strings ("2"). Unknown keys raise, naming the key and the valid ones; so do values of
    the wrong type (:func:`radistill.utils.typed.check_fields`), naming the key and what it expects.
    """
    base = recipe.to_dict()
    _merge_into(base, overrides, "recipe")
    stages = {int(k): _build(StageConfig, v, f"stages.{k}") for k, v in base.pop("stages").items()}
    data = _build(DataConfig, base.pop("data"), "data")
    return DistillRecipe(stages=stages, data=data, **check_fields(DistillRecipe, base, ""))


def _merge_into(base: dict, overrides: dict, where: str) -> None:
    for key, value in overrides.items():
        key = str(key)
        if key not in base:
            raise RadistillError(f"unknown recipe key '{where}.{key}': valid keys are {', '.join(map(str, base))}")
        if isinstance(base[key], dict) and isinstance(value, dict):
            _merge_into(base[key], value, f"{where}.{key}")
        elif isinstance(base[key], dict):
            section = f"{where}.{key}".removeprefix("recipe.")
            raise RadistillError(f"recipe key '{section}' must be a mapping of settings, e.g. "
                                 f"{{{next(iter(base[key]))}: ...}} (got {value!r})")
        else:
            base[key] = value


def _build(cls, values: dict, where: str):
    values = check_fields(cls, dict(values), where)
    if cls is StageConfig:
        values["loss"] = LossConfig(**check_fields(LossConfig, values["loss"], f"{where}.loss"))
    try:
        return cls(**values)
    except TypeError as exc:
        raise RadistillError(f"recipe section '{where}': {exc}") from exc
