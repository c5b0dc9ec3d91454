"""LLaVA-NeXT and LLaVA-OneVision models built offline from configs (random weights) with a
matching processor: the builders of the presets that `tokendrop.preset_specs` names.

Nothing is downloaded: the tokenizer is a byte-level BPE with no merges (one token per byte),
the image processor is transformers' PIL one of the family. Outputs of random weights are
meaningless text; shapes, token counts and timings are real.

- `tiny`: 48 px tiles of 6x6 patches, 3 CLIP layers, a 2-layer LLM: seconds, for tests.
- `llava-next-shape`: CLIP-L/336 (24 layers, 24x24 patches) + a Qwen2-0.5B-shaped LLM, with
  the llava-v1.6 pinpoints: the real prompt lengths and compute of a small LLaVA-NeXT.
- `testbed`: 48 px tiles of 6x6 patches, 4 CLIP layers, a 3-layer LLM, with *trained* weights
  committed in `tokendrop.testbed`: it answers the shapes task (`tokendrop.eval.shapes`),
  whose words its tokenizer holds as whole tokens.
- `tiny-onevision`: LLaVA-OneVision with a 48 px, 6x6-patch, 3-layer SigLIP and a 2-layer LLM:
  seconds, for tests. Its largest pinpoints (4x4 and 3x6 tiles) exceed anyres_max_9, so their
  canvases are resampled as in the real model.
- `onevision-shape`: SigLIP-so400m/384 (27 layers, 27x27 patches) + a Qwen2-0.5B-shaped LLM, with
  some of llava-onevision's anyres_max_9 pinpoints (up to 4x4 tiles).
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    SiglipVisionConfig,
)

from .checks import UsageError
from .preset_specs import PRESETS, family
from .testbed import load_testbed_model, testbed_config

# the PIL (numpy) image processor: `...Pil` from 5.0, the plain class before; chosen by what
# the installed release has, so that no torchvision is needed on any of them
PilImageProcessor = getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor
OnevisionPilImageProcessor = (
    getattr(transformers, "LlavaOnevisionImageProcessorPil", None) or transformers.LlavaOnevisionImageProcessor
)
QwenPilImageProcessor = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor


TEXT_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config}
# each tokenizer's special tokens (its first ids) and which of them are its named tokens
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]
LLAVA_TOKENS = dict(
    bos_token="<s>", eos_token="</s>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"}
)
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_TOKENS = dict(
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    extra_special_tokens={
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    },
)
# Vicuna-style template, as llava-v1.6-vicuna; the question follows the image.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# Qwen's ChatML, the image inside its vision markers
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(words=(), qwen: bool = False) -> PreTrainedTokenizerFast:
    """One token per byte, after the special tokens of LLaVA's tokenizer or of Qwen's (`qwen`);
    each of `words` is one token, alone or after a space (as " red" is one token in byte-level
    BPE vocabularies)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    special = QWEN_SPECIAL_TOKENS if qwen else SPECIAL_TOKENS
    vocab = {token: i for i, token in enumerate(special + alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **(QWEN_TOKENS if qwen else LLAVA_TOKENS),
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],  # 4.x adds token_type_ids, which generate refuses
    )
    if qwen:  # the chat and vision markers are whole special tokens, never bytes
        fast.add_tokens([AddedToken(token, special=True) for token in special], special_tokens=True)
    fast.add_tokens([AddedToken(word, single_word=True) for word in words] + [AddedToken(" " + word) for word in words])
    return fast


