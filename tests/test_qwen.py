"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL on their tiny presets: every method at budget 1.0 is the
unpatched model, kept counts reach the LLM exactly, batched equals one by one, kept tokens keep
their unpruned 3-D positions and decoding continues from them, Qwen3-VL's deepstack rows are
the kept tokens', several images per prompt, videos, reduced precision and 4-bit."""

import pytest
import torch
import transformers
from packaging.version import Version

import tokendrop
from conftest import greedy, prompt
from tokendrop.adapters import ADAPTERS
from tokendrop.preset_specs import PRESETS, family
from tokendrop.presets import build_preset, synthetic_image

QWEN_PRESETS = [name for name in PRESETS.names() if name.startswith("tiny-qwen")]
SIZES = [(38, 96), (60, 100), (96, 38)]
QUESTIONS = ["What is red?", "Describe it.", "Where is the small blue square in the corner?"]


def available(name: str):
    first = ADAPTERS.get(family(name)).first_release
    if Version(transformers.__version__) < Version(first):
        pytest.skip(f"{family(name)} needs transformers >= {first}; this is {transformers.__version__}")


@pytest.fixture(scope="module", params=QWEN_PRESETS)
def qwen_preset(request):
    available(request.param)
    return request.param


@pytest.fixture(scope="module")
def qwen(qwen_preset):
    return build_preset(qwen_preset, attn_implementation="eager")


@pytest.fixture(scope="module")
def qwen_images():
    return [synthetic_image(w, h, seed=i) for i, (h, w) in enumerate(SIZES)]


@pytest.fixture
def qwen_batch(qwen, qwen_images):
    _, processor = qwen
    texts = [prompt(processor, q) for q in QUESTIONS]
    return processor(images=qwen_images, text=texts, return_tensors="pt", padding=True)


@pytest.fixture(autouse=True)
def unpatched(qwen):
    yield
    tokendrop.unpatch(qwen[0])


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("method", tokendrop.methods())
def test_full_budget_is_the_unpatched_model(qwen, qwen_batch, method):
    model, processor = qwen
    expected_logits, expected = logits(model, qwen_batch), greedy(model, qwen_batch)
    with tokendrop.patched(model, method, budget=1.0, processor=processor) as handle:
        assert torch.equal(logits(model, qwen_batch), expected_logits)
        assert torch.equal(greedy(model, qwen_batch), expected)
        assert [r.n_kept for r in handle.last] == [r.n_before for r in handle.last]


@pytest.mark.parametrize("method", ["cls", "hired", "globalcom2", "divprune", "text", "dpp", "pool"])
def test_kept_counts_reach_the_llm(qwen, qwen_batch, method):
    model, processor = qwen
    lengths = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        with tokendrop.patched(model, method, budget=0.3, processor=processor) as handle:
            logits(model, qwen_batch)
    finally:
        hook.remove()
    ids = qwen_batch["input_ids"]
    placeholders = (ids == model.config.image_token_id).sum(1)
    records = handle.last
    assert [r.n_before for r in records] == placeholders.tolist()  # one image per row
    assert [r.n_kept for r in records] == [int(0.3 * r.n_before) for r in records]
    # each row loses its dropped placeholders; the batch's padding stays where it was
    rows = ids.shape[1] - placeholders + torch.tensor([r.n_kept for r in records])
    assert lengths == [int(rows.max())]


def llm_prefill(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds, 3-D position_ids) the LLM receives at a forward's prefill."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["inputs_embeds"], kwargs["position_ids"][-3:])),
        with_kwargs=True,
    )
    try:
        logits(model, inputs)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("method", ["cls", "globalcom2", "text", "visionzip"])
