"""The vLLM plugin's LLaVA-OneVision against stock vLLM and against tokendrop's HF patch.

Runs only where vLLM is installed (`make test-vllm`); skipped elsewhere. Two engines in all,
one after the other (offline, in-process, eager, fp32): stock vLLM, then the plugin (server:
hired at 0.25; the other methods and budget 1.0 chosen per request, every cache on), on the
tiny-onevision preset with random weights, 2 LLM heads of 32 (vLLM's CPU attention has no
kernel for its head size of 16) and a `<video>` token, so that videos can be sent."""

import gc
import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402

vllm = pytest.importorskip("vllm")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from random_presets import tiny_random  # noqa: E402

import tokendrop  # noqa: E402
from tokendrop.adapters import LlavaOnevisionAdapter  # noqa: E402
from tokendrop.eval.vllm_bench import engine  # noqa: E402
from tokendrop.harness import chat_prompt  # noqa: E402
from tokendrop.integrations import vllm as vllm_plugin  # noqa: E402
from tokendrop.integrations.vllm import llava_onevision as vllm_onevision  # noqa: E402
from tokendrop.presets import build_config, build_processor, synthetic_image  # noqa: E402

SERVER = {"method": "hired", "budget": 0.25}
# (h, w): a padded 1x2 (exact), a padded 4x4 and an unpadded 3x6 whose canvases are resampled
# (anyres_max_9), a tall 4x4 under the cap, an unpadded 2x2
SIZES = [(38, 96), (180, 200), (150, 300), (300, 150), (96, 96)]
QUESTIONS = ["What is red?", "Where is the small blue square?"]
# per-request options beside the server's: (method, budget) -> mm_processor_kwargs["tokendrop"]
CHOSEN = {
    ("hired", 0.25): None,
    ("globalcom2", 0.1): {"method": "globalcom2", "budget": 0.1},
    ("text", 0.2): {"method": "text", "budget": 0.2},
}
SETTINGS = dict(max_model_len=2048, limit_mm_per_prompt={"image": 2, "video": 1})


def tiny_onevision():
    return tiny_random("tiny-onevision", video_token="<video>")


@pytest.fixture(scope="module")
def tiny():
    return tiny_onevision()


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    return vllm_plugin.save_for_vllm(*tiny, tmp_path_factory.mktemp("onevision"))


