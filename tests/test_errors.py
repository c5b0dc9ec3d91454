"""Bad input fails at patch() time with a ValueError/TypeError that says what was wrong."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tokendrop


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(method="hird"), ValueError, "Did you mean 'hired'"),
        (dict(method="hired", alpah=0.3), ValueError, "Did you mean 'alpha'"),
        (dict(method="hired", budget=0), ValueError, "must be >= 1"),
        (dict(method="hired", budget=-0.5), ValueError, r"in \(0, 1\]"),
        (dict(method="hired", budget=1.5), ValueError, "pass an int for an absolute token count"),
        (dict(method="hired", budget=float("nan")), ValueError, r"in \(0, 1\]"),
        (dict(method="hired", budget="0.2"), TypeError, "budget must be"),
        (dict(method="hired", budget=True), TypeError, "budget must be"),
        (dict(method="hired", newlines="some"), ValueError, "newlines must be one of"),
        (dict(method="hired", alpha=2.0), ValueError, "alpha must be a number in"),
        (dict(method="hired", select_layer=7), ValueError, "has 3 layers"),
        (dict(method="hired", alloc_layer=1.5), TypeError, "alloc_layer must be an int"),
        (dict(method="hired"), ValueError, r"needs a budget.*budget=0\.2"),
        (dict(method="random", seed="x"), TypeError, "seed must be an int"),
        (dict(method=3), TypeError, "by name"),
    ],
)
def test_bad_options(tiny, kwargs, error, message):
    model, _ = tiny
    with pytest.raises(error, match=message):
        tokendrop.patch(model, **kwargs)
    assert "_tokendrop_handle" not in model.__dict__ and "generate" not in model.__dict__


def test_not_a_vlm():
    llm = LlamaForCausalLM(
        LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match="supported models: llava_next"):
        tokendrop.patch(llm, "hired", budget=0.2)
    with pytest.raises(TypeError, match="loaded Hugging Face model"):
        tokendrop.patch("llava-hf/llava-v1.6-vicuna-7b-hf", "hired")


def test_submodule_is_refused(tiny):
    with pytest.raises(ValueError, match="supported models|generating model"):
        tokendrop.patch(tiny[0].model, "hired")


def test_unsupported_transformers(tiny, monkeypatch):
    for found in ("4.46.0", "6.0.1"):
        monkeypatch.setattr("tokendrop.adapters.llava_next.installed_transformers", lambda found=found: found)
        with pytest.raises(
            ValueError,
            match=rf"supports transformers >=4.56,<6.0; found {found}\. Install a "
            r"supported release: pip install 'transformers>=4.56,<6.0'",
        ):
            tokendrop.patch(tiny[0], "hired")


def test_placeholder_mismatch_is_caught(tiny, batch):
    model, _ = tiny
    tokendrop.patch(model, "hired", budget=0.5)
    ids = batch["input_ids"].clone()
    # move one placeholder from row 0 to row 1: right total, wrong rows
    row0 = (ids[0] == model.config.image_token_id).nonzero()[0, 0]
    text1 = (ids[1] != model.config.image_token_id) & (batch["attention_mask"][1] == 1)
    ids[0, row0] = ids[1, text1.nonzero()[-1, 0]]
    ids[1, text1.nonzero()[-1, 0]] = model.config.image_token_id
    with pytest.raises(ValueError, match="row 0 of input_ids has"):
        model.generate(**(dict(batch) | {"input_ids": ids}), max_new_tokens=2)


def test_position_ids_with_images_refused(tiny, singles):
    model, _ = tiny
    tokendrop.patch(model, "hired", budget=0.5)
    inputs = singles[0]
    positions = torch.arange(inputs["input_ids"].shape[1])[None]
    with pytest.raises(ValueError, match="position_ids"):
        model(**inputs, position_ids=positions)


def test_pixel_values_without_image_sizes(tiny, singles):
    model, _ = tiny
    tokendrop.patch(model, "hired", budget=0.5)
    inputs = {k: v for k, v in singles[0].items() if k != "image_sizes"}
    with pytest.raises(ValueError, match="image_sizes"):
        model.generate(**inputs, max_new_tokens=1)


def test_a_checkpoint_of_another_family_fails_before_its_weights_load(tmp_path):
    from transformers import LlavaConfig

    from tokendrop.loading import load_model

    LlavaConfig().save_pretrained(tmp_path)  # a config alone: the check must not need weights
    with pytest.raises(ValueError, match=r"is a 'llava' model; tokendrop has adapters for llava_next"):
        load_model(str(tmp_path))
