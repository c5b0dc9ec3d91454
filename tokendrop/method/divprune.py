"""DivPrune (Alvar et al., CVPR 2025): keep a maximally diverse subset, no attention and no
question. Max-min diversity solved greedily (farthest-point selection) on the cosine distance
d_ij = 1 - cos(v_i, v_j) between the image's projected feature tokens (what the LLM sees; the
paper prunes the visual tokens at the LLM's input), over all partitions at once.

Seed (the paper's rule): the token whose nearest other token is farthest, argmax_i min_{j != i}
d_ij. Then each step adds the token whose distance to its nearest kept token is largest.
Ties go to the lower index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layout import EncodedImage
from ..selection import keep_count
from .base import Method, register


@register("divprune")
@dataclass
class DivPrune(Method):
    @torch.no_grad()  # a discrete choice: no graph, even when called in a training forward
    def select(self, image: EncodedImage) -> torch.Tensor:
        features = F.normalize(image.features.float(), dim=-1)
        chosen = farthest_points(1 - features @ features.T, keep_count(self.budget, features.shape[0]))
        return torch.sort(chosen).values.cpu()


def farthest_points(distance: torch.Tensor, k: int) -> torch.Tensor:
    """(n, n) distances -> (k,) indices in the order chosen by greedy max-min selection."""
    n = distance.shape[0]
    chosen = torch.empty(k, dtype=torch.long, device=distance.device)
    others = distance.clone()
    others.fill_diagonal_(float("inf"))
    chosen[0] = others.min(1).values.argmax() if n > 1 else 0
    nearest = distance[chosen[0]].clone()  # each token's distance to its nearest kept token
    nearest[chosen[0]] = float("-inf")
    for i in range(1, k):
        chosen[i] = nearest.argmax()
        nearest = torch.minimum(nearest, distance[chosen[i]])
        nearest[chosen[i]] = float("-inf")
    return chosen
