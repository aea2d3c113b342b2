"""The memory plan: sizes, the Nanbeige4.1-3B plan on 24 GiB, errors, and estimates against measured peaks.

Measured peaks: on CPU, live tensor storage counted op by op (``LiveTensors``); on CUDA, the allocator's peak.
The estimates come from meta-device dry runs of single layers, composed by ``Estimator``; the measurements run the
real objectives (radistill.distill.stages, radistill.finetune.train) with AdamW for two steps of two micro-batches.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from distill_helpers import char_tokenizer
from radistill.distill.recipe import LossConfig, StageConfig
from radistill.distill.stages import make_objective, set_activation_checkpointing, stage_modules
from radistill.finetune.lora import LoraSpec, add_lora
from radistill.finetune.train import enable_checkpointing, lm_loss
from radistill.hybrid.build import convert, student_config
from radistill.memplan import GiB, LiveTensors, Plan, Strategy, Workload, make_plan, measure_peak, parse_size, \
    require_fit
from radistill.memplan.estimate import Estimator
from radistill.memplan.scan import ProbeShape, scan_breakdown
from radistill.memplan.shapes import Shapes, hypothetical_kept_heads
from radistill.models import presets
from radistill.models.presets import random_model, tiny_config
from radistill.probes.items import encode_items
from radistill.probes.kv import KVProbeConfig, kv_items
from radistill.probes.scoring import LOGIT_CHUNK
from radistill.utils.errors import RadistillError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, T = 4, 128


pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def test_parse_size():
    assert parse_size("24GiB") == 24 << 30
    assert parse_size("24 GB") == 24 * 10**9
    assert parse_size("80g") == 80 << 30
    assert parse_size(1000) == 1000
    with pytest.raises(RadistillError, match="not a size"):
        parse_size("lots")


def test_live_tensors_counts_storage_once_and_frees():
    with LiveTensors() as live:
        a = torch.zeros(1000)  # 4000 B
        view = a.view(10, 100)  # same storage
        b = torch.ones(500)  # 2000 B
        del a, view
        c = b * 2  # a is gone by now
    assert (live.peak, live.live) == (6000, 4000)
    assert c.numel() == 500


@pytest.fixture(scope="module")
def nanbeige_plan() -> Plan:
    return make_plan("nanbeige4.1-3b", "24GiB", keep=13, state_size=8)


def test_nanbeige_plan_fits_24gib(nanbeige_plan):
    plan = nanbeige_plan
    assert plan.fits, [(s.step, s.memory.total / GiB) for s in plan.steps]
    require_fit(plan)
    stage3 = plan.step("distill stage 3").strategy
    # 4.1B parameters cannot train fully in 24 GiB with fp32 AdamW: the plan must have picked something leaner
    assert stage3.trainable == "lora" or stage3.optimizer == "adamw8bit"
    assert 0 < plan.step("distill stage 2").strategy.layers_at_once < 32  # 0 would be all layers at once
    assert plan.step("distill stage 3").strategy.logits_chunk > 0
    # 13 kept heads: ~10x less KV per token than 640 teacher heads' 4 KV heads x 32 layers
    student, teacher = plan.serving["student"], plan.serving["teacher"]
    assert teacher.kv_bytes_per_token == 32 * 4 * 2 * 128 * 2
    assert student.max_batch > 5 * teacher.max_batch
    assert student.max_context_b1 > teacher.max_context_b1
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))).to_dict() == plan.to_dict()


def test_impossible_budget_fails_before_compute_with_numbers():
    plan = make_plan("nanbeige4.1-3b", "8GiB", keep=13, state_size=8, steps=("distill stage 3",))
    assert not plan.fits
    with pytest.raises(RadistillError, match=r"distill stage 3 needs \d+\.\d GiB.*Lower --seq-len"):
        require_fit(plan)


def test_hypothetical_heads_use_distinct_kv_groups():
    config = presets.shape_config("nanbeige4.1-3b")
    kept = hypothetical_kept_heads(config, 70)
    assert sum(map(len, kept)) == 70
    assert all(len({h // 5 for h in heads}) == len(heads) for heads in kept if len(heads) <= 4)


def test_cli_plan_prints_table_and_json(tmp_path):
    from radistill.cli import app

    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", "nanbeige4.1-3b", "--gpu-memory", "24GiB", "--keep", "13",
                                      "--state-size", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "distill stage 3" in result.output and "serving" in result.output
    assert json.loads(out.read_text())["fits"] is True


# ---- estimate vs measured -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    """A small teacher (vocab 1024, 2 layers) and the shapes/estimator of its 3-head student, fp32 as on CPU."""
    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    teacher = random_model(config).to(DEVICE)
    config = student_config(teacher, [[1], [0, 2]], "discrete_mamba2", {"state_size": 8})
    work = Workload(seq_len=T, batch_size=B, dtype="fp32", lora_rank=8)
    return teacher, config, Estimator(Shapes(config), work)


def _two_steps(step, params):
    """Two AdamW steps of two micro-batches: optimizer state exists and gradients are held, as in a real run."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        for _ in range(2):
            step()
        optimizer.step()


def _measure(step, params, resident) -> int:
    return measure_peak(lambda: _two_steps(step, params), resident=resident, device=DEVICE)


