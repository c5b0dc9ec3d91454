"""Baseline: an evenly strided subset of each partition (HiRED's "spatial" baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..layout import ImageBatch, ImageLayout
from ..selection import feature_mask, keep_count, proportional_counts
from .base import Method, register


@register("uniform", "baseline: an evenly strided subset of each partition")
@dataclass
class Uniform(Method):
    def select_batch(self, batch: ImageBatch) -> torch.Tensor:
        layout = batch.layout
        return strided(layout, keep_count(self.budget, layout.n_features)).expand(len(batch), -1)


@lru_cache(maxsize=64)
def strided(layout: ImageLayout, k: int) -> torch.Tensor:
    """(N,) bool on the layout's device: the selection depends on the geometry only, so it is
    made once, on the host layout, and moved once."""
    host = layout.host
    counts = proportional_counts(k, host)
    kept = []
    for p, count in enumerate(counts.tolist()):
        members = torch.nonzero(host.partition == p).flatten()
        # the centres of `count` equal strides over the partition's tokens in raster order
        picks = ((torch.arange(count, dtype=torch.float64) + 0.5) * members.numel() / count).long()
        kept.append(members[picks])
    return feature_mask(torch.cat(kept), host.n_features).to(layout.packed_source.device)
