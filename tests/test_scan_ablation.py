"""Head ablation: the o_proj-input hook equals zeroing the head's o_proj weight columns; GQA bookkeeping."""

import pytest
import torch

from radistill.models.access import model_layout
from radistill.models.presets import random_model, tiny_config
from radistill.scan.ablation import ablate_heads, head_means
from radistill.utils.errors import RadistillError
from test_probes_scoring import random_items

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_hook_equals_zeroed_weight_columns(arch):
    model = random_model(tiny_config(arch))
    layout = model_layout(model)
    heads = [(0, 1), (2, 3), (2, 0)]
    with torch.no_grad():
        clean = model(IDS).logits
        with ablate_heads(model, heads):
            hooked = model(IDS).logits
        for layer, head in heads:
            model.model.layers[layer].self_attn.o_proj.weight[:, layout.o_proj_slice(head)] = 0
        zeroed = model(IDS).logits
    torch.testing.assert_close(hooked, zeroed, atol=1e-5, rtol=1e-5)
    assert (hooked - clean).abs().max() > 1e-4  # the ablation did something
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, zeroed)  # hooks are gone after the block


def test_gqa_bookkeeping():
    layout = model_layout(random_model(tiny_config("llama", num_attention_heads=8, num_key_value_heads=2)))
    assert layout.group_size == 4
    assert [layout.kv_head(h) for h in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert layout.query_heads_of(1) == [4, 5, 6, 7]
    assert layout.o_proj_slice(5) == slice(80, 96)  # query head index × head_dim, not the KV head's


def test_ablation_touches_only_its_slice():
    model = random_model(tiny_config("llama"))
    layout = model_layout(model)
    seen = []  # a forward hook sees the input after every pre-hook ran
    handle = model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        model(IDS)
        with ablate_heads(model, [(1, 2)]):
            model(IDS)
    handle.remove()
    clean, ablated = seen
    inside = layout.o_proj_slice(2)
    assert ablated[..., inside].abs().max() == 0
    outside = torch.ones(clean.shape[-1], dtype=torch.bool)
    outside[inside] = False
    torch.testing.assert_close(ablated[..., outside], clean[..., outside])


def test_mean_ablation_writes_the_means():
    model = random_model(tiny_config("llama"))
    means = head_means(model, random_items())
    assert means.shape == (3, 4, 16)
    seen = []
    handle = model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad(), ablate_heads(model, [(0, 3)], "mean", means):
        model(IDS)
    handle.remove()
    torch.testing.assert_close(seen[0][0, :, 48:64], means[0, 3].expand(IDS.shape[1], 16))


def test_bad_heads_and_modes():
    model = random_model(tiny_config("llama"))
    with pytest.raises(RadistillError, match=r"head 4 \(layer 0\) is out of range.*0\.\.3"):
        with ablate_heads(model, [(0, 4)]):
            pass
    with pytest.raises(RadistillError, match="layer 7 is out of range"):
        with ablate_heads(model, [(7, 0)]):
            pass
    with pytest.raises(RadistillError, match="unknown ablation"):
        with ablate_heads(model, [(0, 0)], "noise"):
            pass
    with pytest.raises(RadistillError, match="needs the heads' clean means"):
        with ablate_heads(model, [(0, 0)], "mean"):
            pass
