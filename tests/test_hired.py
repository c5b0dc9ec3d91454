"""HiRED and the CLS-attention hooks against eager attention maps and the paper's formulas."""

import pytest
import torch

import reference
import tokendrop
from tokendrop.adapters import adapter_for
from tokendrop.presets import build_preset
from tokendrop.scoring import capture_cls_scores


@pytest.fixture(scope="module")
def eager():
    model, _ = build_preset("tiny", attn_implementation="eager")
    assert model.model.vision_tower.config._attn_implementation == "eager"
    return model


def test_hooks_match_eager_attention_and_leave_no_hooks(tiny, eager, batch):
    model, _ = tiny
    adapter = adapter_for(model)
    layers = {i: "probs" for i in range(adapter.n_vision_layers)}
    attention = {i: layer.self_attn for i, layer in enumerate(adapter.vision_layers)}
    with capture_cls_scores(attention, layers) as captured, torch.no_grad():
        model.model.get_image_features(batch["pixel_values"], batch["image_sizes"])
    for layer in layers:
        expected = torch.cat(reference.eager_cls_attention(eager, batch["pixel_values"], batch["image_sizes"], layer))
        assert torch.allclose(captured[layer][0], expected, atol=1e-6)
    for layer in adapter.vision_layers:
        assert not layer.self_attn.q_proj._forward_hooks and not layer.self_attn.k_proj._forward_hooks


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.1, 0.02, 40])
@pytest.mark.parametrize("alpha", [0.5, 0.2, 1.0])
def test_selection_equals_reference(tiny, eager, batch, budget, alpha):
    model, _ = tiny
    handle = tokendrop.patch(model, "hired", budget=budget, alpha=alpha)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=1)
    expected = reference.hired(eager, batch["pixel_values"], batch["image_sizes"], budget, alpha=alpha)
    assert [r.indices for r in handle.last] == expected


def test_layer_options(tiny, eager, batch):
    model, _ = tiny
    handle = tokendrop.patch(model, "hired", budget=0.3, alloc_layer=-1, select_layer=0)
    assert (handle.method.alloc_layer, handle.method.select_layer) == (-1, 0)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=1)
    expected = reference.hired(eager, batch["pixel_values"], batch["image_sizes"], 0.3, alloc_layer=-1, select_layer=0)
    assert [r.indices for r in handle.last] == expected
    # the default selection layer is the one whose output the model feeds the LLM
    assert tokendrop.patch(model, "hired", budget=1.0).method.select_layer == model.config.vision_feature_layer


def test_region_weights_are_padding_aware(tiny, images):
    model, _ = tiny
    adapter = adapter_for(model)
    for height, width in [(38, 96), (96, 38), (60, 100), (20, 140)]:
        layout = adapter.layout((height, width))
        expected = torch.tensor(reference.region_weights(model, height, width), dtype=torch.float32)
        assert torch.allclose(layout.region_weights, expected, atol=1e-6)
        assert torch.allclose(layout.region_weights.sum(0), torch.ones(layout.tile), atol=1e-6)
