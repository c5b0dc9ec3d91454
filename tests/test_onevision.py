"""LLaVA-OneVision on the tiny-onevision preset: the LLaVA-NeXT invariants for every registered
method, the geometry against the processor and against the anyres_max_9 formulas (with and
without the resampled canvas), and the CLS-free signals against the tower's own attention maps
and hidden states. References are written from the definitions, sharing no code with tokendrop."""

import importlib
import math

import pytest
import torch

import reference
import tokendrop
from conftest import greedy, prompt
from tokendrop.adapters import LlavaOnevisionAdapter
from tokendrop.method import METHODS
from tokendrop.presets import build_preset, synthetic_image

ALL = METHODS.names()
# (h, w): a padded 1x2 (exact), a padded 4x4 resampled to 17x18 of its 24x22 canvas, an
# unpadded 3x6 resampled to 12x25, and a tall 4x2 that stays under the 9-tile cap
SIZES = {"wide": (38, 96), "square": (180, 200), "panorama": (150, 300), "tall": (300, 150)}
QUESTIONS = ["What is red?", "Describe it.", "Where is the small blue square?"]


@pytest.fixture(scope="module")
def ov():
    return build_preset("tiny-onevision")


@pytest.fixture(scope="module")
def ov_eager():
    return build_preset("tiny-onevision", attn_implementation="eager")  # same seed, same weights


@pytest.fixture(scope="module")
def ov_images():
    return {name: synthetic_image(w, h, seed=i) for i, (name, (h, w)) in enumerate(SIZES.items())}


@pytest.fixture(autouse=True)
def never_left_patched_ov(ov):
    yield
    tokendrop.unpatch(ov[0])


@pytest.fixture
def ov_batch(ov, ov_images):
    """A left-padded batch: a padded exact image, a padded resampled one, an unpadded resampled one."""
    _, processor = ov
    images = [ov_images[name] for name in ("wide", "square", "panorama")]
    return processor(images=images, text=[prompt(processor, q) for q in QUESTIONS], return_tensors="pt", padding=True)


@pytest.fixture
def ov_singles(ov, ov_images):
    _, processor = ov
    return [
        processor(images=[ov_images[name]], text=[prompt(processor, q)], return_tensors="pt")
        for name, q in zip(("wide", "square", "panorama"), QUESTIONS)
    ]


# --- independent references -------------------------------------------------------------


