"""tokendrop as a vLLM plugin: what a server and each request are configured with, and how
many placeholder tokens each image gets. Light on purpose: vLLM loads every
`vllm.general_plugins` entry point in every process it starts, so `register` only names the
model classes (imported lazily by vLLM, from `tokendrop.integrations.vllm.llava_next` and
`.llava_onevision`) and imports nothing of vLLM's models.

Configuration, per server (the model's `hf_overrides` win over the environment):
- `hf_overrides={"architectures": ["TokendropLlavaNextForConditionalGeneration"],
  "tokendrop": {"method": "hired", "budget": 0.25}}` (for LLaVA-OneVision,
  "TokendropLlavaOnevisionForConditionalGeneration"), or
- `TOKENDROP_VLLM='{"method": "hired", "budget": 0.25}'` in the server's environment: the
  plugin then also serves every `LlavaNextForConditionalGeneration` and
  `LlavaOnevisionForConditionalGeneration` checkpoint pruned.
Any method option goes beside `method` and `budget`, as in `tokendrop.patch`. Per request,
`mm_processor_kwargs={"tokendrop": {...}}` overrides them: a `method` there starts from that
method's defaults, options alone (`{"budget": 0.1}`) change the server's method.

What the plugin must respect: vLLM writes each image's placeholder tokens into the prompt
while preprocessing, before the vision tower runs, and keys its processing and encoder caches
(and, through them, prefix caching) by a hash of the image and the request's processor
options. So:
- a request's count is known from the image size and its options: the method's feature count
  (`Method.kept_count`: the budget's count, or `text`'s base view and its share of the crops);
  newlines "all" (the plugin's default) and "drop" keep
  a count known from the size; "rows" drops the newline of a canvas row whose tokens were all
  dropped, which depends on the scores, so it is accepted only for methods whose selection
  reads nothing but the image's geometry (`Method.reads()` is empty: `uniform`, `random`,
  `pool`), for which the plugin runs the selection itself while counting; `threshold=` (an
  adaptive count) is refused;
- the options are part of the hash, as vLLM hashes every processor option; the methods that
  read the question (`text`, `router`, `dpp` with relevance="text") get the question of the
  request's latest user turn (`text.Template`), and the plugin adds it to the hash of every
  image of that request, so that no cache hands one question's selection to another.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from tokendrop.layout import EncodedImage, ImageLayout
from tokendrop.method import Method, build
from tokendrop.method.base import ProcessorNeeded
from tokendrop.pruning import select_images

from ...checks import UsageError

# the stock architectures the plugin serves -> the module of this package holding its model
# of each, named `architecture(stock)`
SERVED = {
    "LlavaNextForConditionalGeneration": "llava_next",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
}
ENV = "TOKENDROP_VLLM"  # the server's method as JSON: {"method": "hired", "budget": 0.25, ...}
RECORD_ENV = "TOKENDROP_VLLM_RECORD"  # a file: one JSON line per image the plugin prunes
CONFIG_KEY = "tokendrop"  # hf_overrides={"tokendrop": {...}}
DEFAULT_NEWLINES = "all"


def architecture(stock: str) -> str:
    """The plugin's architecture name for a stock one it serves, for `hf_overrides`."""
    if stock not in SERVED:
        raise UsageError(f"the tokendrop vLLM plugin serves {', '.join(SERVED)}; not {stock}")
    return f"Tokendrop{stock}"


ARCHITECTURE = architecture("LlavaNextForConditionalGeneration")  # the first served, by its old name


def register() -> None:
    """The `vllm.general_plugins` entry point. vLLM may call it in several processes and more
    than once; registering the same class again is harmless."""
    from vllm import ModelRegistry

    for stock, module in SERVED.items():
        model_class = f"{__name__}.{module}:{architecture(stock)}"
        ModelRegistry.register_model(architecture(stock), model_class)
        if os.environ.get(ENV):
            ModelRegistry.register_model(stock, model_class)


def server_options(hf_config) -> dict:
    """The server's method options: `hf_config.tokendrop` (from hf_overrides), else $TOKENDROP_VLLM."""
    raw = getattr(hf_config, CONFIG_KEY, None)
    source = f"hf_overrides['{CONFIG_KEY}']"
    if raw is None:
        raw, source = os.environ.get(ENV), f"${ENV}"
    if raw is None or raw == "":
        raise UsageError(
            f"the tokendrop vLLM model needs a method: pass hf_overrides={{'{CONFIG_KEY}': {{'method': 'hired', "
            f'\'budget\': 0.25}}}} or set {ENV}=\'{{"method": "hired", "budget": 0.25}}\''
        )
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as error:
            raise UsageError(
                f'{source} must be a JSON object such as {{"method": "hired", "budget": 0.25}}: {error}'
            ) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("method"), str):
        raise UsageError(
            f'{source} must be an object with a \'method\' name, e.g. {{"method": "hired", '
            f'"budget": 0.25}}; got {raw!r}'
        )
    return dict(raw)


