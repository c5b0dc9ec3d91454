"""Baseline "base": the base view only, every crop dropped. It asks whether the crops carry
anything at all. An image without crops (Qwen-VL) is its own base view: it ranks as `cls`.

Budgets: k = the budget's count of the image's N tokens. k <= the base view's size keeps the
base's top k by CLS attention at the feature layer (exactly k); a larger k keeps the base
view whole and nothing else (fewer than k). A full budget (k = N) keeps every token, so that,
as for every method, budget 1.0 leaves the model unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import ImageBatch, ImageLayout
from ..selection import keep_count, top_k_per_tile
from .base import register
from .cls import CLS


@register("base", "baseline: the base view only, every crop dropped")
@dataclass
class BaseView(CLS):  # `cls` restricted to the base view: the same option and signal, another candidate set
    def kept_count(self, layout: ImageLayout) -> int:
        k = keep_count(self.budget, layout.n_features)
        return k if k >= layout.n_features else min(k, layout.sizes[0])

    def select_batch(self, batch: ImageBatch) -> torch.Tensor:
        layout = batch.layout
        k = keep_count(self.budget, layout.n_features)
        scores = batch.cls_scores(self.select_layer)
        if k >= layout.n_features:
            return torch.ones(len(batch), layout.n_features, dtype=torch.bool, device=scores.device)
        counts = torch.zeros(len(batch), layout.n_partitions, dtype=torch.long, device=scores.device)
        counts[:, 0] = min(k, layout.sizes[0])
        return top_k_per_tile(layout, scores, counts)
