"""The static LayerNorm adapter: a fixed, calibrated per-channel affine map on each recurrent head's output.

A freshly initialised recurrent head replaces an attention head whose output feeds ``o_proj``. Its output has a
different scale and offset than the attention output it replaces (attention averages values; a linear recurrence
sums them with decaying weights, so its scale grows with the context), and ``o_proj`` was trained on the
attention output's statistics. The adapter maps, per recurrent head and channel,

    y' = (y - mu_student) / sigma_student * sigma_teacher + mu_teacher

with statistics measured once at build time on calibration text: ``mu_teacher``/``sigma_teacher`` from the
replaced head's attention output in the teacher (its slice of the ``o_proj`` input), ``mu_student``/
``sigma_student`` from the freshly initialised mixer's output on the same tokens and the same (teacher) layer
inputs. The statistics are buffers: saved with the checkpoint, never trained, so distillation learns the mixer
against a fixed, sensible output scale. See docs/hybrid.md.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

# Channels whose student output never varies (sigma ~ 0) must not blow up: below this std they pass the
# teacher mean through instead of dividing by ~0.
_MIN_STD = 1e-6


class StaticNormalizer(nn.Module):
    """Per (recurrent head, channel) affine map with fixed statistics; the identity until calibrated."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        # All [heads, head_dim]; persistent buffers so they travel with save_pretrained.
        self.register_buffer("student_mean", torch.zeros(num_heads, head_dim))
        self.register_buffer("student_std", torch.ones(num_heads, head_dim))
        self.register_buffer("teacher_mean", torch.zeros(num_heads, head_dim))
        self.register_buffer("teacher_std", torch.ones(num_heads, head_dim))

    def reset_statistics(self, heads: torch.Tensor | None = None) -> None:
        """Back to the identity map (transformers' init functions: they skip buffers loaded from a checkpoint);
        ``heads`` [num_heads] bool: only those heads."""
        if heads is not None:
            with torch.no_grad():
                for name, value in (("student_mean", 0.0), ("teacher_mean", 0.0), ("student_std", 1.0),
                                    ("teacher_std", 1.0)):
                    getattr(self, name)[heads.to(self.student_mean.device)] = value
            return
        for name in ("student_mean", "teacher_mean"):
            init.zeros_(getattr(self, name))
        for name in ("student_std", "teacher_std"):
            init.ones_(getattr(self, name))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """y [batch, seq, heads, head_dim] -> same shape, in y's dtype (statistics applied in fp32)."""
        scale, shift = self._affine()
        if scale.dtype == y.dtype and y.element_size() <= 4:
            # In y's dtype: for float32 that is the reference itself (y.float() would be y); for a 16-bit model
            # (buffers cast with it) addcmul computes in fp32 internally and rounds once, the same value as
            # upcasting y, without materialising a float32 copy of a prefill-sized tensor
            return torch.addcmul(shift, y, scale)
        return torch.addcmul(shift, y.float(), scale).to(y.dtype)

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) [heads, head_dim] of y' = y * scale + shift, from the statistics as they are now.

        Kept between calls while no statistic changed: three operators per layer and call fewer (a prefill, every
        eager decode step). "Changed" is read off each buffer's storage address and version counter, which every
        write bumps (calibrate, reset_statistics, load_state_dict, any in-place edit) and every move or cast
        replaces. Computed afresh where that cannot be read or must not be skipped: while compiling (the graph
        computes it), while a CUDA graph captures (a replay must read the buffers as they are then), and for
        inference-mode buffers (they have no version counter)."""
        buffers = (self.teacher_std, self.student_std, self.teacher_mean, self.student_mean)
        if torch.compiler.is_compiling() or any(torch.is_inference(b) for b in buffers) or (
                buffers[0].is_cuda and torch.cuda.is_current_stream_capturing()):
            return self._compute_affine()
        # The cache holds the buffer objects themselves, so a freed buffer's address cannot come back under a new
        # tensor and match; inference-mode results are not reused outside it (autograd cannot save them).
        key = (torch.is_inference_mode_enabled(), *((b.data_ptr(), b._version) for b in buffers))
        cached = self.__dict__.get("_affine_cache")
        if cached is not None and cached[0] == key and all(a is b for a, b in zip(cached[1], buffers)):
            return cached[2], cached[3]
        scale, shift = self._compute_affine()
        self.__dict__["_affine_cache"] = (key, buffers, scale, shift)
        return scale, shift

    def _compute_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.teacher_std / self.student_std.clamp_min(_MIN_STD)
        return scale, torch.addcmul(self.teacher_mean, self.student_mean, scale, value=-1.0)

    def forward_reference(self, y: torch.Tensor) -> torch.Tensor:
        """The plain version of :meth:`forward`: y upcast to float32, the map applied, cast back."""
        scale = self.teacher_std / self.student_std.clamp_min(_MIN_STD)
        shift = torch.addcmul(self.teacher_mean, self.student_mean, scale, value=-1.0)
        return torch.addcmul(shift, y.float(), scale).to(y.dtype)

    @torch.no_grad()
    def calibrate(self, student: ChannelMoments, teacher: ChannelMoments) -> None:
        """Set the statistics from accumulated moments of the mixer output and the teacher's head output."""
        s_mean, s_std = student.mean_std()
        t_mean, t_std = teacher.mean_std()
        self.student_mean.copy_(s_mean)
        self.student_std.copy_(torch.where(s_std < _MIN_STD, torch.full_like(s_std, float("inf")), s_std))
        self.teacher_mean.copy_(t_mean)
        self.teacher_std.copy_(t_std)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}"


class ChannelMoments:
    """Running per-channel mean and variance over masked tokens (fp64 sums: calibration sees many tokens). The sums
    live on the device of the first ``y`` added (a GPU build then moves no prefill-sized fp64 tensor to the host)."""

    def __init__(self, num_heads: int, head_dim: int):
        self.count = 0
        self.sum = torch.zeros(num_heads, head_dim, dtype=torch.float64)
        self.sum_sq = torch.zeros(num_heads, head_dim, dtype=torch.float64)

    def add(self, y: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """y [batch, seq, heads, head_dim]; mask [batch, seq] (1 = real token) or None."""
        given = y.detach()
        if self.count == 0 and self.sum.device != given.device:
            self.sum, self.sum_sq = self.sum.to(given.device), self.sum_sq.to(given.device)
        y = given.to(self.sum.device, torch.float64)
        if mask is not None and not bool(mask.all()):
            y = y[mask.bool().to(y.device)]  # [tokens, heads, head_dim]
        else:  # no padding (packed text): the same rows in the same order, without the selection's copy
            y = y.reshape(-1, *y.shape[-2:])
        self.count += y.shape[0]
        self.sum += y.sum(0)
        owned = y.data_ptr() != given.data_ptr()  # a copy of ours may be squared in place; the caller's may not
        self.sum_sq += (y.square_() if owned else y * y).sum(0)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) [heads, head_dim] in fp32 (population std)."""
        if self.count == 0:
            raise ValueError("no tokens were accumulated")
        mean = self.sum / self.count
        var = (self.sum_sq / self.count - mean * mean).clamp_min(0.0)
        return mean.float(), var.sqrt().float()


__all__ = ["ChannelMoments", "StaticNormalizer"]
