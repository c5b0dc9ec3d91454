"""LLaVA-NeXT in vLLM with tokendrop: vLLM's own model and processor, subclassed at two points.

- `TokendropProcessingInfo.get_num_image_tokens`: the placeholder count vLLM writes into the
  prompt for an image is the pruned count (`vllm_plugin.placeholder_count`), not the full one.
- `TokendropLlavaNextForConditionalGeneration._process_image_input`: vLLM's vision pass runs
  as stock (tower, projector, packing) while pre-hooks on the chosen CLIP layers' attention
  kernels score the CLS query against all keys (`scoring.capture_cls_scores_of_inputs`, the
  scores the HF adapter captures); then the images go through the selection `tokendrop.patch`
  runs (`pruning.select_images`: the method, merging, the newlines the policy keeps), and only
  the kept vectors are returned. Each count is checked against the processor's. vLLM builds
  the tower only up to the feature layer; where a method scores deeper (globalcom2's last
  layer), the tower is built that deep and still returns the feature layer's states, through
  vLLM's own `select_layers`.

What it checks of the model and what methods read of it come from the HF adapter
(`LlavaNextAdapter.facts`); the layout of an image from vLLM's own packing
(`_merge_image_patch_embeddings`) applied to an index tensor (`packed_layout`, as the HF
adapter applies HF's), so positions agree with the model by construction. Everything else
(weights, LLM, cache, scheduling) is vLLM's, untouched.
"""

from __future__ import annotations

from functools import lru_cache
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

from tokendrop.adapters.llava_next import LlavaNextAdapter, packed_layout
from tokendrop.layout import EncodedImage, ImageLayout
from tokendrop.method.base import check_signals
from tokendrop.pruning import select_images
from tokendrop.scoring import capture_cls_scores_of_inputs

from .. import vllm as vllm_plugin


def resolved_method(hf_config):
    """The server's method, checked against the model and resolved as `tokendrop.patch` does
    (layer defaults from the vision config)."""
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
    method = vllm_plugin.build_method(vllm_plugin.server_options(hf_config)).resolve(facts)
    check_signals(method, facts)
    for height, width in hf_config.image_grid_pinpoints:
        vllm_plugin.check_countable(method, layout(hf_config, (height, width)))
    return method


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


class TokendropProcessingInfo(LlavaNextProcessingInfo):
    def tokendrop_method(self):
        hf_config = self.get_hf_config()
        cached = getattr(self, "_tokendrop_method", None)
        if cached is None or cached[0] is not hf_config:
            self._tokendrop_method = cached = (hf_config, resolved_method(hf_config))
        return cached[1]

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        image = layout(self.get_hf_config(), (image_height, image_width))
        if image.packed_source.numel() != full:
            raise RuntimeError(
                f"tokendrop's layout of a {image_height}x{image_width} image has "
                f"{image.packed_source.numel()} tokens, vLLM counts {full}"
            )
        return vllm_plugin.placeholder_count(self.tokendrop_method(), image)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=TokendropProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class TokendropLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokendrop_method = resolved_method(self.config)
        self.n_vision_layers = self.config.vision_config.num_hidden_layers
        wanted = {layer % self.n_vision_layers for layer in self.tokendrop_method.signals()}
        if wanted and max(wanted) >= len(self.vision_tower.vision_model.encoder.layers):
            self._build_deeper_tower(vllm_config, prefix, max(wanted) + 1)
        layers = self.vision_tower.vision_model.encoder.layers
        self._kernels = {}  # layer -> (its attention kernel, heads, scale), for the score hooks
        for index in wanted:
            attention = layers[index].self_attn
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

    def _process_image_input(self, image_input):
        if isinstance(image_input, LlavaNextImageEmbeddingInputs):
            raise ValueError(
                "the tokendrop vLLM model prunes images from their pixels; precomputed image_embeds "
                "carry no CLS attention to select by: send the image itself"
            )
        image_sizes = image_input.get("image_sizes")
        if image_sizes is None:
            raise ValueError("the tokendrop vLLM model needs each image's size (the processor gives image_sizes)")
        method = self.tokendrop_method
        kinds = {layer % self.n_vision_layers: kind for layer, kind in method.signals().items()}
        with capture_cls_scores_of_inputs(self._kernels, kinds) as captured:
            patch_embeddings = self._process_image_pixels(image_input)
        tiles = [int(embeddings.shape[0]) for embeddings in patch_embeddings]
        per_layer = {layer: torch.cat(scores).split(tiles) for layer, scores in captured.items()}
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
            images.append(EncodedImage(image_layout, packed, cls, n_layers=self.n_vision_layers, embed=None))
        selected, packed = select_images(method, images)
        kept_vectors = []
        for size, chosen, vectors in zip(image_sizes, selected, packed):
            expected = vllm_plugin.placeholder_count(method, chosen.layout)
            record = chosen.record()
            if record.n_kept + record.n_newlines != expected:
                raise RuntimeError(
                    f"{method.name} kept {record.n_kept + record.n_newlines} tokens of an image the processor gave "
                    f"{expected} placeholders"
                )
            kept_vectors.append(vectors[chosen.keep_mask.to(vectors.device)])
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
        return kept_vectors
