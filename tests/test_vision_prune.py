"""Pruning inside the vision tower (`vision_prune_layer=K`): selection at layer K, layers K+1 up
to the feature layer on the kept tokens only.

Exact where it must be: budget 1.0 gives the unpatched model's logits and tokens for every K;
kept counts are today's; the kept set is the one selection after the tower makes from the
same layer-K reads (a call whose features are taken at K); a batch equals its prompts one by
one. Each tile's vectors equal the tower's later layers run on that tile's kept tokens alone
(its CLS first, or the whole tile where it keeps every feature), written here from the
definition. A 5-layer variant of the tiny preset (features at layer 3) gives K = 0, 1, 2."""

import pytest
import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration

import reference
import tokendrop
from conftest import QUESTIONS, greedy, prompt
from tokendrop.adapters import adapter_for
from tokendrop.adapters.llava_next import TileRows
from tokendrop.presets import build_config, build_preset, build_processor, synthetic_image

FEATURE = 3  # the deep preset's feature layer: hidden state -2 of 5 layers
LAYERS = [0, 2]  # the first and the last below the feature layer
# the methods that select inside the tower, with options, and the same selection after the
# tower from a call whose features are layer K's output (their layer options set to K)
IN_TOWER = [
    ("cls", {}, {"select_layer": "K"}),
    ("hired", {}, {"select_layer": "K"}),
    ("globalcom2", {}, {"score_layer": "K"}),
    ("base", {}, {"select_layer": "K"}),
    ("divprune", {}, {}),
    ("dpp", {"relevance": "none", "allocation": "global"}, {"relevance": "none", "allocation": "global"}),
    ("random", {}, {}),
    ("uniform", {}, {}),
]
ALSO = [("dpp", {"allocation": "globalcom2"}), ("dpp", {"relevance": "cls", "allocation": "partition"})]


@pytest.fixture(scope="module")
def deep():
    processor = build_processor("tiny")
    config = build_config("tiny", processor.tokenizer)
    config.vision_config.num_hidden_layers = 5
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


@pytest.fixture(autouse=True)
def never_left_patched_deep(deep):
    yield
    tokendrop.unpatch(deep[0])


def test_the_deep_preset_has_the_layers_the_tests_count_on(deep):
    adapter = adapter_for(deep[0])
    assert adapter.n_vision_layers == 5 and adapter.feature_layer % 5 == FEATURE


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("method, options", [(m, o) for m, o, _ in IN_TOWER] + ALSO)
def test_full_budget_is_the_unpatched_model(deep, batch, method, options, layer):
    model, processor = deep
    with torch.no_grad():
        expected_logits = model(**batch).logits
    expected = greedy(model, batch, n=4)
    with tokendrop.patched(model, method, budget=1.0, vision_prune_layer=layer, **options) as handle:
        assert handle.prune_layer == layer % 5
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, expected_logits)
        assert torch.equal(greedy(model, batch, n=4), expected)
        assert [r.n_kept for r in handle.last] == [r.n_before for r in handle.last]


@pytest.mark.parametrize("budget", [0.1, 17])
@pytest.mark.parametrize("method, options", [(m, o) for m, o, _ in IN_TOWER] + ALSO)
def test_kept_counts_are_todays(deep, batch, method, options, budget):
    model, _ = deep
    with tokendrop.patched(model, method, budget=budget, **options) as after:
        greedy(model, batch, n=1)
    with tokendrop.patched(model, method, budget=budget, vision_prune_layer=1, **options) as inside:
        greedy(model, batch, n=1)
    assert [r.n_kept for r in inside.last] == [r.n_kept for r in after.last]
    for (height, width), record in zip(batch["image_sizes"].tolist(), inside.last):
        feats, _ = reference.features(model, height, width)
        expected = reference.keep_count(budget, len(feats))
        if method == "base":
            expected = min(expected, sum(1 for p, _ in feats if p == 0))
        assert record.n_kept == expected


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("method, inside, after", IN_TOWER)
def test_the_kept_set_is_selection_after_the_tower_from_layer_k(deep, batch, method, inside, after, layer):
    """In the tower at K, a method keeps what it keeps after the tower from a pass whose scores
    and features are layer K's: a call with vision_feature_layer K + 1 (the hidden state after
    layer K) and the method's layers set to K."""
    model, _ = deep
    after = {name: layer if value == "K" else value for name, value in after.items()}
    with tokendrop.patched(model, method, budget=0.2, vision_prune_layer=layer, **inside) as handle:
        greedy(model, batch, n=1)
        kept_inside = [r.indices for r in handle.last]
    with tokendrop.patched(model, method, budget=0.2, **after) as handle:
        greedy(model, batch, n=1, vision_feature_layer=layer + 1)
        kept_after = [r.indices for r in handle.last]
    assert kept_inside == kept_after


