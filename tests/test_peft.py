"""A model wrapped by PEFT is patched on its base model: the wrapper's calls are pruned, and
unpatching restores it exactly."""

import pytest
import torch

import tokendrop
from conftest import greedy
from tokendrop.presets import build_preset

peft = pytest.importorskip("peft")


@pytest.fixture
def lora():
    model, _ = build_preset("tiny")  # its own: PEFT freezes and rewires the model it wraps
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(model, config)


def test_patching_a_peft_model_patches_its_base_and_says_so(lora, batch):
    stock = greedy(lora, batch)
    with pytest.warns(UserWarning, match="patching the LlavaNextForConditionalGeneration under the PeftModel"):
        handle = tokendrop.patch(lora, "hired", budget=1.0)
    assert handle.model is lora.get_base_model()
    assert torch.equal(greedy(lora, batch), stock)  # full budget through the wrapper: the stock output
    with pytest.warns(UserWarning):
        handle = tokendrop.patch(lora, "hired", budget=0.25)
    pruned = greedy(lora, batch)
    assert [record.n_kept for record in handle.last] == [
        tokendrop.selection.keep_count(0.25, record.n_before) for record in handle.last
    ]
    assert not torch.equal(pruned, stock)
    tokendrop.unpatch(lora)
    assert "_tokendrop_handle" not in lora.get_base_model().__dict__
    assert torch.equal(greedy(lora, batch), stock)
