"""Choice scoring computes logits once per distinct scored position, not once per choice, with unchanged scores."""

from contextlib import contextmanager

import pytest
import torch

from radistill.models.presets import random_model, tiny_config
from radistill.probes.items import EncodedItem
from radistill.probes.scoring import choice_logprobs, forward_hidden, naive_choice_logprobs, pack, row_choice_logprobs

PROMPT = (11, 12, 13, 14, 15)


pytestmark = pytest.mark.usefixtures("flush_denormals")


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config("llama"), seed=3)


@contextmanager
def head_rows(model):
    """Records how many rows each LM head call receives."""
    calls: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        yield calls
    finally:
        hook.remove()


def assert_scores_equal(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)


# flat packing runs one row per choice, and each row reads its own position
@pytest.mark.parametrize("packing, positions", [("tree", [1]), ("flat", [1] * 20)])
def test_twenty_single_token_choices_read_one_position_per_row(model, packing, positions):
    item = EncodedItem(PROMPT, tuple((100 + k,) for k in range(20)), 7)
    assert pack([item], tree=packing == "tree").positions_per_row.tolist() == positions
    with head_rows(model) as calls:
        scores = choice_logprobs(model, [item], packing=packing)
    assert calls == [sum(positions)]
    assert_scores_equal(scores, naive_choice_logprobs(model, [item]))
    assert scores[0].unique().numel() == 20  # every choice got its own token's log-prob, not a copy of one


@pytest.mark.parametrize("packing", ["tree", "flat"])
def test_multi_token_choices_share_only_identical_positions(model, packing):
    # every choice's first token is read at the prompt's last position; in the tree each longer choice then reads
    # at its own packed tokens, (1, 2) and (1, 3) at separate copies of 1 (their branches see different positions)
    items = [EncodedItem(PROMPT, ((1, 2), (1, 3), (4,), (5,), (6, 7, 8)), 2),
             EncodedItem(PROMPT[:3], ((9,), (10,)), 1)]
    packed = pack(items, tree=packing == "tree")
    want_positions = {"tree": [1 + 1 + 1 + 2, 1], "flat": [2, 2, 1, 1, 3, 1, 1]}[packing]
    assert packed.positions_per_row.tolist() == want_positions
    with head_rows(model) as calls:
        scores = choice_logprobs(model, items, packing=packing)
    assert sum(calls) == sum(want_positions)
    assert_scores_equal(scores, naive_choice_logprobs(model, items))


def test_repeated_rows_are_separate_forwards(model):
    """The fast scan repeats a packed row once per ablated head: each copy's positions are its own."""
    item = EncodedItem(PROMPT, ((1,), (2,), (3,)), 0)
    packed = pack([item])
    hidden = forward_hidden(model, packed)
    twice = torch.cat([hidden, 2 * hidden])  # two different forwards of the same packed row
    head = model.get_output_embeddings()
    with head_rows(model) as calls:
        scores = row_choice_logprobs(twice, packed, torch.tensor([0, 0]), head)
    assert calls == [2]
    for copy, states in enumerate((hidden, 2 * hidden)):
        logprobs = torch.log_softmax(head(states[0, len(PROMPT) - 1]).float(), dim=-1)
        torch.testing.assert_close(scores[copy], logprobs[[1, 2, 3]])
