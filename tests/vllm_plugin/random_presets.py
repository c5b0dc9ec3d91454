"""Tiny presets with random weights that vLLM's CPU engine serves, for the plugin's tests."""

import torch


def tiny_random(name: str, video_token: str | None = None):
    """(model, processor): preset `name` with random weights (seed 0) and 2 LLM heads of 32
    (vLLM's CPU attention has no kernel for the presets' head size of 16); with `video_token`,
    that token added to the tokenizer as the model's video token, so that videos can be sent."""
    from tokenizers import AddedToken
    from transformers import AutoModelForImageTextToText

    from tokendrop.presets import build_config, build_processor

    processor = build_processor(name)
    if video_token is not None:
        processor.tokenizer.add_tokens([AddedToken(video_token, special=True)], special_tokens=True)
        processor.video_token_id = processor.tokenizer.convert_tokens_to_ids(video_token)
    config = build_config(name, processor.tokenizer)
    if video_token is not None:
        config.video_token_id = processor.video_token_id
    config.text_config.num_attention_heads = config.text_config.num_key_value_heads = 2
    config.text_config.head_dim = 32
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor
