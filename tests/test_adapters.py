"""The adapter interface, driven by the registry: every registered family patches its tiny
preset exactly (budget 1.0 is the unpatched model; a budget's kept counts reach the LLM), and
what methods declare they read (`Method.reads`) is what they read."""

import inspect

import pytest
import torch
import transformers
from packaging.version import Version

import tokendrop
from conftest import prompt
from tokendrop.adapters import ADAPTERS, adapter_for
from tokendrop.family import Adapter
from tokendrop.layout import EncodedImage
from tokendrop.method import build as build_method
from tokendrop.method.base import READS, Merged
from tokendrop.preset_specs import PRESETS, family
from tokendrop.presets import build_preset, synthetic_image

QUESTION = "What is red?"
SIZES = [(38, 96), (60, 100)]


def tiny_preset(adapter_name: str) -> str:
    names = [n for n in PRESETS.names() if n.startswith("tiny") and family(n) == adapter_name]
    assert names, f"adapter {adapter_name!r} has no tiny preset (name it tiny-...) for the tests"
    return names[0]


@pytest.fixture(scope="module", params=ADAPTERS.names())
def family_model(request):
    first = ADAPTERS.get(request.param).first_release
    if Version(transformers.__version__) < Version(first):
        pytest.skip(f"{request.param} is patched from transformers {first}; this is {transformers.__version__}")
    model, processor = build_preset(tiny_preset(request.param))
    images = [synthetic_image(w, h, seed=i) for i, (h, w) in enumerate(SIZES)]
    inputs = processor(images=images, text=[prompt(processor, QUESTION)] * 2, return_tensors="pt", padding=True)
    return request.param, model, inputs


def test_every_adapter_declares_the_interface(family_model):
    name, model, _ = family_model
    adapter = adapter_for(model)
    assert type(adapter) is ADAPTERS.get(name) and isinstance(adapter, Adapter)
    assert not inspect.isabstract(type(adapter))
    assert len(adapter.image_inputs) == 2 and all(isinstance(n, str) for n in adapter.image_inputs)
    assert adapter.model is model and adapter.image_token_id == model.config.image_token_id
    assert -adapter.n_vision_layers <= adapter.feature_layer < adapter.n_vision_layers


def test_full_budget_is_the_unpatched_model(family_model):
    _, model, inputs = family_model
    with torch.no_grad():
        stock = model(**inputs).logits
        stock_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with tokendrop.patched(model, "cls", budget=1.0):
            assert torch.equal(model(**inputs).logits, stock)
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), stock_tokens)


def test_kept_counts_reach_the_llm(family_model):
    _, model, inputs = family_model
    adapter = adapter_for(model)
    seen = []
    hook = adapter.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        with tokendrop.patched(model, "random", budget=0.25, newlines="drop") as handle, torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    placeholders = (inputs["input_ids"] == adapter.image_token_id).sum(1)
    texts = (inputs["input_ids"] != adapter.image_token_id).sum(1)
    kept = [r.n_kept for r in handle.last]
    assert kept == [max(1, int(0.25 * r.n_before)) for r in handle.last]
    assert all(r.n_newlines == 0 for r in handle.last)
    assert seen == [int((texts + torch.tensor(kept)).max())]
    assert sum(placeholders.tolist()) > sum(kept)


# --- what methods read -------------------------------------------------------------------------

VARIANTS = [(name, {}) for name in tokendrop.methods()] + [
    ("dpp", {"relevance": "cls", "allocation": "global"}),
    ("dpp", {"relevance": "none", "allocation": "global"}),
    ("dpp", {"allocation": "hired"}),
    ("text", {"threshold": 0.5, "budget": 1.0}),
]


class Unread(Exception):
    pass


class NoVectors:
    """Packed vectors that exist only as a place (their device)."""

    device = torch.device("cpu")

    def __getattr__(self, name):
        raise Unread(f"packed.{name}")

    def __getitem__(self, key):
        raise Unread("packed[...]")


class NoScores(dict):
    def __getitem__(self, key):
        raise Unread("scores")


def no_question(*args):
    raise Unread("question")


def kept(selection) -> torch.Tensor:
    return selection.indices if isinstance(selection, Merged) else selection


def encoded(tiny, method):
    model, processor = tiny
    image = synthetic_image(96, 38, seed=3)
    inputs = processor(images=[image], text=[prompt(processor, QUESTION)], return_tensors="pt")
    adapter = adapter_for(model)
    with torch.no_grad():
        (read,) = adapter.read(
            inputs["input_ids"], None, inputs["pixel_values"], inputs["image_sizes"], None, method.signals(), {}
        )
    return read


def withheld(image: EncodedImage, keep: set[str]) -> EncodedImage:
    """`image` with everything a selection can read except `keep` made unreadable."""
    return EncodedImage(
        layout=image.layout,
        packed=image.packed if "features" in keep else NoVectors(),
        cls=image.cls if "scores" in keep else NoScores(),
        n_layers=image.n_layers,
        embed=image.embed if "question" in keep else no_question,
        prompt_row=image.prompt_row if "question" in keep else None,
        prompt_mask=image.prompt_mask if "question" in keep else None,
    )


@pytest.mark.parametrize("name, options", VARIANTS, ids=[f"{n}{o or ''}" for n, o in VARIANTS])
def test_methods_read_what_they_declare(tiny, name, options):
    model, processor = tiny
    method = build_method(name, processor=processor, **({"budget": 0.3} | options)).resolve(adapter_for(model))
    reads = method.reads()
    assert reads <= set(READS)
    image = encoded(tiny, method)
    full = method.select(image)
    assert isinstance(full, Merged) == method.merges  # what inside-the-tower selection refuses
    chosen = method.select(withheld(image, reads))  # all it declares is enough, and gives the same
    assert torch.equal(kept(chosen), kept(full))
    for part in reads:  # and it reads each part it declares
        with pytest.raises((Unread, ValueError)):
            method.select(withheld(image, reads - {part}))


@pytest.mark.parametrize("name, options", [v for v in VARIANTS if "threshold" not in v[1]], ids=str)
@pytest.mark.parametrize("budget", [0.3, 1.0, 5])
def test_methods_keep_the_count_they_declare(tiny, batch, name, options, budget):
    """`Method.kept_count`, which a server writes placeholder counts from before any score, is
    what the method keeps, image by image (three AnyRes grids, padded canvases)."""
    model, processor = tiny
    with tokendrop.patched(model, name, processor=processor, **({"budget": budget} | options)) as handle:
        with torch.no_grad():
            model(**batch)
        layouts = handle.adapter.input_layouts(batch)
        assert [handle.method.kept_count(layout) for layout in layouts] == [r.n_kept for r in handle.last]
