"""Where the student and the teacher are while a stage trains, and putting them back after it.

What ``radistill.memplan`` plans (docs/24gb.md): only what a stage runs is on the device. Stages 1/2 need just the
trained layers (for stage 1, their recurrent mixers), never the embeddings or LM head; everything else waits in
CPU memory in fp32. With ``teacher_offload`` (stages 1/2) the teacher's weights stay in CPU memory too, each
module's moved to the device only for its forward (:func:`stream_teacher`). Stage 3 holds the whole student; with
LoRA under bf16 autocast its frozen base weights are held in bf16; ``activation_checkpointing`` recomputes each
student layer in its backward. After each stage (:meth:`Placement.release`) the student is back, whole and in fp32,
on the device it was given on, and the teacher a plain module where it was given; the trainer releases a stage that
stops with an error (a time limit's step hook, the NaN guard) just the same.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from radistill.distill.parallel import is_sharded
from radistill.distill.recipe import StageConfig
from radistill.distill.stages import set_activation_checkpointing, stage_modules, stream_teacher
from radistill.finetune.lora import adapter_parameters


class Placement:
    """Moves ``student`` and ``teacher`` to ``device`` for a stage and back to where they were at construction.

    ``fsdp``: stage 3 trains a sharded copy of the student (:func:`stage_student`), so the student itself stays.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, device: str, fsdp: bool):
        self.student, self.teacher, self.device, self.fsdp = student, teacher, device, fsdp
        self.home = next(student.parameters()).device  # where the student goes back to after each stage
        # where the teacher goes back to after each stage (stage 3 with stored teacher logits and a streamed teacher
        # take it off the device; a run that streams it gives it in CPU memory)
        self.teacher_home = next(teacher.parameters()).device
        self._lowered: list[nn.Parameter] = []  # parameters place_student() holds in bf16 for the current stage
        self._unstream: Callable[[], None] | None = None  # undoes stream_teacher() for the current stage
        # whether place_student() turned activation checkpointing on: a stage stopped before its first block (or
        # resumed past its last) has nothing to turn off (transformers 4 fails removing an input hook it never made)
        self._checkpointing = False

    def place_student(self, stage: int, cfg: StageConfig, block: list[int], autocast: bool) -> None:
        """Put on the device what ``block`` of ``stage`` runs; the rest of the student waits in CPU memory.

        Stages 1/2: the modules the objective uses (:func:`stage_modules`), in fp32 (master weights); the rest stays
        fp32 too, so nothing is rounded between blocks and stages. Stage 3: the whole student (under FSDP2 the student
        stays, and :func:`stage_student` shards a copy onto the device); with LoRA under bf16
        ``autocast`` the frozen base weights are held in bf16 (the plan's numeric policy: they never get an update,
        and autocast would compute with bf16 copies of them anyway), the adapters in fp32.
        """
        if stage in (1, 2):
            self.student.to("cpu")
            for module in stage_modules(stage, self.student, block, cfg.trainable):
                module.to(self.device)
            return
        if cfg.trainable == "lora" and autocast:
            adapters = {id(p) for p in adapter_parameters(self.student).values()}
            self._lowered = [p for p in self.student.parameters() if id(p) not in adapters and p.is_floating_point()]
            for p in self._lowered:  # cast before the move: the fp32 base never has to fit on the device
                p.data = p.data.to(self.device, torch.bfloat16)
        if not self.fsdp:  # under FSDP2 only the shards of a copy go to the device (:func:`stage_student`)
            self.student.to(self.device)
        if cfg.activation_checkpointing:
            set_activation_checkpointing(self.student, True)
            self._checkpointing = True

    def place_teacher(self, cfg: StageConfig) -> None:
        """The teacher where the stage runs it: on the device, or with ``teacher_offload`` in CPU memory with its
        forward on the device (:func:`stream_teacher`, undone by :meth:`release`). A sharded teacher stays sharded."""
        if is_sharded(self.teacher):
            return
        if cfg.teacher_offload:
            self._unstream = stream_teacher(self.teacher, self.device)
        else:
            self.teacher.to(self.device)

    def release(self) -> None:
        """Undo :meth:`place_student` and :meth:`place_teacher`: the student whole, in fp32, on the device it came on
        (exports merge adapters in fp32, and the next stage starts from the same state whatever this one held where);
        the teacher a plain module again, where it was given."""
        if self._checkpointing:
            set_activation_checkpointing(self.student, False)
            self._checkpointing = False
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
