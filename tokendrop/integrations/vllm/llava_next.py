"""LLaVA-NeXT in vLLM with tokendrop: vLLM's own model and processor, subclassed through the
plugin's AnyRes mixins (`anyres`: per-request options, question, counts, hashes, the selection).

What is LLaVA-NeXT's: pre-hooks on the CLIP layers' attention kernels score the CLS query
against all keys (`scoring.capture_cls_scores_of_inputs`, the scores the HF adapter captures);
what it checks of the model and what methods read of it come from the HF adapter
(`LlavaNextAdapter.facts`); the layout of an image from vLLM's own packing
(`_merge_image_patch_embeddings`) applied to an index tensor (`packed_layout`, as the HF
adapter applies HF's). vLLM builds the tower only up to the feature layer; where the server's
method scores deeper (globalcom2's last layer), the tower is built that deep and still returns
the feature layer's states, through vLLM's own `select_layers`.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)

from tokendrop.adapters.llava_next import LlavaNextAdapter, packed_layout
from tokendrop.layout import ImageLayout
from tokendrop.scoring import capture_cls_scores_of_inputs

from ...checks import UsageError
from . import anyres
from .anyres import REQUEST_FIELD


def vllm_packed_layout(side: int, grid: tuple[int, int], image_size: torch.Tensor, stand_in) -> ImageLayout:
    """vLLM's packing of an index tensor (`packed_layout`)."""

    def pack(tiles: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        return LlavaNextForConditionalGeneration._merge_image_patch_embeddings(
            stand_in(newline), image_size, tiles, strategy="spatial_unpad"
        )

    return packed_layout(side, grid, pack)


FAMILY = anyres.Family(LlavaNextAdapter, "clip", vllm_packed_layout)
layout = FAMILY.layout  # (hf_config, (height, width)) -> the layout of an image of that size


@anyres.served(FAMILY, LlavaNextProcessingInfo, LlavaNextMultiModalProcessor, LlavaDummyInputsBuilder)
class TokendropLlavaNextForConditionalGeneration(anyres.TokendropModel, LlavaNextForConditionalGeneration):
    def _build_deeper_tower(self, vllm_config, prefix: str, n_layers: int) -> None:
        """vLLM builds the CLIP tower only up to the feature layer; a method that scores at a
        deeper layer (globalcom2's default, the last) gets a tower of `n_layers` that returns
        the feature layer's hidden states through vLLM's own `select_layers` (as HF does: no
        post-norm), so the LLM's input is unchanged and the deeper layers only feed the scores."""
        from vllm.model_executor.models.clip import CLIPVisionModel
        from vllm.model_executor.models.utils import maybe_prefix

        if type(self.vision_tower) is not CLIPVisionModel:
            raise UsageError(f"tokendrop scores with a CLIP tower; this model's is {type(self.vision_tower).__name__}")
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = CLIPVisionModel(
                self.config.vision_config,
                quant_config=vllm_config.quant_config,
                num_hidden_layers_override=n_layers,
                require_post_norm=False,
                prefix=maybe_prefix(prefix, "vision_tower"),
            )
        self.select_layers = [self.config.vision_feature_layer]

    def _score_hooks(self, kinds: dict[int, str]):
        return capture_cls_scores_of_inputs(self._kernels, kinds)

    def _pack(self, image_size: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self._merge_image_patch_embeddings(image_size, embeddings, strategy="spatial_unpad")

    def embed_multimodal(self, **kwargs):
        requests = kwargs.pop(REQUEST_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        return self._pruned_images(image_input, requests)
