"""LLaVA-OneVision in vLLM with tokendrop: vLLM's own model and processor, subclassed through
the plugin's AnyRes mixins (`anyres`: per-request options, question, counts, hashes, the
selection), as for LLaVA-NeXT.

What is OneVision's:
- scores: SigLIP has no CLS token; the CLS-free signals of the HF adapter
  (`LlavaOnevisionAdapter`), from vLLM's tower: "probs", the attention each token receives,
  from the query and keys its attention kernel is called with (vLLM projects q, k and v in one
  GEMM), and "logits", -cos to the tile's mean token of the layer's output
  (`scoring.capture_siglip_scores` with `kernels`);
- layout: vLLM's own packing (`_merge_image_patch_embeddings`, with the anyres_max_9
  resampling it applies) of the canvas patch coordinates, booked to the nearest patch as the
  HF adapter books HF's (`canvas_layout`);
- videos pass through as stock: their placeholder counts, hashes and encoding are vLLM's, and
  a request may mix images (pruned) and videos (not).

vLLM 0.32 encodes every image of a multi-image prompt with its crops (it passes the prompt's
images to the HF processor as one flat list, so `batch_num_images` is 1 each), which is also
what the HF model does with such a list; the plugin prunes what vLLM encodes. (HF's base view
only applies to images passed as one nested list per prompt, which vLLM does not do.)
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)

from tokendrop.adapters.llava_onevision import UNCAPPED, LlavaOnevisionAdapter, canvas_layout
from tokendrop.layout import NEWLINE, ImageLayout
from tokendrop.scoring import capture_siglip_scores

from ...checks import UsageError
from . import anyres
from .anyres import REQUEST_FIELD


def vllm_canvas_layout(side: int, grid: tuple[int, int], image_size: torch.Tensor, stand_in) -> ImageLayout:
    """vLLM's packing of the canvas patch coordinates (`canvas_layout`)."""

    def pack(tiles: torch.Tensor, uncapped: bool) -> torch.Tensor:
        newline = torch.full((tiles.shape[-1],), float(NEWLINE), dtype=torch.float64)
        cap = {"vision_aspect_ratio": UNCAPPED} if uncapped else {}  # else vLLM's own, as it calls it
        return LlavaOnevisionForConditionalGeneration._merge_image_patch_embeddings(
            stand_in(newline), image_size, tiles, image_newline=newline, strategy="spatial_unpad", **cap
        )

    return canvas_layout(side, grid, pack)


FAMILY = anyres.Family(LlavaOnevisionAdapter, "siglip", vllm_canvas_layout)
layout = FAMILY.layout  # (hf_config, (height, width)) -> the layout of an image of that size


@anyres.served(
    FAMILY, LlavaOnevisionProcessingInfo, LlavaOnevisionMultiModalProcessor, LlavaOnevisionDummyInputsBuilder
)
class TokendropLlavaOnevisionForConditionalGeneration(anyres.TokendropModel, LlavaOnevisionForConditionalGeneration):
    def _build_deeper_tower(self, vllm_config, prefix: str, n_layers: int) -> None:
        """Refused: vLLM's OneVision reads the features as the last output of the tower it
        builds (to the feature layer), for images and videos alike, so a tower built deeper
        for scores would change what the LLM gets. OneVision checkpoints take the last layer
        (vision_feature_layer=-1), whose tower has every layer a method can score."""
        raise UsageError(
            f"the server's method scores vision layer {n_layers - 1}, deeper than this model's feature layer "
            f"(vision_feature_layer={self.config.vision_feature_layer}), to which vLLM builds LLaVA-OneVision's "
            "tower and from whose output it takes images' and videos' features: choose scored layers at or above "
            "it (globalcom2's score_layer, hired's select_layer and alloc_layer, ...)"
        )

    def _score_hooks(self, kinds: dict[int, str]):
        return capture_siglip_scores(self._layers, kinds, self._kernels)

    def _pack(self, image_size: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self._merge_image_patch_embeddings(
            image_size, embeddings, image_newline=self.image_newline, strategy="spatial_unpad"
        )

    def embed_multimodal(self, **kwargs):
        """As stock, in the order of the inputs' modalities; images pruned, videos as stock."""
        requests = kwargs.pop(REQUEST_FIELD, None)
        embeddings = ()
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image":
                embeddings += tuple(self._pruned_images(inputs, requests))
            else:
                embeddings += tuple(self._process_video_pixels(inputs))
        return embeddings or []
