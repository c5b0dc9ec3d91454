"""Greedy short answers for a batch of image questions."""

from __future__ import annotations

import torch
from PIL import Image


def prompt_text(processor, question: str, n_images: int = 1) -> str:
    """The user turn (images first, then the question) in the model's chat template."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def generate_answers(model, processor, images: list[list[Image.Image]], questions: list[str],
                     max_new_tokens: int, **generation) -> list[str]:
    """One answer per question (each with its own images), generated as one left-padded batch;
    greedy unless `generation` says otherwise. Only the new tokens are decoded."""
    texts = [prompt_text(processor, q, len(imgs)) for q, imgs in zip(questions, images)]
    flat = [image for imgs in images for image in imgs]
    inputs = processor(images=flat or None, text=texts, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device, model.dtype)  # casts only the floating tensors (pixels)
    settings = {"do_sample": False, "num_beams": 1, "max_new_tokens": max_new_tokens} | generation
    with torch.no_grad():
        out = model.generate(**inputs, **settings)
    new = out[:, inputs["input_ids"].shape[1]:]  # a patched generate returns the original prompt first
    return [text.strip() for text in processor.batch_decode(new, skip_special_tokens=True)]