@pytest.mark.parametrize("budget", [0.3, 0.05])
@pytest.mark.parametrize("method, options", [("hired", {}), ("cls", {}), ("dpp", {"allocation": "globalcom2"})])
def test_batched_equals_one_by_one(deep, batch, singles, method, options, budget):
    model, _ = deep
    with tokendrop.patched(model, method, budget=budget, vision_prune_layer=1, **options) as handle:
        together = greedy(model, batch)
        with torch.no_grad():
            vectors = model(**batch).image_outputs.pooler_output if _has_image_outputs() else None
        records = handle.last
        for row, single in enumerate(singles):
            alone = greedy(model, single)
            assert torch.equal(together[row, -6:], alone[0, -6:])
            assert handle.last[0] == records[row]
            if vectors is not None:
                with torch.no_grad():
                    (own,) = model(**single).image_outputs.pooler_output
                torch.testing.assert_close(vectors[row], own, atol=1e-5, rtol=1e-4)


def _has_image_outputs() -> bool:
    from transformers.models.llava_next.modeling_llava_next import LlavaNextCausalLMOutputWithPast

    return "image_outputs" in LlavaNextCausalLMOutputWithPast.__dataclass_fields__


class Spy:
    """Records what `finish_tower` is given and returns, on one adapter instance."""

    def __init__(self, adapter):
        self.adapter, self.original, self.calls = adapter, adapter.finish_tower, []

    def __enter__(self):
        def spy(images, kept, layer, **options):
            packed = self.original(images, kept, layer, **options)
            self.calls.append((images, kept, layer, packed))
            return packed

        self.adapter.finish_tower = spy
        return self

    def __exit__(self, *exc):
        del self.adapter.finish_tower


