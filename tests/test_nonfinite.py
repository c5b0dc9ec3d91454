"""Non-finite inputs (a NaN pixel, an all-NaN image): non-finite scores and features rank
below every finite one, deterministically, on the CPU's own path and on the device path, so
they never change how many tokens a method keeps, and budget 1.0 stays the unpatched model."""

import pytest
import torch

import tokendrop
from conftest import greedy, prompt
from tokendrop import selection
from tokendrop.method.divprune import farthest_points
from tokendrop.method.dpp import greedy_map
from tokendrop.presets import build_preset, synthetic_image
from tokendrop.selection import allocate

VARIANTS = [(name, {}) for name in tokendrop.methods()] + [
    ("text", {"scope": "all"}),
    ("dpp", {"allocation": "partition"}),
    ("dpp", {"allocation": "hired"}),
    ("dpp", {"allocation": "globalcom2"}),
    ("dpp", {"relevance": "cls", "allocation": "global"}),
]
SIZES = [(38, 96), (60, 100)]  # (h, w): a wide 1x2 and a 2x2 grid


@pytest.fixture(scope="module", params=["tiny", "tiny-onevision"])
def poisoned(request):
    """A model and a batch of two images: clean, with one NaN pixel in the first image's first
    crop, and with every pixel NaN."""
    model, processor = build_preset(request.param)
    images = [synthetic_image(w, h, seed=i) for i, (h, w) in enumerate(SIZES)]
    texts = [prompt(processor, "What is red?"), prompt(processor, "Describe it.")]
    clean = processor(images=images, text=texts, return_tensors="pt", padding=True)
    one_nan = dict(clean)
    one_nan["pixel_values"] = clean["pixel_values"].clone()
    one_nan["pixel_values"][0, 1, 0, 5, 7] = float("nan")
    all_nan = dict(clean)
    all_nan["pixel_values"] = torch.full_like(clean["pixel_values"], float("nan"))
    return model, processor, {"clean": clean, "one NaN pixel": one_nan, "all NaN": all_nan}


def records(model, inputs, name, options, budget, processor):
    with tokendrop.patched(model, name, budget=budget, processor=processor, **options) as handle:
        with torch.no_grad():
            model(**inputs)
    return handle.last


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("budget", [1.0, 0.2, 3])
@pytest.mark.parametrize("name, options", VARIANTS, ids=[f"{n}{o or ''}" for n, o in VARIANTS])
def test_non_finite_inputs_never_change_the_count(poisoned, name, options, budget, path, monkeypatch):
    model, processor, inputs = poisoned
    if path == "device":
        monkeypatch.setattr(selection, "HOST_DEVICES", frozenset())
    expected = [r.n_kept for r in records(model, inputs["clean"], name, options, budget, processor)]
    for case in ("one NaN pixel", "all NaN"):
        kept = records(model, inputs[case], name, options, budget, processor)
        assert [r.n_kept for r in kept] == expected, case
        assert all(len(set(r.indices)) == r.n_kept for r in kept)
        if budget == 1.0:
            assert [r.n_kept for r in kept] == [r.n_before for r in kept], case


@pytest.mark.parametrize("name, options", VARIANTS, ids=[f"{n}{o or ''}" for n, o in VARIANTS])
def test_full_budget_with_a_nan_pixel_is_the_unpatched_model(poisoned, name, options):
    model, processor, inputs = poisoned
    stock = greedy(model, inputs["one NaN pixel"], n=3)
    with tokendrop.patched(model, name, budget=1.0, processor=processor, **options):
        assert torch.equal(greedy(model, inputs["one NaN pixel"], n=3), stock)


def unit_rows(n, dim=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=-1)


@pytest.mark.parametrize("path", ["host", "device"])
def test_non_finite_items_rank_last_in_the_dpp_greedy(path, monkeypatch):
    if path == "device":
        monkeypatch.setattr(selection, "HOST_DEVICES", frozenset())
    features, quality = unit_rows(10), torch.linspace(1.0, 0.1, 10)
    features[[1, 4], 2] = float("nan")
    quality[7] = float("nan")
    chosen = greedy_map(features, quality, 10, unit=True).tolist()
    assert chosen[-3:] == [1, 4, 7]  # after every finite item, by index
    finite = [0, 2, 3, 5, 6, 8, 9]
    assert chosen[:7] == [finite[i] for i in greedy_map(features[finite], quality[finite], 7, unit=True).tolist()]


def test_non_finite_tokens_rank_last_in_divprune():
    features = unit_rows(8)
    features[[2, 6]] = float("nan")
    distance = 1 - features @ features.T
    chosen = farthest_points(distance, 8).tolist()
    assert sorted(chosen) == list(range(8)) and chosen[-2:] == [2, 6]
    finite = [0, 1, 3, 4, 5, 7]
    assert chosen[:6] == [finite[i] for i in farthest_points(distance[finite][:, finite], 6).tolist()]


def test_allocation_counts_a_non_finite_weight_as_zero():
    capacity = torch.tensor([10, 10, 10])
    counts = allocate(9, torch.tensor([1.0, float("nan"), 2.0]), capacity)
    assert counts.tolist() == [3, 0, 6]
    counts = allocate(9, torch.full((3,), float("nan")), capacity)
    assert counts.tolist() == [3, 3, 3]
