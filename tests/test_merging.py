"""Merged tokens (`pool`, `visionzip`): what the LLM receives is the mean of each recorded
group, and each method's groups equal a re-computation written here from its formula with
plain loops, sharing no code with tokendrop."""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import reference
import tokendrop
from conftest import greedy
from tokendrop.adapters import adapter_for
from tokendrop.method import Method
from tokendrop.method.base import Merged
from tokendrop.method.pool import pool_cells
from tokendrop.presets import build_preset, synthetic_image
from tokendrop.visualize import group_labels, show

MERGING = ["pool", "visionzip"]


@pytest.fixture(scope="module")
def eager():
    model, _ = build_preset("tiny", attn_implementation="eager")
    return model


def fed_to_llm(model, batch):
    """Run the patched model once; the per-image vectors the LLM received, read from its input
    embeddings (the rows that are no text token's embedding), split by the kept counts."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].clone()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    assert len(seen) == 1
    table = model.get_input_embeddings().weight
    vectors = torch.cat([row[~(row[:, None, :] == table[None]).all(-1).any(-1)] for row in seen[0]])
    records = model.__dict__["_tokendrop_handle"].last
    return list(vectors.split([record.n_kept + record.n_newlines for record in records]))


def original_features(model, batch):
    """Per image: the unpatched model's feature vectors (newlines removed) and its packed sequence."""
    with torch.no_grad():
        packed = adapter_for(model).image_features(batch["pixel_values"], batch["image_sizes"])
    result = []
    for (height, width), vectors in zip(batch["image_sizes"].tolist(), packed):
        _, layout = reference.features(model, height, width)
        feature_rows = [pos for pos, (kind, _) in enumerate(layout) if kind == "f"]
        result.append((vectors[feature_rows], vectors, layout))
    return result


def expected_llm_vectors(model, height, width, record, features, packed, layout):
    """What the LLM must see: kept positions hold their group's (weighted) mean, kept newlines
    stay as they are, all in packed order."""
    mask = reference.keep_mask(model, height, width, record.indices, "rows")
    groups = {i: record.groups[j] for j, i in enumerate(record.indices)}
    weights = None if record.weights is None else {i: record.weights[j] for j, i in enumerate(record.indices)}
    rows = []
    for keep, (kind, value), vector in zip(mask.tolist(), layout, packed):
        if not keep:
            continue
        if kind == "nl":
            rows.append(vector.float())
            continue
        group = groups[value]
        w = [1.0] * len(group) if weights is None else weights[value]
        total = sum(wi * features[g].double() for wi, g in zip(w, group))
        rows.append((total / sum(w)).float())
    return torch.stack(rows)


# --- the core: a merged token is the mean of its recorded group -----------------------


@pytest.mark.parametrize("method", MERGING)
@pytest.mark.parametrize("budget", [0.25, 0.1, 7])
def test_llm_receives_the_mean_of_each_recorded_group(tiny, batch, method, budget):
    model, _ = tiny
    originals = original_features(model, batch)
    # tiny partitions: at the default 10 of 64 a share under 7 tokens makes no contextual token
    options = dict(contextual=0.5) if method == "visionzip" else {}
    handle = tokendrop.patch(model, method, budget=budget, **options)
    fed = fed_to_llm(model, batch)
    for (height, width), record, vectors, (features, packed, layout) in zip(
        batch["image_sizes"].tolist(), handle.last, fed, originals
    ):
        assert record.groups is not None and len(record.groups) == record.n_kept
        for i, group in zip(record.indices, record.groups):
            assert group[0] == i and group == sorted(set(group))
        members = [g for group in record.groups for g in group]
        assert len(members) == len(set(members))  # disjoint
        expected = expected_llm_vectors(model, height, width, record, features, packed, layout)
        assert vectors.shape == expected.shape and vectors.dtype == packed.dtype
        assert torch.allclose(vectors.float(), expected, atol=1e-5)
        assert any(len(g) > 1 for g in record.groups)  # something was merged


@dataclass
class WeightedPairs(Method):
    """Test-only merging method: token 2j+1 is merged into token 2j with weights (1, 3)."""

    def needs_budget(self) -> bool:  # it keeps every other token, whatever the budget
        return False

    def select(self, image):
        n = image.layout.n_features
        groups = [torch.arange(i, min(i + 2, n)) for i in range(0, n, 2)]
        weights = [torch.tensor([1.0, 3.0])[: g.numel()] for g in groups]
        return Merged(indices=torch.arange(0, n, 2), groups=groups, weights=weights)


