"""GlobalCom2 and the text router against independent re-computations from the formulas."""

import pytest
import torch

import reference
import tokendrop
from conftest import QUESTIONS, greedy, prompt

WIDE_AND_TALL = [(38, 96), (96, 38), (60, 100), (20, 140)]


@pytest.fixture
def odd_batch(tiny):
    """Padded wide, padded tall, padded 2x2 and a thin 1x3 image."""
    from tokendrop.presets import synthetic_image

    _, processor = tiny
    images = [synthetic_image(w, h, seed=10 + i) for i, (h, w) in enumerate(WIDE_AND_TALL)]
    questions = QUESTIONS + ["Is there a green circle?"]
    texts = [prompt(processor, q) for q in questions]
    return processor(images=images, text=texts, return_tensors="pt", padding=True), questions


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.1, 9])
@pytest.mark.parametrize("tau", [10.0, 0.5])
def test_globalcom2_equals_reference(tiny, odd_batch, budget, tau):
    model, _ = tiny
    inputs, _ = odd_batch
    handle = tokendrop.patch(model, "globalcom2", budget=budget, tau=tau)
    greedy(model, inputs, n=1)
    expected = reference.globalcom2(model, inputs["pixel_values"], inputs["image_sizes"], budget, tau=tau)
    assert [r.indices for r in handle.last] == expected


def test_globalcom2_score_layer(tiny, odd_batch):
    model, _ = tiny
    inputs, _ = odd_batch
    handle = tokendrop.patch(model, "globalcom2", budget=0.3, score_layer=0)
    greedy(model, inputs, n=1)
    assert [r.indices for r in handle.last] == reference.globalcom2(
        model, inputs["pixel_values"], inputs["image_sizes"], 0.3, layer=0
    )


@pytest.mark.parametrize("scope", ["crops", "all"])
@pytest.mark.parametrize("budget", [0.5, 0.1])
def test_text_budget_equals_reference(tiny, odd_batch, scope, budget):
    model, processor = tiny
    inputs, questions = odd_batch
    handle = tokendrop.patch(model, "text", budget=budget, scope=scope, processor=processor)
    greedy(model, inputs, n=1)
    expected = reference.text_select(model, processor, inputs, questions, budget=budget, scope=scope)
    assert [r.indices for r in handle.last] == expected


@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_text_threshold_equals_reference(tiny, odd_batch, threshold):
    model, processor = tiny
    inputs, questions = odd_batch
    handle = tokendrop.patch(model, "text", threshold=threshold, processor=processor)
    greedy(model, inputs, n=1)
    expected = reference.text_select(model, processor, inputs, questions, threshold=threshold)
    assert [r.indices for r in handle.last] == expected
    assert any(r.n_kept < r.n_before for r in handle.last)


def test_text_threshold_one_is_identical(tiny, batch):
    model, processor = tiny
    expected = greedy(model, batch)
    with tokendrop.patched(model, "text", threshold=1.0, processor=processor):
        assert torch.equal(greedy(model, batch), expected)


def test_text_explicit_questions(tiny, batch):
    """The question found in the prompt is the one asked; another question selects otherwise."""
    model, processor = tiny
    handle = tokendrop.patch(model, "text", budget=0.2, processor=processor)
    greedy(model, batch, n=1)
    found = [r.indices for r in handle.last]
    greedy(model, batch, n=1, questions=QUESTIONS)
    assert [r.indices for r in handle.last] == found
    greedy(model, batch, n=1, questions=["a completely different question"] * 3)
    assert [r.indices for r in handle.last] != found
    with pytest.raises(ValueError, match="one question string per prompt row"):
        greedy(model, batch, n=1, questions=["only one"])


def test_text_needs_a_question(tiny, images):
    model, processor = tiny
    tokendrop.patch(model, "text", budget=0.2, processor=processor)
    inputs = processor(images=[images["wide"]], text=[prompt(processor, "")], return_tensors="pt")
    with pytest.raises(ValueError, match="no question tokens"):
        greedy(model, inputs, n=1)
    greedy(model, inputs, n=1, questions=["What is shown?"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(budget=0.3), "needs processor="),
        (dict(budget=0.3, threshold=0.5), "not both"),
        (dict(threshold=1.5), "threshold must be"),
        (dict(scope="base"), "scope must be one of"),
    ],
)
def test_text_bad_options(tiny, kwargs, message):
    model, processor = tiny
    options = dict(processor=processor) | kwargs if "needs" not in message else kwargs
    with pytest.raises(ValueError, match=message):
        tokendrop.patch(model, "text", **options)


# --- multi-turn chats: the latest user turn drives the selection ---------------------------


def conversation(processor, first: str, answer: str, second: str) -> str:
    turns = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": first}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        {"role": "user", "content": [{"type": "text", "text": second}]},
    ]
    return processor.apply_chat_template(turns, add_generation_prompt=True)


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2.5-vl"])
def test_the_latest_user_turn_is_the_question(preset):
    from tokendrop.method.text import Template
    from tokendrop.presets import build_processor

    processor = build_processor(preset)
    template = Template.of(processor)
    image_token = processor.image_token
    for first, second in [("What colour is the triangle?", "And the circle?"), ("Describe it.", "Why?")]:
        text = conversation(processor, first, "red", second).split(image_token)[-1]
        ids = processor.tokenizer(text, add_special_tokens=False).input_ids
        assert template.question(processor.tokenizer.decode(ids)) == second
        single = prompt(processor, first).split(image_token)[-1]
        assert template.question(processor.tokenizer.decode(processor.tokenizer(single).input_ids)) == first


@pytest.mark.parametrize("method, options", [("text", {}), ("router", {}), ("dpp", {"relevance": "text"})])
def test_a_second_turn_selects_as_its_question_alone(tiny, images, method, options):
    """A two-turn chat (the image and a question, an answer, another question) keeps exactly
    the tokens the second question keeps in a chat of its own."""
    model, processor = tiny
    image = images["square"]
    chat = conversation(processor, "What is red?", "a square", "Where is the small blue square?")
    alone = prompt(processor, "Where is the small blue square?")
    with tokendrop.patched(model, method, budget=0.3, processor=processor, **options) as handle:
        greedy(model, processor(images=[image], text=[chat], return_tensors="pt"), n=1)
        kept = handle.last[0].indices
        greedy(model, processor(images=[image], text=[alone], return_tensors="pt"), n=1)
        assert kept == handle.last[0].indices
        greedy(model, processor(images=[image], text=[prompt(processor, "What is red?")], return_tensors="pt"), n=1)
        assert kept != handle.last[0].indices  # the first question alone keeps others: the rule mattered
