"""The analysis' recomputed attention equals the model's own (eager) attention probabilities."""

import pytest
import torch

from radistill.models.presets import random_model, tiny_config
from radistill.scan.analyze import PromptSpans, head_attention, label, pattern_numbers


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: q/k norms before the rotation
def test_recomputed_attention_equals_eager(arch):
    model = random_model(tiny_config(arch))
    model.set_attn_implementation("eager")
    ids = [5, 17, 99, 3, 42, 8, 200, 11]
    with torch.no_grad():
        reference = model(torch.tensor([ids]), output_attentions=True).attentions
    heads = [(0, 0), (1, 3), (2, 2)]
    for (layer, head), probs in head_attention(model, ids, heads).items():
        torch.testing.assert_close(probs, reference[layer][0, head].float(), atol=1e-5, rtol=1e-4)


def test_pattern_numbers_and_label():
    # tokens: 0 header | line 0: 1 2 (newline 3) | line 1: 4 5 (newline 6) | question 7
    spans = PromptSpans(lines=(((1, 2), 3), ((4, 5), 6)), target=1, last=7)
    probs = torch.zeros(8, 8)
    probs[7, 5], probs[7, 6], probs[7, 0] = 0.5, 0.3, 0.2  # last token -> line 1
    probs[3, 1], probs[6, 4] = 0.2, 0.4
    numbers = pattern_numbers(probs, spans)
    assert numbers["aggregate_mass"] == pytest.approx(0.8)
    assert numbers["aggregate_newline_mass"] == pytest.approx(0.3)
    assert numbers["aggregate_hit_rate"] == 1.0
    assert numbers["gather_mass"] == pytest.approx(0.3)
    assert numbers["sink_mass"] == pytest.approx(0.2)
    assert label(numbers) == "aggregate"
    assert label({**numbers, "aggregate_mass": 0.1}) == "gather"
    assert label({**numbers, "aggregate_mass": 0.1, "gather_mass": 0.1}) == "other"