def request_options(server: dict, request) -> dict:
    """A request's options: the server's, changed by the request's `mm_processor_kwargs`
    entry (a dict, or its JSON); a request that names a method starts from its defaults."""
    if request is None:
        return dict(server)
    if isinstance(request, str):
        try:
            request = json.loads(request)
        except json.JSONDecodeError as error:
            raise UsageError(f"mm_processor_kwargs['{CONFIG_KEY}'] must be a JSON object: {error}") from None
    if not isinstance(request, dict) or not isinstance(request.get("method", ""), str):
        raise UsageError(
            f"mm_processor_kwargs['{CONFIG_KEY}'] must be an object of method options, e.g. {{\"budget\": 0.1}} "
            f'or {{"method": "text", "budget": 0.1}}; got {request!r}'
        )
    return dict(request) if "method" in request else {**server, **request}


def build_method(options: dict, processor=None) -> Method:
    """The method of `options` ({"method": name, option: value}), refusing what vLLM cannot
    serve exactly (see the module docstring), with the plugin's newline default. `processor`:
    the model's tokenizer or processor, which the methods that read the question need."""
    options = dict(options)
    name = options.pop("method")
    options.setdefault("newlines", DEFAULT_NEWLINES)
    try:
        method = build(name, processor=processor, **options)
    except ProcessorNeeded:
        raise UsageError(
            f"method {name!r} reads the question, which needs the model's tokenizer: build it with processor="
        ) from None
    if getattr(method, "threshold", None) is not None:
        raise UsageError(
            "threshold= keeps a data-dependent number of tokens, but vLLM fixes each image's placeholder count "
            "while preprocessing, before the vision tower runs: give a budget (a fraction or a count) instead"
        )
    if method.budget is None:  # it would keep every token: a server that prunes nothing
        raise UsageError(
            f"the tokendrop vLLM model needs a budget for method {name!r}, the visual tokens kept per image (a "
            f'fraction in (0, 1] or a count): e.g. {{"method": {json.dumps(name)}, "budget": 0.25}}'
        )
    return method


def check_countable(method: Method, layout: ImageLayout) -> None:
    """Refuse newlines="rows" where the newlines an image of `layout` keeps depend on the
    selected tokens: a method that reads the image's data, and a layout with newlines."""
    if method.newlines == "rows" and method.reads() and layout.newline_positions.numel():
        raise UsageError(
            f"newlines='rows' with method {method.name!r} keeps a number of newline tokens that depends on which "
            "tokens the scores select, but vLLM fixes each image's placeholder count before the vision tower runs: "
            "use newlines='all' (the plugin's default) or 'drop'"
        )


def placeholder_count(method: Method, layout: ImageLayout) -> int:
    """How many tokens the LLM gets for an image of this layout: kept features plus kept
    newlines. Under newlines="rows" (`check_countable`) the selection itself runs, on the
    layout alone."""
    if method.newlines == "rows":
        check_countable(method, layout)
        (selected,), _ = select_images(method, [geometry_only(layout)])
        return int(selected.keep_mask.sum())
    n_newlines = layout.newline_positions.numel() if method.newlines == "all" else 0
    return method.kept_count(layout) + n_newlines


def geometry_only(layout: ImageLayout) -> EncodedImage:
    """An image of `layout` as a method that reads nothing but the layout sees it: no data."""
    no_vectors = torch.empty(layout.packed_source.numel(), 0)
    return EncodedImage(layout=layout, packed=no_vectors, cls={}, n_layers=1, embed=None)


def record(entry: dict) -> None:
    """Append one pruned image's record to $TOKENDROP_VLLM_RECORD, when set (tests and audits)."""
    path = os.environ.get(RECORD_ENV)
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")


VISION_TOWER = "vision_tower."


def save_for_vllm(model, processor, path) -> Path:
    """Save an HF LLaVA-NeXT or LLaVA-OneVision and its processor where vLLM loads them.
    transformers 5.x writes the CLIP or SigLIP tower's tensors without the `vision_model.` level
    that vLLM's towers (and every published checkpoint) have; they are renamed to it
    (transformers reads both). A OneVision processor without a video processor (the offline
    presets': transformers builds none without torchvision) is saved with the family's default
    one, at the image processor's size and normalisation: it cannot be saved without, and
    vLLM's OneVision loads it."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    model.save_pretrained(path)
    with_video_processor(processor).save_pretrained(path)
    for file in path.glob("*.safetensors"):
        weights = load_file(file)

        def legacy(name: str) -> str:
            if name.startswith(VISION_TOWER) and not name.startswith(VISION_TOWER + "vision_model."):
                return VISION_TOWER + "vision_model." + name[len(VISION_TOWER) :]
            return name

        save_file({legacy(name): tensor for name, tensor in weights.items()}, file, metadata={"format": "pt"})
    return path


def with_video_processor(processor):
    """`processor`, or a copy of a OneVision processor without a video processor given one."""
    from transformers import LlavaOnevisionProcessor

    if not isinstance(processor, LlavaOnevisionProcessor) or getattr(processor, "video_processor", None) is not None:
        return processor

    from transformers import LlavaOnevisionVideoProcessor

    image = processor.image_processor
    processor = copy.copy(processor)
    processor.video_processor = LlavaOnevisionVideoProcessor(
        size=dict(image.size), image_mean=image.image_mean, image_std=image.image_std
    )
    return processor
