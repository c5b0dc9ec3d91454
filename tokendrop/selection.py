"""The selection steps every method shares: exact budgets, allocation across partitions,
order-preserving top-k, and the newline policy. All on CPU tensors (scores arrive in fp32)."""

from __future__ import annotations

import math
import numbers

import torch

from .layout import ImageLayout

NEWLINE_POLICIES = ("rows", "all", "drop")


def check_budget(budget) -> float | int:
    """A float in (0, 1] is a fraction of the image's feature tokens, an int >= 1 a count."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be a float in (0, 1] (a fraction) or an int >= 1 (a token count), got {budget!r}")
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"budget as an int is a token count and must be >= 1, got {budget}")
        return int(budget)
    budget = float(budget)
    if math.isnan(budget) or not 0.0 < budget <= 1.0:
        raise ValueError(
            f"budget as a float is a fraction and must be in (0, 1], got {budget}; "
            "pass an int for an absolute token count"
        )
    return budget


def floor_fraction(fraction: float, n: int) -> int:
    """floor(fraction * n), with a 1e-9 tolerance so that 0.29 * 100 counts as 29."""
    return math.floor(fraction * n + 1e-9)


def keep_count(budget: float | int, n: int) -> int:
    """Exact number of feature tokens kept out of n: floor(budget * n) clamped to [1, n] for a
    fraction, min(n, budget) for a count."""
    if isinstance(budget, int):
        return min(n, budget)
    return min(n, max(1, floor_fraction(budget, n)))


def allocate(total: int, weights: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """Split `total` tokens over partitions in proportion to `weights`, at most `capacity[p]`
    each, summing exactly to min(total, capacity.sum()).

    Each round gives every open partition floor(remaining * w_p / sum w); a partition that
    would exceed its capacity is filled and closed and its overflow goes round again. When no
    partition overflows, the rounding remainder goes one token each to the largest fractional
    shares (ties: lower partition index). Zero total weight among open partitions falls back
    to capacity-proportional shares.
    """
    weights = weights.double().clamp(min=0)
    capacity = capacity.long()
    alloc = torch.zeros_like(capacity)
    remaining = min(int(total), int(capacity.sum()))
    while remaining > 0:
        room = capacity - alloc
        open_ = room > 0
        w = torch.where(open_, weights, torch.zeros_like(weights))
        if w.sum() <= 0:
            w = torch.where(open_, room.double(), torch.zeros_like(weights))
        share = remaining * w / w.sum()
        floor = share.floor().long()
        full = open_ & (floor >= room)
        if full.any():
            take = torch.where(full, room, torch.zeros_like(room))
        else:
            take = floor.clone()
            leftover = remaining - int(take.sum())
            frac = torch.where(open_, share - floor, torch.full_like(share, -1.0))
            order = torch.sort(-frac, stable=True).indices[:leftover]
            take[order] += 1
        alloc += take
        remaining -= int(take.sum())
    return alloc


def top_k_per_partition(scores: torch.Tensor, partition: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Indices of the counts[p] highest-scoring features of each partition p, in ascending
    (spatial) order. Ties go to the lower index, so selections are deterministic."""
    order = torch.sort(-scores.float(), stable=True).indices
    part = partition[order]
    # rank of each feature among its own partition's features, in score order
    rank = torch.empty_like(order)
    for p in range(len(counts)):
        members = part == p
        rank[members] = torch.arange(int(members.sum()))
    kept = order[rank < counts.to(order.device)[part]]
    return torch.sort(kept).values


def proportional_counts(k: int, layout: ImageLayout) -> torch.Tensor:
    """k tokens spread over partitions in proportion to their sizes (exact total)."""
    return allocate(k, layout.capacity.double(), layout.capacity)


def packed_keep_mask(layout: ImageLayout, kept: torch.Tensor, newlines: str) -> torch.Tensor:
    """(L,) bool over the packed sequence: the kept features plus the newlines the policy keeps.
    "rows": the newline of every canvas row unless selection dropped all of the row's features
    (so a canvas whose rows hold no features, that of a very thin image, keeps its newlines as
    the unpatched model does); "all": every newline; "drop": none."""
    mask = torch.zeros(layout.packed_source.numel(), dtype=torch.bool)
    mask[layout.feature_positions[kept]] = True
    if newlines == "all":
        mask[layout.newline_positions] = True
    elif newlines == "rows":
        rows = layout.row
        emptied = torch.zeros(layout.newline_positions.numel(), dtype=torch.bool)
        emptied[rows[rows >= 0]] = True
        emptied[rows[kept][rows[kept] >= 0]] = False
        mask[layout.newline_positions[~emptied]] = True
    return mask


def merge_groups(packed: torch.Tensor, layout: ImageLayout, kept: torch.Tensor, groups, weights=None) -> torch.Tensor:
    """`packed` (L, D) with the vector at each kept feature position replaced by the mean of
    its group's feature vectors (weighted where `weights` are given), computed in fp32 and
    cast back to `packed`'s dtype. Groups must be disjoint, ascending, and start at their kept
    index (see `tokendrop.method.base.Merged`); a group of one leaves its vector as it is."""
    sizes = torch.tensor([g.numel() for g in groups], dtype=torch.long)
    members = torch.cat([g.cpu().long() for g in groups]) if groups else torch.zeros(0, dtype=torch.long)
    firsts = torch.tensor([int(g.min()) if g.numel() else -1 for g in groups], dtype=torch.long)
    if (
        len(groups) != kept.numel()
        or not torch.equal(firsts, kept.cpu())
        or members.unique().numel() != members.numel()
        or bool((members >= layout.n_features).any())
    ):
        raise RuntimeError(
            "a merging method returned groups that are not disjoint groups of feature indices "
            "each starting at its kept index"
        )
    owner = torch.repeat_interleave(torch.arange(len(groups)), sizes)
    w = torch.ones(members.numel()) if weights is None else torch.cat([x.cpu().float() for x in weights])
    if w.numel() != members.numel() or bool((w < 0).any()):
        raise RuntimeError("a merging method returned weights that do not match its groups or are negative")
    device = packed.device
    vectors = packed[layout.feature_positions[members].to(device)].float() * w.to(device)[:, None]
    sums = torch.zeros(len(groups), packed.shape[1], device=device).index_add_(0, owner.to(device), vectors)
    totals = torch.zeros(len(groups)).index_add_(0, owner, w)
    merged = packed.clone()
    merged[layout.feature_positions[kept].to(device)] = (sums / totals.to(device)[:, None]).to(packed.dtype)
    return merged
