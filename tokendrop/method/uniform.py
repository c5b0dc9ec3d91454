"""Baseline: an evenly strided subset of each partition (HiRED's "spatial" baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import EncodedImage
from ..selection import keep_count, proportional_counts
from .base import Method, register


@register("uniform")
@dataclass
class Uniform(Method):
    def select(self, image: EncodedImage) -> torch.Tensor:
        layout = image.layout
        counts = proportional_counts(keep_count(self.budget, layout.n_features), layout)
        kept = []
        for p, count in enumerate(counts.tolist()):
            members = torch.nonzero(layout.partition == p).flatten()
            # the centres of `count` equal strides over the partition's tokens in raster order
            picks = ((torch.arange(count, dtype=torch.float64) + 0.5) * members.numel() / count).long()
            kept.append(members[picks])
        return torch.sort(torch.cat(kept)).values
