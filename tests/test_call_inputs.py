"""What a patched call accepts: every input the stock model accepts means the same patched
(generation lengths, continuation from a cache, image sizes as lists, degenerate image
geometries), and malformed input fails early with a message that says what was expected."""

import random

import pytest
import torch
import transformers
from packaging.version import Version
from tokenizers import Tokenizer, models
from transformers import GenerationConfig, PreTrainedTokenizerFast

import reference
import tokendrop
from conftest import CACHE, QUESTIONS, greedy, prompt, returned_cache
from tokendrop.method import METHODS
from tokendrop.patch import output_cache
from tokendrop.presets import synthetic_image

ALL = METHODS.names()


def single(processor, height, width, question=QUESTIONS[0]):
    image = synthetic_image(width, height, seed=height * 7919 + width)
    return processor(images=[image], text=[prompt(processor, question)], return_tensors="pt")


# --- generation lengths -----------------------------------------------------------------


@pytest.fixture
def model_generation_config(tiny):
    """The model's own generation_config, restored after the test."""
    config = tiny[0].generation_config
    saved = config.to_dict()
    yield config
    for key in ("max_length", "min_length"):
        setattr(config, key, saved.get(key))


def with_length(source, model_config, name, value) -> dict:
    """Generate kwargs that set `name` through `source`: a kwarg, `generation_config=`, or the
    model's own generation_config."""
    if source == "kwarg":
        return {name: value}
    if source == "generation_config":
        return {"generation_config": GenerationConfig(**{name: value})}
    setattr(model_config, name, value)
    return {}


@pytest.mark.parametrize("source", ["kwarg", "generation_config", "model"])
def test_max_length_counts_the_callers_prompt(tiny, batch, model_generation_config, source):
    model, _ = tiny
    length = batch["input_ids"].shape[1]
    eos = [model.config.text_config.eos_token_id]

    def new_tokens():
        kwargs = with_length(source, model_generation_config, "max_length", length + 7)
        return greedy(model, batch, n=None, suppress_tokens=eos, **kwargs).shape[1] - length

    assert new_tokens() == 7
    with tokendrop.patched(model, "hired", budget=0.2):
        assert new_tokens() == 7


def test_default_length_is_twenty_new_tokens_patched_too(tiny, batch):
    """With no length given generate makes 20 new tokens, whatever the prompt; 4.x keeps that
    default as max_length=20 in the model's config, which must not be read as a total length
    (it was, and the shortened prompt made it negative)."""
    model, _ = tiny
    length = batch["input_ids"].shape[1]
    eos = [model.config.text_config.eos_token_id]
    assert greedy(model, batch, n=None, suppress_tokens=eos).shape[1] == length + 20
    with tokendrop.patched(model, "hired", budget=0.2):
        assert greedy(model, batch, n=None, suppress_tokens=eos).shape[1] == length + 20


@pytest.mark.parametrize("source", ["kwarg", "generation_config", "model"])
def test_max_new_tokens_wins_over_max_length(tiny, batch, model_generation_config, source):
    model, _ = tiny
    length = batch["input_ids"].shape[1]
    eos = [model.config.text_config.eos_token_id]
    kwargs = with_length(source, model_generation_config, "max_length", length + 2)
    with tokendrop.patched(model, "hired", budget=0.2):
        assert greedy(model, batch, n=5, suppress_tokens=eos, **kwargs).shape[1] == length + 5


@pytest.mark.parametrize("source", ["kwarg", "generation_config", "model"])
def test_min_length_counts_the_callers_prompt(tiny, batch, model_generation_config, source):
    model, _ = tiny
    length = batch["input_ids"].shape[1]
    eos = model.config.text_config.eos_token_id

    def steps_without_eos():
        kwargs = with_length(source, model_generation_config, "min_length", length + 3)
        out = greedy(model, batch, n=6, output_scores=True, return_dict_in_generate=True, **kwargs)
        return [bool(torch.isinf(step[:, eos]).all()) for step in out.scores]

    assert steps_without_eos()[:4] == [True, True, True, False]
    with tokendrop.patched(model, "hired", budget=0.2):
        assert steps_without_eos()[:4] == [True, True, True, False]


# --- continuing from a cache ------------------------------------------------------------


def continue_generation(model, batch, first, then, **extra):
    """Generate `first` tokens, then `then` more from the returned sequence and cache."""
    out = greedy(model, batch, n=first, return_dict_in_generate=True)
    mask = torch.cat([batch["attention_mask"], torch.ones(len(out.sequences), first, dtype=torch.long)], 1)
    inputs = dict(input_ids=out.sequences, attention_mask=mask) | extra
    return greedy(model, inputs, n=then, **{CACHE: returned_cache(out)})


