"""LLaVA-NeXT in vLLM with tokendrop: vLLM's own model and processor, subclassed at two points.

- `TokendropProcessingInfo.get_num_image_tokens`: the placeholder count vLLM writes into the
  prompt for an image is the pruned count (`vllm_plugin.placeholder_count`), not the full one.
- `TokendropLlavaNextForConditionalGeneration._process_image_input`: vLLM's vision pass runs
  as stock (tower, projector, packing) while forward pre-hooks on the chosen CLIP layers'
  attention score the CLS query against all keys (`tokendrop.scoring.cls_scores`, what the HF
  adapter captures); then, per image, the tokendrop method selects (`Method.select`),
  `packed_keep_mask` adds the newlines the policy keeps, and only those vectors are returned.
  The count is checked against the processor's. vLLM builds the tower only up to the feature
  layer; where a method scores deeper (globalcom2's last layer), the tower is built that deep
  and still returns the feature layer's states, through vLLM's own `select_layers`.

The layout of an image comes from vLLM's own packing (`_merge_image_patch_embeddings`)
applied to an index tensor, as the HF adapter applies HF's, so positions agree with the model
by construction. Everything else (weights, LLM, cache, scheduling) is vLLM's, untouched.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from types import SimpleNamespace

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokendrop.layout import NEWLINE, EncodedImage, ImageLayout
from tokendrop.method.base import Merged
from tokendrop.scoring import cls_scores
from tokendrop.selection import merge_groups, packed_keep_mask

from . import vllm_plugin


def resolved_method(hf_config):
    """The server's method, checked against the model and resolved as `tokendrop.patch` does
    (layer defaults from the vision config)."""
    if hf_config.vision_feature_select_strategy != "default" or not isinstance(hf_config.vision_feature_layer, int):
        raise ValueError(
            "tokendrop supports LLaVA-NeXT with vision_feature_select_strategy='default' and a single "
            f"vision_feature_layer; this model has {hf_config.vision_feature_select_strategy!r} and "
            f"{hf_config.vision_feature_layer!r}"
        )
    if "clip" not in hf_config.vision_config.model_type:
        raise ValueError(
            f"tokendrop scores tokens by CLS attention of a CLIP vision tower; this model's tower is "
            f"{hf_config.vision_config.model_type!r}"
        )
    hidden = hf_config.vision_feature_layer
    geometry = SimpleNamespace(  # what Method.resolve reads of the HF adapter, from the same config
        n_vision_layers=hf_config.vision_config.num_hidden_layers,
        feature_layer=hidden if hidden < 0 else hidden - 1,
    )
    method = vllm_plugin.build_method(vllm_plugin.server_options(hf_config)).resolve(geometry)
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
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    grid = get_anyres_image_grid_shape(list(image_size), [list(p) for p in pinpoints], tile_px)
    n_partitions = 1 + grid[0] * grid[1]
    tile = side * side
    source = torch.arange(n_partitions * tile, dtype=torch.float64).view(n_partitions, tile, 1)
    stand_in = SimpleNamespace(  # the attributes vLLM's packing reads of the model
        config=SimpleNamespace(
            vision_config=SimpleNamespace(image_size=tile_px, patch_size=tile_px // side),
            image_grid_pinpoints=[list(p) for p in pinpoints],
        ),
        image_newline=torch.tensor([float(NEWLINE)], dtype=torch.float64),
    )
    packed = LlavaNextForConditionalGeneration._merge_image_patch_embeddings(
        stand_in, torch.tensor(image_size), source, strategy="spatial_unpad"
    )
    return ImageLayout(side, tuple(grid), packed[:, 0].round().long())


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
        self._attention = {}
        for index in wanted:
            attention = layers[index].self_attn
            if attention.num_heads_per_partition != attention.num_heads:
                raise ValueError(
                    "the tokendrop vLLM plugin needs the vision tower unsharded (tensor_parallel_size=1, "
                    "or mm_encoder_tp_mode='data'): CLS scores sum over all heads"
                )
            self._attention[index] = attention

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
        method = self.tokendrop_method
        kinds = {layer % self.n_vision_layers: kind for layer, kind in method.signals().items()}
        with self._capture(kinds) as captured:
            patch_embeddings = self._process_image_pixels(image_input)
        image_sizes = image_input.get("image_sizes")
        if image_sizes is None:
            raise ValueError("the tokendrop vLLM model needs each image's size (the processor gives image_sizes)")
        tiles = [int(embeddings.shape[0]) for embeddings in patch_embeddings]
        per_layer = {layer: torch.cat(scores).cpu().split(tiles) for layer, scores in captured.items()}
        kept_vectors = []
        for i, embeddings in enumerate(patch_embeddings):
            size = image_sizes[i]
            packed = self._merge_image_patch_embeddings(size, embeddings, strategy="spatial_unpad")
            image_layout = layout(self.config, size.tolist())
            if packed.shape[0] != image_layout.packed_source.numel():
                raise RuntimeError(
                    f"vLLM packed {packed.shape[0]} tokens, tokendrop's layout has {image_layout.packed_source.numel()}"
                )
            p = image_layout.n_partitions
            image = EncodedImage(
                layout=image_layout,
                packed=packed,
                cls={layer: scores[i][:p].reshape(p, image_layout.tile) for layer, scores in per_layer.items()},
                n_layers=self.n_vision_layers,
                embed=_no_prompt,
            )
            kept = merged = method.select(image)
            if isinstance(merged, Merged):  # each kept position holds its group's mean
                kept = merged.indices
                packed = merge_groups(packed, image_layout, kept, merged.groups, merged.weights)
            mask = packed_keep_mask(image_layout, kept, method.newlines)
            expected = vllm_plugin.placeholder_count(method, image_layout)
            if int(mask.sum()) != expected:
                raise RuntimeError(
                    f"{method.name} kept {int(mask.sum())} tokens of an image the processor gave "
                    f"{expected} placeholders"
                )
            kept_vectors.append(packed[mask.to(packed.device)])
            vllm_plugin.record(
                dict(
                    image_size=[int(v) for v in size.tolist()],
                    method=method.name,
                    budget=method.budget,
                    n_before=image_layout.n_features,
                    n_kept=int(kept.numel()),
                    n_newlines=int(mask[image_layout.newline_positions].sum()),
                    indices=kept.tolist(),
                )
            )
        return kept_vectors

    @contextmanager
    def _capture(self, kinds: dict[int, str]):
        """While open, each call of the chosen layers' attention appends its (tiles, L - 1) CLS
        scores to `captured[layer]`, from the query and keys vLLM's attention receives."""
        captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in kinds}
        handles = []
        try:
            for layer, kind in kinds.items():
                attention = self._attention[layer]

                def hook(module, args, attention=attention, kind=kind, layer=layer):
                    query, key = args[0], args[1]
                    captured[layer].append(
                        cls_scores(query[:, 0], key, attention.num_heads_per_partition, attention.scale, kind)
                    )

                handles.append(attention.attn.register_forward_pre_hook(hook))
            yield captured
        finally:
            for handle in handles:
                handle.remove()


def _no_prompt(*_):
    raise RuntimeError("the tokendrop vLLM plugin serves question-agnostic methods only")
