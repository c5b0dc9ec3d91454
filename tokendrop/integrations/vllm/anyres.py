"""What the plugin's AnyRes LLaVA models (`llava_next`, `llava_onevision`) share: vLLM's own
processor and model of the family, subclassed through the mixins below (`served` registers a
family's model with its processor).

- `TokendropProcessor.apply`: each request's options (the server's, changed by its
  `mm_processor_kwargs["tokendrop"]`) and, for the methods that read it, the question of its
  latest user turn (`text.Template`, on the prompt) are worked out once; each image's
  placeholder count is its pruned count under them (`_get_prompt_updates`), its cache hash
  covers them (the options as every processor option, the question added by `_get_mm_hashes`),
  and they travel to the model with the image's pixels (`tokendrop_request`: JSON bytes, the
  one per-image channel from vLLM's processor to the model being tensors). Other modalities
  (OneVision's videos) keep the stock count and hash.
- `TokendropModel._pruned_images`: vLLM's vision pass runs as stock (tower, projector,
  packing) while the family's score hooks (`_score_hooks`) capture the scores the HF adapter
  captures; then the images of each option set go through the selection `tokendrop.patch`
  runs (`pruning.select_images`: the method, merging, the newlines the policy keeps), and only
  the kept vectors are returned. Each count is checked against the processor's. A request may
  choose any method whose scored layers the server's tower has.

What is the family's (`Family`): the HF adapter whose config checks and `ModelFacts` methods
resolve against, the tower it scores, and the layout of an image, from vLLM's own packing
applied to an index or coordinate tensor (as the HF adapter applies HF's), so that positions
agree with the model by construction; and, on the model, the score hooks, the packing call
and how deep the tower may be built. Everything else (weights, LLM, cache, scheduling) is
vLLM's, untouched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property, lru_cache
from types import SimpleNamespace

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement
from vllm.tokenizers.registry import cached_tokenizer_from_config

from tokendrop.adapters.llava_next import LlavaNextAdapter
from tokendrop.layout import EncodedImage, ImageLayout
from tokendrop.method.base import check_signals
from tokendrop.method.text import Template
from tokendrop.pruning import select_images

from ...checks import UsageError
from .. import vllm as vllm_plugin

REQUEST_FIELD = "tokendrop_request"  # each image's options and question, as JSON bytes


@dataclass(frozen=True)
class Family:
    """What the processor and the method checks need of one AnyRes LLaVA family."""

    adapter: type[LlavaNextAdapter]  # the HF adapter: config checks, the facts methods resolve with
    tower_type: str  # what the vision config's model_type holds for the tower it scores ("clip")
    # (side, grid, image_size, stand_in) -> the layout of an image of image_size (a (2,) tensor)
    # with crops on grid, from vLLM's packing called on `stand_in(newline)` (see `_layout`)
    packed_layout: Callable[[int, tuple[int, int], torch.Tensor, Callable], ImageLayout]

    def layout(self, hf_config, image_size) -> ImageLayout:
        """The layout of an image of (height, width), from vLLM's packing."""
        return _layout(self.packed_layout, *layout_key(hf_config), tuple(int(v) for v in image_size))

    def method(self, hf_config, options: dict | None = None, tokenizer=None):
        """The method of `options` (the server's by default), checked against the model and
        resolved as `tokendrop.patch` does (layer defaults from the vision config); `tokenizer`
        for the methods that read the question."""
        name = self.adapter.model_class
        if not isinstance(hf_config.vision_feature_layer, int):
            raise UsageError(
                f"the tokendrop vLLM plugin supports {name} with a single vision_feature_layer; this model has "
                f"{hf_config.vision_feature_layer!r}"
            )
        if self.tower_type not in hf_config.vision_config.model_type:
            raise UsageError(
                f"tokendrop scores the tokens of a {name} {self.adapter.tower}; this model's tower is "
                f"{hf_config.vision_config.model_type!r}"
            )
        facts = self.adapter.facts(hf_config)
        options = vllm_plugin.server_options(hf_config) if options is None else options
        method = vllm_plugin.build_method(options, tokenizer).resolve(facts)
        check_signals(method, facts)
        for height, width in hf_config.image_grid_pinpoints:
            vllm_plugin.check_countable(method, self.layout(hf_config, (height, width)))
        return method


