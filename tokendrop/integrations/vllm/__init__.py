"""tokendrop as a vLLM plugin: what a server is configured with, and how many placeholder
tokens each image gets. Light on purpose: vLLM loads every `vllm.general_plugins` entry point
in every process it starts, so `register` only names the model class (imported lazily by
vLLM, from `tokendrop.integrations.vllm.llava_next`) and imports nothing of vLLM's models.

Configuration, per server (the model's `hf_overrides` win over the environment):
- `hf_overrides={"architectures": ["TokendropLlavaNextForConditionalGeneration"],
  "tokendrop": {"method": "hired", "budget": 0.25}}`, or
- `TOKENDROP_VLLM='{"method": "hired", "budget": 0.25}'` in the server's environment: the
  plugin then also serves every `LlavaNextForConditionalGeneration` checkpoint pruned.
Any method option goes beside `method` and `budget`, as in `tokendrop.patch`.

Why counts are exact here and what is refused: vLLM writes each image's placeholder tokens
into the prompt while preprocessing, before the vision tower runs, and keys its encoder cache
(and prefix cache) by the image alone. So the plugin must know the count from the image size,
and the kept tokens may depend only on the image:
- a budget's feature count is `keep_count(budget, n_features)`, known from the size;
- newlines: "all" (the plugin's default) and "drop" keep a count known from the size; "rows"
  drops the newline of a canvas row whose tokens were all dropped, which depends on the
  scores, so it is accepted only for methods whose selection reads nothing but the image's
  geometry (`Method.reads()` is empty: `uniform`, `random`, `pool`): for those the plugin runs
  the selection itself while counting;
- the methods that read the question (`text`, `router`, `dpp` with relevance="text"; also
  the only ones with an adaptive count, `threshold=`) are refused: the encoder cache would
  hand one question's selection to another request with the same image.
"""

from __future__ import annotations

import json
import os

import torch

from tokendrop.layout import EncodedImage, ImageLayout
from tokendrop.method import Method, build
from tokendrop.method.base import ProcessorNeeded
from tokendrop.pruning import select_images
from tokendrop.selection import keep_count

ARCHITECTURE = "TokendropLlavaNextForConditionalGeneration"
STOCK_ARCHITECTURE = "LlavaNextForConditionalGeneration"
MODEL_CLASS = f"tokendrop.integrations.vllm.llava_next:{ARCHITECTURE}"
ENV = "TOKENDROP_VLLM"  # the server's method as JSON: {"method": "hired", "budget": 0.25, ...}
RECORD_ENV = "TOKENDROP_VLLM_RECORD"  # a file: one JSON line per image the plugin prunes
CONFIG_KEY = "tokendrop"  # hf_overrides={"tokendrop": {...}}
DEFAULT_NEWLINES = "all"


def register() -> None:
    """The `vllm.general_plugins` entry point. vLLM may call it in several processes and more
    than once; registering the same class again is harmless."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    if os.environ.get(ENV):
        ModelRegistry.register_model(STOCK_ARCHITECTURE, MODEL_CLASS)


def server_options(hf_config) -> dict:
    """The server's method options: `hf_config.tokendrop` (from hf_overrides), else $TOKENDROP_VLLM."""
    raw = getattr(hf_config, CONFIG_KEY, None)
    source = f"hf_overrides['{CONFIG_KEY}']"
    if raw is None:
        raw, source = os.environ.get(ENV), f"${ENV}"
    if raw is None or raw == "":
        raise ValueError(
            f"the tokendrop vLLM model needs a method: pass hf_overrides={{'{CONFIG_KEY}': {{'method': 'hired', "
            f'\'budget\': 0.25}}}} or set {ENV}=\'{{"method": "hired", "budget": 0.25}}\''
        )
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ValueError(
                f'{source} must be a JSON object such as {{"method": "hired", "budget": 0.25}}: {error}'
            ) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("method"), str):
        raise ValueError(
            f'{source} must be an object with a \'method\' name, e.g. {{"method": "hired", '
            f'"budget": 0.25}}; got {raw!r}'
        )
    return dict(raw)


def build_method(options: dict) -> Method:
    """The method of `options` ({"method": name, option: value}), refusing what vLLM cannot
    serve exactly (see the module docstring), with the plugin's newline default."""
    options = dict(options)
    name = options.pop("method")
    options.setdefault("newlines", DEFAULT_NEWLINES)
    try:  # without a processor, a method that reads the question cannot be built: it says so
        return build(name, **options)
    except ProcessorNeeded:
        raise ValueError(
            f"method {name!r} reads the question, which the vLLM plugin cannot serve: vLLM caches an image's "
            "encoder output by the image alone (and shares prefix-cached prompts), so one request's "
            "question-dependent selection would be reused for another question. Use a question-agnostic method "
            "(hired, globalcom2, random, uniform, cls, pool, ...)"
            + (" or relevance='cls'/'none'" if name == "dpp" else "")
        ) from None


def check_countable(method: Method, layout: ImageLayout) -> None:
    """Refuse newlines="rows" where the newlines an image of `layout` keeps depend on the
    selected tokens: a method that reads the image's data, and a layout with newlines."""
    if method.newlines == "rows" and method.reads() and layout.newline_positions.numel():
        raise ValueError(
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
    return keep_count(method.budget, layout.n_features) + n_newlines


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
