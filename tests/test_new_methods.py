"""dpp, divprune, cls, base and hired allocation="count" against independent re-computations
written here from the papers' formulas (plain loops, float64), and greedy DPP against brute force."""

import itertools
import math

import pytest
import torch

import reference
import tokendrop
from conftest import QUESTIONS, greedy
from tokendrop import selection
from tokendrop.adapters import adapter_for
from tokendrop.method.dpp import greedy_map
from tokendrop.presets import build_preset, synthetic_image

BUDGETS = [0.25, 0.1, 9]


@pytest.fixture(scope="module")
def eager():
    model, _ = build_preset("tiny", attn_implementation="eager")
    return model


def image_features(model, batch):
    """Per image: (N, D) float64 projected feature tokens, [(partition, local)] of each."""
    with torch.no_grad():
        packed = adapter_for(model).image_features(batch["pixel_values"], batch["image_sizes"])
    out = []
    for (height, width), vectors in zip(batch["image_sizes"].tolist(), packed):
        feats, layout = reference.features(model, height, width)
        rows = [vectors[pos] for pos, (kind, _) in enumerate(layout) if kind == "f"]
        out.append((torch.stack(rows).double(), feats))
    return out


def cosine(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def min_max(x):
    low, high = min(x), max(x)
    return [(v - low + 1e-6) / max(high - low, 1e-6) for v in x]


def naive_greedy_dpp(kernel, quality, k, tol=1e-6):
    """Greedy MAP by determinants: add the item that maximises det(L_S+i); once the best ratio
    det(L_S+i) / det(L_S) is <= tol * max_i L_ii, the rest by quality (ties: lower index)."""
    n = len(kernel)
    chosen = []
    floor = tol * max(kernel[i][i] for i in range(n))

    def det(items):
        if not items:
            return 1.0
        return float(
            torch.linalg.det(torch.tensor([[kernel[a][b] for b in items] for a in items], dtype=torch.float64))
        )

    while len(chosen) < k:
        base = det(chosen)
        gains = [(det(chosen + [i]) / base if i not in chosen else -math.inf) for i in range(n)]
        best = max(range(n), key=lambda i: (gains[i], -i))
        if gains[best] <= floor:
            rest = sorted((i for i in range(n) if i not in chosen), key=lambda i: (-quality[i], i))
            return chosen + rest[: k - len(chosen)]
        chosen.append(best)
    return chosen


def reference_dpp(features, feats, relevance, counts):
    """CDPruner's kernel L_ij = r_i r_j cos(v_i, v_j), greedy inside each partition p keeping
    counts[p]; an int `counts`: one greedy over all tokens."""
    n = len(feats)
    if isinstance(counts, int):
        groups, counts = [list(range(n))], [counts]
    else:
        groups = [[i for i in range(n) if feats[i][0] == p] for p in range(len(counts))]
    kept = []
    for members, k in zip(groups, counts):
        kernel = [
            [relevance[a] * relevance[b] * (1.0 if a == b else cosine(features[a], features[b])) for b in members]
            for a in members
        ]
        picks = naive_greedy_dpp(kernel, [relevance[a] for a in members], k)
        kept += [members[i] for i in picks]
    return sorted(kept)


def test_greedy_map_equals_determinant_greedy_on_random_kernels():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        n, d = 8, int(torch.randint(3, 10, (1,), generator=generator))
        features = torch.randn(n, d, generator=generator, dtype=torch.float64)
        quality = torch.rand(n, generator=generator, dtype=torch.float64) + 0.1
        kernel = (quality[:, None] * (features @ features.T) * quality[None]).tolist()
        for k in range(1, n + 1):
            chosen = greedy_map(features.float(), quality.float(), k).tolist()
            assert chosen == naive_greedy_dpp(kernel, quality.tolist(), k), (trial, k)
            # step by step: each prefix's next pick maximises log det of the extended set
            for i in range(1, min(k, d)):
                logdet = lambda s, kernel=kernel: torch.linalg.slogdet(
                    torch.tensor(kernel, dtype=torch.float64)[s][:, s]
                )[1]
                best = max(logdet(chosen[:i] + [j]) for j in range(n) if j not in chosen[:i])
                assert logdet(chosen[: i + 1]) >= best - 1e-6


def test_greedy_map_is_exact_where_greedy_is_optimal():
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        n = 8
        features = torch.randn(n, 5, generator=generator, dtype=torch.float64)
        quality = torch.rand(n, generator=generator, dtype=torch.float64) + 0.1
        kernel = quality[:, None] * (features @ features.T) * quality[None]
        # k = 1: the best singleton is the largest diagonal entry
        assert greedy_map(features.float(), quality.float(), 1).tolist() == [int(kernel.diagonal().argmax())]
        # orthogonal features (a diagonal kernel): greedy equals the brute-force log-det maximiser
        scale = torch.rand(n, generator=generator, dtype=torch.float64) + 0.1
        diagonal = torch.diag(scale)
        kern = torch.diag(quality**2 * scale**2)
        for k in range(1, n + 1):
            best = max(
                itertools.combinations(range(n), k), key=lambda s: float(torch.logdet(kern[list(s)][:, list(s)]))
            )
            assert sorted(greedy_map(diagonal.float(), quality.float(), k).tolist()) == sorted(best)


def test_greedy_map_set_by_set_equals_the_batched_device_path(monkeypatch):
    """The CPU runs a batch of sets one at a time; the device path (a GPU's) masks them all at
    once. Padded sets with their own counts, duplicated rows (tied gains) and a rank below k
    (exhausted gains, filled by quality) must give the same choices either way."""
    generator = torch.Generator().manual_seed(2)
    features = torch.nn.functional.normalize(torch.randn(3, 4, 12, 4, generator=generator), dim=-1)
    features[0, 1, 5] = features[0, 1, 2]
    quality = torch.rand(3, 4, 12, generator=generator) + 0.05
    valid = torch.rand(3, 4, 12, generator=generator) > 0.2
    valid[..., :7] = True
    counts = torch.randint(0, 8, (3, 4), generator=generator)
    set_by_set = greedy_map(features, quality, 7, counts=counts, valid=valid, unit=True)
    monkeypatch.setattr(selection, "HOST_DEVICES", frozenset())
    batched = greedy_map(features, quality, 7, counts=counts, valid=valid, unit=True)
    taken = torch.arange(7) < counts[..., None]
    assert torch.equal(set_by_set[taken], batched[taken])
    assert bool(valid.gather(-1, set_by_set)[taken].all())
    assert greedy_map(features, quality, 0).shape == (3, 4, 0)  # the device path; the host path below
    monkeypatch.undo()
    assert greedy_map(features, quality, 0).shape == (3, 4, 0)
    assert greedy_map(features[0, 0], quality[0, 0], 0).shape == (0,)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("relevance", ["text", "cls", "none"])
def test_dpp_global_equals_reference(tiny, eager, batch, budget, relevance):
    model, processor = tiny
    handle = tokendrop.patch(model, "dpp", budget=budget, relevance=relevance, allocation="global", processor=processor)
    greedy(model, batch, n=1)
    probs = reference.eager_cls_attention(eager, batch["pixel_values"], batch["image_sizes"], -2)
    table = model.get_input_embeddings().weight.detach().double()
    tokenizer = processor.tokenizer
    for (features, feats), record, question, prob in zip(image_features(model, batch), handle.last, QUESTIONS, probs):
        if relevance == "none":
            r = [1.0] * len(feats)
        elif relevance == "cls":
            r = min_max([float(prob[p, j]) for p, j in feats])
        else:
            ids = [
                i for i in tokenizer(question, add_special_tokens=False).input_ids if i not in tokenizer.all_special_ids
            ]
            r = min_max([sum(cosine(v, table[i]) for i in ids) / len(ids) for v in features])  # the paper's sign
        assert record.indices == reference_dpp(features, feats, r, reference.keep_count(budget, len(feats)))


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("allocation", ["partition", "hired", "globalcom2"])
def test_dpp_allocations_equal_reference(tiny, eager, batch, budget, allocation):
    model, processor = tiny
    handle = tokendrop.patch(model, "dpp", budget=budget, relevance="cls", allocation=allocation)
    greedy(model, batch, n=1)
    probs = reference.eager_cls_attention(eager, batch["pixel_values"], batch["image_sizes"], -2)
    if allocation == "hired":
        splits = reference.hired(eager, batch["pixel_values"], batch["image_sizes"], budget)
    elif allocation == "globalcom2":
        splits = reference.globalcom2(model, batch["pixel_values"], batch["image_sizes"], budget)
    for row, ((features, feats), record, prob) in enumerate(zip(image_features(model, batch), handle.last, probs)):
        n_parts = prob.shape[0]
        capacity = [sum(1 for p, _ in feats if p == q) for q in range(n_parts)]
        k = reference.keep_count(budget, len(feats))
        if allocation == "partition":
            counts = reference.allocate(k, capacity, capacity)
        else:  # the per-partition counts of those methods' own reference selections
            counts = [sum(1 for i in splits[row] if feats[i][0] == p) for p in range(n_parts)]
        r = min_max([float(prob[p, j]) for p, j in feats])
        assert record.indices == reference_dpp(features, feats, r, counts)
        assert record.partitions == counts


def globalcom2_token_scores(model, batch, layer=-1):
    """Per image, GlobalCom2's in-partition ranking score from its formula: a base token its own
    CLS logit; a crop token its logit plus the base logit map bilinearly resized to the unpadded
    canvas at its position, each L2-normalised over the crop's tokens."""
    out = []
    logits_of = reference.cls_logits(model, batch["pixel_values"], batch["image_sizes"], layer)
    for (height, width), logits in zip(batch["image_sizes"].tolist(), logits_of):
        side, _, _, (y0, y1, x0, x1) = reference.geometry(model, height, width)
        feats, _ = reference.features(model, height, width)
        base = [float(v) for v in logits[0]]
        canvas = reference.bilinear([base[r * side : (r + 1) * side] for r in range(side)], y1 - y0, x1 - x0)
        local = [float(logits[p, j]) for p, j in feats]
        global_ = [
            0.0 if p == 0 else canvas[(i - side * side) // (x1 - x0)][(i - side * side) % (x1 - x0)]
            for i, (p, _) in enumerate(feats)
        ]
        scores = []
        for i, (p, _) in enumerate(feats):
            members = [m for m, (q, _) in enumerate(feats) if q == p]
            if p == 0:
                scores.append(local[i])
            else:
                scores.append(
                    local[i] / math.sqrt(sum(local[m] ** 2 for m in members))
                    + global_[i] / math.sqrt(sum(global_[m] ** 2 for m in members))
                )
        out.append(scores)
    return out


@pytest.mark.parametrize("budget", BUDGETS + [0.02])
@pytest.mark.parametrize("allocation", ["hired", "globalcom2"])
def test_dpp_allocator_relevance_equals_reference(tiny, eager, batch, budget, allocation):
    """The default with an allocator: r is that method's own ranking score, min-max normalised
    within each partition, and the DPP runs on the allocator's counts."""
    model, processor = tiny
    handle = tokendrop.patch(model, "dpp", budget=budget, allocation=allocation)  # no processor needed
    assert handle.method.relevance == "allocator"
    greedy(model, batch, n=1)
    if allocation == "hired":
        splits = reference.hired(eager, batch["pixel_values"], batch["image_sizes"], budget)
        probs = reference.eager_cls_attention(eager, batch["pixel_values"], batch["image_sizes"], -2)
        scores_of = [
            [float(prob[p, j]) for p, j in reference.features(model, h, w)[0]]
            for (h, w), prob in zip(batch["image_sizes"].tolist(), probs)
        ]
    else:
        splits = reference.globalcom2(model, batch["pixel_values"], batch["image_sizes"], budget)
        scores_of = globalcom2_token_scores(model, batch)
    for row, ((features, feats), record, scores) in enumerate(
        zip(image_features(model, batch), handle.last, scores_of)
    ):
        n_parts = 1 + max(p for p, _ in feats)
        counts = [sum(1 for i in splits[row] if feats[i][0] == p) for p in range(n_parts)]
        r = [0.0] * len(feats)
        for p in range(n_parts):
            members = [i for i, (q, _) in enumerate(feats) if q == p]
            for i, v in zip(members, min_max([scores[i] for i in members])):
                r[i] = v
        assert record.indices == reference_dpp(features, feats, r, counts)
        assert record.partitions == counts
        # a partition that keeps one token keeps the allocator's own top token
        for p, count in enumerate(counts):
            if count == 1:
                assert [i for i in record.indices if feats[i][0] == p] == [i for i in splits[row] if feats[i][0] == p]


@pytest.mark.parametrize("budget", BUDGETS + [0.5])
def test_divprune_equals_reference(tiny, batch, budget):
    model, _ = tiny
    handle = tokendrop.patch(model, "divprune", budget=budget)
    greedy(model, batch, n=1)
    for (features, feats), record in zip(image_features(model, batch), handle.last):
        n = len(feats)
        dist = [[1 - cosine(features[a], features[b]) for b in range(n)] for a in range(n)]
        # seed: the token whose nearest other token is farthest
        chosen = [max(range(n), key=lambda i: (min(dist[i][j] for j in range(n) if j != i), -i))]
        while len(chosen) < reference.keep_count(budget, n):
            rest = [i for i in range(n) if i not in chosen]
            chosen.append(max(rest, key=lambda i: (min(dist[i][j] for j in chosen), -i)))
        assert record.indices == sorted(chosen)


@pytest.mark.parametrize("budget", BUDGETS + [0.5, 1000])
@pytest.mark.parametrize("method", ["cls", "base"])
def test_cls_and_base_equal_reference(tiny, eager, batch, budget, method):
    model, _ = tiny
    handle = tokendrop.patch(model, method, budget=budget)
    greedy(model, batch, n=1)
    probs = reference.eager_cls_attention(eager, batch["pixel_values"], batch["image_sizes"], -2)
    for (height, width), record, prob in zip(batch["image_sizes"].tolist(), handle.last, probs):
        feats, _ = reference.features(model, height, width)
        k = reference.keep_count(budget, len(feats))
        candidates = [i for i, (p, _) in enumerate(feats) if method == "cls" or p == 0 or k == len(feats)]
        ranked = sorted(candidates, key=lambda i: (-float(prob[feats[i]]), i))
        assert record.indices == sorted(ranked[:k])


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.1, 40])
@pytest.mark.parametrize("alpha", [0.5, 0.2, 0.9])
def test_hired_count_allocation_equals_reference(tiny, eager, batch, budget, alpha):
    """The reference code's crop weights: how many of the base's top floor(tile * (1 - alpha))
    layer-0 patches fall in each crop's region (2-D, padding-aware, by area share)."""
    model, _ = tiny
    handle = tokendrop.patch(model, "hired", budget=budget, alpha=alpha, allocation="count")
    greedy(model, batch, n=1)
    allocs = reference.eager_cls_attention(eager, batch["pixel_values"], batch["image_sizes"], 0)
    selects = reference.eager_cls_attention(eager, batch["pixel_values"], batch["image_sizes"], -2)
    for (height, width), record, alloc, select in zip(batch["image_sizes"].tolist(), handle.last, allocs, selects):
        feats, _ = reference.features(model, height, width)
        tile = alloc.shape[1]
        k = reference.keep_count(budget, len(feats))
        capacity = [sum(1 for p, _ in feats if p == q) for q in range(alloc.shape[0])]
        n_base = min(math.floor(alpha * k + 1e-9), capacity[0])
        top = sorted(range(tile), key=lambda j: (-float(alloc[0, j]), j))[: math.floor(tile * (1 - alpha) + 1e-9)]
        weights = [sum(region[j] for j in top) for region in reference.region_weights(model, height, width)]
        crops = reference.allocate(k - n_base, weights, capacity[1:])
        counts = [k - sum(crops)] + crops
        expected = reference.top_per_partition([float(select[p, j]) for p, j in feats], [p for p, _ in feats], counts)
        assert record.indices == expected