def layout_key(hf_config) -> tuple:
    """(tile pixels, patch pixels, pinpoints): what a layout depends on besides the image's
    size, hashable."""
    vision = hf_config.vision_config
    pinpoints = tuple(tuple(int(v) for v in p) for p in hf_config.image_grid_pinpoints)
    return int(vision.image_size), int(vision.patch_size), pinpoints


@lru_cache(maxsize=4096)
def _layout(packed_layout, tile_px: int, patch_px: int, pinpoints: tuple, image_size: tuple[int, int]):
    """`packed_layout` called with the image's crop grid and `stand_in(newline)`: what vLLM's
    packing reads of the model (its config, its `image_newline`), to call it without a model."""
    config = SimpleNamespace(
        vision_config=SimpleNamespace(image_size=tile_px, patch_size=patch_px),
        image_grid_pinpoints=[list(p) for p in pinpoints],
    )
    grid = get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints, tile_px)

    def stand_in(newline: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(config=config, image_newline=newline)

    return packed_layout(tile_px // patch_px, tuple(grid), torch.tensor(image_size), stand_in)


class Methods:
    """Each option set's method, built once per server process (options as sorted JSON)."""

    def __init__(self, family: Family, hf_config, tokenizer):
        self.family, self.hf_config, self.tokenizer = family, hf_config, tokenizer
        self.server = vllm_plugin.server_options(hf_config)
        self._built: dict[str, object] = {}

    def options(self, request) -> str:
        """A request's options (see `vllm_plugin.request_options`) as the key of its method."""
        return json.dumps(vllm_plugin.request_options(self.server, request), sort_keys=True)

    def __getitem__(self, options: str):
        if options not in self._built:
            self._built[options] = self.family.method(self.hf_config, json.loads(options), self.tokenizer)
        return self._built[options]


# the request a processor is working on, in its thread: (options key, question or None)
_request: ContextVar[tuple[str, str | None] | None] = ContextVar("tokendrop_vllm_request", default=None)


class TokendropProcessingInfo:
    """Mixed in before the family's vLLM processing info."""

    family: Family

    @cached_property
    def tokendrop_methods(self) -> Methods:
        return Methods(self.family, self.get_hf_config(), self.get_tokenizer())

    @cached_property
    def question_rule(self) -> Template:
        return Template.of(self.get_hf_processor())

    def get_hf_processor(self, **kwargs):
        kwargs.pop(vllm_plugin.CONFIG_KEY, None)  # tokendrop's request options are not the HF processor's
        return super().get_hf_processor(**kwargs)

    def request(self, inputs) -> tuple[str, str | None]:
        """(the request's options key, the question of its latest user turn where its method
        reads the question, else None)."""
        options = self.tokendrop_methods.options(inputs.hf_processor_mm_kwargs.get(vllm_plugin.CONFIG_KEY))
        if "question" not in self.tokendrop_methods[options].reads():
            return options, None
        tokenizer = self.get_tokenizer()
        image_token = self.get_hf_processor().image_token
        prompt = inputs.prompt if isinstance(inputs.prompt, str) else tokenizer.decode(inputs.prompt)
        return options, self.question_rule.question(prompt.split(image_token)[-1])

    def pruned_tokens(self, image_width: int, image_height: int) -> int:
        """The placeholder count of an image of this size under the request being processed."""
        full = self.get_num_image_tokens(image_width=image_width, image_height=image_height)
        image = self.family.layout(self.get_hf_config(), (image_height, image_width))
        if image.packed_source.numel() != full:
            raise RuntimeError(
                f"tokendrop's layout of a {image_height}x{image_width} image has "
                f"{image.packed_source.numel()} tokens, vLLM counts {full}"
            )
        options, _ = self.current_request()
        return vllm_plugin.placeholder_count(self.tokendrop_methods[options], image)

    def current_request(self) -> tuple[str, str | None]:
        """The request being processed (`request`); the server's options outside one."""
        return _request.get() or (self.tokendrop_methods.options(None), None)


class TokendropProcessor:
    """Mixed in before the family's vLLM processor: each request's options and question, its
    images' placeholder counts and cache hashes, and `tokendrop_request` beside each image's
    pixels."""

    def apply(self, inputs, timing_ctx):
        token = _request.set(self.info.request(inputs))
        try:
            return super().apply(inputs, timing_ctx)
        finally:
            _request.reset(token)

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != vllm_plugin.CONFIG_KEY}  # tokendrop's, not HF's
        return super()._apply_hf_processor_main(mm_items, hf_kwargs)

    def _get_mm_hashes(self, inputs):
        options, question = self.info.current_request()
        hashes = super()._get_mm_hashes(inputs)
        if question is None or "image" not in hashes:  # the options are hashed already, as every processor option
            return hashes
        return {**hashes, "image": [hashlib.sha256(f"{h}\0{question}".encode()).hexdigest() for h in hashes["image"]]}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        image_token_id = self.info.get_hf_config().image_token_index

        def replacement(item_idx: int):
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            return [image_token_id] * self.info.pruned_tokens(size.width, size.height)

        pruned = PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)
        stock = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        return [pruned if update.modality == "image" else update for update in stock]

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)
        return {**fields, REQUEST_FIELD: MultiModalFieldConfig.batched("image")}

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        options, question = self.info.current_request()
        message = json.dumps({"options": json.loads(options), "question": question}).encode()
        n_images = len(processed_data.get("image_sizes", ()))  # none where this call processed no image
        if n_images:
            processed_data[REQUEST_FIELD] = [torch.frombuffer(bytearray(message), dtype=torch.uint8)] * n_images
        return super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)