def test_continue_from_a_patched_generation(tiny, batch):
    model, _ = tiny
    with tokendrop.patched(model, "hired", budget=0.3):
        expected = greedy(model, batch, n=5)
        assert torch.equal(continue_generation(model, batch, 3, 2), expected)
        # the images are in the cache already: passing them again changes nothing
        images = {k: batch[k] for k in ("pixel_values", "image_sizes")}
        assert torch.equal(continue_generation(model, batch, 3, 2, **images), expected)
        # a sequence that does not start with the returned one cannot use the cache
        out = greedy(model, batch, n=2, return_dict_in_generate=True)
        with pytest.raises(ValueError, match="start with the sequences"):
            greedy(model, {"input_ids": out.sequences[:, 1:]}, n=1, **{CACHE: returned_cache(out)})
    # a cache that the unpatched model filled holds the whole prompt: patched, it continues as stock
    stock = greedy(model, batch, n=3, return_dict_in_generate=True)
    mask = torch.cat([batch["attention_mask"], torch.ones(3, 3, dtype=torch.long)], 1)
    with tokendrop.patched(model, "hired", budget=0.3):
        continued = greedy(
            model, dict(input_ids=stock.sequences, attention_mask=mask), n=2, **{CACHE: returned_cache(stock)}
        )
    assert torch.equal(continued, greedy(model, batch, n=5))


def manual_decode(model, inputs, n, cache_name=CACHE, grow_mask=True):
    """The loop users write: a forward with the images that returns a cache, then one token
    at a time from it, the caller's own mask one longer per step."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        mask, tokens = inputs["attention_mask"], []
        for _ in range(n):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], 1) if grow_mask else mask
            out = model(input_ids=token, attention_mask=mask, use_cache=True, **{cache_name: output_cache(out)})
    return torch.cat(tokens, 1)


@pytest.mark.parametrize("method", ["hired", "random", "text"])
def test_a_manual_decode_loop_from_a_patched_forward_is_patched_generate(tiny, batch, method):
    """The rows of a batch lose different numbers of tokens, so the shortened prompt has its
    own padding: the caller's mask is swapped for it in every step that uses the cache."""
    model, processor = tiny
    width = batch["input_ids"].shape[1]
    assert torch.equal(manual_decode(model, batch, 5), greedy(model, batch, n=5)[:, width:])  # as stock
    with tokendrop.patched(model, method, budget=0.2, processor=processor):
        expected = greedy(model, batch, n=5)[:, width:]
        assert torch.equal(manual_decode(model, batch, 5), expected)
        if CACHE != "past_key_values":  # the older name, still accepted by the release
            assert torch.equal(manual_decode(model, batch, 5, cache_name="past_key_values"), expected)
        with pytest.raises(ValueError, match="this cache holds a prompt a patched call shortened"):
            manual_decode(model, batch, 2, grow_mask=False)  # a mask that fits neither prompt


# --- image geometries -------------------------------------------------------------------

DEGENERATE = [(1, 1), (1, 1000), (1000, 1), (3, 500), (500, 3), (13, 400), (400, 13), (1, 20), (20, 1), (2, 7)]


def image_sizes_to_test():
    rng = random.Random(13)
    small = [(rng.randint(1, 20), rng.randint(1, 20)) for _ in range(6)]
    extreme = [(rng.randint(1, 20), rng.randint(200, 2000)) for _ in range(3)]
    return DEGENERATE + small + extreme + [(w, h) for h, w in extreme]


@pytest.mark.parametrize("height, width", image_sizes_to_test())
def test_every_geometry(tiny, height, width):
    """Budget 1.0 is the stock model for every image size it accepts; 0.3 keeps exact counts."""
    model, processor = tiny
    try:
        inputs = single(processor, height, width)
    except ValueError as error:  # the processor of 4.x misreads images 1 or 3 pixels high or wide
        if Version(transformers.__version__) >= Version("5"):
            raise
        pytest.skip(f"transformers {transformers.__version__}'s processor refuses a {height}x{width} image: {error}")
    height, width = inputs["image_sizes"][0].tolist()  # as the model sees it (4.x may swap the sides of such images)
    expected = greedy(model, inputs, n=3)
    feats, _ = reference.features(model, height, width)
    for method in ALL:
        with tokendrop.patched(model, method, budget=1.0, processor=processor) as handle:
            assert torch.equal(greedy(model, inputs, n=3), expected), method
        with tokendrop.patched(model, method, budget=0.3, processor=processor) as handle:
            greedy(model, inputs, n=1)
            whole = sum(1 for p, _ in feats if p == 0) if getattr(handle.method, "scope", "all") == "crops" else 0
            [record] = handle.last
            assert record.n_before == len(feats)
            assert record.n_kept == whole + reference.keep_count(0.3, len(feats) - whole), method
            mask = reference.keep_mask(model, height, width, record.indices, "rows")
            assert record.n_newlines == int(mask.sum()) - record.n_kept, method