@pytest.mark.parametrize(
    "method, options, error, message",
    [
        ("dpp", dict(relevance="clip", processor=None), ValueError, "'text', 'cls', 'none', 'allocator'"),
        ("dpp", dict(relevance="allocator", allocation="partition"), ValueError, "needs allocation='hired' or"),
        ("dpp", dict(relevance="cls", allocation="crops"), ValueError, "'global', 'partition', 'hired', 'globalcom2'"),
        ("dpp", dict(allocation="global"), ValueError, "needs processor="),
        ("dpp", dict(allocation="global", processor=42), TypeError, "processor="),
        ("hired", dict(allocation="area"), ValueError, "'mass', 'count'"),
        ("cls", dict(select_layer=7), ValueError, "out of range"),
        ("base", dict(select_layer="last"), TypeError, "select_layer"),
        ("divprune", dict(seed=1), ValueError, "no option"),
    ],
)
def test_bad_options_rejected_at_patch(tiny, method, options, error, message):
    model, _ = tiny
    with pytest.raises(error, match=message):
        tokendrop.patch(model, method, budget=0.2, **options)
    assert "_tokendrop_handle" not in model.__dict__


def test_dpp_needs_no_processor_without_text_relevance(tiny, batch):
    model, _ = tiny
    for allocation in ("global", "hired"):
        handle = tokendrop.patch(model, "dpp", budget=0.2, relevance="none", allocation=allocation)
        greedy(model, batch, n=1)
        assert all(r.n_kept == reference.keep_count(0.2, r.n_before) for r in handle.last)


