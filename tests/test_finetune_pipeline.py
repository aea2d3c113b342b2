"""A Nanbeige4.1-3B-shaped model, shrunk in depth and width but keeping its head layout (20 query heads, 4 KV heads,
head_dim 128, untied embeddings, RoPE theta 7e7), through scan -> build -> a few distill steps -> generate ->
LoRA on the recurrent and kept heads -> merge, with the memory plan of its student."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from radistill.distill.trainer import Trainer
from radistill.finetune.data import Pair, pair_batches
from radistill.finetune.lora import LoraSpec, add_lora, merge_lora
from radistill.finetune.train import FinetuneConfig, train
from radistill.hybrid.build import build_student, load_selection
from radistill.memplan import Workload, make_plan, require_fit
from radistill.models.presets import SHAPES, random_model, tiny_config
from radistill.scan.run import probe_items, scan_model
from distill_helpers import char_tokenizer, tiny_recipe, write_corpus

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
NANBEIGE = SHAPES["nanbeige4.1-3b"]


def shrunk_nanbeige():
    # hidden 320: transformers wants hidden_size divisible by the 20 heads (Nanbeige: 2560 = 20 x 128)
    config = tiny_config(
        "llama", vocab_size=128, hidden_size=320, intermediate_size=640, num_hidden_layers=2,
        num_attention_heads=NANBEIGE["num_attention_heads"], num_key_value_heads=NANBEIGE["num_key_value_heads"],
        head_dim=NANBEIGE["head_dim"], tie_word_embeddings=False, rope_theta=NANBEIGE["rope_theta"],
        max_position_embeddings=4096,
    )
    return random_model(config, seed=0)


def test_nanbeige_layout_end_to_end(tmp_path):
    tokenizer = char_tokenizer()
    teacher = shrunk_nanbeige()
    c = teacher.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (20, 4, 128)
    assert teacher.config.rope_parameters["rope_theta"] == 7e7 and not teacher.config.tie_word_embeddings

    items, probe = probe_items(tokenizer, pairs=4, samples=6, seed=0, probe_file=None)
    scan = scan_model(teacher, tokenizer, "shrunk-nanbeige", items=items, probe=probe)
    assert len(scan.heads) == 40
    scan_json = scan.save(tmp_path / "scan")

    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, docs=30)
    student_dir = build_student(teacher, tmp_path / "student", scan=scan_json, keep=3, state_size=8,
                                tokenizer=tokenizer, calibration_data=corpus, calibration_tokens=512)
    assert load_selection(student_dir)["keep"] == 3
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    recipe = tiny_recipe(corpus, stages=(2, 3), tokens=16 * 4 * 2)
    results = Trainer(student, teacher, tokenizer, recipe, tmp_path / "run", "cpu").run()
    assert [r.stage for r in results] == [2, 3] and all(r.loss == r.loss for r in results)

    distilled = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "stage3").eval()
    prompt = tokenizer("apple:3\nThe value of apple is", return_tensors="pt")
    out = distilled.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, prompt.input_ids.shape[1] + 6)

    # LoRA on the recurrent heads and the three kept heads; every adapter must get a gradient (checked by train)
    peft_model, summary = add_lora(distilled, LoraSpec(rank=4), quiet=True)
    kept_layers = {h["layer"] for h in load_selection(student_dir)["kept_heads"]}
    assert len(summary.modules["kept-heads"]) == 3 * len(kept_layers)
    assert len(summary.modules["recurrent"]) == 2
    pairs = [Pair(f"key {w}:", f" {v}") for w, v in [("ash", 4), ("oak", 7), ("elm", 1), ("fir", 9)]]
    result = train(peft_model, pair_batches(tokenizer, pairs, 4, 32), FinetuneConfig(lora=None, steps=3, lr=1e-2),
                   "cpu")
    assert result.losses[-1] < result.losses[0]
    merged = merge_lora(peft_model)
    assert merged.generate(**prompt, max_new_tokens=2, do_sample=False).shape[1] == prompt.input_ids.shape[1] + 2

    # the memory plan reads the built student's config (its teacher's shape is derived from it)
    plan = make_plan(student_dir, "1GiB", workload=Workload(seq_len=256, batch_size=2))
    require_fit(plan)
    assert plan.serving["student"].kv_bytes_per_token < plan.serving["teacher"].kv_bytes_per_token
