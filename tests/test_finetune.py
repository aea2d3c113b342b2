"""LoRA on a tiny student: exact module lists and parameter counts, gradients, bypass detection, merge, CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import radistill.hybrid  # noqa: F401  (Auto registration)
from radistill.finetune.data import (IGNORE, Pair, document_batches, encode_marked, encode_pair, marked_batches,
                                     pair_batches)
from radistill.finetune.lora import LoraSpec, add_lora, adapter_parameters, load_adapter
from radistill.finetune.run import save_merged
from radistill.finetune.targets import parse_targets, target_modules
from radistill.finetune.train import FinetuneConfig, causal_lm_loss, train
from radistill.utils.errors import RadistillError
from distill_helpers import char_tokenizer, tiny_student, tiny_teacher

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

RANK = 4
KEPT = ((1,), (0, 2))  # layer 0 keeps head 1 (KV head 0); layer 1 keeps heads 0 and 2 (KV heads 0 and 1)
PAIRS = [Pair(f"Q: code of {w}?\nA:", f" {c}") for w, c in
         [("apple", "x7"), ("brick", "q2"), ("cloud", "m5"), ("delta", "k9"), ("ember", "z3"), ("frost", "p4")]]


@pytest.fixture
def student():
    return tiny_student(tiny_teacher(), kept=KEPT, state_size=8)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def expected_modules(targets: str) -> dict[str, list[str]]:
    layer = "model.layers.{}.self_attn."
    restricted = {
        "recurrent": [layer.format(i) + "recurrent.in_proj" for i in (0, 1)],
        "kept-heads": [layer.format(i) + f"attention.{p}_proj" for i in (0, 1) for p in "qkv"],
    }
    if targets != "all":
        return {g: restricted[g] for g in parse_targets(targets)}
    per_layer = ["self_attn.attention.q_proj", "self_attn.attention.k_proj", "self_attn.attention.v_proj",
                 "self_attn.recurrent.in_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    return {"all": [f"model.layers.{i}.{n}" for i in (0, 1) for n in per_layer]}  # module order


def expected_params(targets: str, c) -> int:
    """r (in + out) per adapted linear, from the config's numbers alone (hidden 64, 4 heads x 16, 2 KV heads)."""
    D, P, N, H = c.hidden_size, c.head_dim, c.mixer_settings["state_size"], c.num_attention_heads
    kept = [len(k) for k in KEPT]
    kv = [1, 2]
    recurrent = sum(RANK * (D + (H - k) * (2 * P + 2 * N + 1)) for k in kept)  # in_proj: x, z, b, c, A_log
    heads = sum(RANK * (D + k * P) + 2 * RANK * (D + v * P) for k, v in zip(kept, kv))
    if targets == "recurrent":
        return recurrent
    if targets == "recurrent,kept-heads":
        return recurrent + heads
    I = c.intermediate_size
    return recurrent + heads + 2 * RANK * ((H * P + D) + 2 * (D + I) + (I + D))  # o_proj, gate/up, down


@pytest.mark.parametrize("targets", ["recurrent", "recurrent,kept-heads", "all"])
def test_targeted_modules_and_parameter_counts_are_exact(student, targets):
    assert target_modules(student, targets) == expected_modules(targets)
    peft_model, summary = add_lora(student, LoraSpec(targets=targets, rank=RANK), quiet=True)
    assert summary.modules == expected_modules(targets)
    assert summary.trainable_params == expected_params(targets, student.config)
    assert summary.trainable_params == sum(p.numel() for p in adapter_parameters(peft_model).values())
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)


def test_restricted_is_a_small_fraction_of_all(student):
    c = student.config
    assert expected_params("recurrent,kept-heads", c) < 0.5 * expected_params("all", c)


def test_groups_that_match_nothing_fail_loudly(student):
    everything = tiny_student(tiny_teacher(), kept=((0, 1, 2, 3), (0, 1, 2, 3)))
    with pytest.raises(RadistillError, match="--lora-targets recurrent matches no module.*no recurrent heads"):
        target_modules(everything, "recurrent")
    with pytest.raises(RadistillError, match="no recurrent heads"):
        target_modules(tiny_teacher(), "recurrent,kept-heads")
    with pytest.raises(RadistillError, match="unknown group conv"):
        parse_targets("recurrent,conv")
    with pytest.raises(RadistillError, match="give it alone"):
        parse_targets("all,mlp")


