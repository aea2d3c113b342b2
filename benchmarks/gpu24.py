"""A Nanbeige4.1-3B-shaped teacher and its 13-head, state-8 hybrid on one GPU capped at 24 GiB: does each stage fit?

Every distillation stage at sequence 2048 and a LoRA fine-tune run with the strategy ``radistill plan`` chooses
(random bf16 weights: memory and speed do not depend on their values); per stage the measured peak (CUDA
allocator), the plan's estimate and tokens/s. Then the serving limits, teacher vs hybrid: the longest context at
batch 1 and the largest batch at 32k that fit next to the weights, from the memory accounting and verified by
filling a cache to that size and prefilling one more chunk on top of it.

    python benchmarks/gpu24.py                 # H100: < 9 min, writes benchmarks/results/24gb.json
    python benchmarks/gpu24.py --quick         # CPU smoke run on tiny shapes (benchmarks/results/24gb-quick.json)

Stages 1/2 train the first block of ``layers_at_once`` layers (each block costs the same); their tokens/s is the
whole stage's rate (the block rate times the share of layers per block), since every block needs its own pass.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

# before CUDA starts: grown segments instead of fixed blocks, so a cap this tight is not lost to fragmentation
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from radistill.distill.recipe import LossConfig, StageConfig
from radistill.distill.stages import make_objective, set_activation_checkpointing, trained_layers, trained_module
from radistill.finetune.lora import LoraSpec, adapter_parameters, add_lora
from radistill.finetune.train import FinetuneConfig, enable_checkpointing, make_optimizer, train
from radistill.hybrid.build import convert
from radistill.hybrid.modeling import CACHE_FIELD
from radistill.memplan import GiB, LiveTensors, Workload, make_plan
from radistill.memplan.shapes import Shapes
from radistill.models import presets
from radistill.utils.io import write_json_atomic

from distill import seconds_per_call, versions  # noqa: E402  (benchmarks/distill.py)

RESULTS = Path(__file__).parent / "results"
KEEP, STATE_SIZE = 13, 8


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run on tiny shapes")
    parser.add_argument("--cap-gib", type=float, default=24.0)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per stage (after one warm-up)")
    parser.add_argument("--reserve", type=float, default=0.10,
                        help="share of the cap the plan leaves free (allocator fragmentation)")
    parser.add_argument("--serving-only", action="store_true",
                        help="measure only the serving limits; keep the stages of the result file already at --out")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


class Meter:
    """Peak memory and wall time of a block: the CUDA allocator's peak, or live tensors on CPU."""

    def __init__(self, device: str):
        self.device = device

    @contextmanager
    def measure(self, record: dict):
        cuda = self.device.startswith("cuda")
        tracker = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            tracker = LiveTensors().__enter__()
            tracker.add(t for t in _all_tensors())
        started = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize()
                record["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
            else:
                tracker.__exit__(None, None, None)
                record["peak_gib"] = tracker.peak / GiB
            record["seconds"] = time.perf_counter() - started


_MODELS: list[torch.nn.Module] = []


def _all_tensors():
    for model in _MODELS:
        yield from model.parameters()


def build_models(config, device: str):
    """Random bf16 teacher on ``device`` and its hybrid (kept heads spread as the plan assumes), built where the
    teacher is (``convert`` works in the teacher's dtype: both fit under the cap) and left there; each step then
    moves what it needs (stages 1/2 start by sending the student to CPU memory)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # random init of 3.9B values: minutes on the CPU, a second on the GPU
        teacher = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    student_config = Shapes(config, keep=KEEP, state_size=STATE_SIZE).student_config
    student = convert(teacher, student_config)  # on the teacher's device and dtype
    _MODELS[:] = [teacher, student]
    return teacher.requires_grad_(False), student


def run_layerwise(stage: int, teacher, student, plan_step, work: Workload, args, device, meter) -> dict:
    st = plan_step.strategy
    layers = student.model.layers
    k = st.layers_at_once or len(layers)
    if st.teacher != "resident":
        return {"skipped": f"strategy teacher={st.teacher} is not implemented in this benchmark"}
    cfg = StageConfig(trainable="recurrent" if stage == 1 else "all", seq_len=work.seq_len, batch_size=st.micro_batch)
    block = trained_layers(stage, student, cfg.trainable)[:k]
    # as the trainer: only what the block trains (fp32 master weights; stage 1: just the recurrent mixers) and the
    # rotary embedding go to the GPU
    trained = [trained_module(stage, layers[i], cfg.trainable) for i in block]
    student.to("cpu")
    for module in trained:
        module.to(device=device, dtype=torch.float32)
    student.model.rotary_emb.to(device)
    objective = make_objective(stage, student, teacher, cfg, block, block=block)
    params = [p for unit in objective.units.values() for p in unit]
    student.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    record: dict = {}
    with meter.measure(record):
        rate = _time_objective(objective, params, st, work, student.config.vocab_size, args.steps, device)
    for module in trained:
        module.to(dtype=torch.bfloat16)
    student.zero_grad(set_to_none=True)  # Module.to would carry the gradients to the next stage's device
    student.to("cpu")
    record.update(tokens_per_s=rate * k / len(layers), block_tokens_per_s=rate)
    return record


def _time_objective(objective, params, st, work: Workload, vocab_size: int, steps: int, device) -> float:
    """Tokens/s of full optimizer steps of ``objective`` on random token ids (bf16 autocast)."""
    optimizer = make_optimizer(params, 1e-5, 0.0, st.optimizer)
    ids = torch.randint(0, vocab_size, (st.micro_batch, work.seq_len), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=True):
            objective.step(ids, 1.0)
        optimizer.step()

    return ids.numel() / seconds_per_call(step, device, steps)


def run_stage3(teacher, student, plan_step, work: Workload, args, device, meter) -> dict:
    st = plan_step.strategy
    if st.teacher != "resident":
        return {"skipped": f"strategy teacher={st.teacher} is not implemented in this benchmark"}
    student.to(device=device, dtype=torch.bfloat16 if st.trainable == "lora" else torch.float32)
    model, peft_model = student, None
    if st.trainable == "lora":
        peft_model = add_lora(student, LoraSpec(targets=work.lora_targets, rank=work.lora_rank), quiet=True)[0]
        model = peft_model.get_base_model()
    if st.checkpointing:
        enable_checkpointing(model)
    model.train()
    cfg = StageConfig(seq_len=work.seq_len, batch_size=st.micro_batch,
                      loss=LossConfig(chunk_tokens=st.logits_chunk or st.micro_batch * work.seq_len))
    objective = make_objective(3, model, teacher, cfg, [])
    if st.trainable == "lora":  # the trainer's "all" would train the base weights too
        objective.units = {"model": list(adapter_parameters(model).values())}
    params = objective.units["model"]
    record: dict = {}
    try:
        with meter.measure(record):
            record["tokens_per_s"] = _time_objective(objective, params, st, work, student.config.vocab_size,
                                                     args.steps, device)
    finally:
        if peft_model is not None:
            peft_model.unload()  # back to the plain student (the adapters are dropped, not merged)
        if st.checkpointing:
            set_activation_checkpointing(model, False)
    return record


def run_finetune(student, plan_step, work: Workload, args, device, meter) -> dict:
    st = plan_step.strategy
    model = student
    if st.trainable == "lora":
        model = add_lora(model, LoraSpec(targets=work.lora_targets, rank=work.lora_rank), quiet=True)[0]
    vocab = student.config.vocab_size

    def batches():
        while True:
            ids = torch.randint(0, vocab, (st.micro_batch, work.seq_len))
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    cfg = FinetuneConfig(lora=None, steps=1, lr=1e-4, batch_size=st.micro_batch, seq_len=work.seq_len,
                         optimizer=st.optimizer, checkpointing=st.checkpointing,
                         loss_chunk=st.logits_chunk or st.micro_batch * work.seq_len)
    train(model, batches(), cfg, device, autocast=True)  # warm-up: compilation, the adapters' gradient check
    cfg.steps = args.steps
    record: dict = {}
    with meter.measure(record):
        result = train(model, batches(), cfg, device, autocast=True)
    record["tokens_per_s"] = result.tokens_per_s
    return record


# ---- serving ------------------------------------------------------------------------------------------------------
def _filled_teacher_cache(model, batch: int, length: int, device):
    from transformers import DynamicCache

    c = model.config
    cache = DynamicCache(config=c)
    for i in range(c.num_hidden_layers):
        shape = (batch, c.num_key_value_heads, length, c.head_dim)
        cache.update(torch.empty(shape, device=device, dtype=torch.bfloat16),
                     torch.empty(shape, device=device, dtype=torch.bfloat16), i)
    return cache


def _filled_student_cache(model, batch: int, length: int, device):
    from radistill.hybrid import HybridCache

    c = model.config
    cache = HybridCache(c)
    for i, layer_cache in enumerate(cache.layers):
        mixer = model.model.layers[i].self_attn
        if mixer.attention is not None:
            shape = (batch, mixer.attention.num_kv_heads, length, c.head_dim)
            layer_cache.update(torch.empty(shape, device=device, dtype=torch.bfloat16),
                               torch.empty(shape, device=device, dtype=torch.bfloat16))
        if mixer.recurrent is not None:
            layer_cache.mixer_state(lambda m=mixer: m.recurrent.empty_state(batch, device, torch.bfloat16))
        layer_cache.advance(length)
    return cache


@torch.no_grad()
def verify_fit(model, which: str, batch: int, context: int, chunk: int, device: str) -> dict:
    """Fill a cache with ``context - chunk`` positions, run ``chunk`` more (1: a decoding step, more: a prefill
    chunk); report whether it fit and the peak."""
    fill = _filled_teacher_cache if which == "teacher" else _filled_student_cache
    record = {"batch": batch, "context": context, "step_tokens": chunk}
    try:
        torch.cuda.empty_cache() if device.startswith("cuda") else None
        torch.cuda.reset_peak_memory_stats() if device.startswith("cuda") else None
        cache = fill(model, batch, context - chunk, device)
        ids = torch.randint(0, model.config.vocab_size, (batch, chunk), device=device)
        positions = torch.arange(context - chunk, context, device=device)[None].expand(batch, -1)
        model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache})
        record["fits"] = True
        if device.startswith("cuda"):
            record["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
    except torch.OutOfMemoryError:
        record["fits"] = False
    finally:
        cache = None
    return record


def serving(model, which: str, limits, device: str, batch_context: int) -> dict:
    context = limits.max_context_b1
    if limits.max_positions:
        context = min(context, limits.max_positions)
    return {
        "max_context_b1": limits.max_context_b1,
        "max_batch_32k": limits.max_batch,
        "kv_bytes_per_token": limits.kv_bytes_per_token,
        "state_bytes": limits.state_bytes,
        # serving = holding the cache and decoding into it: one token on top of a full cache
        "verified_context_b1": verify_fit(model, which, 1, context, 1, device),
        "verified_batch": verify_fit(model, which, max(limits.max_batch, 1), batch_context, 1, device),
        # and, for the record, a prefill chunk on top: transformers' attention repeats a GQA layer's cached keys and
        # values per query head when a mask is needed, an extra (heads / kv_heads) x one layer's cache
        "prefill_context_b1": verify_fit(model, which, 1, context, min(2048, context // 2), device),
        "prefill_batch": verify_fit(model, which, max(limits.max_batch, 1), batch_context,
                                    min(256, batch_context // 2), device),
    }


def main() -> None:
    args = parse_args()
    if args.quick:
        device = "cpu"
        config = presets.tiny_config("llama", vocab_size=512, hidden_size=320, intermediate_size=640,
                                     num_hidden_layers=4, num_attention_heads=20, num_key_value_heads=4, head_dim=128,
                                     tie_word_embeddings=False, rope_theta=7e7, max_position_embeddings=8192)
        args.seq_len, args.batch_size, args.steps = 64, 2, 1
        cap, batch_context, keep_note = 0.25 * GiB, 1024, "quick CPU run on tiny shapes"
        globals()["KEEP"] = 3
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA device (or --quick)")
        device = "cuda"
        config = presets.shape_config("nanbeige4.1-3b")
        cap, batch_context, keep_note = args.cap_gib * GiB, 32768, None
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    work = Workload(seq_len=args.seq_len, batch_size=args.batch_size)
    plan = make_plan(config, int(cap), keep=KEEP, state_size=STATE_SIZE, workload=work, reserve=args.reserve,
                     serving_context=batch_context)
    meter = Meter(device)
    started = time.perf_counter()
    teacher, student = build_models(config, device)
    print(f"built the teacher and the hybrid in {time.perf_counter() - started:.0f} s", flush=True)
    out = args.out or RESULTS / ("24gb-quick.json" if args.quick else "24gb.json")
    result = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "cap_gib": cap / GiB,
        "model": "nanbeige4.1-3b shape, random bf16" if not args.quick else keep_note,
        "hybrid": {"keep": KEEP, "state_size": STATE_SIZE, "kept_heads": student.config.kept_heads},
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "versions": versions(),
        "stages": [],
        "serving": {},
        "plan": plan.to_dict(),
    }
    stages = result["stages"]
    if args.serving_only:
        earlier = json.loads(out.read_text())
        if earlier["device"] != result["device"] or earlier["cap_gib"] != result["cap_gib"]:
            raise SystemExit(f"--serving-only: {out} was measured on {earlier['device']} at {earlier['cap_gib']} GiB")
        stages.extend(earlier["stages"])
        result["stages_run"] = earlier.get("stages_run", "an earlier run of this script")
    runs = [("distill stage 1", lambda s: run_layerwise(1, teacher, student, s, work, args, device, meter)),
            ("distill stage 2", lambda s: run_layerwise(2, teacher, student, s, work, args, device, meter)),
            ("distill stage 3", lambda s: run_stage3(teacher, student, s, work, args, device, meter)),
            ("finetune", lambda s: run_finetune(student, s, work, args, device, meter))]
    # the finetune step has no teacher: it leaves the GPU before that step
    for name, run in [] if args.serving_only else runs:
        step = plan.step(name)
        if name == "finetune":
            teacher.to("cpu")
            student.to(device=device, dtype=torch.bfloat16)
        print(f"{name}: {step.strategy.describe()} (estimate {step.memory.total / GiB:.2f} GiB)", flush=True)
        try:
            record = run(step)
        except torch.OutOfMemoryError as exc:
            record = {"oom": str(exc).splitlines()[0]}
        stages.append({"name": name, "strategy": step.strategy.to_dict(), "estimate_gib": step.memory.total / GiB,
                       **record})
        print(f"  -> {json.dumps(record)}", flush=True)
        write_json_atomic(out, result)  # what is measured survives a run cut short

    student.to(device="cpu")
    teacher.to(device=device)
    served = result["serving"]
    for which, model, role in (("teacher", teacher, "teacher"), ("hybrid", student, "student")):
        started = time.perf_counter()
        if which == "hybrid":
            teacher.to("cpu")
            student.to(device=device, dtype=torch.bfloat16)
        served[which] = serving(model.eval(), role, plan.serving[role], device, batch_context)
        print(f"serving, {which} ({time.perf_counter() - started:.0f} s): {json.dumps(served[which])}", flush=True)
        write_json_atomic(out, result)
    print(json.dumps({k: result[k] for k in ("device", "cap_gib", "stages", "serving")}, indent=2))


if __name__ == "__main__":
    main()