def served(family: Family, info: type, processor: type, dummy_inputs: type):
    """Class decorator of a family's model (a `TokendropModel`): sets its `family` and registers
    it, as vLLM registers the stock model, with vLLM's processing `info` and `processor` of the
    family behind this module's mixins (`TokendropProcessingInfo`, `TokendropProcessor`)."""

    def register(model: type) -> type:
        model.family = family
        module = {"__module__": model.__module__}
        info_class = type(f"Tokendrop{info.__name__}", (TokendropProcessingInfo, info), {**module, "family": family})
        processor_class = type(f"Tokendrop{processor.__name__}", (TokendropProcessor, processor), module)
        with_processor = MULTIMODAL_REGISTRY.register_processor(
            processor_class, info=info_class, dummy_inputs=dummy_inputs
        )
        return with_processor(model)

    return register


class TokendropModel:
    """Mixed in before the family's vLLM model, which `served` registers. A family implements
    `_score_hooks` (the context capturing {layer: kind} scores of its tower), `_pack` (vLLM's
    packing of one image's projected tiles) and `_build_deeper_tower`, for a server's method
    that scores deeper than vLLM builds the tower (to the feature layer)."""

    family: Family

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        tokenizer = cached_tokenizer_from_config(vllm_config.model_config)
        self.tokendrop_methods = Methods(self.family, self.config, tokenizer)
        server = self.tokendrop_methods[self.tokendrop_methods.options(None)]
        self.n_vision_layers = self.config.vision_config.num_hidden_layers
        wanted = {layer % self.n_vision_layers for layer in server.signals()}
        if wanted and max(wanted) >= len(self.vision_tower.vision_model.encoder.layers):
            self._build_deeper_tower(vllm_config, prefix, max(wanted) + 1)
        self._layers = dict(enumerate(self.vision_tower.vision_model.encoder.layers))
        self._kernels = {}  # layer -> (its attention kernel, heads, scale), for the score hooks
        for index, layer in self._layers.items():
            attention = layer.self_attn
            if attention.num_heads_per_partition != attention.num_heads:
                raise UsageError(
                    "the tokendrop vLLM plugin needs the vision tower unsharded (tensor_parallel_size=1, "
                    "or mm_encoder_tp_mode='data'): its scores sum over all heads"
                )
            self._kernels[index] = (attention.attn, attention.num_heads, attention.scale)

    def _build_deeper_tower(self, vllm_config, prefix: str, n_layers: int) -> None:
        raise NotImplementedError

    def _score_hooks(self, kinds: dict[int, str]):
        raise NotImplementedError

    def _pack(self, image_size: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _pruned_images(self, image_input, requests) -> list[torch.Tensor]:
        """Each image's kept vectors, selected by its request's method (and question);
        `requests`: the images' `tokendrop_request` tensors."""
        if image_input["type"] == "image_embeds":
            raise UsageError(
                "the tokendrop vLLM model prunes images from their pixels; precomputed image_embeds "
                "carry no scores to select by: send the image itself"
            )
        if requests is None:
            raise UsageError(f"the tokendrop vLLM model's images come with {REQUEST_FIELD} from its own processor")
        requests = [json.loads(bytes(r.tolist())) for r in requests]
        image_sizes = image_input.get("image_sizes")
        if image_sizes is None:
            raise UsageError("the tokendrop vLLM model needs each image's size (the processor gives image_sizes)")
        keys = [json.dumps(r["options"], sort_keys=True) for r in requests]
        methods = {key: self.tokendrop_methods[key] for key in dict.fromkeys(keys)}
        kinds = {}
        for method in methods.values():
            for layer, kind in method.signals().items():
                layer %= self.n_vision_layers
                if layer not in self._kernels:
                    raise UsageError(
                        f"method {method.name!r} scores vision layer {layer}, deeper than this server's tower "
                        f"(built to layer {len(self._kernels) - 1} for its own method): make a method that scores "
                        "that deep the server's, or choose another"
                    )
                if kinds.setdefault(layer, kind) != kind:
                    raise UsageError(f"the methods of one batch need layer {layer} as both {kind} and {kinds[layer]}")
        with self._score_hooks(kinds) as captured:
            patch_embeddings = self._process_image_pixels(image_input)
        tiles = [int(embeddings.shape[0]) for embeddings in patch_embeddings]
        per_layer = {layer: torch.cat(scores).split(tiles) for layer, scores in captured.items()}
        embed = self.get_language_model().model.embed_tokens  # what text and the router embed questions with
        images = []
        for i, embeddings in enumerate(patch_embeddings):
            packed = self._pack(image_sizes[i], embeddings)
            image_layout = self.family.layout(self.config, image_sizes[i].tolist())
            if packed.shape[0] != image_layout.packed_source.numel():
                raise RuntimeError(
                    f"vLLM packed {packed.shape[0]} tokens, tokendrop's layout has {image_layout.packed_source.numel()}"
                )
            p = image_layout.n_partitions
            cls = {layer: scores[i][:p].reshape(p, image_layout.tile) for layer, scores in per_layer.items()}
            images.append(
                EncodedImage(image_layout, packed, cls, self.n_vision_layers, embed, question=requests[i]["question"])
            )
        kept_vectors = [None] * len(images)
        for key, method in methods.items():
            members = [i for i, k in enumerate(keys) if k == key]
            selected, packed = select_images(method, [images[i] for i in members])
            for i, chosen, vectors in zip(members, selected, packed):
                kept_vectors[i] = self._kept(method, chosen, vectors, image_sizes[i])
        return kept_vectors

    @staticmethod
    def _kept(method, chosen, vectors, size):
        """The vectors the LLM gets for one image, checked against its placeholder count, and its record."""
        expected = vllm_plugin.placeholder_count(method, chosen.layout)
        record = chosen.record()
        if record.n_kept + record.n_newlines != expected:
            raise RuntimeError(
                f"{method.name} kept {record.n_kept + record.n_newlines} tokens of an image the processor gave "
                f"{expected} placeholders"
            )
        vllm_plugin.record(
            dict(
                image_size=[int(v) for v in size.tolist()],
                method=method.name,
                budget=method.budget,
                n_before=record.n_before,
                n_kept=record.n_kept,
                n_newlines=record.n_newlines,
                indices=record.indices,
            )
        )
        return vectors[chosen.keep_mask.to(vectors.device)]
