"""DivPrune (Alvar et al., CVPR 2025): keep a maximally diverse subset, no attention and no
question. Max-min diversity solved greedily (farthest-point selection) on the cosine distance
d_ij = 1 - cos(v_i, v_j) between the image's projected feature tokens (what the LLM sees; the
paper prunes the visual tokens at the LLM's input), over all partitions at once.

Seed (the paper's rule): the token whose nearest other token is farthest, argmax_i min_{j != i}
d_ij. Then each step adds the token whose distance to its nearest kept token is largest.
Ties go to the lower index. A token whose feature is not finite (a NaN pixel spreads through
its tile) is never the seed and ranks after every finite token, in index order: the count
stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layout import ImageBatch
from ..selection import keep_count
from .base import Method, register


@register(
    "divprune",
    "DivPrune (CVPR 2025): the most mutually different tokens (greedy max-min diversity); no attention, no question",
)
@dataclass
class DivPrune(Method):
    def reads(self) -> frozenset[str]:
        return frozenset({"features"})

    @torch.no_grad()  # a discrete choice: no graph, even when called in a training forward
    def select_batch(self, batch: ImageBatch) -> torch.Tensor:
        features = F.normalize(batch.features.float(), dim=-1)
        chosen = farthest_points(1 - features @ features.mT, keep_count(self.budget, features.shape[-2]))
        return torch.zeros(features.shape[:-1], dtype=torch.bool, device=features.device).scatter_(-1, chosen, True)


def farthest_points(distance: torch.Tensor, k: int) -> torch.Tensor:
    """(..., n, n) distances -> (..., k) indices in the order chosen by greedy max-min selection.
    A token whose distance to itself is not finite (a non-finite feature) comes after every
    finite token, in index order."""
    n = distance.shape[-1]
    finite = distance.diagonal(dim1=-2, dim2=-1).isfinite()
    # -1 is below every cosine distance: a token with a non-finite feature is taken last, and
    # still above the -inf that marks the tokens already taken
    distance = torch.where(finite[..., :, None] & finite[..., None, :], distance, -1.0)
    others = torch.where(finite[..., None, :], distance, float("inf"))  # the seed ignores them
    others.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    seed = others.min(-1).values.masked_fill(~finite, float("-inf"))
    first = seed.argmax(-1) if n > 1 else distance.new_zeros(distance.shape[:-2], dtype=torch.long)
    chosen = [first]

    def row(j):  # distance[..., j, :]
        return distance.gather(-2, j[..., None, None].expand(*j.shape, 1, n))[..., 0, :]

    nearest = row(first).scatter(-1, first[..., None], float("-inf"))  # each token's distance to the kept ones
    for _ in range(1, k):
        chosen.append(nearest.argmax(-1))
        nearest = torch.minimum(nearest, row(chosen[-1])).scatter_(-1, chosen[-1][..., None], float("-inf"))
    return torch.stack(chosen, -1)
