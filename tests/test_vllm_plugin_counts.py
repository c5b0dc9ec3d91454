"""The vLLM plugin's configuration and placeholder counts, without vLLM: the count it writes
into a prompt before the tower runs must equal what tokendrop's patch keeps afterwards.
(The engine tests are in tests/vllm_plugin, run in the vLLM venv.)"""

import json

import pytest

import tokendrop
from conftest import prompt
from tokendrop.adapters import LlavaNextAdapter
from tokendrop.integrations import vllm as vllm_plugin


class Config:
    tokendrop = None


def test_server_options_from_hf_overrides_then_environment(monkeypatch):
    config = Config()
    monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    with pytest.raises(ValueError, match="needs a method"):
        vllm_plugin.server_options(config)
    monkeypatch.setenv(vllm_plugin.ENV, json.dumps({"method": "uniform", "budget": 0.5}))
    assert vllm_plugin.server_options(config) == {"method": "uniform", "budget": 0.5}
    config.tokendrop = {"method": "hired", "budget": 0.25}
    assert vllm_plugin.server_options(config)["method"] == "hired"
    monkeypatch.setenv(vllm_plugin.ENV, "hired:0.2")
    with pytest.raises(ValueError, match="JSON object"):
        vllm_plugin.server_options(Config())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "text"}, "reads the question"),
        ({"method": "router"}, "reads the question"),
        ({"method": "dpp", "relevance": "text"}, "reads the question"),
        ({"method": "text", "threshold": 0.5}, "reads the question"),
        ({"method": "hired", "threshold": 0.5}, "threshold"),
        ({"method": "hired", "newlines": "some"}, "newlines"),
        ({"method": "hired"}, 'needs a budget .*"budget": 0.25'),  # a server that would keep every token
    ],
)
def test_refused(options, message):
    with pytest.raises(ValueError, match=message):
        vllm_plugin.build_method(options)


@pytest.mark.parametrize(
    "method, options",
    [
        ("hired", {}),
        ("globalcom2", {"newlines": "drop"}),
        ("cls", {}),
        ("uniform", {"newlines": "rows"}),
        ("random", {"newlines": "rows"}),
        ("pool", {"newlines": "rows"}),
        ("dpp", {"relevance": "cls", "allocation": "global"}),
    ],
)
def test_count_before_the_tower_is_what_the_patch_keeps(tiny, images, method, options):
    model, processor = tiny
    adapter = LlavaNextAdapter(model)
    chosen = vllm_plugin.build_method({"method": method, "budget": 0.3, **options}).resolve(adapter)
    inputs = processor(
        images=list(images.values()),
        text=[prompt(processor, "Describe it.")] * len(images),
        return_tensors="pt",
        padding=True,
    )
    with tokendrop.patched(model, chosen) as handle:
        model(**inputs)
        for size, record in zip(inputs["image_sizes"].tolist(), handle.last):
            layout = adapter.layout(size)
            vllm_plugin.check_countable(chosen, layout)
            assert vllm_plugin.placeholder_count(chosen, layout) == record.n_kept + record.n_newlines


def test_rows_refused_where_the_scores_decide_the_newlines(tiny):
    adapter = LlavaNextAdapter(tiny[0])
    chosen = vllm_plugin.build_method({"method": "hired", "budget": 0.3, "newlines": "rows"}).resolve(adapter)
    with pytest.raises(ValueError, match="newlines='rows'"):
        vllm_plugin.check_countable(chosen, adapter.layout((96, 96)))
