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

import torch
from einops import rearrange

from ..layout import EncodedImage
from ..selection import allocate, keep_count, proportional_counts
from .base import Merged, Method, register


@register("pool")
@dataclass
class Pool(Method):
    def select(self, image: EncodedImage) -> Merged:
        layout = image.layout
        counts = proportional_counts(keep_count(self.budget, layout.n_features), layout)
        y, _ = layout.canvas_yx
        groups = []
        for p, count in enumerate(counts.tolist()):
            members = torch.nonzero(layout.partition == p).flatten()  # raster order of the valid rectangle
            if count == 0:
                continue
            h = int(y[members].unique().numel())
            grid = rearrange(members, "(h w) -> h w", h=h)
            groups += pool_cells(grid, count)
        groups.sort(key=lambda g: int(g[0]))
        return Merged(indices=torch.stack([g[0] for g in groups]), groups=groups)


def pool_cells(grid: torch.Tensor, count: int) -> list[torch.Tensor]:
    """`count` disjoint near-equal rectangular cells covering `grid` (h, w) of feature indices,
    as the module docstring describes; each cell's indices ascending."""
    h, w = grid.shape
    bands = min(h, count, max(math.ceil(count / w), round(math.sqrt(count * h / w))))
    edges = [i * h // bands for i in range(bands + 1)]
    heights = torch.tensor([edges[i + 1] - edges[i] for i in range(bands)])
    # one cell per band first, so that every band (every row) is covered
    per_band = 1 + allocate(count - bands, heights.double(), torch.full((bands,), w - 1))
    cells = []
    for i, n in enumerate(per_band.tolist()):
        cuts = [j * w // n for j in range(n + 1)]
        for j in range(n):
            cells.append(grid[edges[i] : edges[i + 1], cuts[j] : cuts[j + 1]].flatten().sort().values)
    return cells