def test_batched_equals_one_by_one(qwen, qwen_images, qwen_batch, method):
    """Each image keeps the same tokens, and its row of the LLM's input (vectors and positions,
    left padded) is the same, in a batch of mixed sizes as alone. (Greedy tokens are not
    compared: a random tiny model's near-ties flip with the padding's rounding.)"""
    model, processor = qwen
    with tokendrop.patched(model, method, budget=0.4, processor=processor) as handle:
        embeds, positions = llm_prefill(model, qwen_batch)
        kept = [r.indices for r in handle.last]
        for i, (image, question) in enumerate(zip(qwen_images, QUESTIONS)):
            alone = processor(images=[image], text=[prompt(processor, question)], return_tensors="pt")
            own_embeds, own_positions = llm_prefill(model, alone)
            n = own_embeds.shape[1]
            assert handle.last[0].indices == kept[i]
            assert torch.equal(embeds[i, -n:], own_embeds[0])
            assert torch.equal(positions[:, i, -n:], own_positions[:, 0])


def kept_columns(model, inputs, records) -> torch.Tensor:
    """(B, T) bool: the prompt positions a patched call keeps, written out from its records:
    every non-placeholder, and image i's placeholder j where j is a kept index of image i."""
    is_image = inputs["input_ids"] == model.config.image_token_id
    keep = ~is_image.clone()
    images = iter(records)
    for row in range(len(keep)):
        columns = is_image[row].nonzero().flatten()
        start = 0
        while start < len(columns):
            record = next(images)
            own = columns[start : start + record.n_before]
            keep[row, own[record.indices]] = True
            start += record.n_before
    return keep & inputs["attention_mask"].bool()


def rope_positions_seen(model, inputs, method=None, processor=None):
    """The 3-D positions the LLM gets at each call (prefill, then each decode step) of a greedy
    generate, patched with `method` at 0.3 where given; and the patch's records."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"][-3:].clone()), with_kwargs=True
    )
    try:
        if method is None:
            greedy(model, inputs, n=3)
            return seen, None
        with tokendrop.patched(model, method, budget=0.3, processor=processor) as handle:
            greedy(model, inputs, n=3)
            return seen, handle.last
    finally:
        hook.remove()


@pytest.mark.parametrize("method", ["cls", "random"])
def test_kept_tokens_keep_their_positions_and_decoding_continues(qwen, qwen_batch, method):
    model, processor = qwen
    call = {"input_ids": qwen_batch["input_ids"], "attention_mask": qwen_batch["attention_mask"]}
    call["image_grid_thw"] = qwen_batch["image_grid_thw"]
    if "mm_token_type_ids" in qwen_batch:
        call["mm_token_type_ids"] = qwen_batch["mm_token_type_ids"]
    full, _ = model.model.get_rope_index(**call)
    unpatched, _ = rope_positions_seen(model, qwen_batch)
    patched, records = rope_positions_seen(model, qwen_batch, method, processor)
    keep = kept_columns(model, qwen_batch, records)
    prefill = patched[0]
    for row in range(len(keep)):
        expected = full[:, row, keep[row]]
        assert torch.equal(prefill[:, row, -expected.shape[1] :], expected)  # left padded: the row ends the batch
    assert torch.equal(unpatched[0], full)
    for step in (1, 2):  # decoding continues where the unpruned prompt's positions would
        assert torch.equal(patched[step], unpatched[step])


def test_deepstack_rows_are_the_kept_tokens(qwen, qwen_batch):
    model, _ = qwen
    if family_of(model) != "qwen3_vl":
        pytest.skip("deepstack is Qwen3-VL's")
    seen = []
    hook = model.model.language_model.register_forward_hook(  # what it ran with, after every pre-hook
        lambda module, args, kwargs, output: seen.append(
            (kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"])
        ),
        with_kwargs=True,
    )
    try:
        with tokendrop.patched(model, "cls", budget=0.3) as handle:
            logits(model, qwen_batch)
    finally:
        hook.remove()
    with torch.no_grad():
        output = model.model.get_image_features(qwen_batch["pixel_values"], qwen_batch["image_grid_thw"])
    sizes = (qwen_batch["image_grid_thw"].prod(-1) // 4).tolist()
    masks, embeds = seen[0]
    assert masks.sum() == sum(r.n_kept for r in handle.last)
    for level, vectors in zip(output.deepstack_features, embeds):
        per_image = level.split(sizes) if isinstance(level, torch.Tensor) else level
        expected = torch.cat([image[r.indices] for image, r in zip(per_image, handle.last)])
        assert torch.equal(vectors, expected)


def test_several_images_per_prompt(qwen, qwen_images):
    model, processor = qwen
    inputs = processor(
        images=[qwen_images[:2], qwen_images[2:]],
        text=[prompt(processor, "Compare them.", n_images=2), prompt(processor, "And this?")],
        return_tensors="pt",
        padding=True,
    )
    expected = greedy(model, inputs)
    with tokendrop.patched(model, "hired", budget=1.0):
        assert torch.equal(greedy(model, inputs), expected)
    with tokendrop.patched(model, "hired", budget=0.5) as handle:
        greedy(model, inputs)
        assert len(handle.last) == 3
        assert [r.n_kept for r in handle.last] == [int(0.5 * r.n_before) for r in handle.last]


def as_video(model, inputs):
    """The batch's images as one-frame videos: video placeholders, video pixels and grids."""
    ids = inputs["input_ids"].clone()
    ids[ids == model.config.image_token_id] = model.config.video_token_id
    video = dict(input_ids=ids, attention_mask=inputs["attention_mask"])
    video["pixel_values_videos"], video["video_grid_thw"] = inputs["pixel_values"], inputs["image_grid_thw"]
    if "mm_token_type_ids" in inputs:
        video["mm_token_type_ids"] = inputs["mm_token_type_ids"] * 2
    return video