def canvas_geometry(model, height, width):
    """(side, n_h, n_w, unpadded box, (out_h, out_w)): the packed canvas size after anyres_max_9."""
    side, n_h, n_w, (y0, y1, x0, x1) = reference.geometry(model, height, width)
    max_tiles = int(model.config.vision_aspect_ratio.removeprefix("anyres_max_"))
    h, w = y1 - y0, x1 - x0
    ratio = math.sqrt(h * w / (max_tiles * side * side))
    out = (int(h // ratio), int(w // ratio)) if ratio > 1.1 else (h, w)
    return side, n_h, n_w, (y0, y1, x0, x1), out


def ov_features(model, height, width):
    """[(partition, local)] of every feature token in packed order, and the packed length: each
    resampled canvas token stands for the patch nearest its bilinear (align_corners=False) sample
    point, ties to the upper/left patch."""
    side, n_h, n_w, (y0, y1, x0, x1), (out_h, out_w) = canvas_geometry(model, height, width)

    def nearest(i, n_in, n_out, start):
        source = (i + 0.5) * n_in / n_out - 0.5
        return start + math.ceil(source - 0.5)  # x.5 goes down

    feats = [(0, j) for j in range(side * side)]
    for i in range(out_h):
        y = nearest(i, y1 - y0, out_h, y0)
        for j in range(out_w):
            x = nearest(j, x1 - x0, out_w, x0)
            feats.append((1 + (y // side) * n_w + x // side, (y % side) * side + x % side))
    return feats, len(feats) + out_h


def canvas_yx(model, height, width):
    side, n_h, n_w, *_ = canvas_geometry(model, height, width)
    feats, _ = ov_features(model, height, width)
    return [((p - 1) // n_w * side + j // side, (p - 1) % n_w * side + j % side) for p, j in feats]


def tower_outputs(eager_model, batch):
    """Eager attention maps and hidden states of every real tile, split per image."""
    config = eager_model.config
    counts = [reference_tiles(config, size) for size in batch["image_sizes"].tolist()]
    real = torch.cat([pv[:c] for pv, c in zip(batch["pixel_values"], counts)])
    with torch.no_grad():
        out = eager_model.model.vision_tower(real, output_attentions=True, output_hidden_states=True)
    return out, counts


def reference_tiles(config, size):
    side = config.vision_config.image_size
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution(size, config.image_grid_pinpoints)
    return 1 + (best_h // side) * (best_w // side)


def received(eager_model, batch, layer):
    """Attention each token receives, mean over queries and heads: list of (P, side**2)."""
    out, counts = tower_outputs(eager_model, batch)
    return list(out.attentions[layer].float().mean((1, 2)).split(counts))


def minus_cos_to_mean(eager_model, batch, layer):
    """-cos(token, mean token) of layer `layer`'s output: list of (P, side**2)."""
    out, counts = tower_outputs(eager_model, batch)
    hidden = out.hidden_states[layer % len(out.attentions) + 1].float()
    mean = hidden.mean(1, keepdim=True)
    return list((-(hidden * mean).sum(-1) / (hidden.norm(dim=-1) * mean.norm(dim=-1))).split(counts))


def hired_reference(model, batch, signals_alloc, signals_select, budget, alpha=0.5):
    result = []
    for (height, width), alloc, select in zip(batch["image_sizes"].tolist(), signals_alloc, signals_select):
        feats, _ = ov_features(model, height, width)
        k = reference.keep_count(budget, len(feats))
        capacity = [sum(1 for p, _ in feats if p == q) for q in range(alloc.shape[0])]
        n_base = min(math.floor(alpha * k + 1e-9), capacity[0])
        mass = [
            sum(w * float(a) for w, a in zip(weights, alloc[0]))
            for weights in reference.region_weights(model, height, width)
        ]
        crops = reference.allocate(k - n_base, mass, capacity[1:])
        counts = [k - sum(crops)] + crops
        scores = [float(select[p, j]) for p, j in feats]
        result.append(reference.top_per_partition(scores, [p for p, _ in feats], counts))
    return result


def globalcom2_reference(model, batch, logits_per_image, budget, tau=10.0):
    """GlobalCom2 with the global map read at each canvas token's nearest patch."""
    result = []
    for (height, width), logits in zip(batch["image_sizes"].tolist(), logits_per_image):
        side, n_h, n_w, (y0, y1, x0, x1), _ = canvas_geometry(model, height, width)
        feats, _ = ov_features(model, height, width)
        yx = canvas_yx(model, height, width)
        k = reference.keep_count(budget, len(feats))
        ratio = k / len(feats)
        capacity = [sum(1 for p, _ in feats if p == q) for q in range(1 + n_h * n_w)]
        n_base = min(math.floor(ratio * side * side + 1e-9), capacity[0])
        base = [float(v) for v in logits[0]]
        sums = [sum(w * b for w, b in zip(weights, base)) for weights in reference.region_weights(model, height, width)]
        exps = [math.exp((s - max(sums)) / tau) for s in sums]
        ratios = [min(1.0, ratio * (1 + e / sum(exps) - 1 / len(exps))) for e in exps]
        crops = reference.allocate(k - n_base, [r * c for r, c in zip(ratios, capacity[1:])], capacity[1:])
        counts = [k - sum(crops)] + crops
        global_map = reference.bilinear([base[r * side : (r + 1) * side] for r in range(side)], y1 - y0, x1 - x0)
        local = [float(logits[p, j]) for p, j in feats]
        global_ = [0.0 if p == 0 else global_map[y - y0][x - x0] for (p, _), (y, x) in zip(feats, yx)]
        norms = {}
        for q in range(1, 1 + n_h * n_w):
            members = [i for i, (p, _) in enumerate(feats) if p == q]
            norms[q] = (
                math.sqrt(sum(local[i] ** 2 for i in members)),
                math.sqrt(sum(global_[i] ** 2 for i in members)),
            )
        scores = [
            local[i] if p == 0 else local[i] / norms[p][0] + global_[i] / norms[p][1] for i, (p, _) in enumerate(feats)
        ]
        result.append(reference.top_per_partition(scores, [p for p, _ in feats], counts))
    return result


# --- geometry ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [(38, 96), (96, 38), (60, 100), (180, 200), (150, 300), (300, 150), (40, 40), (200, 200), (100, 290)]
)
def test_layout_matches_processor_and_formulas(ov, size):
    model, processor = ov
    image = synthetic_image(size[1], size[0])
    inputs = processor(images=[image], text=[prompt(processor, "hi")], return_tensors="pt")
    layout = LlavaOnevisionAdapter(model).layout(size)
    n_placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
    feats, length = ov_features(model, *size)
    assert layout.packed_source.numel() == n_placeholders == length
    assert list(zip(layout.partition.tolist(), layout.local.tolist())) == feats
    with torch.no_grad():
        packed = LlavaOnevisionAdapter(model).image_features(inputs["pixel_values"], inputs["image_sizes"])[0]
    assert packed.shape[0] == length
    # newlines sit where the model put its image_newline vector
    is_newline = (packed == model.model.image_newline).all(-1)
    assert torch.equal(torch.nonzero(is_newline).flatten(), layout.newline_positions)
    *_, box, _ = canvas_geometry(model, *size)
    assert layout.valid_box == box


def test_resampled_and_exact_cases_are_both_covered(ov):
    model, _ = ov
    resampled = []
    for name, size in SIZES.items():
        *_, (y0, y1, x0, x1), out = canvas_geometry(model, *size)
        if out != (y1 - y0, x1 - x0):
            resampled.append(name)
    assert resampled == ["square", "panorama"]


def test_exact_layout_features_are_their_patches(ov, ov_images):
    """Without resampling each packed canvas token is its source patch's projected hidden state."""
    model, processor = ov
    inputs = processor(images=[ov_images["tall"]], text=[prompt(processor, "hi")], return_tensors="pt")
    layout = LlavaOnevisionAdapter(model).layout(SIZES["tall"])
    with torch.no_grad():
        packed = LlavaOnevisionAdapter(model).image_features(inputs["pixel_values"], inputs["image_sizes"])[0]
        tiles = inputs["pixel_values"][0][: layout.n_partitions]
        hidden = model.model.vision_tower(tiles, output_hidden_states=True).hidden_states[-1]
        projected = model.model.multi_modal_projector(hidden)
    expected = projected[layout.partition, layout.local]
    assert torch.allclose(packed[layout.feature_positions], expected, atol=1e-5)


# --- signals -----------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, -1])
def test_signals_equal_attention_maps_and_hidden_states(ov, ov_eager, ov_batch, layer):
    model, _ = ov
    adapter = LlavaOnevisionAdapter(model)
    with torch.no_grad():
        probs = adapter.encode(ov_batch["pixel_values"], ov_batch["image_sizes"], {layer: "probs"})
        logits = adapter.encode(ov_batch["pixel_values"], ov_batch["image_sizes"], {layer: "logits"})
    for image, expected in zip(probs, received(ov_eager[0], ov_batch, layer)):
        assert image.cls_scores(layer).dtype == torch.float32
        assert torch.allclose(image.cls_scores(layer), expected, atol=1e-6)
    for image, expected in zip(logits, minus_cos_to_mean(ov_eager[0], ov_batch, layer)):
        assert torch.allclose(image.cls_scores(layer), expected, atol=1e-6)


@pytest.mark.parametrize("budget", [0.3, 0.1])
def test_hired_equals_reference(ov, ov_eager, ov_batch, budget):
    model, _ = ov
    handle = tokendrop.patch(model, "hired", budget=budget)
    greedy(model, ov_batch, n=1)
    eager = ov_eager[0]
    expected = hired_reference(model, ov_batch, received(eager, ov_batch, 0), received(eager, ov_batch, -1), budget)
    assert [r.indices for r in handle.last] == expected


@pytest.mark.parametrize("budget", [0.3, 0.1])
def test_globalcom2_equals_reference(ov, ov_eager, ov_batch, budget):
    model, _ = ov
    handle = tokendrop.patch(model, "globalcom2", budget=budget)
    greedy(model, ov_batch, n=1)
    expected = globalcom2_reference(model, ov_batch, minus_cos_to_mean(ov_eager[0], ov_batch, -1), budget)
    assert [r.indices for r in handle.last] == expected


def test_missing_signal_is_a_clear_error(ov, monkeypatch):
    model, _ = ov

    class ProbsOnly(LlavaOnevisionAdapter):
        signal_kinds = ("probs",)

    monkeypatch.setattr(importlib.import_module("tokendrop.patch"), "adapter_for", ProbsOnly)
    with pytest.raises(
        ValueError, match="'globalcom2' needs the 'logits' signal.*LlavaOnevisionForConditionalGeneration"
    ):
        tokendrop.patch(model, "globalcom2", budget=0.5)
    assert "_tokendrop_handle" not in model.__dict__
    tokendrop.patch(model, "hired", budget=0.5)  # a method within the vocabulary patches


# --- the LLaVA-NeXT invariants -------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
def test_full_budget_is_identical(ov, ov_batch, method):
    model, processor = ov
    expected = greedy(model, ov_batch)
    with torch.no_grad():
        expected_logits = model(**ov_batch).logits
    for budget in (1.0, 10**6):
        with tokendrop.patched(model, method, budget=budget, processor=processor) as handle:
            assert torch.equal(greedy(model, ov_batch), expected)
            assert [r.n_kept for r in handle.last] == [r.n_before for r in handle.last]
            with torch.no_grad():
                assert torch.equal(model(**ov_batch).logits, expected_logits)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("budget", [0.5, 0.1, 17])
def test_exact_counts(ov, ov_batch, method, budget):
    model, processor = ov
    handle = tokendrop.patch(model, method, budget=budget, processor=processor)
    greedy(model, ov_batch, n=1)
    assert len(handle.last) == 3
    for (height, width), record in zip(ov_batch["image_sizes"].tolist(), handle.last):
        feats, _ = ov_features(model, height, width)
        assert record.n_before == len(feats)
        whole = sum(1 for p, _ in feats if p == 0) if getattr(handle.method, "scope", "all") == "crops" else 0
        expected = reference.keep_count(budget, len(feats) - whole)
        if method == "base" and expected < len(feats):
            expected = min(expected, sum(1 for p, _ in feats if p == 0))
        assert record.n_kept == whole + expected == len(record.indices)
        assert record.indices == sorted(set(record.indices)) and record.indices[-1] < len(feats)


@pytest.mark.parametrize("method", ALL)
def test_batched_equals_one_by_one(ov, ov_batch, ov_singles, method):
    model, processor = ov
    handle = tokendrop.patch(model, method, budget=0.3, processor=processor)
    together = greedy(model, ov_batch)[:, ov_batch["input_ids"].shape[1] :]
    records = handle.last
    pad = model.generation_config.pad_token_id
    for row, single in enumerate(ov_singles):
        alone = greedy(model, single)[0, single["input_ids"].shape[1] :]
        # a row that ends early (eos) is padded in the batch while the others go on
        assert torch.equal(together[row, : len(alone)], alone)
        assert bool((together[row, len(alone) :] == pad).all())
        assert handle.last[0] == records[row]


# --- several images in one prompt ------------------------------------------------------------


@pytest.fixture
def multi(ov, ov_images):
    """A two-image prompt (each image its base view only, as the model encodes it) beside a
    one-image prompt (with crops, resampled), left padded."""
    _, processor = ov
    images = [[ov_images["wide"], ov_images["tall"]], [ov_images["square"]]]
    texts = [prompt(processor, "Compare them.", n_images=2), prompt(processor, "And this?")]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("method", ["hired", "globalcom2", "visionzip", "pool"])
def test_multi_image_prompts(ov, ov_images, multi, method):
    model, processor = ov
    assert multi["batch_num_images"].tolist() == [2, 1]
    expected = greedy(model, multi)
    with tokendrop.patched(model, method, budget=1.0):
        assert torch.equal(greedy(model, multi), expected)
    handle = tokendrop.patch(model, method, budget=0.5)
    together = greedy(model, multi)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert [r.n_before for r in handle.last][:2] == [side * side] * 2  # base views only
    assert [r.n_kept for r in handle.last][:2] == [reference.keep_count(0.5, side * side)] * 2
    two = processor(
        images=[[ov_images["wide"], ov_images["tall"]]],
        text=[prompt(processor, "Compare them.", 2)],
        return_tensors="pt",
    )
    assert torch.equal(greedy(model, two)[0, -6:], together[0, -6:])


def ov_keep_mask(model, height, width, indices):
    """Packed keep mask under the "rows" newline policy: base tokens, then each packed canvas
    row of features followed by its newline, kept while the row keeps a feature."""
    side, *_, (out_h, out_w) = canvas_geometry(model, height, width)
    kept = set(indices)
    mask = [i in kept for i in range(side * side)]
    for row in range(out_h):
        features = [side * side + row * out_w + j in kept for j in range(out_w)]
        mask += features + [any(features)]
    return torch.tensor(mask)


def test_pruned_generation_equals_manual_reference(ov, ov_batch):
    """Greedy generation equals decoding by hand, without cache, from inputs_embeds built from
    the unpatched model's features of the recorded selection (resampled canvases included)."""
    model, _ = ov
    with torch.no_grad():
        packed = LlavaOnevisionAdapter(model).image_features(ov_batch["pixel_values"], ov_batch["image_sizes"])
    handle = tokendrop.patch(model, "hired", budget=0.25)
    out = greedy(model, ov_batch, n=5)
    token = model.config.image_token_id
    for row, ((height, width), record, features) in enumerate(
        zip(ov_batch["image_sizes"].tolist(), handle.last, packed)
    ):
        mask = ov_keep_mask(model, height, width, record.indices)
        assert record.n_newlines == int(mask.sum()) - record.n_kept
        valid = ov_batch["input_ids"][row][ov_batch["attention_mask"][row] == 1]
        keep = torch.ones_like(valid, dtype=torch.bool)
        keep[(valid == token).nonzero().flatten()[~mask]] = False
        embeds = reference.embed_prompt(model, valid[keep][None], [features[mask]])
        assert reference.greedy_no_cache(model, embeds, 5) == out[row, -5:].tolist()


def test_unsupported_configuration_fails_clearly(ov):
    model, _ = ov
    model.config.vision_feature_select_strategy = "default"
    try:
        with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
            tokendrop.patch(model, "hired", budget=0.5)
    finally:
        model.config.vision_feature_select_strategy = "full"


def test_a_onevision_checkpoint_loads_and_sweeps_and_profiles(ov, tmp_path):
    """`--model` may name a OneVision checkpoint (the class comes from its config) or the
    OneVision presets; `sweep` and `profile` run on them through the adapter."""
    import json

    from tokendrop.cli import main
    from tokendrop.loading import load_model

    model, _ = ov
    model.save_pretrained(tmp_path / "checkpoint")
    loaded = load_model(str(tmp_path / "checkpoint"))
    assert type(loaded).__name__ == "LlavaOnevisionForConditionalGeneration"
    with tokendrop.patched(loaded, "hired", budget=0.25) as handle:
        assert isinstance(handle.adapter, LlavaOnevisionAdapter)

    data = tmp_path / "data"
    data.mkdir()
    with open(data / "data.jsonl", "w") as file:
        for i, (w, h) in enumerate([(90, 60), (200, 70)]):
            synthetic_image(w, h, seed=i).save(data / f"{i}.png")
            file.write(json.dumps({"id": f"q{i}", "image": f"{i}.png", "question": "What?", "answers": ["x"]}) + "\n")
    assert (
        main(
            [
                "sweep",
                "--model",
                "tiny-onevision",
                "--tasks",
                "custom",
                "--data",
                f"custom={data / 'data.jsonl'}",
                "--methods",
                "hired",
                "globalcom2",
                "--budgets",
                "0.25",
                "--max-new-tokens",
                "2",
                "--no-progress",
                "--out",
                str(tmp_path / "sweep"),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert {(row["method"], row["n"]) for row in summary["cells"]} == {("none", 2), ("hired", 2), ("globalcom2", 2)}
    assert (
        main(
            [
                "profile",
                "--model",
                "tiny-onevision",
                "--methods",
                "hired",
                "--budgets",
                "0.25",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--max-new-tokens",
                "2",
                "--out",
                str(tmp_path / "profile"),
            ]
        )
        == 0
    )
    assert (tmp_path / "profile" / "profile.json").is_file()
