"""Choice scoring: tree-packed one-forward scores equal one forward per choice."""

import random

import pytest
import torch

from radistill.models.presets import random_model, tiny_config
from radistill.probes.items import EncodedItem, ProbeItem, encode_items, load_jsonl
from radistill.probes.scoring import (
    choice_logprobs, choice_metrics, naive_choice_logprobs, pack, summarize,
)
from radistill.utils.errors import RadistillError

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.fixture(autouse=True, scope="module")
def _flush_denormals():
    """Tiny random models produce denormal floats, which are ~30x slower on x86 CPUs."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def random_items(count=6, seed=0, vocab=256, max_choice_tokens=3):
    """Items with random prompts and 1-4 choices of 1..max_choice_tokens tokens (shared prefixes included)."""
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        prompt = tuple(rng.randrange(vocab) for _ in range(rng.randrange(3, 12)))
        choices = [tuple(rng.randrange(vocab) for _ in range(rng.randrange(1, max_choice_tokens + 1)))
                   for _ in range(rng.randrange(1, 5))]
        if len(choices[0]) > 1:
            choices.append(choices[0][:1] + (rng.randrange(vocab),))  # same first token, different second
        items.append(EncodedItem(prompt, tuple(choices), rng.randrange(len(choices))))
    return items


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("max_choice_tokens", [1, 3])  # 1: the causal-only path without a 4D mask
def test_tree_and_flat_packing_equal_one_forward_per_choice(arch, max_choice_tokens):
    model = random_model(tiny_config(arch))
    items = random_items(max_choice_tokens=max_choice_tokens)
    reference = naive_choice_logprobs(model, items)
    for packing, batch_size in (("tree", 4), ("flat", 3)):
        scores = choice_logprobs(model, items, batch_size=batch_size, packing=packing)
        for got, want in zip(scores, reference):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_single_token_choices_add_no_tokens():
    items = [EncodedItem((5, 6, 7), ((1,), (2,), (3,)), 0), EncodedItem((5, 6), ((4,), (9,)), 1)]
    packed = pack(items)
    assert packed.input_ids.shape == (2, 3)
    assert packed.lengths.tolist() == [3, 2]
    assert packed.score_pos[0].tolist() == [2, 2, 2] and packed.score_pos[1, :2].tolist() == [1, 1]


def test_tree_mask_hides_sibling_choices():
    item = EncodedItem((5, 6), ((1, 2, 3), (4, 5)), 0)
    packed = pack([item])
    # prompt 5 6 | choice 0: 1 2 | choice 1: 4
    assert packed.input_ids[0].tolist() == [5, 6, 1, 2, 4]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 2]
    allowed = packed.attention_mask(torch.float32)[0, 0] == 0
    assert allowed[4].tolist() == [True, True, False, False, True]
    assert allowed[3].tolist() == [True, True, True, True, False]


def test_metrics_accuracy_and_normalised_logprob():
    scores = [torch.tensor([0.0, -1.0]), torch.tensor([-2.0, -1.0, -5.0])]
    metrics = summarize(scores, [0, 0])
    assert metrics.accuracy == pytest.approx(0.5)
    expected = (torch.log_softmax(scores[0], 0)[0] + torch.log_softmax(scores[1], 0)[0]) / 2
    assert metrics.logprob == pytest.approx(expected.item())
    correct, normalised = choice_metrics(torch.tensor([[1.0, float("-inf")]]), torch.tensor([0]))
    assert correct.item() == 1 and normalised.item() == pytest.approx(0.0)


def test_bad_inputs(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "choices": ["x"], "answer": 0}\n{"prompt": "b", "choices": []}\n')
    with pytest.raises(RadistillError, match=r"bad.jsonl:2"):
        load_jsonl(bad)
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(RadistillError, match="expected"):
        load_jsonl(tmp_path / "broken.jsonl")
    with pytest.raises(RadistillError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(RadistillError, match="batch-size"):
        choice_logprobs(random_model(tiny_config()), random_items(), batch_size=0)


class CharTokenizer:
    """A tokenizer-free stand-in: one token per character (code point mod 256)."""

    def __call__(self, text, add_special_tokens=True):
        return type("Encoding", (), {"input_ids": [ord(c) % 256 for c in text]})()


def test_probe_longer_than_context_fails_before_compute():
    item = ProbeItem("x" * 40, ("yes", "no"), 0)
    with pytest.raises(RadistillError, match="context is 32"):
        encode_items(CharTokenizer(), [item], max_length=32)
