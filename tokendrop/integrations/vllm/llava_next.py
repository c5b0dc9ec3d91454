"""LLaVA-NeXT in vLLM with tokendrop: vLLM's own model and processor, subclassed.

- `TokendropProcessor.apply`: each request's options (the server's, changed by its
  `mm_processor_kwargs["tokendrop"]`) and, for the methods that read it, the question of its
  latest user turn (`text.Template`, on the prompt) are worked out once; each image's
  placeholder count is its pruned count under them (`_get_prompt_updates`), its cache hash
  covers them (the options as every processor option, the question added by `_get_mm_hashes`),
  and they travel to the model with the image's pixels (`tokendrop_request`: JSON bytes, the
  one per-image channel from vLLM's processor to the model being tensors).
- `TokendropLlavaNextForConditionalGeneration.embed_multimodal`: vLLM's vision pass runs as
  stock (tower, projector, packing) while pre-hooks on the CLIP layers' attention kernels
  score the CLS query against all keys (`scoring.capture_cls_scores_of_inputs`, the scores the
  HF adapter captures); then the images of each option set go through the selection
  `tokendrop.patch` runs (`pruning.select_images`: the method, merging, the newlines the policy
  keeps), and only the kept vectors are returned. Each count is checked against the
  processor's. vLLM builds the tower only up to the feature layer; where the server's method
  scores deeper (globalcom2's last layer), the tower is built that deep and still returns the
  feature layer's states, through vLLM's own `select_layers`; a request may choose any method
  whose scored layers the built tower has.

What it checks of the model and what methods read of it come from the HF adapter
(`LlavaNextAdapter.facts`); the layout of an image from vLLM's own packing
(`_merge_image_patch_embeddings`) applied to an index tensor (`packed_layout`, as the HF
adapter applies HF's), so positions agree with the model by construction. Everything else
(weights, LLM, cache, scheduling) is vLLM's, untouched.
"""

from __future__ import annotations

import hashlib
import json
from contextvars import ContextVar
from functools import cached_property, lru_cache
from types import SimpleNamespace

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement
from vllm.tokenizers.registry import cached_tokenizer_from_config

from tokendrop.adapters.llava_next import LlavaNextAdapter, packed_layout
from tokendrop.layout import EncodedImage, ImageLayout
from tokendrop.method.base import check_signals
from tokendrop.method.text import Template
from tokendrop.pruning import select_images
from tokendrop.scoring import capture_cls_scores_of_inputs

from .. import vllm as vllm_plugin

REQUEST_FIELD = "tokendrop_request"  # each image's options and question, as JSON bytes


def resolved_method(hf_config, options: dict | None = None, tokenizer=None):
    """The method of `options` (the server's by default), checked against the model and
    resolved as `tokendrop.patch` does (layer defaults from the vision config); `tokenizer`
    for the methods that read the question."""
    if not isinstance(hf_config.vision_feature_layer, int):
        raise ValueError(
            "the tokendrop vLLM plugin supports LLaVA-NeXT with a single vision_feature_layer; this model has "
            f"{hf_config.vision_feature_layer!r}"
        )
    if "clip" not in hf_config.vision_config.model_type:
        raise ValueError(
            f"tokendrop scores tokens by CLS attention of a CLIP vision tower; this model's tower is "
            f"{hf_config.vision_config.model_type!r}"
        )
    facts = LlavaNextAdapter.facts(hf_config)
    options = vllm_plugin.server_options(hf_config) if options is None else options
    method = vllm_plugin.build_method(options, tokenizer).resolve(facts)
    check_signals(method, facts)
    for height, width in hf_config.image_grid_pinpoints:
        vllm_plugin.check_countable(method, layout(hf_config, (height, width)))
    return method