def build_processor(name: str):
    spec = PRESETS.get(name)
    if family(name) in QWEN_FAMILIES:
        return build_qwen_processor(name)
    size = spec["vision"]["image_size"]
    if family(name) == "llava_onevision":
        return build_onevision_processor(spec)
    image_processor = PilImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=spec["pinpoints"],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(spec.get("words", ())),
        patch_size=spec["vision"]["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


class Offline:
    """A processor of the offline presets, whose class checks accept what the presets give:
    no video processor (transformers has none without torchvision, not installable beside the
    CPU torch here; the presets take images only), and the presets' byte-level tokenizer where
    a release expects the family's own tokenizer class (4.x's Qwen processors)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        if argument_name == "tokenizer" and isinstance(argument, PreTrainedTokenizerFast):
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


class OfflineOnevisionProcessor(Offline, LlavaOnevisionProcessor):
    pass


def build_onevision_processor(spec: dict) -> LlavaOnevisionProcessor:
    size, patch = spec["vision"]["image_size"], spec["vision"]["patch_size"]
    image_processor = OnevisionPilImageProcessor(
        size={"height": size, "width": size}, image_grid_pinpoints=spec["pinpoints"]
    )
    return OfflineOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(spec.get("words", ())),
        num_image_tokens=(size // patch) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=CHAT_TEMPLATE,
    )


class OfflineQwen2VLProcessor(Offline, Qwen2VLProcessor):
    pass


class OfflineQwen2_5_VLProcessor(Offline, Qwen2_5_VLProcessor):
    pass


# family -> (config class, model class, offline processor class); Qwen3-VL from transformers 5
QWEN_FAMILIES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, OfflineQwen2VLProcessor),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, OfflineQwen2_5_VLProcessor),
}
if hasattr(transformers, "Qwen3VLProcessor"):

    class OfflineQwen3VLProcessor(Offline, transformers.Qwen3VLProcessor):
        pass

    QWEN_FAMILIES["qwen3_vl"] = (
        transformers.Qwen3VLConfig,
        transformers.Qwen3VLForConditionalGeneration,
        OfflineQwen3VLProcessor,
    )


def qwen_family(name: str) -> tuple:
    """(config class, model class, processor class) of a Qwen-VL preset, or why it cannot be built."""
    if family(name) not in QWEN_FAMILIES:
        raise UsageError(
            f"preset {name!r} is a {family(name)} model, which transformers {transformers.__version__} does not "
            "have: pip install 'transformers>=5,<6'"
        )
    return QWEN_FAMILIES[family(name)]


def build_qwen_processor(name: str):
    spec = PRESETS.get(name)
    min_pixels, max_pixels = spec["pixels"]
    patch = spec["vision"]["patch_size"]
    image_processor = QwenPilImageProcessor(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch, merge_size=2, temporal_patch_size=2
    )
    return qwen_family(name)[2](
        image_processor=image_processor,
        tokenizer=build_tokenizer(spec.get("words", ()), qwen=True),
        chat_template=QWEN_CHAT_TEMPLATE,
    )


def build_qwen_config(name: str, tokenizer: PreTrainedTokenizerFast):
    spec = PRESETS.get(name)
    text = (
        dict(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
            rope_scaling=(
                {"rope_type": "default", "mrope_section": spec["mrope_section"], "mrope_interleaved": True}
                if family(name) == "qwen3_vl"
                else {"type": "mrope", "mrope_section": spec["mrope_section"]}
            ),
        )
        | spec["text"]
    )
    hidden = text["hidden_size"]
    vision = spec["vision"] | ({"hidden_size": hidden} if family(name) == "qwen2_vl" else {"out_hidden_size": hidden})
    ids = {f"{t}_token_id": tokenizer.convert_tokens_to_ids(f"<|{t}|>") for t in ("vision_start", "vision_end")}
    return qwen_family(name)[0](
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        **ids,
    )


def build_config(name: str, tokenizer: PreTrainedTokenizerFast):
    spec = PRESETS.get(name)
    if family(name).startswith("qwen"):
        return build_qwen_config(name, tokenizer)
    text = (
        dict(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        | spec["text"]
    )
    if family(name) == "llava_onevision":
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(vision_use_head=False, **spec["vision"]),
            text_config=TEXT_CONFIGS[spec["text_model"]](**text),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=spec["pinpoints"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**spec["vision"]),
        text_config=TEXT_CONFIGS[spec["text_model"]](**text),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=spec["pinpoints"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def preset_config(name: str) -> LlavaNextConfig | LlavaOnevisionConfig:
    """The configuration of an embedded preset, without building its model."""
    if PRESETS.get(name).get("task"):
        return testbed_config()
    return build_config(name, build_processor(name).tokenizer)


def build_preset(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, attn_implementation: str = "sdpa"):
    """(model, processor) for an embedded preset, random weights drawn from `seed`; the
    preset trained for a task (`testbed`) loads its committed weights instead."""
    processor = build_processor(name)
    if PRESETS.get(name).get("task"):
        return load_testbed_model(processor, dtype=dtype, attn_implementation=attn_implementation), processor
    config = build_config(name, processor.tokenizer)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    if family(name).startswith("qwen"):
        model_class = qwen_family(name)[1]
    elif family(name) == "llava_onevision":
        model_class = LlavaOnevisionForConditionalGeneration
    else:
        model_class = LlavaNextForConditionalGeneration
    if not PRESETS.get(name).get("draw_in_dtype"):
        return _with_pad_token(model_class(config).to(dtype).eval(), processor), processor
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # a 7B shape drawn in fp32 would not fit in memory
    try:
        model = model_class(config).eval()
    finally:
        torch.set_default_dtype(default)
    return _with_pad_token(model, processor), processor


def _with_pad_token(model, processor):
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic image of coloured rectangles on noise: structure for attention to find."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 64, size=(height, width, 3), dtype=np.uint8)
    for _ in range(12):
        h, w = rng.integers(height // 16 + 1, height // 3 + 2), rng.integers(width // 16 + 1, width // 3 + 2)
        y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        pixels[y : y + h, x : x + w] = rng.integers(64, 256, size=3, dtype=np.uint8)
    return Image.fromarray(pixels)
