"""Baseline: spatial average pooling of each partition's grid to the budget, the
training-free analogue of plain downsampling (LLaVA-HR's "ViT+Pooling+MLP" baseline).

The budget's exact count k is split over partitions in proportion to their sizes (as
`uniform`). A partition of h x w valid tokens (crops lose their padding rows/columns) with
share c is cut into c disjoint cells:
- g = round(sqrt(c * h / w)) horizontal bands (the pooled grid's aspect follows the tile's),
  clamped so that every band holds at least one row and at most w cells: ceil(c / w) <= g <= min(h, c);
- band i covers rows [floor(i h / g), floor((i + 1) h / g)); the c cells are split over the
  bands in proportion to their heights (exact total, at most w per band);
- a band of n cells cuts its columns at floor(j w / n).
When c = (h / a) * (w / a) this is exactly a x a average pooling: 2 x 2 at 25%, 3 x 3 at 1/9
of a 24 x 24 tile; otherwise neighbouring bands differ by one cell, so the total stays exact.
Each cell is one merged token: the plain mean of its tokens, standing at its top-left token
(its smallest feature index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from einops import rearrange

from ..layout import ImageBatch, ImageLayout
from ..selection import Grouping, allocate, keep_count, proportional_counts
from .base import Method, register


@register("pool", "baseline: spatial average pooling of each partition (merged tokens)")
@dataclass
class Pool(Method):
    merges = True

    def select_batch(self, batch: ImageBatch) -> Grouping:
        layout = batch.layout
        owner = pooled_owner(layout, keep_count(self.budget, layout.n_features))
        return Grouping(owner.expand(len(batch), -1))


@lru_cache(maxsize=64)
def pooled_owner(layout: ImageLayout, k: int) -> torch.Tensor:
    """(N,) long on the layout's device: each feature's cell, named by the cell's first token.
    The cells depend on the geometry only, so they are made once, on the host layout."""
    host = layout.host
    counts = proportional_counts(k, host)
    y, _ = host.canvas_yx
    owner = torch.full((host.n_features,), -1, dtype=torch.long)
    for p, count in enumerate(counts.tolist()):
        members = torch.nonzero(host.partition == p).flatten()  # raster order of the valid rectangle
        if count == 0:
            continue
        h = int(y[members].unique().numel())
        for cell in pool_cells(rearrange(members, "(h w) -> h w", h=h), count):
            owner[cell] = cell[0]
    return owner.to(layout.packed_source.device)


def pool_cells(grid: torch.Tensor, count: int) -> list[torch.Tensor]:
    """`count` disjoint near-equal rectangular cells covering `grid` (h, w) of feature indices,
    as the module docstring describes; each cell's indices ascending."""
    h, w = grid.shape
    bands = min(h, count, max(math.ceil(count / w), round(math.sqrt(count * h / w))))
    edges = [i * h // bands for i in range(bands + 1)]
    heights = torch.tensor([edges[i + 1] - edges[i] for i in range(bands)])
    # one cell per band first, so that every band (every row) is covered
    room = [w - 1] * bands
    per_band = 1 + allocate(count - bands, heights.double(), torch.tensor(room), room)
    cells = []
    for i, n in enumerate(per_band.tolist()):
        cuts = [j * w // n for j in range(n + 1)]
        for j in range(n):
            cells.append(grid[edges[i] : edges[i + 1], cuts[j] : cuts[j + 1]].flatten().sort().values)
    return cells
