"""HiRED (Arif et al., AAAI-25): split the budget between the base view and the crops, give
each crop a share proportional to the base's early-layer CLS attention over the crop's region
(paper Eq. 1), then keep each partition's top tokens by CLS attention at the feature layer.
An image without crops (Qwen-VL's native resolution, an image of a multi-image OneVision
prompt) has no crop shares to allocate: its one view keeps the whole budget, its top tokens
by the selection signal (CLS-free towers: the attention each token receives).

`allocation="count"` reproduces the reference code's crop shares instead: a crop's weight is how
many of the base's top floor(tile * (1 - alpha)) patches by the allocation signal fall in its
region (576 * (1 - alpha) for CLIP-L/336). Regions stay 2-D and padding-aware, so a base patch
that straddles two crops counts for each by its area share (the code cut the flat map into row
strips); budgets stay exact."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..checks import check_choice, check_layer, check_real
from ..layout import ImageBatch
from ..selection import allocate, floor_fraction, keep_count, region_sums, top_k_per_tile
from .base import Method, option, register

ALLOCATIONS = ("mass", "count")


@register(
    "hired",
    "HiRED (AAAI-25): the budget split between base view and crops by the base's CLS attention; the top "
    "tokens by CLS attention within each",
)
@dataclass
class HiRED(Method):
    alpha: float = option(0.5, "the share of the budget for the base view, in [0, 1]")
    alloc_layer: int = option(0, "the vision layer whose CLS attention on the base view decides the crop shares")
    select_layer: int | None = option(
        None, "the vision layer whose CLS attention ranks each partition's tokens; None: the model's feature layer"
    )
    allocation: str = option(
        "mass",
        "crop weights: 'mass', the base's CLS attention summed over each crop's region (paper Eq. 1); 'count', "
        "how many of the base's top patches fall in it (the reference code)",
    )

    def __post_init__(self):
        super().__post_init__()
        self.alpha = check_real("alpha", self.alpha, 0.0, 1.0)
        check_choice("allocation", self.allocation, ALLOCATIONS)

    def resolve(self, adapter) -> HiRED:
        select = adapter.feature_layer if self.select_layer is None else self.select_layer
        return replace(
            self,
            alloc_layer=check_layer("alloc_layer", self.alloc_layer, adapter.n_vision_layers),
            select_layer=check_layer("select_layer", select, adapter.n_vision_layers),
        )

    def signals(self) -> dict[int, str]:
        return {self.alloc_layer: "probs", self.select_layer: "probs"}

    def select_batch(self, batch: ImageBatch) -> torch.Tensor:
        return top_k_per_tile(batch.layout, batch.cls_scores(self.select_layer), self.counts(batch))

    def scores(self, batch: ImageBatch) -> torch.Tensor:
        """(B, N) the importance each partition's tokens are ranked by: CLS attention at select_layer."""
        return batch.layout.per_feature(batch.cls_scores(self.select_layer))

    def counts(self, batch: ImageBatch) -> torch.Tensor:
        """(B, P) tokens kept per partition, summing exactly to the budget's count."""
        layout = batch.layout
        k = keep_count(self.budget, layout.n_features)
        n_base = min(floor_fraction(self.alpha, k), layout.sizes[0])
        signal = batch.cls_scores(self.alloc_layer)[:, 0]
        if self.allocation == "count":
            top = torch.sort(-signal, dim=-1, stable=True).indices[:, : floor_fraction(1 - self.alpha, layout.tile)]
            signal = torch.zeros_like(signal).scatter_(-1, top, 1.0)
        crops = allocate(k - n_base, region_sums(layout, signal), layout.capacity[1:], layout.sizes[1:])
        # whatever the crops cannot hold returns to the base, so exactly k survive
        return torch.cat([k - crops.sum(-1, keepdim=True), crops], -1)
