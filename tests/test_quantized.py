"""bitsandbytes 4-bit and 8-bit models (they load and run on CPU): the q/k hooks work on
quantised projections and full budget changes nothing."""

import pytest
import torch
from transformers import BitsAndBytesConfig, LlavaNextForConditionalGeneration

import tokendrop
from conftest import greedy

pytest.importorskip("bitsandbytes")

MODES = {
    "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
    "8bit": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny[0].save_pretrained(path)
    return path


@pytest.mark.parametrize("mode", MODES)
def test_quantized_model(saved, tiny, batch, mode):
    model = LlavaNextForConditionalGeneration.from_pretrained(saved, quantization_config=MODES[mode], device_map="cpu")
    expected = greedy(model, batch, n=3)
    with tokendrop.patched(model, "hired", budget=1.0):
        assert torch.equal(greedy(model, batch, n=3), expected)
    with tokendrop.patched(model, "hired", budget=0.3) as handle:
        greedy(model, batch, n=3)
        assert [r.n_kept for r in handle.last] == [int(0.3 * r.n_before) for r in handle.last]
