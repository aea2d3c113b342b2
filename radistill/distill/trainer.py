"""The distillation loop: stages in order, each a token budget of optimizer steps, resumable at any checkpoint.

Per optimizer step: ``grad_accum`` micro-batches (bf16 autocast on CUDA, fp32 master weights), per-unit
gradient clipping (per layer in stages 1/2, whole model in stage 3), a NaN/inf guard, AdamW, the lr from
:func:`lr_multiplier`. Every ``checkpoint_every`` steps and at the end of each stage (and layer block) a
checkpoint is published (``checkpoint.py``); at each stage's end the student is also exported as an HF checkpoint
``RUN/stageN/``.

Several processes (``torchrun``): stages 1/2 split the layers being trained over the ranks (every rank reads the
same batches, so the result equals one process's) and broadcast them back before every checkpoint and at the end
of each block; stage 3 is DDP or FSDP2 (``parallel``), each rank taking its slice of every global batch. FSDP2 trains
a sharded copy of the student, copied back whole at every checkpoint, so the student stays a plain module; with
``shard_teacher`` the teacher's layers are sharded too (stage-3-only runs).

A stage with ``trainable: lora`` injects LoRA adapters into the student (``radistill.finetune.lora``), trains only
them, checks after its first step that each got a gradient, and exports ``stageN/`` with them merged.

Stage 3 with ``teacher_logits: topk`` first has the teacher store its top-k logits of every sequence the stage will
read (``teacher_logits.py``; reused or continued when already there), then moves the teacher off the device and
trains each micro-batch against its stored top-k, read by the micro-batch's position in the stream.

Memory (what ``radistill.memplan`` plans; docs/24gb.md): the trainer puts on the device only what a stage runs.
Stages 1/2 need just the trained layers (for stage 1, their recurrent mixers), never the embeddings or LM head;
with ``layer_block`` they train one block of layers after another, each block a whole pass over the stage's data
with its own optimizer, and everything else waits in CPU memory in fp32. With ``teacher_offload`` (stages 1/2) the
teacher's weights stay in CPU memory too, each module's moved to the device only for its forward
(:func:`stream_teacher`), and the teacher is whole again after the stage. Stage 3 holds the whole student; with
LoRA under bf16 autocast its frozen base weights are held in bf16. ``activation_checkpointing`` recomputes each
student layer in stage 3's backward; ``optimizer: adamw8bit`` keeps 8-bit AdamW moments (torchao or
bitsandbytes). After each stage the student is back, in fp32, on the device it was given on.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from radistill.distill import checkpoint as ckpt
from radistill.distill.data import PackedStream
from radistill.distill.parallel import (
    all_reduce_sum, barrier, broadcast_layers, broadcast_object, copy_full, full_value, is_sharded,
    load_optimizer_state, optimizer_state_to_save, owned_layers, shard_frozen, stage_student,
)
from radistill.distill.recipe import DistillRecipe, StageConfig, merge
from radistill.distill.schedule import lr_multiplier
from radistill.distill.stages import (
    Objective, layer_blocks, make_objective, set_activation_checkpointing, stage_modules, stream_teacher,
    student_layers, trained_layers, trained_module,
)
from radistill.distill.teacher_logits import TeacherLogits, logits_settings, precompute
from radistill.finetune.lora import LoraSpec, adapter_parameters, add_lora, check_adapter_gradients, merged_copy
from radistill.models.access import decoder_layers
from radistill.scan.distributed import rank, world_size
from radistill.utils.console import console, is_main_process, progress
from radistill.utils.errors import RadistillError
from radistill.utils.optim import make_adamw, require_eight_bit

StepHook = Callable[[int, int], None]  # (stage, step) after every optimizer step; tests use it to interrupt


class NonFiniteLossError(RadistillError):
    """The loss or gradient norm became NaN/inf; training stopped before the bad update."""


@dataclass
class Position:
    """Where a resumed run continues: ``step`` optimizer steps of ``stage`` are done."""

    stage: int
    step: int  # counted over the whole stage: block b's steps follow block b-1's
    tokens: int
    data: dict
    checkpoint: Path
    blocks: list[list[int]] | None  # the stage's layer blocks as the checkpoint recorded them (None: not recorded)


@dataclass
class StageResult:
    stage: int
    steps: int
    tokens: int
    loss: float
    seconds: float


class Trainer:
    """Runs the recipe's enabled stages on ``student`` (trained in place) against the frozen ``teacher``.

    ``device``: where both models live; ``export_files``: files copied into every ``RUN/stageN/`` beside the HF
    checkpoint (e.g. the student's ``selection.json``).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, tokenizer, recipe: DistillRecipe, run_dir: Path,
                 device: str, export_files: tuple[Path, ...] = (), step_hook: StepHook | None = None):
        if recipe.data.teacher_share > 0 and not recipe.data.teacher_dir:  # recorded in recipe.json, for --resume
            recipe = merge(recipe, {"data": {"teacher_dir": str((Path(run_dir) / "teacher_text").resolve())}})
        self.student, self.teacher, self.tokenizer, self.recipe = student, teacher, tokenizer, recipe
        self.run_dir = Path(run_dir)
        self.device = device
        self.export_files = export_files
        self.step_hook = step_hook
        self.ckpt_root = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.autocast = device.startswith("cuda") and recipe.dtype == "bf16"
        self.fsdp = recipe.parallel == "fsdp" and world_size() > 1
        self.home = next(student.parameters()).device  # where the student goes back to after each stage
        # where the teacher goes back to after each stage (stage 3 with stored teacher logits and a streamed teacher
        # take it off the device; a run that streams it gives it in CPU memory)
        self.teacher_home = next(teacher.parameters()).device
        self._lowered: list[nn.Parameter] = []  # parameters _place() holds in bf16 for the current stage
        self._unstream: Callable[[], None] | None = None  # undoes stream_teacher() for the current stage
        teacher.requires_grad_(False).eval()
        self._compile([*student_layers(student), *decoder_layers(teacher)])
        if self.fsdp and recipe.shard_teacher:  # only stage 3 runs (the recipe checks), and the teacher stays frozen
            shard_frozen(teacher, device)
        for stage in recipe.enabled_stages():  # up front: a missing 8-bit library fails before any training
            if recipe.stage(stage).optimizer == "adamw8bit":
                eight_bit_library(stage)
        self._tensorboard = None
        if recipe.tensorboard and is_main_process():  # up front: a missing package fails before any training
            _summary_writer_class()

    # --- the run ------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> list[StageResult]:
        position = self._restore() if resume else self._check_fresh()
        if self.recipe.data.teacher_share > 0:
            self._teacher_texts()
        if self.recipe.tensorboard and is_main_process():  # only now: a refused --out gets no tensorboard/ folder
            self._tensorboard = _summary_writer_class()(self.run_dir / "tensorboard")
        if is_main_process():
            self.recipe.save(self.run_dir / "recipe.json")
            if position is None:  # nothing to continue: drop records of an attempt that never checkpointed
                self.metrics_path.unlink(missing_ok=True)
        results = []
        for stage in self.recipe.enabled_stages():
            if position is not None and stage < position.stage:
                continue
            here = position if position is not None and position.stage == stage else None
            results.append(self._train_stage(stage, here))
        if self._tensorboard is not None:
            self._tensorboard.close()
        return results

    def _check_fresh(self) -> None:
        """A new run goes only into a folder that holds no run: starting over would truncate one run's metrics,
        replace its recipe and exports and mix the two."""
        # rank 0 looks, before it writes recipe.json; the others must not look after it did
        found = broadcast_object(ckpt.run_artifacts(self.run_dir) if is_main_process() else None)
        if found:
            raise RadistillError(
                f"{self.run_dir} already holds a distillation run ({', '.join(found)}): pass --resume to continue "
                "it, or choose a new --out"
            )
        return None

    def _restore(self) -> Position | None:
        # rank 0 finds and hashes the checkpoint; the others learn the verdict (and raise the same error) from it
        verdict: tuple[str | None, str | None, str | None] = (None, None, None)
        if is_main_process():
            try:
                found, note = ckpt.resumable(self.ckpt_root)
                verdict = (str(found) if found else None, note, None)
            except ckpt.CheckpointError as exc:
                verdict = (None, None, str(exc))
        found, note, error = broadcast_object(verdict)
        if error is not None:
            raise ckpt.CheckpointError(error)
        if found is None:
            self._check_restartable()
            if is_main_process():
                console.print(f"[yellow]{self.run_dir} has no checkpoint yet: starting from the beginning[/]")
            return None
        path = Path(found)
        if note is not None and is_main_process():
            console.print(f"[yellow]{note}[/]")
        state = ckpt.load_trainer(path)
        if state["world_size"] != world_size():
            raise RadistillError(
                f"{path} was written by {state['world_size']} processes; resume it with the same number "
                f"(this run has {world_size()})"
            )
        # a recipe saved before a setting existed reads as that setting's default
        if DistillRecipe.from_dict(state["recipe"]).to_dict() != self.recipe.to_dict():
            raise RadistillError(
                f"the recipe differs from the one {self.run_dir} was started with ({self.run_dir / 'recipe.json'}): "
                "resume without changing settings, or start a new --out"
            )
        if self.recipe.stage(state["stage"]).trainable == "lora":  # the checkpoint holds the stage's adapters
            self._add_adapters(state["stage"])
        self.student.load_state_dict(ckpt.load_model_state(path))
        self._truncate_metrics(state["stage"], state["step"])
        if is_main_process():
            console.print(f"resuming from {path.name} ({state['tokens']:,} tokens into stage {state['stage']})")
        return Position(state["stage"], state["step"], state["tokens"], state["data"], path, state.get("blocks"))

    # --- one stage ----------------------------------------------------------------------------------------
    def blocks(self, stage: int) -> list[list[int]]:
        """The layer blocks ``stage`` trains one after the other: stages 1/2 its trained layers cut by
        ``layer_block`` (one block when unset); stage 3 one block of every layer."""
        cfg = self.recipe.stage(stage)
        if stage == 3:
            return [list(range(len(student_layers(self.student))))]
        return layer_blocks(trained_layers(stage, self.student, cfg.trainable), cfg.layer_block)

    def _train_stage(self, stage: int, position: Position | None) -> StageResult:
        cfg = self.recipe.stage(stage)
        layerwise = stage in (1, 2)
        data_shards = 1 if layerwise else world_size()
        if cfg.trainable == "lora":
            self._add_adapters(stage)
        blocks = self.blocks(stage)
        tokens_per_step = cfg.seq_len * cfg.batch_size * cfg.grad_accum * data_shards
        per_block = max(1, cfg.tokens // tokens_per_step)  # every block makes a whole pass over the stage's tokens
        total = per_block * len(blocks)
        step, tokens = 0, 0
        if position is not None:
            if position.blocks is not None and position.blocks != blocks:
                raise RadistillError(
                    f"{position.checkpoint} trained stage {stage} in layer blocks {position.blocks}, this run makes "
                    f"{blocks}: resume with the student the run was started with"
                )
            step, tokens = position.step, position.tokens
            _set_rng_state(ckpt.load_rank(position.checkpoint, rank())["rng"])
        if is_main_process() and step < total:
            passes = f"{len(blocks)} blocks of <= {len(blocks[0])} layers, each " if len(blocks) > 1 else ""
            console.print(
                f"stage {stage}: {passes}{per_block:,} steps of {tokens_per_step:,} tokens "
                f"({cfg.batch_size} x {cfg.seq_len} x {cfg.grad_accum} accum x {data_shards} ranks)"
            )
        self._place_teacher(stage)
        stored = None  # stage 3's precomputed teacher logits (teacher_logits: topk)
        if cfg.teacher_logits == "topk" and step < total:
            stored = self._teacher_logits(stage, cfg, total * cfg.grad_accum * cfg.batch_size * data_shards)
        self.student.train()
        started, last_loss = time.perf_counter(), float("nan")
        window_start, window_tokens = started, 0
        with progress() as bar:
            task = bar.add_task(f"stage {stage}", total=total, completed=step, status="")
            for index, block in enumerate(blocks):
                first, end = index * per_block, (index + 1) * per_block
                if step >= end:
                    continue
                self._place(stage, block)
                mine = owned_layers(block) if layerwise else block
                student, wrap = stage_student(stage, self.student, fsdp=self.fsdp, device=self.device,
                                              bf16=self.autocast, compile_layers=self._compile)
                objective = make_objective(stage, student, self.teacher, cfg, mine, wrap=wrap,
                                           block=block if layerwise else None, compile_loss=self.compiles)
                optimizer = self.make_optimizer(objective, cfg)
                stream = PackedStream(self.recipe.data, self.tokenizer, cfg.seq_len, seed=self._seed(stage))
                if position is not None and first < step:  # resumed inside this block: its data and optimizer
                    self._load_optimizer(objective, optimizer, position.checkpoint)
                    stream.load_state_dict(position.data)
                while step < end:
                    loss, grad_norm, lr = self.step(objective, optimizer, stream, cfg, stage, step, per_block,
                                                    data_shards, first=first, teacher_logits=stored)
                    step += 1
                    tokens += tokens_per_step
                    window_tokens += tokens_per_step
                    last_loss = loss
                    if step % cfg.log_every == 0 or step == end:
                        now = time.perf_counter()
                        rate = window_tokens / max(now - window_start, 1e-9)
                        self._log(dict(stage=stage, step=step, steps=total, tokens=tokens, loss=loss, lr=lr,
                                       grad_norm=grad_norm, tokens_per_s=rate, elapsed=now - started, block=index))
                        bar.update(task, completed=step, status=f"loss {loss:.4f} · {rate:,.0f} tok/s")
                        window_start, window_tokens = now, 0
                    if step % cfg.checkpoint_every == 0 or step == end:
                        self._save(stage, step, tokens, stream, objective, optimizer, block if layerwise else None,
                                   blocks)
                    if self.step_hook is not None:
                        self.step_hook(stage, step)
                # the block's last step was checkpointed, which gathered its layers onto every rank
                del objective, optimizer  # the block's optimizer state goes before the next block's is made
        self._release(stage)
        if cfg.recalibrate:  # stage 1 only (the recipe checks)
            self._recalibrate()
        self._export(stage)
        self.student.requires_grad_(True).eval()
        return StageResult(stage, total, tokens, last_loss, time.perf_counter() - started)

    @property
    def compiles(self) -> bool:
        """Whether torch.compile is on: ``compile: true`` on CUDA (on CPU it would need a C++ toolchain)."""
        return self.recipe.compile and self.device.startswith("cuda")

    def _compile(self, layers) -> None:
        if self.compiles:
            # all decoder layers of a model share one forward, and dynamo counts its graphs per function: each
            # layer shape (kept-head count), grad mode and static/dynamic batch is one, so the default limit of 8
            # is soon reached, after which every new kind of layer silently runs eager
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            for layer in layers:
                layer.compile()

    def _gather(self, stage: int, block: list[int]) -> None:
        """Stages 1/2 over several processes: every rank gets the block's trained modules from their owners."""
        layers = student_layers(self.student)
        trainable = self.recipe.stage(stage).trainable
        broadcast_layers({i: trained_module(stage, layers[i], trainable) for i in block})

    def _place(self, stage: int, block: list[int]) -> None:
        """Put on the device what ``block`` of ``stage`` runs; the rest of the student waits in CPU memory.

        Stages 1/2: the modules the objective uses (:func:`stage_modules`), in fp32 (master weights); the rest stays
        fp32 too, so nothing is rounded between blocks and stages. Stage 3: the whole student (under FSDP2 the student
        stays, and :func:`stage_student` shards a copy onto the device); with LoRA under bf16
        autocast the frozen base weights are held in bf16 (the plan's numeric policy: they never get an update, and
        autocast would compute with bf16 copies of them anyway), the adapters in fp32.
        """
        cfg = self.recipe.stage(stage)
        if stage in (1, 2):
            self.student.to("cpu")
            for module in stage_modules(stage, self.student, block, cfg.trainable):
                module.to(self.device)
            return
        if cfg.trainable == "lora" and self.autocast:
            adapters = {id(p) for p in adapter_parameters(self.student).values()}
            self._lowered = [p for p in self.student.parameters() if id(p) not in adapters and p.is_floating_point()]
            for p in self._lowered:  # cast before the move: the fp32 base never has to fit on the device
                p.data = p.data.to(self.device, torch.bfloat16)
        if not self.fsdp:  # under FSDP2 only the shards of a copy go to the device (:func:`stage_student`)
            self.student.to(self.device)
        if cfg.activation_checkpointing:
            set_activation_checkpointing(self.student, True)

    def _place_teacher(self, stage: int) -> None:
        """The teacher where ``stage`` runs it: on the device, or with ``teacher_offload`` in CPU memory with its
        forward on the device (:func:`stream_teacher`, undone by :meth:`_release`). A sharded teacher stays sharded."""
        if is_sharded(self.teacher):
            return
        if self.recipe.stage(stage).teacher_offload:
            self._unstream = stream_teacher(self.teacher, self.device)
        else:
            self.teacher.to(self.device)

    def _release(self, stage: int) -> None:
        """Undo :meth:`_place` and :meth:`_place_teacher`: the student whole, in fp32, on the device it came on
        (exports merge adapters in fp32, and the next stage starts from the same state whatever this one held where);
        the teacher a plain module again, where it was given."""
        if self.recipe.stage(stage).activation_checkpointing:
            set_activation_checkpointing(self.student, False)
        for p in self._lowered:
            p.data = p.data.float()
        self._lowered = []
        # a stage's last gradients would follow the student to the next stage's device (Module.to moves them), and
        # those of weights the next stage freezes (LoRA's base) would stay there all stage
        self.student.zero_grad(set_to_none=True)
        self.student.to(self.home)
        if self._unstream is not None:
            self._unstream()
            self._unstream = None
        if not is_sharded(self.teacher):
            self.teacher.to(self.teacher_home)

    def _teacher_texts(self) -> None:
        """data.teacher_share: the teacher's texts generated (or finished) before any stage reads them, by rank 0,
        with the teacher on the device (teacher_text.py)."""
        from radistill.distill.teacher_text import generate_texts

        if is_main_process():
            home = next(self.teacher.parameters()).device
            self.teacher.to(self.device)
            generate_texts(self.teacher, self.tokenizer, self.recipe.data, self.recipe.data.teacher_dir,
                           self.recipe.seed)
            self.teacher.to(home)
        barrier()

    def _recalibrate(self) -> None:
        """The static normalisers measured again after stage 1 on the build's calibration text (the training data's
        first documents), every rank alike, beside the teacher; the student comes back to where it was."""
        from radistill.hybrid.calibrate import calibration_batches, recalibrate_normalizers

        batches = calibration_batches(self.tokenizer, self.recipe.data.source)
        device = next(self.teacher.parameters()).device  # where the teacher waits between stages
        self.student.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast and device.type == "cuda"):
            tokens = recalibrate_normalizers(self.student, self.teacher, batches)
        self.student.to(self.home)
        if is_main_process():
            console.print(f"stage 1: normalisers recalibrated on {tokens:,} tokens")

    def _seed(self, stage: int) -> int:
        """``stage``'s own seed: its data order (and stored teacher logits), its LoRA adapters' initialisation."""
        return self.recipe.seed * 1000 + stage

    def _teacher_logits(self, stage: int, cfg: StageConfig, sequences: int) -> TeacherLogits:
        """Stage 3 with ``teacher_logits: topk``: the teacher's top-k of the first ``sequences`` sequences of the
        stage's stream (every rank's), computed or continued into ``RUN/teacher_logits/``; the teacher then leaves the
        device until the stage ends (:meth:`_release`), which is the point: stage 3 runs without it."""
        settings = logits_settings(self.teacher, self.tokenizer, self.recipe.data, self._seed(stage), cfg.seq_len,
                                   cfg.teacher_topk, cfg.loss.temperature)
        root = self.run_dir / "teacher_logits"
        precompute(self.teacher, self.tokenizer, root, settings, sequences, batch_size=cfg.batch_size,
                   chunk_tokens=cfg.loss.chunk_tokens, autocast=self.autocast)
        self.teacher.to("cpu")
        return TeacherLogits(root, settings, sequences)

    def _add_adapters(self, stage: int) -> None:
        """``stage``'s LoRA adapters injected into the student in place (unless there already), initialised from the
        recipe's seed, so that every rank and every attempt starts from the same ones."""
        if adapter_parameters(self.student):
            return
        cfg = self.recipe.stage(stage)
        with torch.random.fork_rng():
            torch.manual_seed(self._seed(stage))
            add_lora(self.student, LoraSpec(targets=cfg.lora_targets, rank=cfg.lora_rank), quiet=not is_main_process())

    def make_optimizer(self, objective: Objective, cfg: StageConfig) -> torch.optim.Optimizer:
        """AdamW (or 8-bit AdamW) over the objective's parameters, which alone are left requiring grad."""
        objective.student.requires_grad_(False)
        params = list({id(p): p for unit in objective.units.values() for p in unit}.values())
        for p in params:
            p.requires_grad_(True)
        # no weight decay on gains and biases (1-D), as usual for Transformers
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        library = eight_bit_library(objective.stage) if cfg.optimizer == "adamw8bit" else None
        return make_adamw(groups, cfg.lr, betas=cfg.betas, kind=cfg.optimizer, on_cuda=self.device.startswith("cuda"),
                          library=library, what=f"stage {objective.stage}")

    def _load_optimizer(self, objective: Objective, optimizer, checkpoint: Path) -> None:
        own = ckpt.load_rank(checkpoint, rank())["optimizer"]
        state = own if own is not None else ckpt.load_rank(checkpoint, 0)["optimizer"]
        load_optimizer_state(objective.student, optimizer, state)

    def step(self, objective: Objective, optimizer, stream: PackedStream, cfg: StageConfig, stage: int, step: int,
             total: int, data_shards: int, first: int = 0,
             teacher_logits: TeacherLogits | None = None) -> tuple[float, float, float]:
        """One optimizer step; ``step`` counts over the stage, ``first`` is the step its layer block began at and
        ``total`` the block's steps (the lr schedule runs over each block). ``teacher_logits``: stage 3 reads each
        micro-batch's teacher top-k there, by the stream position of its sequences, instead of running the teacher."""
        lr = cfg.lr * lr_multiplier(step - first, total, cfg)
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # torchao keeps lr as a tensor (no recompile when it moves)
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            position = stream.sequences  # of the batch's first sequence in the stream
            batch = stream.next_batch(cfg.batch_size * data_shards)
            if data_shards > 1:
                batch = batch[rank() * cfg.batch_size : (rank() + 1) * cfg.batch_size]
                position += rank() * cfg.batch_size
            topk = None
            if teacher_logits is not None:  # read by the CPU batch, whose tokens are checked against the stored ones
                topk = tuple(self._to_device(t) for t in teacher_logits.read(position, batch))
            positions = stream.position_ids(batch)  # None unless data.packing is "documents"
            batch = self._to_device(batch)
            extra = {} if positions is None else {"position_ids": self._to_device(positions)}
            with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.autocast):
                final = micro == cfg.grad_accum - 1  # DDP / FSDP2 reduce gradients on the last one only
                loss_sum += objective.step(batch, 1.0 / cfg.grad_accum, sync=final, teacher_topk=topk, **extra)
        if step == 0 and cfg.trainable == "lora":  # every adapter must be on the forward's path
            check_adapter_gradients(self.student)
        max_norm = cfg.clip if cfg.clip > 0 else float("inf")
        # the norm of sharded (FSDP2) gradients is a DTensor, already the whole model's
        norms = [full_value(torch.nn.utils.clip_grad_norm_(ps, max_norm)) for ps in objective.units.values()]
        squares = torch.stack(norms).double().square().sum() if norms else torch.zeros((), device=self.device)
        # stage 3 (DDP, FSDP2): each rank's loss is its shard's mean, every rank has the same grad norm; stages 1/2:
        # each rank sums its own layers' losses and grad norms. One reduction, and the step's only wait for the GPU.
        loss_total, squares = all_reduce_sum(torch.stack([loss_sum.double() / cfg.grad_accum, squares]))
        loss = loss_total / (data_shards if stage == 3 else objective.unit_count)
        grad_norm = (squares / (data_shards if stage == 3 else 1)) ** 0.5
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            try:
                last = ckpt.latest(self.ckpt_root)
            except ckpt.CheckpointError:  # --resume finds the newest intact one itself
                last = ckpt.checkpoints(self.ckpt_root)[-1] if ckpt.checkpoints(self.ckpt_root) else None
            raise NonFiniteLossError(
                f"stage {stage}, step {step + 1}: the loss is {loss} (gradient norm {grad_norm}); stopped before "
                f"applying it. The last good checkpoint is {last or 'none (nothing was saved yet)'}: lower the "
                f"learning rate (--lr-stage{stage}) or the clip, then --resume"
            )
        optimizer.step()
        return loss, grad_norm, lr

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        # a blocking copy to the GPU would wait for the kernels queued before it
        cuda = self.device.startswith("cuda")
        return (tensor.pin_memory() if cuda else tensor).to(self.device, non_blocking=cuda)

    # --- files --------------------------------------------------------------------------------------------
    def _save(self, stage: int, step: int, tokens: int, stream: PackedStream, objective: Objective, optimizer,
              block: list[int] | None, blocks: list[list[int]]) -> None:
        """``block``: the layers being trained (stages 1/2), gathered from their ranks first; None in stage 3."""
        layerwise = block is not None
        if layerwise:
            self._gather(stage, block)
        if objective.student is not self.student:  # a sharded copy trains (FSDP2): the student gets its weights
            copy_full(objective.student, self.student)
        name = ckpt.checkpoint_name(stage, step)
        partial = ckpt.partial_dir(self.ckpt_root, name)
        if is_main_process():
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            ckpt.save_model(self.student.state_dict(), partial)
            ckpt.save_trainer(dict(stage=stage, step=step, tokens=tokens, data=stream.state_dict(),
                                   world_size=world_size(), recipe=self.recipe.to_dict(), blocks=blocks), partial)
        barrier()
        own = optimizer_state_to_save(objective.student, optimizer, layerwise)
        ckpt.save_rank({"rng": _rng_state(), "optimizer": own}, partial, rank())
        barrier()
        if is_main_process():
            meta = dict(stage=stage, step=step, tokens=tokens, world_size=world_size())
            ckpt.publish(self.ckpt_root, name, meta, self.recipe.keep_checkpoints)
        barrier()

    def _export(self, stage: int) -> None:
        """``RUN/stageN/``: the student as a loadable HF checkpoint, published by rename."""
        if is_main_process():
            final = self.run_dir / f"stage{stage}"
            partial = self.run_dir / f".stage{stage}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            # adapters merged, so that every stageN/ is a plain radistill checkpoint
            exported = merged_copy(self.student) if adapter_parameters(self.student) else self.student
            exported.save_pretrained(partial)
            self.tokenizer.save_pretrained(partial)
            for extra in self.export_files:
                shutil.copy2(extra, partial / Path(extra).name)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
        barrier()

    def _log(self, record: dict) -> None:
        if not is_main_process():
            return
        with open(self.metrics_path, "a") as fh:  # append-only log; a resume trims it back to the checkpoint
            fh.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                self._tensorboard.add_scalar(f"stage{record['stage']}/{key}", record[key], record["tokens"])

    def _truncate_metrics(self, stage: int, step: int) -> None:
        """Drop log records written after the checkpoint being resumed (they will be logged again), and a torn last
        line (the process was killed mid-write; said in one line). A damaged line before the end is refused."""
        if not is_main_process() or not self.metrics_path.exists():
            return
        if ckpt.trim_metrics(self.metrics_path, (stage, step)):
            console.print(f"[yellow]{self.metrics_path}: dropped a torn last line (the run was killed while writing "
                          "it)[/]")

    def _check_restartable(self) -> None:
        """--resume with no checkpoint starts from the beginning, which is only right for a run that never got past
        its first checkpoint with the same recipe: not for a folder holding stage exports (its checkpoints were
        deleted) or another recipe's run."""
        exports = sorted(p.name for p in self.run_dir.glob("stage*") if p.is_dir())
        if exports:
            raise RadistillError(
                f"{self.run_dir} holds exported stages ({', '.join(exports)}) but no checkpoint to resume from: "
                "choose a new --out"
            )
        saved = self.run_dir / "recipe.json"
        if saved.exists():
            try:
                same = DistillRecipe.load(saved).to_dict() == self.recipe.to_dict()
            except (RadistillError, ValueError, KeyError, TypeError):
                same = False
            if not same:
                raise RadistillError(
                    f"{saved} is not this run's recipe (or is unreadable) and there is no checkpoint: resume with "
                    "the same settings, or choose a new --out"
                )


def eight_bit_library(stage: int) -> str:
    """The library 8-bit AdamW comes from (the one the memory plan names: torchao, else bitsandbytes)."""
    from radistill.memplan.plan import eight_bit_optimizer

    return require_eight_bit(eight_bit_optimizer(), f"stage {stage}")


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise RadistillError("--tensorboard needs the tensorboard package: pip install tensorboard (or drop the flag; "
                             "metrics.jsonl has the same numbers)") from exc
    return SummaryWriter



def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