@pytest.mark.parametrize("targets", ["recurrent,kept-heads", "all"])
def test_gradients_reach_every_adapter(student, tokenizer, targets):
    peft_model, _ = add_lora(student, LoraSpec(targets=targets, rank=RANK), quiet=True)
    cfg = FinetuneConfig(lora=None, steps=2, lr=1e-2, batch_size=3, seq_len=64, loss_chunk=16)
    train(peft_model, pair_batches(tokenizer, PAIRS, 3, 64), cfg, "cpu")
    # after the first update lora_B != 0, so the second backward gives every A and B a nonzero gradient
    for name, p in adapter_parameters(peft_model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_an_adapter_bypassed_by_its_forward_is_caught(student, tokenizer):
    peft_model, _ = add_lora(student, LoraSpec(rank=RANK), quiet=True)
    lora_layer = peft_model.get_base_model().model.layers[1].self_attn.recurrent.in_proj
    base = lora_layer.base_layer
    lora_layer.forward = lambda x, *a, **k: F.linear(x, base.weight, base.bias)  # a "fused kernel" on the raw weight
    cfg = FinetuneConfig(lora=None, steps=1, batch_size=3, seq_len=64)
    with pytest.raises(RadistillError, match=r"1 adapted module\(s\) got no gradient.*layers\.1\.self_attn\.recurrent"):
        train(peft_model, pair_batches(tokenizer, PAIRS, 3, 64), cfg, "cpu")


def test_merge_and_reload_give_the_adapted_logits(student, tokenizer, tmp_path):
    fresh = {k: v.clone() for k, v in student.state_dict().items()}
    peft_model, _ = add_lora(student, LoraSpec(targets="all", rank=RANK), quiet=True)
    cfg = FinetuneConfig(lora=None, steps=3, lr=1e-2, batch_size=3, seq_len=64)
    train(peft_model, pair_batches(tokenizer, PAIRS, 3, 64), cfg, "cpu")
    ids = tokenizer(["Q: code of apple?\nA: x7", "A longer line of text, 123"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = peft_model(**ids).logits
    base_logits = tiny_student(tiny_teacher(), kept=KEPT, state_size=8)(**ids).logits
    assert not torch.allclose(want, base_logits, atol=1e-3)  # the adapters changed something

    peft_model.save_pretrained(tmp_path / "adapter")
    other = tiny_student(tiny_teacher(), kept=KEPT, state_size=8)
    other.load_state_dict(fresh)
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(other, tmp_path / "adapter")(**ids).logits, want)

    save_merged(peft_model, tokenizer, None, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, want, atol=1e-5, rtol=1e-5)


def test_chunked_loss_equals_full_cross_entropy():
    hidden, weight = torch.randn(2, 9, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    labels = torch.randint(0, 30, (2, 9))
    labels[0, :4] = IGNORE
    got = causal_lm_loss(hidden, weight, labels, chunk=4)
    logits = hidden @ weight.t()
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got, [hidden, weight])
    g_want = torch.autograd.grad(want, [hidden, weight])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_pairs_put_the_loss_on_the_answer_only(tokenizer):
    ids, labels = encode_pair(tokenizer, Pair("Q: a?\nA:", " b1"), 64)
    prompt = len(tokenizer("Q: a?\nA:").input_ids)
    assert labels[:prompt] == [IGNORE] * prompt
    assert labels[prompt:] == ids[prompt:] and ids[-1] == tokenizer.eos_token_id
    assert ids[prompt:-1] == tokenizer(" b1", add_special_tokens=False).input_ids
    with pytest.raises(RadistillError, match="over --seq-len"):
        encode_pair(tokenizer, Pair("x" * 50, "y" * 20), 64)


def test_documents_are_one_row_each_with_the_loss_on_every_token(tokenizer):
    texts = ["apple is red.", "a much longer statement about a brick."]
    batch = next(document_batches(tokenizer, texts, batch_size=2, max_length=64, seed=0))
    lead = len(tokenizer("").input_ids)  # a beginning-of-text token, if the tokenizer adds one, is never a target
    rows = {}
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        assert (labels[n:] == IGNORE).all() and (labels[:lead] == IGNORE).all()
        assert torch.equal(labels[lead:n], ids[lead:n]) and int(ids[n - 1]) == tokenizer.eos_token_id
        rows[tuple(ids[:n - 1].tolist())] = n
    assert set(rows) == {tuple(tokenizer(t).input_ids) for t in texts}  # one document per row, none packed together
    with pytest.raises(RadistillError, match="no documents"):
        document_batches(tokenizer, [], 2, 64)


def test_marked_pieces_carry_the_loss_and_nothing_else(tokenizer):
    pieces = [("list: a=1 b=2\n", False), ("Q a?", False), (" 1", True), ("\nQ b?", False), (" 2", True)]
    ids, labels = encode_marked(tokenizer, pieces, 64)
    assert ids[:-1] == tokenizer("".join(p for p, _ in pieces)).input_ids and ids[-1] == tokenizer.eos_token_id
    scored = [i for i, label in enumerate(labels) if label != IGNORE]
    answer = [t for a in (" 1", " 2") for t in tokenizer(a, add_special_tokens=False).input_ids]
    assert [ids[i] for i in scored] == answer + [tokenizer.eos_token_id]
    assert all(labels[i] == ids[i] for i in scored)
    # the same text as a prompt/answer pair: the same ids, the loss on the last answer only
    pair_ids, pair_labels = encode_pair(tokenizer, Pair("".join(p for p, _ in pieces[:-1]), pieces[-1][0]), 64)
    assert pair_ids == ids and sum(label != IGNORE for label in pair_labels) == len(scored) - len(answer) // 2
    with pytest.raises(RadistillError, match="no scored piece"):
        encode_marked(tokenizer, [("context only", False)], 64)
    batch = next(marked_batches(tokenizer, [pieces, pieces[:3]], batch_size=2, max_length=64))
    assert int((batch["labels"] != IGNORE).sum()) == len(scored) + len(answer) // 2 + 1


def test_training_on_documents_memorises_them(student, tokenizer):
    texts = [f"{w} has code {c}." for w, c in [("apple", "x7"), ("brick", "q2"), ("cloud", "m5"), ("delta", "k9")]]
    cfg = FinetuneConfig(lora=None, steps=30, lr=3e-3, batch_size=4, seq_len=64, seed=0)
    result = train(student.requires_grad_(True), document_batches(tokenizer, texts, 4, 64), cfg, "cpu")
    assert result.losses[-1] < 0.2 * result.losses[0]  # measured: 5.56 -> 0.40


def test_cli_finetune_saves_adapter_and_merged_student(student, tokenizer, tmp_path):
    from radistill.cli import app

    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    (tmp_path / "student" / "selection.json").write_text(json.dumps({"keep": 3}))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in PAIRS))
    out = tmp_path / "ft"
    args = ["finetune", str(tmp_path / "student"), "--data", str(data), "--out", str(out), "--steps", "2",
            "--micro-batch", "3", "--seq-len", "64", "--lora-rank", str(RANK), "--merge", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "finetune.json").read_text())
    assert record["lora"]["trainable_params"] == expected_params("recurrent,kept-heads", student.config)
    assert len(record["result"]["losses"]) == 2
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert (out / "merged" / "selection.json").exists()
    AutoModelForCausalLM.from_pretrained(out / "merged")
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "already exists" in str(again.exception)


