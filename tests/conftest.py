"""Shared fixtures: the tiny preset (random weights, built offline) and images whose AnyRes
grids differ: a padded wide 1x2, a padded tall 2x1 and a padded 2x2 (sizes are (h, w))."""

import pytest
import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

import tokendrop
from tokendrop.harness import chat_prompt as prompt  # the tests' prompts are the library's
from tokendrop.presets import build_preset, synthetic_image

SIZES = {"wide": (38, 96), "tall": (96, 38), "square": (60, 100)}
QUESTIONS = ["What is red?", "Describe it.", "Where is the small blue square in the corner?"]


@pytest.fixture(scope="session")
def tiny():
    model, processor = build_preset("tiny")
    return model, processor


@pytest.fixture(scope="session")
def images():
    return {name: synthetic_image(w, h, seed=i) for i, (name, (h, w)) in enumerate(SIZES.items())}


@pytest.fixture
def batch(tiny, images):
    """A left-padded batch of three prompts of different lengths and image grids."""
    _, processor = tiny
    texts = [prompt(processor, q) for q in QUESTIONS]
    return processor(images=list(images.values()), text=texts, return_tensors="pt", padding=True)


@pytest.fixture
def singles(tiny, images):
    _, processor = tiny
    return [
        processor(images=[image], text=[prompt(processor, q)], return_tensors="pt")
        for image, q in zip(images.values(), QUESTIONS)
    ]


@pytest.fixture(autouse=True)
def never_left_patched(tiny):
    yield
    tokendrop.unpatch(tiny[0])


# what generate calls its cache, in its output and as an argument: `cache` from 5.2x
CACHE = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


def returned_cache(output):
    return getattr(output, CACHE)


def greedy(model, inputs, n=6, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kwargs)


def without_hanging(call, fifo, timeout=60):
    """`call()`'s result, failing the test if it is still running after `timeout` seconds (a
    read of `fifo` waiting for a writer): the FIFO is then opened for writing until the call
    ends, so that the test does not hang too."""
    import os
    import threading

    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as error:  # SystemExit from the command line included
            outcome["error"] = error

    running = threading.Thread(target=run, daemon=True)
    running.start()
    running.join(timeout=timeout)
    hung = running.is_alive()
    while running.is_alive():  # let a blocked open() end
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader at this instant
            pass
        running.join(timeout=0.2)
    assert not hung, f"waited on the FIFO {fifo}"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
