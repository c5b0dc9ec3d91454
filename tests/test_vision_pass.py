"""The vision pass runs only what is read: features and scores bit-identical to the full tower's,
the encoder stopping at the deepest layer whose output feeds the LLM or a signal, a deeper
scored layer computing only its q/k projections, and nothing left behind in the model or in
another thread's pass over the same tower.

References are the model's own `get_image_features` (every layer) inside the same score hooks,
as tokendrop ran it before the early stop; expected layer counts are written out by hand from
the presets (tiny: 3 CLIP layers, features at hidden state -2 = after layer 1)."""

import json
import threading

import pytest
import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration

import tokendrop
from conftest import greedy, prompt
from tokendrop.adapters import adapter_for
from tokendrop.eval import bench_vision
from tokendrop.method import build as build_method
from tokendrop.presets import build_config, build_preset, build_processor, synthetic_image

# method, options, {absolute layer: kind} it asks for (tiny), full layers run, a layer scored
# from its projections alone (None: every scored layer runs in full)
CASES = [
    ("hired", {}, {0: "probs", 1: "probs"}, 2, None),
    ("globalcom2", {}, {2: "logits"}, 2, 2),  # score_layer -1: the last layer, past the features
    ("cls", {}, {1: "probs"}, 2, None),
    ("text", {}, {}, 2, None),
    ("cls", {"select_layer": -1}, {2: "probs"}, 2, 2),
    ("hired", {"alloc_layer": -1, "select_layer": 0}, {2: "probs", 0: "probs"}, 2, 2),
]


class LayerRuns:
    """Counts, per thread, the forwards of every encoder layer and of each layer's MLP and
    projections, with forward hooks (removed by `remove`)."""

    def __init__(self, adapter):
        self.counts: dict[tuple[int, str, int], int] = {}
        self.handles = []
        for i, layer in enumerate(adapter.vision_layers):
            parts = {"layer": layer, "mlp": layer.mlp, "q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj}
            for name, module in parts.items():
                self.handles.append(module.register_forward_hook(self.counter(i, name)))

    def counter(self, i, name):
        def count(module, args, output):
            key = (threading.get_ident(), name, i)
            self.counts[key] = self.counts.get(key, 0) + 1

        return count

    def of(self, name: str, n_layers: int, thread=None) -> list[int]:
        thread = threading.get_ident() if thread is None else thread
        return [self.counts.get((thread, name, i), 0) for i in range(n_layers)]

    def remove(self):
        for handle in self.handles:
            handle.remove()


def full_tower(adapter, pixel_values, image_sizes, signals, **vision_kwargs):
    """(packed features, {layer: (tiles, L - 1) scores}) from the model's own pass, every layer run."""
    with adapter.capture_scores(signals) as captured, torch.no_grad():
        output = adapter.vlm.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes, **vision_kwargs)
    packed = list(getattr(output, "pooler_output", output))
    return packed, {layer: torch.cat(scores) for layer, scores in captured.items()}


def assert_same(images, packed, scores):
    assert len(images) == len(packed)
    for image, features in zip(images, packed):
        assert torch.equal(image.packed, features)
    assert all(set(image.cls) == set(scores) for image in images)
    for layer, tiles in scores.items():
        expected = tiles.split([image.layout.n_partitions for image in images])
        for image, image_scores in zip(images, expected):
            assert image.cls[layer].dtype == torch.float32
            assert torch.equal(image.cls[layer], image_scores.view(-1, image.layout.tile))


def assert_nothing_left(model, adapter):
    """The layer list is a plain ModuleList again and no hook but transformers' own (5.x records
    hidden states with hooks it installs once) is left on the model."""
    assert type(adapter.encoder_layers) is nn.ModuleList
    hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    assert all(hook.__module__.startswith("transformers.") for hook in hooks)


@pytest.mark.parametrize(("method", "options", "signals", "depth", "projected"), CASES)
def test_features_and_scores_equal_the_full_tower(tiny, batch, method, options, signals, depth, projected):
    model, processor = tiny
    adapter = adapter_for(model)
    asked = build_method(method, processor=processor, **options).resolve(adapter).signals()
    assert {layer % adapter.n_vision_layers: kind for layer, kind in asked.items()} == signals
    packed, scores = full_tower(adapter, batch["pixel_values"], batch["image_sizes"], signals)
    runs = LayerRuns(adapter)
    try:
        with torch.no_grad():
            images = adapter.encode(batch["pixel_values"], batch["image_sizes"], asked)
        n = adapter.n_vision_layers
        assert runs.of("layer", n) == [1] * depth + [0] * (n - depth)
        assert runs.of("mlp", n) == [1] * depth + [0] * (n - depth)
        projections = [1] * depth + [int(i == projected) for i in range(depth, n)]
        assert runs.of("q", n) == runs.of("k", n) == projections
    finally:
        runs.remove()
    assert_same(images, packed, scores)
    assert all(s.device == adapter.vision_tower.device for image in images for s in image.cls.values())
    assert_nothing_left(model, adapter)