def test_videos_pass_through_and_mixing_is_refused(qwen, qwen_batch):
    model, processor = qwen
    video = as_video(model, qwen_batch)
    expected = greedy(model, video)
    with tokendrop.patched(model, "cls", budget=0.3) as handle:
        assert torch.equal(greedy(model, video), expected)
        assert handle.last == []
        with pytest.raises(ValueError, match="videos"):
            greedy(model, {**qwen_batch, **{k: video[k] for k in ("pixel_values_videos", "video_grid_thw")}})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision(qwen_preset, qwen_images, dtype):
    model, processor = build_preset(qwen_preset, dtype=dtype)
    inputs = processor(
        images=qwen_images, text=[prompt(processor, q) for q in QUESTIONS], return_tensors="pt", padding=True
    )
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    expected = logits(model, inputs)
    with tokendrop.patched(model, "hired", budget=1.0):
        assert torch.equal(logits(model, inputs), expected)
    with tokendrop.patched(model, "hired", budget=0.2) as handle:
        logits(model, inputs)
        assert [r.n_kept for r in handle.last] == [int(0.2 * r.n_before) for r in handle.last]


def test_four_bit(qwen, qwen_batch, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    model, _ = qwen
    model.save_pretrained(tmp_path)
    quantized = type(model).from_pretrained(
        tmp_path,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map="cpu",
    )
    expected = greedy(quantized, qwen_batch, n=3)
    with tokendrop.patched(quantized, "cls", budget=1.0):
        assert torch.equal(greedy(quantized, qwen_batch, n=3), expected)
    with tokendrop.patched(quantized, "cls", budget=0.3) as handle:
        greedy(quantized, qwen_batch, n=3)
        assert [r.n_kept for r in handle.last] == [int(0.3 * r.n_before) for r in handle.last]


def test_missing_mm_token_type_ids_is_refused(qwen, qwen_batch):
    model, _ = qwen
    if "mm_token_type_ids" not in qwen_batch:
        pytest.skip("this release's processor gives no mm_token_type_ids")
    call = {k: v for k, v in qwen_batch.items() if k != "mm_token_type_ids"}
    with tokendrop.patched(model, "cls", budget=0.3), pytest.raises(ValueError, match="mm_token_type_ids"):
        logits(model, call)


def family_of(model) -> str:
    return model.config.model_type