def later_layers(adapter, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """Layers `layer` + 1 up to the feature layer on one tile's tokens (T', D), alone: no mask."""
    hidden = tokens[None]
    for block in adapter.vision_layers[layer + 1 : FEATURE + 1]:
        extra = {"causal_attention_mask": None} if "causal_attention_mask" in block.forward.__code__.co_varnames else {}
        output = block(hidden, None, **extra)
        hidden = output[0] if isinstance(output, tuple) else output
    return hidden[0]


@pytest.mark.parametrize("method, budget", [("hired", 0.3), ("cls", 0.2), ("random", 0.6), ("hired", 0.9)])
def test_each_tile_equals_its_kept_tokens_run_alone(deep, batch, method, budget):
    """Tiles of one image with different kept counts (packed into shared rows, each attending
    within itself) give what each gives run alone: its CLS token and kept patches in raster
    order through the later layers, or the whole tile where it keeps every feature; then the
    projector. Newlines are the model's."""
    model, _ = deep
    layer = 1
    with tokendrop.patched(model, method, budget=budget, vision_prune_layer=layer) as handle, torch.no_grad():
        with Spy(handle.adapter) as spy:
            model(**batch)
        ((images, kept, _, packed),) = spy.calls
        counts = []
        for image, keep, vectors in zip(images, kept, packed):
            layout = image.layout
            tiles = []
            for p in range(layout.n_partitions):
                idx = torch.nonzero(keep & (layout.partition == p)).flatten()
                if not idx.numel():
                    continue
                local = layout.local[idx]
                assert torch.equal(local, local.sort().values)  # features of a tile come in raster order
                whole = idx.numel() == layout.sizes[p]
                tokens = image.hidden[p] if whole else image.hidden[p][torch.cat([torch.tensor([0]), 1 + local])]
                out = model.model.multi_modal_projector(later_layers(handle.adapter, tokens, layer))
                expected = out[1 + local] if whole else out[1:]
                torch.testing.assert_close(vectors[layout.feature_positions[idx]], expected, atol=1e-5, rtol=1e-4)
                tiles.append(idx.numel())
            counts.append(tiles)
            newlines = model.model.image_newline.expand(layout.newline_positions.numel(), -1)
            assert torch.equal(vectors[layout.newline_positions], newlines)
        assert any(len(set(c)) > 1 for c in counts)  # some image's tiles keep different counts


def test_the_later_layers_see_only_the_kept_tokens(deep, batch):
    """Layers 0..K run on every tile's tokens; layers K+1..F on about the kept ones (with each
    tile's CLS and the rows' padding); the last layer not at all."""
    model, _ = deep
    adapter = adapter_for(model)
    seen = {}

    def record(i):
        def hook(module, args):
            seen.setdefault(i, tuple(args[0].shape[:2]))

        return hook

    hooks = [block.register_forward_pre_hook(record(i)) for i, block in enumerate(adapter.vision_layers)]
    try:
        with tokendrop.patched(model, "hired", budget=0.1, vision_prune_layer=1) as handle:
            greedy(model, batch, n=1)
    finally:
        for hook in hooks:
            hook.remove()
    tiles = sum(r.n_before > 0 and len(r.partitions) for r in handle.last)
    assert seen[0] == seen[1] == (tiles, 37)  # 6 x 6 patches and the CLS token
    kept_tokens = sum(r.n_kept for r in handle.last) + tiles
    rows, length = seen[2]
    assert seen[3] == seen[2] and 4 not in seen
    assert kept_tokens <= rows * length < kept_tokens + length  # the rows hold what they need, little padding


def test_rows_at_a_full_budget_are_the_tiles_unmasked(deep, batch):
    model, _ = deep
    adapter = adapter_for(model)
    layouts = adapter.layouts(batch["image_sizes"])
    full = [torch.ones(layout.n_features, dtype=torch.bool) for layout in layouts]
    rows = TileRows.plan(layouts, full, 37, 1)
    tiles = sum(layout.n_partitions for layout in layouts)
    assert rows.shape == (tiles, 37) and rows.segment is None
    assert torch.equal(rows.source, torch.arange(tiles * 37))
    # one feature dropped: its tile loses its padding and that feature, the others stay whole
    partial = [keep.clone() for keep in full]
    partial[0][-1] = False
    rows = TileRows.plan(layouts, partial, 37, 1)
    assert rows.segment is not None and rows.attention_mask(torch.float32, "cpu").shape[1] == 1


def test_profile_reports_the_vision_time_of_both_parts(deep, batch, monkeypatch):
    """`vision_s` covers the pass up to K and the rest of the tower on the kept tokens: the
    rest slowed by 0.3 s shows in it, not in the selection time."""
    import time

    from tokendrop.adapters.llava_next import LlavaNextAdapter
    from tokendrop.measure import measure_generate

    model, _ = deep
    original = LlavaNextAdapter.finish_tower

    def slow(self, *args, **kwargs):
        time.sleep(0.3)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlavaNextAdapter, "finish_tower", slow)
    with tokendrop.patched(model, "hired", budget=0.2, vision_prune_layer=1):
        figures = measure_generate(model, batch, max_new_tokens=1)
    assert figures["vision_s"] >= 0.3 and figures["select_s"] < 0.3
    assert "finish_tower" not in adapter_for(model).__dict__


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, error, match",
    [
        (3, ValueError, "not below the feature layer 3"),
        (-2, ValueError, "not below the feature layer 3"),
        (5, ValueError, "out of range"),
        (-6, ValueError, "out of range"),
        (1.0, TypeError, "must be an int"),
        ("1", TypeError, "must be an int"),
        (True, TypeError, "must be an int"),
    ],
)
def test_a_layer_that_cannot_be_is_refused(deep, layer, error, match):
    model, _ = deep
    before = dict(model.__dict__)
    with pytest.raises(error, match=match):
        tokendrop.patch(model, "hired", budget=0.2, vision_prune_layer=layer)
    assert model.__dict__ == before  # refused before the model is touched


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("text", {}, "question's LLM input embeddings"),
        ("router", {}, "question's LLM input embeddings"),
        ("dpp", {"allocation": "global"}, "relevance='cls', 'none' or 'allocator'"),
        ("pool", {}, "no vector there to average"),
        ("visionzip", {}, "no vector there to average"),
        ("hired", {"select_layer": 2}, "selection sees the tower up to layer 1 only"),
        ("hired", {"alloc_layer": 3}, "selection sees the tower up to layer 1 only"),
    ],
)
def test_methods_that_cannot_select_inside_are_refused(deep, method, options, match):
    model, processor = deep
    with pytest.raises(ValueError, match=match):
        tokendrop.patch(model, method, budget=0.2, processor=processor, vision_prune_layer=1, **options)
    assert tokendrop.handle_of(model) is None


def test_layer_options_count_in_the_tower_that_ends_at_k(deep):
    model, _ = deep
    handle = tokendrop.patch(model, "hired", budget=0.2, vision_prune_layer=2, select_layer=-2)
    assert handle.method.signals() == {0: "probs", -2: "probs"}
    assert "inside the vision tower at layer 2" in repr(handle)
    assert tokendrop.patch(model, "cls", budget=0.2, vision_prune_layer=-5).prune_layer == 0  # negative: from the end


def test_a_call_whose_features_are_not_past_k_is_refused(deep, batch):
    model, _ = deep
    tokendrop.patch(model, "hired", budget=0.2, vision_prune_layer=2)
    with pytest.raises(ValueError, match="not one hidden state past vision layer 2"):
        greedy(model, batch, n=1, vision_feature_layer=3)  # hidden state 3: layer 2's output


