"""Baseline: a uniformly random subset of the image's feature tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import EncodedImage
from ..selection import keep_count
from .base import Method, check_int, register


@register("random")
@dataclass
class Random(Method):
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.seed = check_int("seed", self.seed)
        if not -(2**63) <= self.seed < 2**64:  # what torch.Generator.manual_seed accepts
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")

    def select(self, image: EncodedImage) -> torch.Tensor:
        # A fresh generator per image: the subset depends on the seed and the image's token
        # count only, never on the batch the image arrives in.
        n = image.layout.n_features
        generator = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(n, generator=generator)[: keep_count(self.budget, n)]
        return torch.sort(chosen).values
