"""GlobalCom2 (Liu et al., AAAI-26): the thumbnail directs per-crop retention.

Scores are the last CLIP layer's CLS-query logits before softmax (head mean): softmax
probabilities would make the crop shares below near-uniform. With R the kept fraction:
- the base keeps its top floor(R * 576) tokens by its own scores;
- crop j's share: s_j = base scores summed over its region, sigma = softmax((s - max s) / tau),
  r_j = min(1, R * (1 + sigma_j - 1/n)), the rest of the budget split over crops in
  proportion to r_j * N_j (N_j its unpadded tokens), exactly;
- inside crop j: its own logits and the base score map bilinearly resized to the unpadded
  canvas, each L2-normalised over the crop's tokens, added; top tokens by that sum.
An image without crops (Qwen-VL's native resolution, an image of a multi-image OneVision
prompt) is its one view: it keeps that view's top tokens by its own score (CLS-free towers:
-cos to the mean token, the paper's SigLIP score), the whole budget.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..checks import check_layer, check_real
from ..layout import ImageBatch, ImageLayout
from ..selection import allocate, floor_fraction, keep_count, region_sums, top_k_per_partition
from .base import Method, option, register


@register(
    "globalcom2",
    "GlobalCom2 (AAAI-26): the thumbnail's scores set each crop's share; the top tokens by CLS logits within each",
)
@dataclass
class GlobalCom2(Method):
    tau: float = option(10.0, "the temperature of the softmax over the crops' scores that sets their shares")
    score_layer: int = option(-1, "the vision layer whose CLS-query logits score every token")

    def __post_init__(self):
        super().__post_init__()
        self.tau = check_real("tau", self.tau, 1e-6, float("inf"))

    def resolve(self, adapter) -> GlobalCom2:
        return replace(self, score_layer=check_layer("score_layer", self.score_layer, adapter.n_vision_layers))

    def signals(self) -> dict[int, str]:
        return {self.score_layer: "logits"}

    def select_batch(self, batch: ImageBatch) -> torch.Tensor:
        return top_k_per_partition(self.scores(batch), batch.layout.partition_members, self.counts(batch))

    def scores(self, batch: ImageBatch) -> torch.Tensor:
        """(B, N) the importance each partition's tokens are ranked by (see `token_scores`)."""
        return self.token_scores(batch.layout, batch.cls_scores(self.score_layer))

    def counts(self, batch: ImageBatch) -> torch.Tensor:
        """(B, P) tokens kept per partition, summing exactly to the budget's count."""
        layout = batch.layout
        logits = batch.cls_scores(self.score_layer)
        n = layout.n_features
        k = keep_count(self.budget, n)
        ratio = k / n
        if layout.n_partitions == 1:  # no crops (an image of a multi-image OneVision prompt)
            return torch.full((len(batch), 1), k, device=logits.device)
        n_base = min(floor_fraction(ratio, layout.tile), layout.sizes[0])
        sums = region_sums(layout, logits[:, 0])
        sigma = torch.softmax((sums - sums.max(-1, keepdim=True).values) / self.tau, dim=-1)
        crop_ratio = (ratio * (1 + sigma - 1 / sigma.shape[-1])).clamp(max=1.0)
        crops = allocate(k - n_base, crop_ratio * layout.capacity[1:], layout.capacity[1:], layout.sizes[1:])
        return torch.cat([k - crops.sum(-1, keepdim=True), crops], -1)

    @staticmethod
    def token_scores(layout: ImageLayout, logits: torch.Tensor) -> torch.Tensor:
        """(B, P, side**2) logits -> (B, N): base tokens their own logits; crop tokens local +
        global, each L2-normalised over the crop's unpadded tokens."""
        local = layout.per_feature(logits)
        if len(layout.sizes) == 1 or sum(layout.sizes[1:]) == 0:  # a very thin image: only the base is left
            return local
        in_crop = layout.partition > 0
        y0, y1, x0, x1 = layout.valid_box
        base_map = logits[:, :1].unflatten(-1, (layout.side, layout.side))
        global_map = F.interpolate(base_map, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[:, 0]
        # every feature reads the map at its canvas place, clamped into it: the base tokens'
        # reads are never used (they keep their own logits)
        y, x = layout.canvas_yx
        global_ = global_map[:, (y - y0).clamp(0, y1 - y0 - 1), (x - x0).clamp(0, x1 - x0 - 1)]
        # local and global normalised together: one pass of each op, the same sums per row
        both = torch.stack([local, global_])
        squares = torch.zeros(*both.shape[:-1], layout.n_partitions, dtype=torch.float64, device=both.device)
        norms = squares.index_add_(-1, layout.partition, both.double() ** 2).sqrt().float().clamp(min=1e-12)
        normalised = both / norms[..., layout.partition]
        return torch.where(in_crop, normalised[0] + normalised[1], local)