def test_other_towers_and_configurations_are_refused(deep):
    model, _ = deep
    qwen, _ = build_preset("tiny-qwen2-vl")
    with pytest.raises(ValueError, match="not available for a Qwen2VLForConditionalGeneration: its tower runs"):
        tokendrop.patch(qwen, "hired", budget=0.2, vision_prune_layer=0)
    vision = model.model.vision_tower.config
    implementation = vision._attn_implementation
    try:
        vision._attn_implementation = "flash_attention_2"
        with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
            tokendrop.patch(model, "hired", budget=0.2, vision_prune_layer=0)
    finally:
        vision._attn_implementation = implementation
    layers = model.config.vision_feature_layer
    try:
        model.config.vision_feature_layer = [1, -2]
        with pytest.raises(ValueError, match="concatenates hidden states"):
            tokendrop.patch(model, "hired", budget=0.2, vision_prune_layer=0)
    finally:
        model.config.vision_feature_layer = layers


def test_nothing_is_left_behind(deep, batch):
    model, _ = deep
    adapter = adapter_for(model)
    before = dict(model.__dict__)
    with tokendrop.patched(model, "hired", budget=0.2, vision_prune_layer=1):
        greedy(model, batch, n=2)
    assert model.__dict__ == before
    assert type(adapter.encoder_layers) is nn.ModuleList
    hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    assert all(hook.__module__.startswith("transformers.") for hook in hooks)


# --- LLaVA-OneVision: SigLIP, no CLS token --------------------------------------------------------


@pytest.fixture(scope="module")
def ov():
    model, processor = build_preset("tiny-onevision")
    # a padded 1x2 and a 4x2 under the 9-tile cap: packed without resampling
    images = [synthetic_image(96, 38, seed=0), synthetic_image(150, 300, seed=1)]
    batch = processor(
        images=images, text=[prompt(processor, q) for q in QUESTIONS[:2]], return_tensors="pt", padding=True
    )
    singles = [
        processor(images=[i], text=[prompt(processor, q)], return_tensors="pt") for i, q in zip(images, QUESTIONS)
    ]
    return model, processor, batch, singles


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("method, options", [("hired", {}), ("globalcom2", {}), ("divprune", {}), ("cls", {})])
def test_onevision_full_budget_and_counts(ov, method, options, layer):
    model, _, batch, singles = ov
    with torch.no_grad():
        expected = model(**batch).logits
    try:
        with tokendrop.patched(model, method, budget=1.0, vision_prune_layer=layer, **options), torch.no_grad():
            assert torch.equal(model(**batch).logits, expected)
        with tokendrop.patched(model, method, budget=0.2, **options) as after:
            greedy(model, batch, n=1)
        with tokendrop.patched(model, method, budget=0.2, vision_prune_layer=layer, **options) as inside:
            together = greedy(model, batch, n=3)
            records = inside.last
            for row, single in enumerate(singles):
                assert torch.equal(greedy(model, single, n=3)[0, -3:], together[row, -3:])
                assert inside.last[0] == records[row]
        assert [r.n_kept for r in records] == [r.n_kept for r in after.last]
    finally:
        tokendrop.unpatch(model)


def test_onevision_resampled_canvas_is_refused_at_the_call(ov):
    model, processor, _, _ = ov
    inputs = processor(images=[synthetic_image(200, 180)], text=[prompt(processor, "Hi?")], return_tensors="pt")
    try:
        tokendrop.patch(model, "hired", budget=0.2, vision_prune_layer=0)
        with pytest.raises(ValueError, match="resamples the crop canvas"):
            greedy(model, inputs, n=1)
    finally:
        tokendrop.unpatch(model)


def test_the_benchmark_runs_every_variant_interleaved_and_writes_json(tmp_path, capsys):
    import json

    from tokendrop.eval import bench_tower

    out = tmp_path / "bench_tower.json"
    bench_tower.main(["--preset", "tiny", "--budgets", "0.2", "--repeats", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["config"]["layers"] == [0]  # the tiny preset's only layer below its features (layer 1)
    assert list(result["variants"]) == ["none", "after 0.2", "K=0 0.2"]
    for figures in result["variants"].values():
        assert len(figures["ttft_s"]["samples"]) == 2 and figures["vision_s"]["median"] > 0
        assert figures["speedup"]["ttft_s"]["median"] > 0
    assert result["variants"]["K=0 0.2"]["kept"] == result["variants"]["after 0.2"]["kept"]
    assert "TTFT x" in capsys.readouterr().out
