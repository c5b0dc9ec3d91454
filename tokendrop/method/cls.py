"""FasterVLM (Zhang et al., arXiv 2412.01818): the image's top tokens by [CLS] attention
(probabilities, heads summed) at the feature layer, ranked over all partitions at once: no
per-partition allocation, so a crop may keep many tokens and another none."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..checks import check_layer
from ..layout import ImageBatch
from ..selection import keep_count, top_k
from .base import Method, option, register


@register("cls", "FasterVLM: the top tokens by CLS attention, ranked over all partitions at once")
@dataclass
class CLS(Method):
    select_layer: int | None = option(
        None, "the vision layer whose CLS attention ranks the tokens; None: the model's feature layer"
    )

    def resolve(self, adapter) -> CLS:
        layer = adapter.feature_layer if self.select_layer is None else self.select_layer
        return replace(self, select_layer=check_layer("select_layer", layer, adapter.n_vision_layers))

    def signals(self) -> dict[int, str]:
        return {self.select_layer: "probs"}

    def select_batch(self, batch: ImageBatch) -> torch.Tensor:
        layout = batch.layout
        return top_k(
            layout.per_feature(batch.cls_scores(self.select_layer)), keep_count(self.budget, layout.n_features)
        )