def test_patched_generate_runs_the_short_tower_and_keeps_all_at_full_budget(tiny, batch):
    model, _ = tiny
    adapter = adapter_for(model)
    expected = greedy(model, batch, n=3)
    runs = LayerRuns(adapter)
    try:
        tokendrop.patch(model, "globalcom2", budget=1.0)
        output = greedy(model, batch, n=3)
        assert runs.of("layer", 3) == [1, 1, 0] and runs.of("q", 3) == [1, 1, 1]
    finally:
        runs.remove()
    assert torch.equal(output, expected)
    tokendrop.unpatch(model)
    assert_nothing_left(model, adapter)


def test_per_call_feature_layer_sets_the_depth(tiny, batch):
    """A caller's vision_feature_layer (as the model takes it) moves where the tower stops."""
    model, _ = tiny
    adapter = adapter_for(model)
    pixel_values, image_sizes = batch["pixel_values"], batch["image_sizes"]
    # -4: the embeddings (0 selects nothing in 5.x's get_image_features)
    for feature_layer, signals, depth in [(1, {}, 1), (-3, {2: "logits"}, 2), (-1, {0: "probs"}, 3), (-4, {}, 1)]:
        packed, scores = full_tower(adapter, pixel_values, image_sizes, signals, vision_feature_layer=feature_layer)
        runs = LayerRuns(adapter)
        try:
            with torch.no_grad():
                images = adapter.encode(pixel_values, image_sizes, signals, vision_feature_layer=feature_layer)
            assert runs.of("layer", 3) == [1] * depth + [0] * (3 - depth)
        finally:
            runs.remove()
        assert_same(images, packed, scores)


@pytest.mark.parametrize("feature_layer", [7, -5, [1, 4], "last", [], True])
def test_feature_layer_out_of_range_is_a_clear_error(tiny, batch, feature_layer):
    model, _ = tiny
    adapter = adapter_for(model)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        adapter.encode(batch["pixel_values"], batch["image_sizes"], {}, vision_feature_layer=feature_layer)
    assert_nothing_left(model, adapter)


@pytest.fixture(scope="module")
def listed():
    """The tiny preset with features concatenated from hidden states 1 and -2 (after layers 0
    and 1): the projector takes both."""
    processor = build_processor("tiny")
    config = build_config("tiny", processor.tokenizer)
    config.vision_feature_layer = [1, -2]
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def test_feature_layer_list_config(listed, batch):
    model, _ = listed
    adapter = adapter_for(model)
    assert adapter.feature_layer == -2  # the deepest of the list stands for the features
    assert model.model.multi_modal_projector.linear_1.in_features == 2 * model.config.vision_config.hidden_size
    for signals, depth in [({}, 2), ({0: "probs", 1: "probs"}, 2), ({2: "logits"}, 2)]:
        packed, scores = full_tower(adapter, batch["pixel_values"], batch["image_sizes"], signals)
        runs = LayerRuns(adapter)
        try:
            with torch.no_grad():
                images = adapter.encode(batch["pixel_values"], batch["image_sizes"], signals)
            assert runs.of("layer", 3) == [1] * depth + [0] * (3 - depth)
        finally:
            runs.remove()
        assert_same(images, packed, scores)
    expected = greedy(model, batch, n=3)
    try:
        tokendrop.patch(model, "hired", budget=1.0)
        assert torch.equal(greedy(model, batch, n=3), expected)
    finally:
        tokendrop.unpatch(model)
    assert_nothing_left(model, adapter)


def test_onevision(ov_model_and_batch):
    """SigLIP, features at -1: every layer runs. With features at -2 the last layer runs only
    for a signal of its output (logits: -cos to the mean token), and its projections alone for
    received attention (probs)."""
    model, batch = ov_model_and_batch
    adapter = adapter_for(model)
    pixel_values, image_sizes = batch["pixel_values"], batch["image_sizes"]
    cases = [
        (None, {}, 3, None),
        (None, {0: "probs", 2: "probs"}, 3, None),
        (None, {2: "logits"}, 3, None),
        (-2, {}, 2, None),
        (-2, {2: "probs"}, 2, 2),
        (-2, {2: "logits"}, 3, None),
        (-2, {1: "logits", 0: "probs"}, 2, None),
    ]
    for feature_layer, signals, depth, projected in cases:
        vision_kwargs = {"batch_num_images": batch["batch_num_images"]} if "batch_num_images" in batch else {}
        if feature_layer is not None:
            vision_kwargs["vision_feature_layer"] = feature_layer
        packed, scores = full_tower(adapter, pixel_values, image_sizes, signals, **vision_kwargs)
        runs = LayerRuns(adapter)
        try:
            with torch.no_grad():
                images = adapter.encode(pixel_values, image_sizes, signals, **vision_kwargs)
            assert runs.of("layer", 3) == [1] * depth + [0] * (3 - depth)
            assert runs.of("q", 3) == [1] * depth + [int(i == projected) for i in range(depth, 3)]
        finally:
            runs.remove()
        assert_same(images, packed, scores)
    assert_nothing_left(model, adapter)