def test_image_sizes_as_a_list(tiny, batch):
    model, _ = tiny
    as_list = dict(batch) | {"image_sizes": batch["image_sizes"].tolist()}
    expected = greedy(model, as_list)
    with tokendrop.patched(model, "hired", budget=0.3):
        assert torch.equal(greedy(model, as_list), greedy(model, batch))
    with tokendrop.patched(model, "hired", budget=1.0):
        assert torch.equal(greedy(model, as_list), expected)


# --- malformed inputs fail before the vision pass ---------------------------------------


def sizes_times(factor):
    return lambda b: {"image_sizes": b["image_sizes"] * factor}


MALFORMED = {  # case: (change to the batch, expected message)
    "zero size": (sizes_times(0), "image_sizes must hold positive integers"),
    "negative size": (sizes_times(-1), "image_sizes must hold positive integers"),
    "fractional sizes": (lambda b: {"image_sizes": b["image_sizes"] + 0.5}, "image_sizes must hold positive integers"),
    "sizes of other images": (sizes_times(2), "row 0 of input_ids has 88 image placeholder tokens"),
    "sizes not pairs": (lambda b: {"image_sizes": b["image_sizes"][:, :1]}, r"image_sizes must be \(n_images, 2\)"),
    "fewer sizes than images": (lambda b: {"image_sizes": b["image_sizes"][:2]}, "has 3 images but 2 image_sizes"),
    "too few tiles": (lambda b: {"pixel_values": b["pixel_values"][:, :2]}, "needs 3 tiles"),
    "wrong tile size": (lambda b: {"pixel_values": b["pixel_values"][..., :40, :40]}, "tiles of 3x48x48"),
    "4-D tiles miscounted": (lambda b: {"pixel_values": b["pixel_values"][0]}, "4-D pixel_values hold 5 tiles"),
    "1-D input_ids": (
        lambda b: {"input_ids": b["input_ids"][0], "attention_mask": b["attention_mask"][0]},
        r"2-D \(batch, sequence\)",
    ),
    "mask of another shape": (lambda b: {"attention_mask": b["attention_mask"][:, 1:]}, "attention_mask has shape"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.parametrize("call", ["generate", "forward"])
def test_malformed_inputs(tiny, batch, case, call):
    model, _ = tiny
    change, message = MALFORMED[case]
    inputs = dict(batch) | change(batch)
    runs = []
    hook = model.model.vision_tower.register_forward_hook(lambda *_: runs.append(1))
    handle = tokendrop.patch(model, "hired", budget=0.3)
    try:
        with pytest.raises(ValueError, match=message), torch.no_grad():
            model.generate(**inputs, max_new_tokens=1) if call == "generate" else model(**inputs)
    finally:
        hook.remove()
    assert runs == [] and handle.last == []


# --- options checked at patch time ------------------------------------------------------


def test_random_seed_range(tiny, singles):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64 - 1\]"):
        tokendrop.patch(model, "random", budget=0.3, seed=2**70)
    assert "_tokendrop_handle" not in model.__dict__
    for seed in (2**64 - 1, -(2**63)):
        handle = tokendrop.patch(model, "random", budget=0.3, seed=seed)
        greedy(model, singles[0], n=1)
        assert handle.last[0].n_kept == int(0.3 * handle.last[0].n_before)


def foreign_tokenizer(extra_tokens=()):
    """A tokenizer of another model: no `<image>`, or `<image>` at another id."""
    vocab = {"<unk>": 0, "a": 1, "b": 2}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    return tokenizer


@pytest.mark.parametrize(
    "processor, error, message",
    [
        (3, TypeError, "processor= must be the model's processor"),
        ("llava-hf/llava-v1.6-vicuna-7b-hf", TypeError, "processor= must be the model's processor"),
        (foreign_tokenizer(), ValueError, "has no image token"),
        (foreign_tokenizer(["<x>", "<image>"]), ValueError, "another model's processor"),
    ],
)
@pytest.mark.parametrize("method", ["text", "router"])
def test_text_processor_is_checked(tiny, method, processor, error, message):
    with pytest.raises(error, match=message):
        tokendrop.patch(tiny[0], method, budget=0.3, processor=processor)
    assert "_tokendrop_handle" not in tiny[0].__dict__


@pytest.mark.parametrize(
    "questions, message",
    [([3, "x", "y"], r"questions\[0\] is int"), ((q for q in QUESTIONS), "got a generator"), ("What?", "got a str")],
)
def test_questions_must_be_a_list_of_strings(tiny, batch, questions, message):
    model, processor = tiny
    tokendrop.patch(model, "text", budget=0.3, processor=processor)
    with pytest.raises(TypeError, match=message):
        greedy(model, batch, n=1, questions=questions)