def test_selection_benchmark_reads_its_baseline_from_an_archive_where_there_is_no_git(tmp_path):
    import subprocess

    from tokendrop.eval import bench_selection

    archive = tmp_path / "baseline.tar"
    files = ["tokendrop", "adapters/llava_next.py"]
    git = ["git", "-C", str(bench_selection.ROOT), "archive", bench_selection.BASELINE, *files]
    archive.write_bytes(subprocess.run(git, check=True, capture_output=True).stdout)
    before = bench_selection.load_baseline("", archive)
    assert before["revision"] == bench_selection.BASELINE  # read from the archive, not the argument
    assert before["build"]("hired", budget=0.1).budget == 0.1


def test_selection_benchmark_runs_and_writes_json(tmp_path, capsys):
    import json

    from tokendrop.eval import bench_selection

    out = tmp_path / "bench.json"
    bench_selection.main(["--preset", "tiny", "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["devices"]["cpu"]["methods"]
    assert set(rows) == {f"{name}@{budget}" for name in tokendrop.methods() for budget in (0.1, 0.25)}
    assert rows["hired@0.1"]["ratio_to_hired"] == 1.0
    batches = result["devices"]["cpu"]["batches"]
    assert set(batches) == {f"{name}@0.1 x{n}" for name in bench_selection.BATCH_METHODS for n in (1, 8)}
    assert all(row["speedup"] == row["baseline"]["median_s"] / row["batched"]["median_s"] for row in batches.values())
    assert "dpp@0.1" in capsys.readouterr().out


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("allocation", ["partition", "hired", "globalcom2"])
@pytest.mark.parametrize(
    "preset, width, height",
    [("tiny", 1000, 1), ("tiny", 1, 1000), ("tiny-onevision", 100, 300), ("tiny-onevision", 144, 288)],
)
def test_dpp_per_partition_on_thin_and_portrait_images(preset, width, height, allocation, path, monkeypatch):
    """Partitions left empty (the crops of a very thin image, OneVision's padded portrait
    canvas) get no tokens and no greedy: the CPU's own path took the max of an empty set."""
    if path == "device":
        monkeypatch.setattr(selection, "HOST_DEVICES", frozenset())
    model, processor = build_preset(preset)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True,
    )
    # channels stated: transformers 4.56 reads a 1-pixel-high image as channels-first
    image = synthetic_image(width, height)
    inputs = processor(images=[image], text=[text], return_tensors="pt", input_data_format="channels_last")
    relevance = "cls" if allocation == "partition" else "allocator"
    with tokendrop.patched(model, "dpp", budget=0.2, allocation=allocation, relevance=relevance) as handle:
        greedy(model, inputs, n=1)
    record = handle.last[0]
    assert record.n_kept == max(1, int(0.2 * record.n_before)) and len(set(record.indices)) == record.n_kept
