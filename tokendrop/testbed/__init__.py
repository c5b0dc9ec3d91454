"""The trained testbed: a tiny LLaVA-NeXT that answers the shapes task
(`tokendrop.eval.shapes`), trained from scratch on a CPU by `examples/train_testbed.py`.
Its config and weights are committed beside this file (MODEL_CARD.md says how they were
made and how well they do); the processor is built offline, as every preset's
(`tokendrop.presets`, preset `testbed`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

HERE = Path(__file__).parent
CONFIG = HERE / "config.json"
WEIGHTS = HERE / "model.safetensors"


def load_testbed_model(processor, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """The model built from the committed config with the committed weights, in eval mode;
    `processor` is the testbed preset's (`tokendrop.presets`, which loads the two together)."""
    if not WEIGHTS.is_file():
        raise missing(WEIGHTS)
    config = testbed_config()
    if config.text_config.vocab_size != len(processor.tokenizer):
        raise ValueError(
            f"{CONFIG} has a vocabulary of {config.text_config.vocab_size} tokens, the testbed processor "
            f"{len(processor.tokenizer)}: the weights belong to another task vocabulary; retrain them"
        )
    config._attn_implementation = attn_implementation
    model = LlavaNextForConditionalGeneration(config)
    try:
        model.load_state_dict(under_installed_names(load_file(WEIGHTS), model), strict=True)
    except RuntimeError as error:  # missing, unexpected or mis-shaped tensors
        raise ValueError(f"{WEIGHTS} does not fit {CONFIG}: {error}") from None
    model.to(dtype).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model


def testbed_config() -> LlavaNextConfig:
    """The committed config."""
    if not CONFIG.is_file():
        raise missing(CONFIG)
    return LlavaNextConfig.from_json_file(CONFIG)


def missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{path} is missing: reinstall tokendrop, or rebuild it with examples/train_testbed.py")


def under_installed_names(weights: dict, model) -> dict:
    """The committed tensors (saved by 5.x) under the parameter names of the installed release:
    4.x keeps the CLIP tower's parameters one level deeper, under `vision_model.`."""
    names = set(model.state_dict())
    tower = "model.vision_tower."
    nested = tower + "vision_model."

    def installed(name: str) -> str:
        if name not in names and name.startswith(tower) and nested + name.removeprefix(tower) in names:
            return nested + name.removeprefix(tower)
        return name

    return {installed(name): tensor for name, tensor in weights.items()}
