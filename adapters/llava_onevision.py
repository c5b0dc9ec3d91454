"""LLaVA-OneVision (`transformers.LlavaOnevisionForConditionalGeneration`).

What it shares with LLaVA-NeXT (`LlavaNextAdapter`): AnyRes tiles (a base view, then crops
stitched into an unpadded canvas with one newline per row), the placeholder bookkeeping,
compaction of the prompt and feeding the kept vectors to the LLM. What differs:

- The tower is SigLIP: no CLS token, every patch is a feature (`vision_feature_select_strategy=
  "full"`, usually `vision_feature_layer=-1`). The two signal kinds have CLS-free equivalents:
  - "probs" (HiRED, `cls`, VisionZip's dominant tokens, ...): the attention each token
    *receives*, averaged over all queries and heads, from the layer's q/k projections: the
    dominant-token score VisionZip uses for towers without a CLS token such as SigLIP (Yang et
    al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025,
    arXiv 2412.04467). It costs an L x L map per head, built one tile at a time.
  - "logits" (GlobalCom2): the negative cosine similarity of each token to the tile's mean token,
    GlobalCom2's score for towers without CLS (Liu et al., AAAI-26, appendix on LLaVA-OneVision;
    its code for OneVision is unreleased, xuyang-liu16/GlobalCom2 issue #1), taken on
    the *output* of the scored layer: with the default `score_layer=-1` that is exactly the
    hidden state the projector feeds the LLM, so the score judges the tokens the LLM would see.
- `anyres_max_9` packing: where the unpadded crop canvas is larger than 9 tiles (by more than
  10% in side), the model bilinearly resizes it (align_corners=False) to about 9 tiles before
  adding newlines, so a packed canvas token is a blend of up to four patches, not one patch.
- A prompt with several images (`batch_num_images` from the processor > 1) encodes each image
  as its base view only, plus one newline: no crops.

Geometry, exact or resampled, comes from the model's own `pack_image_features`: packing the
canvas (y, x) patch coordinates through it resamples that linear field like the features, so
every packed token carries its sample point. A token is booked (partition, local index,
region) to the patch *nearest* its sample point (ties to the upper/left patch); sample points
are more than one patch apart, so no two tokens share a patch. Without resampling the sample
points are the patches themselves and the layout is exact. "Feature index i" stays the i-th
non-newline packed position. The unpadded canvas box, which HiRED's and GlobalCom2's crop
regions use, comes from the same packing without the 9-tile cap.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from tokendrop.layout import NEWLINE, ImageLayout
from tokendrop.scoring import SIGNAL_KINDS, capture_siglip_scores

from ..checks import UsageError
from .llava_next import LlavaNextAdapter

UNCAPPED = "anyres_max_1000000"  # a cap no canvas reaches: the packing without resampling
TIE = 1e-6  # sample points exactly between two patches go to the upper/left one


class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_class = "LlavaOnevisionForConditionalGeneration"
    call_options = (*LlavaNextAdapter.call_options, "batch_num_images")
    signal_kinds = SIGNAL_KINDS  # both, as the CLS-free equivalents of `capture_siglip_scores`
    model_type = "llava_onevision"
    layer_type = SiglipEncoderLayer
    tower = "in a SigLIP vision tower"

    @staticmethod
    def check_config(config) -> None:
        if config.vision_feature_select_strategy != "full" or not isinstance(config.vision_feature_layer, int):
            raise UsageError(
                "tokendrop supports LLaVA-OneVision with vision_feature_select_strategy='full' (SigLIP has no CLS "
                f"token to drop) and a single vision_feature_layer; this model has "
                f"{config.vision_feature_select_strategy!r} and {config.vision_feature_layer!r}"
            )

    # --- geometry ---------------------------------------------------------------------

    def layout(self, image_size, with_crops: bool = True) -> ImageLayout:
        """The layout of an image of (height, width); `with_crops=False` for an image of a
        multi-image prompt, which the model encodes as its base view only."""
        key = (*(int(v) for v in image_size), bool(with_crops))
        if key not in self._layouts:
            self._layouts[key] = self._crops_layout(key[:2]) if with_crops else self._base_only_layout()
        return self._layouts[key]

    def layouts(self, image_sizes: torch.Tensor, batch_num_images=None, **vision_kwargs) -> list[ImageLayout]:
        """Every image's layout; as the model, an image gets crops unless its prompt holds several
        images by `batch_num_images` (None: every image gets crops)."""
        sizes = image_sizes.tolist()
        if batch_num_images is None:
            return [self.layout(size) for size in sizes]
        counts = [int(n) for n in batch_num_images]
        if sum(counts) != len(sizes) or min(counts, default=1) < 1:
            raise UsageError(
                f"batch_num_images {counts} must count each prompt's images (each >= 1), {len(sizes)} in all: pass "
                "the batch_num_images that the processor returns with these images"
            )
        with_crops = [n == 1 for n in counts for _ in range(n)]
        return [self.layout(size, crops) for size, crops in zip(sizes, with_crops)]

    def _pack(self, channels: torch.Tensor, image_size, vision_aspect_ratio: str) -> torch.Tensor:
        """`channels` (P, side**2, C) float64 tiles -> (L, C) through the model's packing; newlines
        come out as NEWLINE in every channel."""
        newline = torch.full((channels.shape[-1],), float(NEWLINE), dtype=torch.float64)
        packed, _ = self.vlm.pack_image_features(
            [channels], torch.tensor([image_size]), image_newline=newline, vision_aspect_ratio=vision_aspect_ratio
        )
        return packed[0]

    def _crops_layout(self, image_size) -> ImageLayout:
        config = self.model.config
        grid = tuple(
            get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints, config.vision_config.image_size)
        )

        def pack(channels: torch.Tensor, uncapped: bool) -> torch.Tensor:
            return self._pack(channels, image_size, UNCAPPED if uncapped else config.vision_aspect_ratio)

        return canvas_layout(self.side, grid, pack)

    def _base_only_layout(self) -> ImageLayout:
        tile = torch.arange(self.side * self.side, dtype=torch.float64).view(1, -1, 1)
        packed = self._pack(tile, (self.side, self.side), self.model.config.vision_aspect_ratio)
        return ImageLayout(self.side, (0, 0), packed[:, 0].round().long())

    # --- vision pass ------------------------------------------------------------------

    output_signals = frozenset({"logits"})  # -cos to the mean token, of the layer's output
    lead_tokens = 0  # SigLIP has no CLS token: a tile's tokens are its patches

    def capture_scores(self, signals: dict[int, str]):
        """The CLS-free equivalents of the signals, from the SigLIP layers (module docstring)."""
        layers = {layer % self.n_vision_layers: self.vision_layers[layer] for layer in signals}
        kinds = {layer % self.n_vision_layers: kind for layer, kind in signals.items()}
        return capture_siglip_scores(layers, kinds)


def canvas_layout(side: int, grid: tuple[int, int], pack: Callable[[torch.Tensor, bool], torch.Tensor]) -> ImageLayout:
    """The layout of an image with crops on a `grid` (n_h, n_w) of tiles of side x side patches,
    from its packing (see the module docstring): `pack(tiles, uncapped)` packs (1 + n_h * n_w,
    side**2, C) float64 tiles as the model packs features, newlines NEWLINE in every channel;
    with `uncapped`, without the anyres_max cap (the unpadded canvas, never resampled)."""
    s, (n_h, n_w) = side, grid
    # (y, x) canvas patch coordinates of every crop patch; the base tile's are unused
    a, b = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    tiles = [torch.stack([a, b], -1).flatten(0, 1)]
    tiles += [torch.stack([a + i * s, b + j * s], -1).flatten(0, 1) for i in range(n_h) for j in range(n_w)]
    coords = torch.stack(tiles).double()
    canvas = pack(coords, False)[s * s :]
    is_newline = canvas[:, 0] == NEWLINE
    y, x = (torch.floor(canvas[:, c] + 0.5 - TIE).long() for c in (0, 1))
    source = (1 + (y // s) * n_w + x // s) * s * s + (y % s) * s + x % s
    packed_source = torch.cat([torch.arange(s * s), torch.where(is_newline, NEWLINE, source)])
    uncapped = pack(coords, True)[s * s :]
    resampled = uncapped.shape[0] != canvas.shape[0]
    box = None
    if resampled:
        y, x = uncapped[uncapped[:, 0] != NEWLINE].long().unbind(-1)
        box = (int(y.min()), int(y.max()) + 1, int(x.min()), int(x.max()) + 1)
    return ImageLayout(s, tuple(grid), packed_source, unpadded_box=box)