def test_merged_copy_exports_a_plain_student_and_leaves_the_adapters(student, tokenizer, tmp_path):
    from radistill.finetune.lora import merged_copy

    peft_model, _ = add_lora(student, LoraSpec(rank=RANK), quiet=True)
    train(peft_model, pair_batches(tokenizer, PAIRS, 3, 64), FinetuneConfig(lora=None, steps=2, lr=1e-2), "cpu")
    ids = tokenizer(["Q: code of brick?\nA:"], return_tensors="pt")
    with torch.no_grad():
        want = peft_model(**ids).logits
        plain = merged_copy(peft_model.get_base_model())
        torch.testing.assert_close(plain(**ids).logits, want, atol=1e-5, rtol=1e-5)
    assert not any("lora" in k for k in plain.state_dict())
    assert adapter_parameters(peft_model)  # the live model keeps training its adapters


def test_distill_plan_sets_micro_batch_and_logit_chunk():
    from radistill.distill.recipe import DistillRecipe
    from radistill.memplan.distill import plan_distill, recipe_overrides
    from radistill.memplan.shapes import Shapes
    from radistill.models import presets

    config = Shapes(presets.shape_config("nanbeige4.1-3b"), keep=13, state_size=8).student_config
    recipe = DistillRecipe()
    plan = plan_distill(config, recipe, "24GiB")
    assert [s.step for s in plan.steps] == ["distill stage 2", "distill stage 3"] and plan.fits
    overrides = recipe_overrides(plan, recipe)
    for number, stage in overrides["stages"].items():
        assert stage["batch_size"] * stage["grad_accum"] == 8 * 16
    assert overrides["stages"][3]["loss"]["chunk_tokens"] <= 2048