@pytest.fixture(scope="module")
def images():
    return [synthetic_image(w, h, seed=30 + i) for i, (h, w) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def video():
    return np.stack([np.asarray(synthetic_image(64, 48, seed=60 + f)) for f in range(4)])


@pytest.fixture(scope="module")
def plugin_engine(model_dir, stock):  # after the stock engine is gone: one engine at a time
    llm = engine(model_dir, SERVER, **SETTINGS)
    yield llm
    del llm
    gc.collect()


def prompt(processor, question: str, n_images: int = 1, video: bool = False) -> str:
    """The chat prompt of `n_images` images, then a video where `video`."""
    text = chat_prompt(processor, question, max(n_images, 1))
    return text.replace("<image>", "<image><video>" if n_images else "<video>", 1) if video else text


def request(processor, question, images=(), video=None, options=None) -> dict:
    data = ({"image": list(images)} if images else {}) | ({"video": video} if video is not None else {})
    return {"prompt": prompt(processor, question, len(images), video is not None), "multi_modal_data": data} | (
        {"mm_processor_kwargs": {"tokendrop": options}} if options is not None else {}
    )


def served(llm, requests: list[dict], record) -> tuple[list[dict], list]:
    """(the records of the images whose vision pass ran, vLLM's outputs) of one generate call."""
    from vllm import SamplingParams

    os.environ[vllm_plugin.RECORD_ENV] = str(record)
    try:
        outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    finally:
        os.environ.pop(vllm_plugin.RECORD_ENV, None)
    return ([json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []), outputs


def hf_records(tiny, method, budget, images, question, newlines="all", **options):
    """The HF patch's records of `images`, in one prompt (a flat image list, as vLLM passes them)."""
    model, processor = tiny
    inputs = processor(images=list(images), text=[prompt(processor, question, len(images))], return_tensors="pt")
    with tokendrop.patched(model, method, budget=budget, processor=processor, newlines=newlines, **options) as handle:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return handle.last


def placeholders(model, ids: list[int]) -> tuple[list[int], int, int]:
    """(the prompt's other tokens, its image placeholders, its video placeholders)."""
    image, video = model.config.image_token_id, model.config.video_token_id
    return [t for t in ids if t not in (image, video)], ids.count(image), ids.count(video)


# --- without an engine ------------------------------------------------------------------


def test_the_plugin_registers_onevision():
    from vllm import ModelRegistry

    vllm_plugin.register()
    assert vllm_plugin.architecture("LlavaOnevisionForConditionalGeneration") in ModelRegistry.get_supported_archs()
    with pytest.raises(ValueError, match="serves"):
        vllm_plugin.architecture("Qwen2VLForConditionalGeneration")


def onevision_shape():
    """onevision-shape (SigLIP-so400m/384 geometry, llava-onevision's pinpoints) on the meta
    device: the packing reads only the config."""
    processor = build_processor("onevision-shape")
    config = build_config("onevision-shape", processor.tokenizer)
    from transformers import LlavaOnevisionForConditionalGeneration

    with torch.device("meta"):
        return LlavaOnevisionForConditionalGeneration(config)


@pytest.mark.parametrize(
    "build, sizes",
    [
        (lambda: tiny_onevision()[0], [*SIZES, (48, 144), (20, 200), (200, 20), (1000, 30), (500, 700), (48, 48)]),
        (onevision_shape, [(384, 384), (672, 1000), (1080, 1920), (1500, 1500), (1300, 1200), (2000, 500), (700, 701)]),
    ],
)
def test_vllm_packing_gives_the_hf_adapters_layout(build, sizes):
    """vLLM's packing of the patch coordinates books every token where the HF adapter does:
    grids, sources (resampled canvases included), the unpadded box of the crop regions."""
    model = build()
    adapter = LlavaOnevisionAdapter(model)
    resampled = 0
    for size in sizes:
        ours, theirs = vllm_onevision.layout(model.config, size), adapter.layout(size)
        assert ours.grid == theirs.grid and torch.equal(ours.packed_source, theirs.packed_source), size
        assert ours.unpadded_box == theirs.unpadded_box, size
        resampled += theirs.unpadded_box is not None
    assert resampled >= 2  # the anyres_max_9 resampling is exercised


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "text", "budget": 0.25}, "reads the question"),
        ({"method": "hired", "budget": 0.25, "threshold": 0.5}, "threshold"),
        ({"method": "hired", "budget": 0.25, "newlines": "rows"}, "newlines='rows'"),
        ({"method": "globalcom2", "budget": 0.25, "score_layer": 7}, "score_layer"),
    ],
)
def test_refused_configurations(tiny, options, message):
    config = tiny[0].config
    config.tokendrop = options
    try:
        with pytest.raises((ValueError, TypeError), match=message):
            vllm_onevision.FAMILY.method(config)
    finally:
        del config.tokendrop


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("vision_feature_select_strategy", "default", "vision_feature_select_strategy='full'"),
        ("vision_feature_layer", [-2, -1], "single vision_feature_layer"),
    ],
)
def test_other_feature_settings_are_refused(tiny, setting, value, message):
    config = tiny[0].config
    config.tokendrop, kept = SERVER, getattr(config, setting)
    setattr(config, setting, value)
    try:
        with pytest.raises(ValueError, match=message):
            vllm_onevision.FAMILY.method(config)
    finally:
        setattr(config, setting, kept)
        del config.tokendrop


