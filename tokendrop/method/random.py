"""Baseline: a uniformly random subset of the image's feature tokens."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..checks import UsageError, check_int
from ..layout import ImageBatch
from ..selection import feature_mask, keep_count
from .base import Method, option, register


@register("random", "baseline: a uniformly random subset")
@dataclass
class Random(Method):
    seed: int = option(0, "draws the subset, which depends on it and the image's token count only")

    def __post_init__(self):
        super().__post_init__()
        self.seed = check_int("seed", self.seed)
        if not -(2**63) <= self.seed < 2**64:  # what torch.Generator.manual_seed accepts
            raise UsageError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")

    def select_batch(self, batch: ImageBatch) -> torch.Tensor:
        n = batch.layout.n_features
        return random_subset(n, keep_count(self.budget, n), self.seed, batch.device).expand(len(batch), n)


@lru_cache(maxsize=64)
def random_subset(n: int, k: int, seed: int, device: torch.device) -> torch.Tensor:
    """(n,) bool: k of n drawn by a fresh generator, so that the subset depends on the seed and
    the image's token count only, never on the batch the image arrives in; made once per device."""
    generator = torch.Generator().manual_seed(seed)
    return feature_mask(torch.randperm(n, generator=generator)[:k], n).to(device)