CASES = {
    "stage 1": Strategy(micro_batch=B, trainable="recurrent"),
    "stage 2": Strategy(micro_batch=B),
    "stage 2 block": Strategy(micro_batch=B, layers_at_once=1),
    "stage 3": Strategy(micro_batch=B, logits_chunk=128),
    "stage 3 ckpt": Strategy(micro_batch=B, logits_chunk=128, checkpointing=True),
    "stage 3 topk": Strategy(micro_batch=B, logits_chunk=128, teacher="topk"),
    "finetune full": Strategy(micro_batch=B, logits_chunk=128),
    "finetune lora": Strategy(micro_batch=B, trainable="lora", logits_chunk=128),
    "finetune lora ckpt": Strategy(micro_batch=B, trainable="lora", logits_chunk=128, checkpointing=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_within_20_percent_of_measured(small, case):
    teacher, config, estimator = small
    strategy = CASES[case]
    student = convert(teacher, config).train()
    ids = torch.randint(0, config.vocab_size, (B, T), device=DEVICE)
    resident = [*student.parameters(), *teacher.parameters()]
    if case.startswith("stage"):
        stage = int(case[6])
        block = list(range(strategy.layers_at_once or 2))
        cfg = StageConfig(trainable="recurrent" if stage == 1 else "all", loss=LossConfig(chunk_tokens=128))
        if stage < 3:  # of the student, only what the trainer puts on the GPU for these stages
            modules = stage_modules(stage, student, block, cfg.trainable)
            resident = [*(p for m in modules for p in m.parameters()), *teacher.parameters()]
        set_activation_checkpointing(student, strategy.checkpointing)
        objective = make_objective(stage, student, teacher, cfg, block, block=block)
        params = [p for unit in objective.units.values() for p in unit]
        stored = None
        if strategy.teacher == "topk":  # the batch's stored top-k instead of the teacher
            k = estimator.w.topk
            stored = (torch.randn(B, T, k, device=DEVICE).log_softmax(-1).half(),
                      torch.rand(B, T, config.vocab_size, device=DEVICE).topk(k).indices.int())
            resident = [*student.parameters(), *stored]
        measured = _measure(lambda: objective.step(ids, 0.5, teacher_topk=stored), params, resident)
        estimate = (estimator.distill3(strategy) if stage == 3 else estimator.layerwise(stage, strategy)).total
        if stored is not None and DEVICE == "cuda":  # the teacher is not on the GPU in such a run
            measured -= sum(p.numel() * p.element_size() for p in teacher.parameters())
    else:
        model = add_lora(student, LoraSpec(rank=8), quiet=True)[0] if strategy.trainable == "lora" else student
        if strategy.checkpointing:
            enable_checkpointing(student)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        params = [p for p in model.parameters() if p.requires_grad]
        measured = _measure(lambda: (lm_loss(model, batch, 128) * 0.5).backward(), params,
                            list(model.parameters()))
        estimate = estimator.finetune(strategy).total
        # the teacher is not part of a finetune run
        if DEVICE == "cuda":
            measured -= sum(p.numel() * p.element_size() for p in teacher.parameters())
    assert abs(estimate / measured - 1) < 0.20, (case, estimate, measured)


def test_scan_only_plan_needs_no_student_and_counts_every_scored_positions_logits():
    plan = make_plan("nanbeige4.1-3b", "24GiB", steps=("scan",))
    scan = plan.step("scan")
    rows = scan.strategy.micro_batch
    assert scan.fits and rows * Workload().probe_scores > LOGIT_CHUNK  # enough rows to fill a logits chunk
    # 4,096 positions x 166,144 vocabulary x (bf16 logits, their fp32 copy, the log-softmax): 6.3 GiB, where one
    # position per row (0.3 GiB) was counted before
    assert scan.memory.logits == LOGIT_CHUNK * 166144 * (2 + 4 + 4)


@pytest.mark.parametrize("rows, chunk", [(4, 16), (32, 4), (256, 16)])
def test_plan_scan_row_matches_the_scan_plan_of_a_real_probe(rows, chunk):
    tokenizer = char_tokenizer()  # values of two digits are two tokens: tree-packed branches
    # a large vocabulary, as real models have, so that the logits are part of the peak
    config = tiny_config("llama", vocab_size=65536, num_hidden_layers=2)
    items = encode_items(tokenizer, kv_items(tokenizer, KVProbeConfig(pairs=20, samples=16)))
    probe = ProbeShape.of(items)
    assert probe.branches and 1 < probe.scores <= Workload().probe_scores  # the default bounds a real probe
    work = Workload(dtype="fp32", probe_tokens=probe.width, probe_samples=probe.items, probe_scores=probe.scores)
    shapes = Shapes(config, keep=0)
    st = Strategy(micro_batch=rows, trainable="none", optimizer="none", prompt_chunk=chunk)
    planned = Estimator(shapes, work).scan(st)
    exact = scan_breakdown(shapes, shapes.teacher, probe, st, torch.float32, shapes.layout.num_heads)
    assert planned.logits == exact.logits > 0
    # every row as long as the longest: a bound, close to the real probe's mix of lengths
    assert exact.total <= planned.total < 1.2 * exact.total