@pytest.fixture(scope="module")
def ov_model_and_batch():
    model, processor = build_preset("tiny-onevision")
    images = [synthetic_image(96, 38, seed=0), synthetic_image(200, 180, seed=1)]
    texts = [prompt(processor, "What is red?"), prompt(processor, "Describe it.")]
    return model, processor(images=images, text=texts, return_tensors="pt", padding=True)


def test_other_threads_see_the_whole_tower(tiny, batch):
    """While one thread's pass stops early, another thread's unpatched pass over the same tower
    runs every layer and gets the model's own features; the layer list is restored once both
    are done. The first pass is held inside its tower (at its first layer) while the other runs
    whole, so that the two overlap for certain; then both run concurrently for some rounds."""
    model, _ = tiny
    adapter = adapter_for(model)
    pixel_values, image_sizes = batch["pixel_values"], batch["image_sizes"]
    signals = {2: "logits"}
    full, scores = full_tower(adapter, pixel_values, image_sizes, signals)
    rounds = 10
    start, inside, whole_done = threading.Barrier(2), threading.Event(), threading.Event()
    results: dict[str, list] = {"short": [], "whole": [], "overlapped": []}
    errors = []

    def hold(module, args):
        if threading.current_thread() is threads["short"] and not inside.is_set():
            inside.set()
            assert whole_done.wait(timeout=60)

    def short():
        start.wait()
        for _ in range(rounds):
            with torch.no_grad():
                results["short"].append(adapter.encode(pixel_values, image_sizes, signals))

    def whole():
        start.wait()
        assert inside.wait(timeout=60)
        for round in range(rounds):
            if round == 0:  # the short pass holds the list now
                results["overlapped"].append(type(adapter.encoder_layers) is not nn.ModuleList)
            with torch.no_grad():
                output = model.model.get_image_features(pixel_values, image_sizes)
            results["whole"].append(list(getattr(output, "pooler_output", output)))
            whole_done.set()

    def guarded(run):
        def target():
            try:
                run()
            except BaseException as error:  # reported by the main thread
                errors.append(error)
                inside.set()  # release the other thread
                whole_done.set()

        return target

    runs = LayerRuns(adapter)
    holding = adapter.vision_layers[0].register_forward_pre_hook(hold)
    threads = {name: threading.Thread(target=guarded(run)) for name, run in (("short", short), ("whole", whole))}
    try:
        for thread in threads.values():
            thread.start()
        for thread in threads.values():
            thread.join()
        assert not errors
        assert results["overlapped"] == [True]
        assert runs.of("layer", 3, threads["short"].ident) == [rounds, rounds, 0]
        assert runs.of("layer", 3, threads["whole"].ident) == [rounds] * 3
    finally:
        holding.remove()
        runs.remove()
    for images in results["short"]:
        assert_same(images, full, scores)
    for packed in results["whole"]:
        assert all(torch.equal(a, b) for a, b in zip(packed, full))
    assert_nothing_left(model, adapter)


def test_a_failing_pass_leaves_nothing_behind(tiny, batch):
    model, _ = tiny
    adapter = adapter_for(model)

    def fail(module, args):
        raise RuntimeError("a layer failed")

    failing = adapter.vision_layers[1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="a layer failed"), torch.no_grad():
            adapter.encode(batch["pixel_values"], batch["image_sizes"], {2: "logits", 0: "probs"})
    finally:
        failing.remove()
    assert_nothing_left(model, adapter)


def test_benchmark_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench_vision.json"
    bench_vision.main(["--preset", "tiny", "--repeats", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {
        f"{m}:{when}" for m in ("none", "hired", "globalcom2") for when in ("before", "after")
    }
    assert set(result["ratios"]) == {"none", "hired", "globalcom2"}
    assert result["layers_run"] == {"none": 2, "hired": 2, "globalcom2": 2}
    assert all(len(v["time_s"]["samples"]) == 2 for v in result["variants"].values())
    assert "globalcom2: after/before" in capsys.readouterr().out