@pytest.mark.parametrize(
    "options",
    [
        {"method": "hired", "budget": 0.25},
        {"method": "globalcom2", "budget": 0.1, "newlines": "drop"},
        {"method": "pool", "budget": 0.1, "newlines": "rows"},
        {"method": "visionzip", "budget": 0.2},
    ],
)
def test_counts_are_what_the_hf_patch_keeps(tiny, images, options):
    """The placeholder count equals the tokens the HF patch feeds the LLM, image by image."""
    model, processor = tiny
    model.config.tokendrop = options
    try:
        method = vllm_onevision.FAMILY.method(model.config)
    finally:
        del model.config.tokendrop
    rest = {k: v for k, v in options.items() if k not in ("method", "budget", "newlines")}
    for image, size in zip(images, SIZES):
        (record,) = hf_records(tiny, method.name, options["budget"], [image], "What is red?", method.newlines, **rest)
        count = vllm_plugin.placeholder_count(method, vllm_onevision.layout(model.config, size))
        assert count == record.n_kept + record.n_newlines, size


# --- on the engines ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stock(model_dir, tiny, images, video, tmp_path_factory):
    """Stock vLLM's outputs (its engine dropped afterwards): each image alone, two images in one
    prompt, a video alone, an image with a video."""
    processor = tiny[1]
    requests = [request(processor, QUESTIONS[0], [image]) for image in images]
    requests += [
        request(processor, QUESTIONS[0], images[1:3]),
        request(processor, QUESTIONS[0], video=video),
        request(processor, QUESTIONS[0], images[:1], video=video),
    ]
    llm = engine(model_dir, None, **SETTINGS)
    try:
        _, outputs = served(llm, requests, tmp_path_factory.mktemp("stock") / "record.jsonl")
    finally:
        del llm
        gc.collect()
    return outputs


def test_stock_vllm_encodes_each_image_of_a_prompt_with_its_crops(stock, tiny):
    """What the plugin relies on for multi-image prompts: vLLM gives each image of a prompt its
    full AnyRes count (not HF's base view of a nested image list)."""
    model = tiny[0]
    full = [vllm_onevision.layout(model.config, size).packed_source.numel() for size in SIZES]
    assert [placeholders(model, o.prompt_token_ids)[1] for o in stock[: len(SIZES)]] == full
    assert placeholders(model, stock[len(SIZES)].prompt_token_ids)[1] == full[1] + full[2]


def test_budget_one_is_stock_vllm(plugin_engine, stock, tiny, images, video, tmp_path):
    """At budget 1.0 (chosen per request), every request, videos and multi-image prompts
    included, gets stock vLLM's prompt and tokens; a video-only request runs as stock."""
    processor = tiny[1]
    full = {"budget": 1.0}
    requests = [request(processor, QUESTIONS[0], [image], options=full) for image in images]
    requests += [
        request(processor, QUESTIONS[0], images[1:3], options=full),
        request(processor, QUESTIONS[0], video=video),
        request(processor, QUESTIONS[0], images[:1], video=video, options=full),
    ]
    records, outputs = served(plugin_engine, requests, tmp_path / "record.jsonl")
    assert [len(o.prompt_token_ids) for o in outputs] == [len(o.prompt_token_ids) for o in stock]
    assert [o.prompt_token_ids for o in outputs] == [o.prompt_token_ids for o in stock]
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in stock]
    assert all(r["n_kept"] == r["n_before"] for r in records)


@pytest.fixture(scope="module")
def pruned(plugin_engine, tiny, images, video, tmp_path_factory):
    """Each image alone under each chosen method (text with both questions), then two images in
    one prompt and an image with a video (budgets of their own, so that no cache serves them):
    {key: (requests, records, outputs)}, key (method, question) or "multi"."""
    processor = tiny[1]
    where = tmp_path_factory.mktemp("pruned")
    runs = {}
    for (method, _), options in CHOSEN.items():
        for question in QUESTIONS if method == "text" else QUESTIONS[:1]:
            batch = [request(processor, question, [image], options=options) for image in images]
            runs[(method, question)] = (batch, *served(plugin_engine, batch, where / f"{len(runs)}.jsonl"))
    batch = [
        request(processor, QUESTIONS[1], images[1:3], options={"method": "text", "budget": 0.15}),
        request(processor, QUESTIONS[0], images[3:4], video=video, options={"budget": 0.1}),
    ]
    runs["multi"] = (batch, *served(plugin_engine, batch, where / "multi.jsonl"))
    return runs


