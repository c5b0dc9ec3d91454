"""Greedy short answers for a batch of image questions."""

from __future__ import annotations

import torch
from PIL import Image

from ..harness import chat_prompt


def generate_answers(
    model, processor, images: list[list[Image.Image]], questions: list[str], max_new_tokens: int, **generation
) -> list[str]:
    """One answer per question (each with its own images), generated as one left-padded batch;
    greedy unless `generation` says otherwise. Only the new tokens are decoded. `stop_strings`
    in `generation` end a row at any of them (the tokenizer is passed for it), and the text
    is cut before the first one."""
    texts = [chat_prompt(processor, q, len(imgs)) for q, imgs in zip(questions, images)]
    flat = [image for imgs in images for image in imgs]
    inputs = processor(images=flat or None, text=texts, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device, model.dtype)  # casts only the floating tensors (pixels)
    settings = {"do_sample": False, "num_beams": 1, "max_new_tokens": max_new_tokens} | generation
    stops = [s for s in settings.pop("stop_strings", None) or [] if s]
    if stops:
        settings |= {"stop_strings": stops, "tokenizer": processor.tokenizer}
    with torch.no_grad():
        out = model.generate(**inputs, **settings)
    new = out[:, inputs["input_ids"].shape[1] :]  # a patched generate returns the original prompt first
    return [cut(text, stops).strip() for text in processor.batch_decode(new, skip_special_tokens=True)]


def cut(text: str, stops: list[str]) -> str:
    """The text before the first stop string (generation stops after it, the answer excludes it)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text
