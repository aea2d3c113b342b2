"""The distillation loop: the recipe's stages in order, each a token budget of optimizer steps, resumable at any
checkpoint.

:meth:`Trainer.run` checks the run folder or finds the checkpoint to resume (``resume.py``), then trains each
enabled stage: its layer blocks one after the other (``schedule.StagePlan``), each with its own objective
(``stages.py``), optimizer (``optimizer.py``) and pass over the stage's data (``data.py``), with only what the block
runs on the device (``placement.py``); then it recalibrates after stage 1 where asked and exports ``RUN/stageN/``.

One optimizer step (:meth:`Trainer.step`): ``grad_accum`` micro-batches (bf16 autocast on CUDA, fp32 master
weights), per-unit gradient clipping (per layer in stages 1/2, whole model in stage 3), the NaN/inf guard
(``guard.py``), AdamW, the lr from :func:`lr_multiplier`. Every ``log_every`` steps a record goes to
``RUN/metrics.jsonl`` (``metrics.py``); every ``checkpoint_every`` steps and at the end of each block a checkpoint
is published (``publish.py``, ``checkpoint.py``).

Several processes (``torchrun``): stages 1/2 split the layers being trained over the ranks (every rank reads the
same batches, so the result equals one process's) and broadcast them back before every checkpoint; stage 3 is DDP
or FSDP2 (``parallel.py``), each rank taking its slice of every global batch. FSDP2 trains a sharded copy of the
student, copied back whole at every checkpoint, so the student stays a plain module; with ``shard_teacher`` the
teacher's layers are sharded too (stage-3-only runs).

A stage with ``trainable: lora`` injects LoRA adapters into the student, trains only them, checks after its first
step that each got a gradient, and exports ``stageN/`` with them merged. Stage 3 with ``teacher_logits: topk``
first has the teacher store its top-k logits of every sequence the stage will read (``teacher_logits.py``), then
moves the teacher off the device and trains each micro-batch against its stored top-k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from radistill.distill import checkpoint as ckpt
from radistill.distill.data import PackedStream
from radistill.distill.guard import NonFiniteLossError, require_finite
from radistill.distill.metrics import MetricsLog, StageMeter
from radistill.distill.optimizer import eight_bit_library, load_optimizer, make_optimizer
from radistill.distill.parallel import (
    all_reduce_sum, barrier, broadcast_layers, copy_full, full_value, optimizer_state_to_save, owned_layers,
    shard_frozen, stage_student,
)
from radistill.distill.placement import Placement
from radistill.distill.publish import export_stage, save_checkpoint
from radistill.distill.recipe import DistillRecipe, StageConfig, merge
from radistill.distill.resume import (
    Position, check_blocks, check_fresh, check_restartable, check_same_run, find_checkpoint, rng_state,
    set_rng_state,
)
from radistill.distill.schedule import StagePlan, lr_multiplier, set_lr
from radistill.distill.stages import (
    Objective, layer_blocks, make_objective, student_layers, trained_layers, trained_module,
)
from radistill.distill.teacher_logits import TeacherLogits, logits_settings, precompute
from radistill.finetune.lora import LoraSpec, adapter_parameters, add_lora, check_adapter_gradients
from radistill.models.access import decoder_layers
from radistill.scan.distributed import rank, world_size
from radistill.utils.console import console, is_main_process

StepHook = Callable[[int, int], None]  # (stage, step) after every optimizer step; tests use it to interrupt

__all__ = ["NonFiniteLossError", "Position", "StageResult", "StepHook", "Trainer", "eight_bit_library"]


@dataclass
class StageResult:
    """What a stage did: its optimizer steps, the tokens it trained on, its last loss and its wall time."""

    stage: int
    steps: int
    tokens: int
    loss: float
    seconds: float


class Trainer:
    """Runs the recipe's enabled stages on ``student`` (trained in place) against the frozen ``teacher``.

    ``device``: where both models live; ``export_files``: files copied into every ``RUN/stageN/`` beside the HF
    checkpoint (e.g. the student's ``selection.json``); ``step_hook``: called with (stage, step) after every step
    (and its checkpoint); an exception it raises stops the run there, the student and teacher put back as after a
    stage (a time limit's way to stop).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, tokenizer, recipe: DistillRecipe, run_dir: Path,
                 device: str, export_files: tuple[Path, ...] = (), step_hook: StepHook | None = None):
        if recipe.data.teacher_share > 0 and not recipe.data.teacher_dir:  # recorded in recipe.json, for --resume
            recipe = merge(recipe, {"data": {"teacher_dir": str((Path(run_dir) / "teacher_text").resolve())}})
        self.student, self.teacher, self.tokenizer, self.recipe = student, teacher, tokenizer, recipe
        self.run_dir = Path(run_dir)
        self.device, self.export_files, self.step_hook = device, export_files, step_hook
        self.ckpt_root = self.run_dir / "checkpoints"
        self.autocast = device.startswith("cuda") and recipe.dtype == "bf16"
        self.fsdp = recipe.parallel == "fsdp" and world_size() > 1
        self.placement = Placement(student, teacher, device, self.fsdp)
        teacher.requires_grad_(False).eval()
        self._compile([*student_layers(student), *decoder_layers(teacher)])
        if self.fsdp and recipe.shard_teacher:  # only stage 3 runs (the recipe checks), and the teacher stays frozen
            shard_frozen(teacher, device)
        for stage in recipe.enabled_stages():  # up front: a missing 8-bit library fails before any training
            if recipe.stage(stage).optimizer == "adamw8bit":
                eight_bit_library(stage)
        self.metrics = MetricsLog(self.run_dir, recipe.tensorboard)  # up front: a missing tensorboard fails now

    # --- the run ------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> list[StageResult]:
        """Train the recipe's enabled stages (with ``resume``, from the run folder's newest checkpoint on); one
        result per stage trained."""
        position = self._restore() if resume else check_fresh(self.run_dir)  # a fresh run has nothing to continue
        if self.recipe.data.teacher_share > 0:
            self._teacher_texts()
        self.metrics.open()  # only now: a refused --out gets no tensorboard/ folder
        if is_main_process():
            self.recipe.save(self.run_dir / "recipe.json")
        if position is None:  # nothing to continue: drop records of an attempt that never checkpointed
            self.metrics.clear()
        results = []
        for stage in self.recipe.enabled_stages():
            if position is None or stage > position.stage:
                results.append(self._train_stage(stage, None))
            elif stage == position.stage:
                results.append(self._train_stage(stage, position))
        self.metrics.close()
        return results

    def _restore(self) -> Position | None:
        """The checkpoint ``--resume`` continues from, loaded into the student (None: start from the beginning)."""
        path = find_checkpoint(self.ckpt_root)
        if path is None:
            check_restartable(self.run_dir, self.recipe)
            if is_main_process():
                console.print(f"[yellow]{self.run_dir} has no checkpoint yet: starting from the beginning[/]")
            return None
        state = ckpt.load_trainer(path)
        check_same_run(state, path, self.run_dir, self.recipe)
        if self.recipe.stage(state["stage"]).trainable == "lora":  # the checkpoint holds the stage's adapters
            self._add_adapters(state["stage"])
        self.student.load_state_dict(ckpt.load_model_state(path))
        self.metrics.trim(state["stage"], state["step"])
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
        """Train ``stage`` from the start, or from ``position`` inside it, then release, recalibrate, export."""
        cfg = self.recipe.stage(stage)
        if cfg.trainable == "lora":
            self._add_adapters(stage)
        plan = StagePlan.make(stage, cfg, self.blocks(stage), world_size())
        step, tokens = 0, 0
        if position is not None:
            check_blocks(position, stage, plan.blocks)
            step, tokens = position.step, position.tokens
            set_rng_state(ckpt.load_rank(position.checkpoint, rank())["rng"])
        if is_main_process() and step < plan.total:
            console.print(plan.describe(cfg))
        try:
            meter = self._train_blocks(stage, cfg, plan, position, step, tokens)
        except BaseException:
            # a step hook that raises (a time limit), the NaN guard or any other error stops the stage inside a block,
            # where stages 1/2 hold all but the block's layers in CPU memory and the teacher may be streamed: the
            # student is then left as a finished stage leaves it (whole, in fp32, on its device, in eval mode)
            self.placement.release()
            self.student.requires_grad_(True).eval()
            raise
        self.placement.release()
        if cfg.recalibrate:  # stage 1 only (the recipe checks)
            self._recalibrate()
        export_stage(self.run_dir, stage, self.student, self.tokenizer, self.export_files)
        self.student.requires_grad_(True).eval()
        return StageResult(stage, plan.total, meter.tokens, meter.loss, meter.elapsed())

    def _train_blocks(self, stage: int, cfg: StageConfig, plan: StagePlan, position: Position | None, step: int,
                      tokens: int) -> StageMeter:
        """The steps of ``stage`` from ``step`` (``tokens`` trained before it) on, block after block, with the teacher
        placed; returns the stage's meter. The student is left placed for the last block (:meth:`Placement.release`
        puts it back)."""
        self.placement.place_teacher(cfg)
        stored = None  # stage 3's precomputed teacher logits (teacher_logits: topk)
        if cfg.teacher_logits == "topk" and step < plan.total:
            stored = self._teacher_logits(stage, cfg, plan.total * cfg.grad_accum * cfg.batch_size * plan.data_shards)
        self.student.train()
        with StageMeter(self.metrics, stage, plan.total, plan.tokens_per_step, step, tokens) as meter:
            for index, block in enumerate(plan.blocks):
                first, end = plan.span(index)
                if step >= end:
                    continue
                objective, optimizer, stream = self._start_block(plan, cfg, block, position if first < step else None)
                while step < end:
                    loss, grad_norm, lr = self.step(objective, optimizer, stream, cfg, stage, step, plan.per_block,
                                                    plan.data_shards, first=first, teacher_logits=stored)
                    step += 1
                    meter.stepped(step, loss, grad_norm, lr, index, record=step % cfg.log_every == 0 or step == end)
                    if step % cfg.checkpoint_every == 0 or step == end:
                        self._save(plan, step, meter.tokens, stream, objective, optimizer, block)
                    if self.step_hook is not None:
                        self.step_hook(stage, step)
                # the block's last step was checkpointed, which gathered its layers onto every rank
                del objective, optimizer  # the block's optimizer state goes before the next block's is made
        return meter

    def _start_block(self, plan: StagePlan, cfg: StageConfig, block: list[int],
                     position: Position | None) -> tuple[Objective, torch.optim.Optimizer, PackedStream]:
        """The objective, optimizer and data stream that train ``block``: fresh, or as ``position`` (a resume
        inside this block) left them."""
        stage = plan.stage
        self.placement.place_student(stage, cfg, block, self.autocast)
        mine = owned_layers(block) if plan.layerwise else block
        student, wrap = stage_student(stage, self.student, fsdp=self.fsdp, device=self.device,
                                      bf16=self.autocast, compile_layers=self._compile)
        objective = make_objective(stage, student, self.teacher, cfg, mine, wrap=wrap,
                                   block=block if plan.layerwise else None, compile_loss=self.compiles)
        optimizer = self.make_optimizer(objective, cfg)
        stream = PackedStream(self.recipe.data, self.tokenizer, cfg.seq_len, seed=self._seed(stage))
        if position is not None:
            load_optimizer(objective, optimizer, position.checkpoint)
            stream.load_state_dict(position.data)
        return objective, optimizer, stream

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

    # --- what a stage needs besides its steps -------------------------------------------------------------
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
        self.student.to(self.placement.home)
        if is_main_process():
            console.print(f"stage 1: normalisers recalibrated on {tokens:,} tokens")

    def _seed(self, stage: int) -> int:
        """``stage``'s own seed: its data order (and stored teacher logits), its LoRA adapters' initialisation."""
        return self.recipe.seed * 1000 + stage

    def _teacher_logits(self, stage: int, cfg: StageConfig, sequences: int) -> TeacherLogits:
        """Stage 3 with ``teacher_logits: topk``: the teacher's top-k of the first ``sequences`` sequences of the
        stage's stream (every rank's), computed or continued into ``RUN/teacher_logits/``; the teacher then leaves the
        device until the stage ends (:meth:`Placement.release`), which is the point: stage 3 runs without it."""
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
        return make_optimizer(objective, cfg, on_cuda=self.device.startswith("cuda"))

    # --- one optimizer step -------------------------------------------------------------------------------
    def step(self, objective: Objective, optimizer, stream: PackedStream, cfg: StageConfig, stage: int, step: int,
             total: int, data_shards: int, first: int = 0,
             teacher_logits: TeacherLogits | None = None) -> tuple[float, float, float]:
        """One optimizer step, returning (loss, gradient norm, lr); ``step`` counts over the stage, ``first`` is the
        step its layer block began at and ``total`` the block's steps (the lr schedule runs over each block).
        Each micro-batch is ``(batch_size, seq_len)`` token ids, this rank's slice of the ``data_shards`` ranks'
        global batch. ``teacher_logits``: stage 3 reads each micro-batch's teacher top-k there, by the stream
        position of its sequences, instead of running the teacher."""
        lr = cfg.lr * lr_multiplier(step - first, total, cfg)
        set_lr(optimizer, lr)
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
        require_finite(loss, grad_norm, stage, step, self.ckpt_root)
        optimizer.step()
        return loss, grad_norm, lr

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        # a blocking copy to the GPU would wait for the kernels queued before it
        cuda = self.device.startswith("cuda")
        return (tensor.pin_memory() if cuda else tensor).to(self.device, non_blocking=cuda)

    def _save(self, plan: StagePlan, step: int, tokens: int, stream: PackedStream, objective: Objective, optimizer,
              block: list[int]) -> None:
        """Checkpoint ``step`` of the stage, ``block`` being trained: its layers (stages 1/2) gathered from their
        ranks, or the sharded copy's weights (FSDP2) copied into the student, first."""
        if plan.layerwise:  # every rank gets the block's trained modules from the ranks that own them
            layers, trainable = student_layers(self.student), self.recipe.stage(plan.stage).trainable
            broadcast_layers({i: trained_module(plan.stage, layers[i], trainable) for i in block})
        if objective.student is not self.student:  # a sharded copy trains (FSDP2): the student gets its weights
            copy_full(objective.student, self.student)
        state = dict(stage=plan.stage, step=step, tokens=tokens, data=stream.state_dict(), world_size=world_size(),
                     recipe=self.recipe.to_dict(), blocks=plan.blocks)

        def own() -> dict:  # this rank's part, made once rank 0 has written the student
            optimizer_state = optimizer_state_to_save(objective.student, optimizer, plan.layerwise)
            return {"rng": rng_state(), "optimizer": optimizer_state}

        save_checkpoint(self.ckpt_root, self.student, state, own, self.recipe.keep_checkpoints)