def test_weighted_groups_give_the_weighted_mean(tiny, batch):
    model, _ = tiny
    originals = original_features(model, batch)
    handle = tokendrop.patch(model, WeightedPairs())
    fed = fed_to_llm(model, batch)
    for (height, width), record, vectors, (features, packed, layout) in zip(
        batch["image_sizes"].tolist(), handle.last, fed, originals
    ):
        assert record.weights[0] == [1.0, 3.0]
        expected = expected_llm_vectors(model, height, width, record, features, packed, layout)
        assert torch.allclose(vectors.float(), expected, atol=1e-5)


def test_subset_methods_record_no_groups(tiny, batch):
    model, _ = tiny
    handle = tokendrop.patch(model, "uniform", budget=0.3)
    greedy(model, batch, n=1)
    assert all(r.groups is None and r.weights is None for r in handle.last)


def test_broken_groups_are_refused(tiny, batch):
    @dataclass
    class Overlapping(Method):
        def needs_budget(self) -> bool:
            return False

        def select(self, image):
            return Merged(indices=torch.tensor([0, 1]), groups=[torch.tensor([0, 1]), torch.tensor([1, 2])])

    model, _ = tiny
    tokendrop.patch(model, Overlapping())
    with pytest.raises(RuntimeError, match="disjoint"):
        greedy(model, batch, n=1)


# --- pool ----------------------------------------------------------------------------


