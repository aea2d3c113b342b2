"""The loop's parts on their own (the Trainer's runs test them together): a stage's steps, the per-step record, the
NaN guard, the lr setter."""

from __future__ import annotations

import json
import math

import pytest
import torch

from radistill.distill import checkpoint as ckpt
from radistill.distill.guard import NonFiniteLossError, require_finite
from radistill.distill.metrics import MetricsLog, StageMeter
from radistill.distill.recipe import DistillRecipe, StageConfig
from radistill.distill.run import whole_step_notes
from radistill.distill.schedule import StagePlan, set_lr


@pytest.mark.parametrize("stage,world", [(1, 1), (2, 4), (3, 1), (3, 4)])
@pytest.mark.parametrize("tokens", [1, 1000, 4096, 4097, 100_000])
def test_stage_plan_follows_the_rule_run_distill_announces(stage, world, tokens):
    cfg = StageConfig(tokens=tokens, seq_len=64, batch_size=4, grad_accum=4)
    plan = StagePlan.make(stage, cfg, [[0, 1], [2]], world)
    shards = world if stage == 3 else 1  # stages 1/2 split layers over the processes, not data
    assert plan.data_shards == shards and plan.tokens_per_step == 64 * 4 * 4 * shards
    assert plan.per_block == max(1, tokens // plan.tokens_per_step) and plan.total == 2 * plan.per_block
    assert plan.span(1) == (plan.per_block, 2 * plan.per_block)
    # the warning run_distill prints names the same number of steps
    recipe = DistillRecipe.from_dict({"stages": {s: {"enabled": s == stage, "tokens": tokens, "seq_len": 64,
                                                     "batch_size": 4, "grad_accum": 4} for s in (1, 2, 3)}})
    notes = whole_step_notes(recipe, world)
    whole = plan.per_block * plan.tokens_per_step == tokens
    assert notes == [] if whole else f"runs {plan.per_block:,} step" in notes[0]


def test_stage_meter_counts_every_step_and_records_only_those_asked(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    with StageMeter(log, stage=2, steps=6, tokens_per_step=10, step=2, tokens=20) as meter:
        for step in range(3, 7):
            meter.stepped(step, loss=1.0 / step, grad_norm=0.5, lr=1e-3, block=0, record=step % 2 == 0)
    assert meter.tokens == 60 and meter.loss == pytest.approx(1 / 6)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["tokens"]) for r in records] == [(4, 40), (6, 60)]
    assert all(r["tokens_per_s"] > 0 and r["steps"] == 6 and r["stage"] == 2 for r in records)
    assert records[0]["elapsed"] <= records[1]["elapsed"] <= meter.elapsed()


def test_metrics_trim_keeps_records_up_to_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for stage, step in [(2, 1), (2, 2), (3, 1)]:
        log.write({"stage": stage, "step": step})
    log.trim(2, 2)
    assert [json.loads(x)["step"] for x in log.path.read_text().splitlines()] == [1, 2]
    log.clear()
    assert not log.path.exists()


def test_nan_guard_names_the_checkpoint_to_resume(tmp_path):
    require_finite(1.5, 0.3, stage=3, step=0, ckpt_root=tmp_path)  # finite: nothing happens
    with pytest.raises(NonFiniteLossError, match=r"stage 3, step 1: .*none \(nothing was saved yet\)"):
        require_finite(math.nan, 0.3, stage=3, step=0, ckpt_root=tmp_path)
    for step in (4, 2):
        (tmp_path / ckpt.checkpoint_name(3, step)).mkdir()
    (tmp_path / ckpt.LATEST).write_text(json.dumps({"checkpoint": ckpt.checkpoint_name(3, 2)}))
    with pytest.raises(NonFiniteLossError, match=r"stage 3, step 6: .*stage3-step00000002.*--lr-stage3"):
        require_finite(0.1, math.inf, stage=3, step=5, ckpt_root=tmp_path)
    (tmp_path / ckpt.LATEST).write_text("{")  # damaged: the newest by (stage, step), which --resume would check
    with pytest.raises(NonFiniteLossError, match=r"stage3-step00000004"):
        require_finite(math.inf, math.nan, stage=3, step=5, ckpt_root=tmp_path)


def test_set_lr_sets_plain_and_tensor_learning_rates():
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [p]}, {"params": [], "lr": torch.tensor(1.0)}], lr=1.0)
    kept = optimizer.param_groups[1]["lr"]
    set_lr(optimizer, 0.25)
    assert optimizer.param_groups[0]["lr"] == 0.25
    assert optimizer.param_groups[1]["lr"] is kept and kept.item() == 0.25  # filled in place, never replaced