class Methods:
    """Each option set's method, built once per server process (options as sorted JSON)."""

    def __init__(self, hf_config, tokenizer):
        self.hf_config, self.tokenizer = hf_config, tokenizer
        self.server = vllm_plugin.server_options(hf_config)
        self._built: dict[str, object] = {}

    def options(self, request) -> str:
        """A request's options (see `vllm_plugin.request_options`) as the key of its method."""
        return json.dumps(vllm_plugin.request_options(self.server, request), sort_keys=True)

    def __getitem__(self, options: str):
        if options not in self._built:
            self._built[options] = resolved_method(self.hf_config, json.loads(options), self.tokenizer)
        return self._built[options]


def layout(hf_config, image_size) -> ImageLayout:
    """The layout of an image of (height, width): vLLM's packing of an index tensor."""
    side = hf_config.vision_config.image_size // hf_config.vision_config.patch_size
    return _layout(side, hf_config.vision_config.image_size, _pinpoints(hf_config), tuple(int(v) for v in image_size))


def _pinpoints(hf_config) -> tuple:
    return tuple(tuple(int(v) for v in p) for p in hf_config.image_grid_pinpoints)


@lru_cache(maxsize=4096)
def _layout(side: int, tile_px: int, pinpoints: tuple, image_size: tuple[int, int]) -> ImageLayout:
    grid = get_anyres_image_grid_shape(list(image_size), [list(p) for p in pinpoints], tile_px)
    config = SimpleNamespace(  # what vLLM's packing reads of the model's config
        vision_config=SimpleNamespace(image_size=tile_px, patch_size=tile_px // side),
        image_grid_pinpoints=[list(p) for p in pinpoints],
    )

    def pack(tiles: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        stand_in = SimpleNamespace(config=config, image_newline=newline)
        return LlavaNextForConditionalGeneration._merge_image_patch_embeddings(
            stand_in, torch.tensor(image_size), tiles, strategy="spatial_unpad"
        )

    return packed_layout(side, tuple(grid), pack)


# the request a processor is working on, in its thread: (options key, question or None)
_request: ContextVar[tuple[str, str | None] | None] = ContextVar("tokendrop_vllm_request", default=None)


class TokendropProcessingInfo(LlavaNextProcessingInfo):
    @cached_property
    def tokendrop_methods(self) -> Methods:
        return Methods(self.get_hf_config(), self.get_tokenizer())

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
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        image = layout(self.get_hf_config(), (image_height, image_width))
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


class TokendropProcessor(LlavaNextMultiModalProcessor):
    """Each request's options and question: its placeholder counts, its cache hashes, and
    `tokendrop_request` beside each image's pixels."""

    def apply(self, inputs, timing_ctx):
        token = _request.set(self.info.request(inputs))
        try:
            return super().apply(inputs, timing_ctx)
        finally:
            _request.reset(token)

    def _call_hf_processor(self, hf_data, hf_kwargs):
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != vllm_plugin.CONFIG_KEY}  # tokendrop's, not HF's
        return super()._call_hf_processor(hf_data, hf_kwargs)

    def _get_mm_hashes(self, inputs):
        options, question = self.info.current_request()
        hashes = super()._get_mm_hashes(inputs)
        if question is None:  # the options are hashed already, as every processor option
            return hashes
        return {
            modality: [hashlib.sha256(f"{h}\0{question}".encode()).hexdigest() for h in items]
            for modality, items in hashes.items()
        }

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        image_token_id = self.info.get_hf_config().image_token_index

        def replacement(item_idx: int):
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            return [image_token_id] * self.info.pruned_tokens(size.width, size.height)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]

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