def by_size(records: list[dict]) -> dict[tuple[int, int], dict]:
    return {tuple(r["image_size"]): r for r in records}


@pytest.mark.parametrize("method, budget", list(CHOSEN))
def test_kept_indices_are_the_hf_patchs(pruned, tiny, images, method, budget):
    """hired (the server's), globalcom2 and text (chosen per request; text with two questions on
    the same images, each its own selection): every image's kept indices are the HF patch's,
    resampled canvases included."""
    kept = {}
    for question in QUESTIONS if method == "text" else QUESTIONS[:1]:
        ours = by_size(pruned[(method, question)][1])
        assert sorted(ours) == sorted(SIZES)
        for image, size in zip(images, SIZES):
            (hf,) = hf_records(tiny, method, budget, [image], question)
            assert ours[size]["n_kept"] == hf.n_kept and ours[size]["n_newlines"] == hf.n_newlines, size
            assert ours[size]["indices"] == hf.indices, (method, question, size)
        kept[question] = [ours[size]["indices"] for size in SIZES]
    if method == "text":
        assert kept[QUESTIONS[0]] != kept[QUESTIONS[1]]  # the question matters


def test_multi_image_and_video_prompts_are_the_hf_patchs(pruned, tiny, images):
    """Two images in one prompt: each pruned with its crops, as the HF patch prunes a flat image
    list (the text method reading the question after the last image); an image beside a video:
    the image pruned, the video as stock."""
    _, records, _ = pruned["multi"]
    assert len(records) == 3  # the video went through no selection
    ours = by_size(records)
    hf = hf_records(tiny, "text", 0.15, images[1:3], QUESTIONS[1])
    assert [ours[size]["indices"] for size in SIZES[1:3]] == [r.indices for r in hf]
    (hf_alone,) = hf_records(tiny, "hired", 0.1, images[3:4], QUESTIONS[0])
    assert ours[SIZES[3]]["indices"] == hf_alone.indices


def test_prompt_lengths_follow_the_counts(pruned, stock, tiny):
    """Every prompt holds its text, each image's kept count of placeholders (kept features and
    newlines) and a video's stock count."""
    model, processor = tiny
    *_, video_count = placeholders(model, stock[-1].prompt_token_ids)
    assert video_count > 0
    for requests, records, outputs in pruned.values():
        counts = by_size(records)
        for sent, out in zip(requests, outputs):
            images = sent["multi_modal_data"].get("image", [])
            kept = sum(
                counts[(i.height, i.width)]["n_kept"] + counts[(i.height, i.width)]["n_newlines"] for i in images
            )
            text, _, _ = placeholders(model, processor.tokenizer(sent["prompt"])["input_ids"])
            assert placeholders(model, out.prompt_token_ids) == (
                text,
                kept,
                video_count if "video" in sent["multi_modal_data"] else 0,
            )
            assert out.outputs[0].token_ids  # it answered


def test_a_repeated_request_is_served_from_the_caches(plugin_engine, pruned, tiny, images, tmp_path):
    """The same image, question and options again: no vision pass (no record), the same tokens."""
    processor = tiny[1]
    again, out = served(
        plugin_engine,
        [request(processor, QUESTIONS[1], images[:1], options=CHOSEN[("text", 0.2)])],
        tmp_path / "record.jsonl",
    )
    assert again == []
    assert out[0].outputs[0].token_ids == pruned[("text", QUESTIONS[1])][2][0].outputs[0].token_ids