def reference_pool(model, height, width, budget):
    """Groups of `pool` from its rule: budget split by partition size; a partition of h x w
    valid tokens and share c: g = min(h, c, max(ceil(c / w), round(sqrt(c h / w)))) row bands at
    floor(i h / g); each band 1 cell plus its height's share of the other c - g (at most w - 1
    more); a band of n cells cut at floor(j w / n)."""
    feats, _ = reference.features(model, height, width)
    side, n_h, n_w, (y0, y1, x0, x1) = reference.geometry(model, height, width)
    k = reference.keep_count(budget, len(feats))
    n_parts = 1 + n_h * n_w
    capacity = [sum(1 for p, _ in feats if p == q) for q in range(n_parts)]
    counts = reference.allocate(k, capacity, capacity)
    groups = []
    for p, c in enumerate(counts):
        if c == 0:
            continue
        members = [i for i, (q, _) in enumerate(feats) if q == p]
        rows = sorted({feats[i][1] // side for i in members})
        h = len(rows)
        w = len(members) // h
        grid = [members[r * w : (r + 1) * w] for r in range(h)]
        g = min(h, c, max(math.ceil(c / w), round(math.sqrt(c * h / w))))
        edges = [i * h // g for i in range(g + 1)]
        extra = reference.allocate(c - g, [edges[i + 1] - edges[i] for i in range(g)], [w - 1] * g)
        for i in range(g):
            n = 1 + extra[i]
            cuts = [j * w // n for j in range(n + 1)]
            for j in range(n):
                groups.append(
                    sorted(grid[r][x] for r in range(edges[i], edges[i + 1]) for x in range(cuts[j], cuts[j + 1]))
                )
    groups.sort()
    return [g[0] for g in groups], groups


@pytest.mark.parametrize("budget", [0.25, 0.1, 0.5, 17, 1])
def test_pool_equals_reference(tiny, batch, budget):
    model, _ = tiny
    handle = tokendrop.patch(model, "pool", budget=budget)
    greedy(model, batch, n=1)
    for (height, width), record in zip(batch["image_sizes"].tolist(), handle.last):
        indices, groups = reference_pool(model, height, width, budget)
        assert record.indices == indices and record.groups == groups
        # where every partition has a share, pooling covers every valid token exactly once
        if all(record.partitions):
            assert sorted(g for group in groups for g in group) == list(range(record.n_before))


@pytest.mark.parametrize("count, window", [(144, 2), (64, 3), (36, 4), (576, 1)])
def test_pool_is_plain_a_by_a_pooling_when_the_share_allows(count, window):
    grid = torch.arange(576).view(24, 24)
    cells = pool_cells(grid, count)
    expected = sorted(
        grid[r : r + window, c : c + window].flatten().tolist()
        for r in range(0, 24, window)
        for c in range(0, 24, window)
    )
    assert sorted(cell.tolist() for cell in cells) == expected


# --- visionzip -----------------------------------------------------------------------


def reference_visionzip(model, eager, batch, budget, contextual=0.15625, layer=-2):
    """VisionZip from the paper's description: per partition (budget split by size), the top
    c - floor(contextual c) tokens by CLS attention; the rest in raster order, every
    floor(r / m)-th a target, each other joining its most cosine-similar target."""
    attention = reference.eager_cls_attention(eager, batch["pixel_values"], batch["image_sizes"], layer)
    with torch.no_grad():
        packed = adapter_for(model).image_features(batch["pixel_values"], batch["image_sizes"])
    result = []
    for (height, width), attn, vectors in zip(batch["image_sizes"].tolist(), attention, packed):
        feats, layout = reference.features(model, height, width)
        features = vectors[[pos for pos, (kind, _) in enumerate(layout) if kind == "f"]].double()
        k = reference.keep_count(budget, len(feats))
        capacity = [sum(1 for p, _ in feats if p == q) for q in range(attn.shape[0])]
        counts = reference.allocate(k, capacity, capacity)
        groups = []
        for p, c in enumerate(counts):
            members = [i for i, (q, _) in enumerate(feats) if q == p]
            m = math.floor(contextual * c + 1e-9)
            by_score = sorted(members, key=lambda i: (-float(attn[p, feats[i][1]]), i))
            groups += [[i] for i in by_score[: c - m]]
            if m == 0:
                continue
            rest = sorted(by_score[c - m :])
            step = max(1, len(rest) // m)
            targets = [rest[t] for t in range(0, len(rest), step)][:m]
            joined = {t: [t] for t in targets}
            for i in rest:
                if i in joined:
                    continue
                cos = [float(torch.nn.functional.cosine_similarity(features[i], features[t], dim=0)) for t in targets]
                joined[targets[cos.index(max(cos))]].append(i)
            groups += [sorted(g) for g in joined.values()]
        groups.sort()
        result.append(([g[0] for g in groups], groups))
    return result


@pytest.mark.parametrize("budget, contextual", [(0.25, 0.15625), (0.1, 0.15625), (0.5, 0.5), (20, 1.0), (0.3, 0.0)])
def test_visionzip_equals_reference(tiny, eager, batch, budget, contextual):
    model, _ = tiny
    handle = tokendrop.patch(model, "visionzip", budget=budget, contextual=contextual)
    greedy(model, batch, n=1)
    expected = reference_visionzip(model, eager, batch, budget, contextual)
    assert [(r.indices, r.groups) for r in handle.last] == expected
    if contextual == 0.0:  # no contextual tokens: a per-partition CLS top-k
        assert all(len(g) == 1 for r in handle.last for g in r.groups)


def test_visionzip_select_layer(tiny, eager, batch):
    model, _ = tiny
    handle = tokendrop.patch(model, "visionzip", budget=0.3, select_layer=0)
    greedy(model, batch, n=1)
    assert [(r.indices, r.groups) for r in handle.last] == reference_visionzip(model, eager, batch, 0.3, layer=0)


# --- options, records, show ----------------------------------------------------------


@pytest.mark.parametrize(
    "method, options, error",
    [
        ("visionzip", dict(contextual=1.5), ValueError),
        ("visionzip", dict(contextual=-0.1), ValueError),
        ("visionzip", dict(contextual="some"), ValueError),
        ("visionzip", dict(select_layer=99), ValueError),
        ("visionzip", dict(select_layer=1.5), TypeError),
        ("visionzip", dict(dominant=54), ValueError),
        ("pool", dict(window=2), ValueError),
        ("pool", dict(newlines="some"), ValueError),
    ],
)
def test_bad_options_rejected_at_patch(tiny, method, options, error):
    model, _ = tiny
    before = dict(model.__dict__)
    with pytest.raises(error):
        tokendrop.patch(model, method, budget=0.2, **options)
    assert model.__dict__ == before


@pytest.mark.parametrize("method", MERGING)
def test_show_draws_the_groups(tiny, tmp_path, method):
    model, processor = tiny
    image = synthetic_image(100, 60, seed=3)
    out = tmp_path / f"{method}.png"
    figure = show(model, processor, image, method, budget=0.25, out=out)
    assert out.stat().st_size > 10_000
    assert all("merged into them" in ax.get_title() for ax in figure.axes)
    assert all(ax.collections for ax in figure.axes)  # the group outlines


def test_group_labels_place_each_group(tiny):
    model, _ = tiny
    height, width = 60, 100
    layout = adapter_for(model).layout((height, width))
    side, _, _, (y0, y1, x0, x1) = reference.geometry(model, height, width)
    groups = [[0, 1, side], [side * side, side * side + 1], [layout.n_features - 1]]
    base, canvas = group_labels(layout, groups)
    assert base[0, 0] == base[0, 1] == base[1, 0] == 0 and (base >= 0).sum() == 3
    assert canvas[0, 0] == canvas[0, 1] == 1 and canvas[-1, -1] == 2 and (canvas >= 0).sum() == 3
    assert np.array_equal(np.unique(canvas), [-1, 1, 2])