@MULTIMODAL_REGISTRY.register_processor(
    TokendropProcessor, info=TokendropProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class TokendropLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokendrop_methods = Methods(self.config, cached_tokenizer_from_config(vllm_config.model_config))
        server = self.tokendrop_methods[self.tokendrop_methods.options(None)]
        self.n_vision_layers = self.config.vision_config.num_hidden_layers
        wanted = {layer % self.n_vision_layers for layer in server.signals()}
        if wanted and max(wanted) >= len(self.vision_tower.vision_model.encoder.layers):
            self._build_deeper_tower(vllm_config, prefix, max(wanted) + 1)
        self._kernels = {}  # layer -> (its attention kernel, heads, scale), for the score hooks
        for index, layer in enumerate(self.vision_tower.vision_model.encoder.layers):
            attention = layer.self_attn
            if attention.num_heads_per_partition != attention.num_heads:
                raise ValueError(
                    "the tokendrop vLLM plugin needs the vision tower unsharded (tensor_parallel_size=1, "
                    "or mm_encoder_tp_mode='data'): CLS scores sum over all heads"
                )
            self._kernels[index] = (attention.attn, attention.num_heads, attention.scale)

    def _build_deeper_tower(self, vllm_config, prefix: str, n_layers: int) -> None:
        """vLLM builds the CLIP tower only up to the feature layer; a method that scores at a
        deeper layer (globalcom2's default, the last) gets a tower of `n_layers` that returns
        the feature layer's hidden states through vLLM's own `select_layers` (as HF does: no
        post-norm), so the LLM's input is unchanged and the deeper layers only feed the scores."""
        from vllm.model_executor.models.clip import CLIPVisionModel
        from vllm.model_executor.models.utils import maybe_prefix

        if type(self.vision_tower) is not CLIPVisionModel:
            raise ValueError(f"tokendrop scores with a CLIP tower; this model's is {type(self.vision_tower).__name__}")
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = CLIPVisionModel(
                self.config.vision_config,
                quant_config=vllm_config.quant_config,
                num_hidden_layers_override=n_layers,
                require_post_norm=False,
                prefix=maybe_prefix(prefix, "vision_tower"),
            )
        self.select_layers = [self.config.vision_feature_layer]

    def embed_multimodal(self, **kwargs):
        requests = kwargs.pop(REQUEST_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if isinstance(image_input, LlavaNextImageEmbeddingInputs):
            raise ValueError(
                "the tokendrop vLLM model prunes images from their pixels; precomputed image_embeds "
                "carry no CLS attention to select by: send the image itself"
            )
        if requests is None:
            raise ValueError(f"the tokendrop vLLM model's images come with {REQUEST_FIELD} from its own processor")
        return self._process_image_input(image_input, [json.loads(bytes(r.tolist())) for r in requests])

    def _process_image_input(self, image_input, requests: list[dict]):
        """Each image's kept vectors, selected by its request's method (and question)."""
        image_sizes = image_input.get("image_sizes")
        if image_sizes is None:
            raise ValueError("the tokendrop vLLM model needs each image's size (the processor gives image_sizes)")
        keys = [json.dumps(r["options"], sort_keys=True) for r in requests]
        methods = {key: self.tokendrop_methods[key] for key in dict.fromkeys(keys)}
        kinds = {}
        for method in methods.values():
            for layer, kind in method.signals().items():
                layer %= self.n_vision_layers
                if layer not in self._kernels:
                    raise ValueError(
                        f"method {method.name!r} scores vision layer {layer}, deeper than this server's tower "
                        f"(built to layer {len(self._kernels) - 1} for its own method): make a method that scores "
                        "that deep the server's, or choose another"
                    )
                if kinds.setdefault(layer, kind) != kind:
                    raise ValueError(f"the methods of one batch need layer {layer} as both {kind} and {kinds[layer]}")
        with capture_cls_scores_of_inputs(self._kernels, kinds) as captured:
            patch_embeddings = self._process_image_pixels(image_input)
        tiles = [int(embeddings.shape[0]) for embeddings in patch_embeddings]
        per_layer = {layer: torch.cat(scores).split(tiles) for layer, scores in captured.items()}
        embed = self.get_language_model().model.embed_tokens  # what text and the router embed questions with
        images = []
        for i, embeddings in enumerate(patch_embeddings):
            packed = self._merge_image_patch_embeddings(image_sizes[i], embeddings, strategy="spatial_unpad")
            image_layout = layout(self.config, image_sizes[i].tolist())
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