def test_optimizer_takes_groups_and_8bit_needs_a_library():
    from radistill.finetune.train import make_optimizer
    from radistill.memplan import eight_bit_optimizer

    p = torch.nn.Parameter(torch.zeros(3))
    assert isinstance(make_optimizer([{"params": [p], "weight_decay": 0.1}], 1e-3, 0.0), torch.optim.AdamW)
    if eight_bit_optimizer() is None:
        with pytest.raises(RadistillError, match="torchao or bitsandbytes"):
            make_optimizer([p], 1e-3, 0.0, "adamw8bit")


def test_replay_interleaves_whole_steps_at_its_share_and_refuses_a_bad_share():
    from radistill.finetune.data import with_replay

    def endless(tag):
        while True:
            yield {"tag": tag}

    drawn = [b["tag"] for _, b in zip(range(4000), with_replay(endless("task"), endless("text"), 0.25, seed=3))]
    assert abs(drawn.count("text") / len(drawn) - 0.25) < 0.03
    again = [b["tag"] for _, b in zip(range(4000), with_replay(endless("task"), endless("text"), 0.25, seed=3))]
    assert drawn == again  # one fixed draw per seed: a run is reproducible
    with pytest.raises(RadistillError, match="replay share"):
        next(with_replay(endless("task"), endless("text"), 1.0))
    with pytest.raises(RadistillError, match="replay-share"):
        FinetuneConfig(replay="text.txt", replay_share=0.0)


def test_cli_finetune_with_replay_trains_on_both_and_keeps_the_held_out_documents_out(student, tokenizer, tmp_path,
                                                                                     monkeypatch):
    from radistill.cli import app
    from radistill.finetune import data as finetune_data

    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in PAIRS))
    text = tmp_path / "prose.txt"
    text.write_text("\n<|endoftext|>\n".join(f"document {i} says {'ab' * (i % 7 + 3)}." for i in range(400)))
    seen = []
    real = finetune_data.text_batches

    def spy(*args, **kwargs):
        seen.append(kwargs.get("heldout_docs"))
        for batch in real(*args, **kwargs):
            seen.append("text step")
            yield batch

    monkeypatch.setattr(finetune_data, "text_batches", spy)
    out = tmp_path / "ft"
    args = ["finetune", str(tmp_path / "student"), "--data", str(data), "--out", str(out), "--steps", "12",
            "--micro-batch", "3", "--seq-len", "32", "--lora-rank", str(RANK), "--device", "cpu",
            "--replay", str(text), "--replay-share", "0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "finetune.json").read_text())
    assert record["config"]["replay"] == str(text) and record["config"]["replay_share"] == 0.5
    assert seen[0] == 200 and 2 <= seen.count("text step") <= 10  # the evaluations' held-out rule; about half
    bad = CliRunner().invoke(app, args[:-1] + ["1.5", "--overwrite"])
    assert bad.exit_code != 0 and "replay-share" in str(bad.exception)  # a RadistillError: exit 2 from the CLI
