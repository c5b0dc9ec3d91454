"""The embedded models, as data: what `tokendrop.presets` builds offline, by name. Kept apart
from the builders, and free of torch and transformers, so that the command line can name the
presets in its help and check a `--model` before it imports anything heavy.

A spec: `family` (the adapter's name; "llava_next" if absent), `vision` (the vision config's
sizes), `text` (the LLM's sizes); LLaVA families add `text_model` ("llama" or "qwen2") and
`pinpoints` (AnyRes tile grids), Qwen-VL families `pixels` (the image processor's least and
most pixels: native resolution within them) and `mrope_section` (the LLM's rotary split over
t, h, w); a trained preset adds `words` (whole-word tokens), `task` (what it was trained for)
and `method_options` (defaults for methods run on it).
"""

from __future__ import annotations

from .registry import Registry

QWEN2_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    rope_theta=1e6,
)

PRESETS: Registry[dict] = Registry("preset")
PRESETS.register("tiny")(
    dict(
        vision=dict(
            image_size=48,
            patch_size=8,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
        ),
        text_model="llama",
        text=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        ),
        pinpoints=[[48, 96], [96, 48], [96, 96], [48, 144], [144, 48]],
    )
)
PRESETS.register("llava-next-shape")(
    dict(
        vision=dict(
            image_size=336,
            patch_size=14,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            projection_dim=768,
        ),
        text_model="qwen2",
        text=QWEN2_05B,
        pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    )
)
PRESETS.register("testbed")(
    dict(
        vision=dict(
            image_size=48,
            patch_size=8,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
        ),
        text_model="llama",
        text=dict(
            hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4
        ),
        pinpoints=[[48, 96], [96, 48], [96, 96]],
        # whole-word tokens, as a real vocabulary has for common words: the chat roles and the
        # shapes task's words (a test checks the task uses no other)
        words=(
            "USER:",
            "ASSISTANT:",
            "What",
            "colour",
            "is",
            "the",
            "red",
            "green",
            "blue",
            "yellow",
            "purple",
            "cyan",
            "circle",
            "square",
            "triangle",
            "cross",
        ),
        task="shapes",  # trained for this task: its weights are loaded, not drawn
        method_options={"router": {"router": "tokendrop:testbed"}},  # the router trained for it, shipped beside it
    )
)


PRESETS.register("tiny-onevision")(
    dict(
        family="llava_onevision",
        vision=dict(
            image_size=48,
            patch_size=8,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
        ),
        text_model="qwen2",
        text=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        ),
        pinpoints=[[48, 48], [48, 96], [96, 48], [96, 96], [144, 144], [192, 192], [144, 288]],
    )
)
PRESETS.register("onevision-shape")(
    dict(
        family="llava_onevision",
        vision=dict(
            image_size=384,
            patch_size=14,
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
        ),
        text_model="qwen2",
        text=QWEN2_05B,
        pinpoints=[
            [384, 384],
            [384, 768],
            [768, 384],
            [768, 768],
            [768, 1152],
            [1152, 768],
            [1152, 1152],
            [768, 1536],
            [1536, 768],
            [1536, 1536],
        ],
    )
)


# Qwen-VL at test size: 4-pixel patches, so that a 100-pixel image is about 60 LLM tokens;
# widths of 64 and more, which bitsandbytes' 4-bit CPU kernels need
TINY_QWEN_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
TINY_QWEN_PIXELS = (8 * 8 * 4, 128 * 128)  # at least 4 tokens, at most 256
PRESETS.register("tiny-qwen2-vl")(
    dict(
        family="qwen2_vl",
        vision=dict(depth=3, embed_dim=64, num_heads=4, mlp_ratio=2, patch_size=4),
        text=TINY_QWEN_TEXT,
        mrope_section=[2, 3, 3],
        pixels=TINY_QWEN_PIXELS,
    )
)
PRESETS.register("tiny-qwen2.5-vl")(
    dict(
        family="qwen2_5_vl",
        # windows of 4 x 4 patches (2 x 2 LLM tokens); blocks 1 and 3 attend over the whole image
        vision=dict(
            depth=4,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            patch_size=4,
            window_size=16,
            fullatt_block_indexes=[1, 3],
        ),
        text=TINY_QWEN_TEXT,
        mrope_section=[2, 3, 3],
        pixels=TINY_QWEN_PIXELS,
    )
)
PRESETS.register("tiny-qwen3-vl")(
    dict(
        family="qwen3_vl",
        # blocks 1 and 2 feed the first two LLM layers (deepstack)
        vision=dict(
            depth=3,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            patch_size=4,
            num_position_embeddings=64,
            deepstack_visual_indexes=[1, 2],
        ),
        text=TINY_QWEN_TEXT | dict(head_dim=16),
        mrope_section=[2, 3, 3],
        pixels=TINY_QWEN_PIXELS,
    )
)
PRESETS.register("qwen2.5-vl-7b-shape")(
    dict(
        family="qwen2_5_vl",
        # Qwen2.5-VL-7B-Instruct's dimensions
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            patch_size=14,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        text=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rope_theta=1e6,
        ),
        mrope_section=[16, 24, 24],
        pixels=(56 * 56, 28 * 28 * 1280),  # the model card's default range
        draw_in_dtype=True,  # 8B parameters: drawn in fp32 they would not fit in memory
    )
)


def family(name: str) -> str:
    """The model family preset `name` builds: "llava_next" unless its spec says otherwise."""
    return PRESETS.get(name).get("family", "llava_next")


def with_preset_defaults(model_name: str, methods, options: dict) -> dict:
    """{method: {option: value}}: the preset's defaults for the methods run, then `options`
    (which win). Only a preset named by `model_name` has defaults."""
    defaults = PRESETS.get(model_name).get("method_options", {}) if model_name in PRESETS.names() else {}
    names = list(options) + [m for m in methods if m in defaults and m not in options]
    return {m: defaults.get(m, {}) | options.get(m, {}) for m in names}
