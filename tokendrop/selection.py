"""The selection steps every method shares: exact budgets, allocation across partitions,
order-preserving top-k, the newline policy and merging.

Every step takes a leading batch of images of one layout and runs where its tensors are
(the features' device) without reading a value back to the host: budgets are Python ints
from the layout's sizes, and a selection is a (..., N) bool mask over the feature tokens
(a merging selection: an owner map, see `Grouping`). Scores arrive in fp32.

Non-finite scores (a NaN pixel spreads through its tile) never change a count: NaN ranks
below every key (`order_key`) and a non-finite allocation weight counts as zero; the methods
with their own arithmetic (dpp, divprune, text) rank non-finite tokens last as well."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .checks import UsageError, UsageTypeError, is_number
from .layout import ImageLayout

NEWLINE_POLICIES = ("rows", "all", "drop")

# Devices where the host runs each op as it is called: reading a value back waits for nothing
# and a loop of small ops launches no kernels, so a method may take host-driven shortcuts
# there (dpp: image by image, set by set); the tests empty this set to run the device path.
HOST_DEVICES = frozenset({"cpu"})


def on_host(tensor: torch.Tensor) -> bool:
    return tensor.device.type in HOST_DEVICES


def check_budget(budget) -> float | int:
    """A float in (0, 1] is a fraction of the image's feature tokens, an int >= 1 a count."""
    if not is_number(budget):
        raise UsageTypeError(
            f"budget must be a float in (0, 1] (a fraction) or an int >= 1 (a token count), got {budget!r}"
        )
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise UsageError(f"budget as an int is a token count and must be >= 1, got {budget}")
        return int(budget)
    budget = float(budget)
    if math.isnan(budget) or not 0.0 < budget <= 1.0:
        raise UsageError(
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


def allocate(total, weights: torch.Tensor, capacity: torch.Tensor, host_capacity=None) -> torch.Tensor:
    """Split `total` tokens over partitions in proportion to `weights`, at most `capacity[p]`
    each, summing exactly to min(total, capacity.sum()).

    weights: (..., P); capacity: (P,) or (..., P); total: an int or a (...,) tensor;
    host_capacity: `capacity` (P,) as Python ints, where the caller has them (a layout's
    `sizes`). Returns (..., P) long, on the weights' device.

    Each round gives every open partition floor(remaining * w_p / sum w); a partition that
    would exceed its capacity is filled and closed and its overflow goes round again. When no
    partition overflows, the rounding remainder goes one token each to the largest fractional
    shares (ties: lower partition index). A non-finite weight (from non-finite scores) counts
    as zero, so it never changes the total; zero total weight among open partitions falls back
    to capacity-proportional shares. The rounds run as masked tensor steps, with no host sync.
    A round either closes a partition or hands out all that remains, and a partition that can
    hold all that is handed out never overflows (its share never exceeds what remains), so
    1 + (the partitions that cannot) rounds suffice: with an int total and `host_capacity`,
    only those run (one for a budget that every partition could hold), else P + 1; the last
    of them, with no partition left to overflow, skips the check.
    """
    n = weights.shape[-1]
    rounds = n + 1
    weights = weights.double().nan_to_num(nan=0.0, posinf=0.0).clamp(min=0)
    capacity = capacity.long().to(weights.device).expand_as(weights)
    if host_capacity is not None and not isinstance(total, torch.Tensor):
        handed_out = min(total, sum(host_capacity))
        rounds = 1 + sum(size < handed_out for size in host_capacity)
        remaining = torch.full(weights.shape[:-1], handed_out, dtype=torch.long, device=weights.device)
    else:
        if not isinstance(total, torch.Tensor):  # made on the device: a copy there would wait for it
            total = torch.full(weights.shape[:-1], total, dtype=torch.long, device=weights.device)
        remaining = torch.minimum(total, capacity.sum(-1))
    alloc = torch.zeros_like(capacity)
    for round_ in range(rounds):
        room = capacity - alloc
        open_ = room > 0
        w = torch.where(open_, weights, 0.0)
        w = torch.where(w.sum(-1, keepdim=True) <= 0, room.double(), w)  # a closed partition's room is 0
        active = (remaining > 0)[..., None]
        share = torch.where(active, remaining[..., None] * w / w.sum(-1, keepdim=True), 0.0)
        floor = share.floor().long()
        leftover = remaining - floor.sum(-1)
        frac = torch.where(open_, share - floor, -1.0)
        # each partition's place in the order of descending fractions (ties: lower index first)
        place = torch.sort(frac, dim=-1, descending=True, stable=True).indices.argsort(dim=-1)
        spread = floor + (place < leftover[..., None])
        if round_ == rounds - 1:  # the bound leaves nothing to overflow in the last round
            return alloc + torch.where(active, spread, 0)
        full = open_ & (floor >= room)
        take = torch.where(full.any(-1, keepdim=True), torch.where(full, room, 0), spread)
        take = torch.where(active, take, 0)
        alloc += take
        remaining = remaining - take.sum(-1)


# `order_key`'s range is [NAN_KEY, INF_KEY]: -inf and inf stand below and above every key
NAN_KEY, INF_KEY = -2e300, 1e300


def order_key(scores: torch.Tensor) -> torch.Tensor:
    """float64 keys in the order of the scores (exact: an fp32 score is a float64), with the
    infinities made finite and NaN below them, so that ties are exact equality (-0.0 == 0.0)
    and the true infinities are free to pad below and above every key."""
    return scores.double().nan_to_num(nan=NAN_KEY, posinf=INF_KEY, neginf=-INF_KEY)


def top_k_per_partition(scores: torch.Tensor, members: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(..., N) bool: the counts[..., p] highest-scoring features of each partition p.
    scores (..., N); members (P, M): each partition's feature indices, ascending, padded
    with -1 (`ImageLayout.partition_members`, `layout.members_of`); counts (..., P). Ties go
    to the lower index and NaN ranks last, so selections are deterministic."""
    # padding points at a spare column of -inf, below every key, so it is never taken
    slots = torch.where(members >= 0, members, scores.shape[-1])
    key = torch.nn.functional.pad(order_key(scores), (0, 1), value=-math.inf)
    take = top_counts(key[..., slots], counts)  # (..., P, M)
    # back to feature order; padding writes to the spare column, cut off
    kept = torch.zeros(key.shape, dtype=torch.bool, device=scores.device)
    return kept.scatter_(-1, slots.flatten().expand(*key.shape[:-1], -1), take.flatten(-2))[..., :-1]


def top_k_per_tile(layout: ImageLayout, tile_scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`top_k_per_partition(layout.per_feature(tile_scores), layout.partition_members,
    counts)` for scores given per partition tile (..., P, side**2), ranked in the tiles
    themselves where their cells rank the features as the feature indices do
    (`features_in_tile_order`): no gather into partition rows and no scatter back; a cell
    that holds no feature ranks below every key."""
    if not layout.features_in_tile_order:
        return top_k_per_partition(layout.per_feature(tile_scores), layout.partition_members, counts)
    key = order_key(tile_scores).masked_fill_(layout.empty_cells, -math.inf)
    return top_counts(key, counts).flatten(-2)[..., layout.cell]


def top_counts(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(..., P, M) bool: the counts[..., p] largest `order_key`s of each row p (-inf: never).

    No sort (on a CPU, torch sorts a row of 2,880 floats in ~90 us): each row's count-th
    largest key is found by one k-th value, then the keys above it are kept, and as many of
    those equal to it as the count still allows, in index order."""
    n = rows.shape[-1]
    # the count-th largest of a row is the n-th largest once n - count entries above all
    # keys are added to it: one k-th value (the (n + 1)-th smallest of 2n) for every row
    counts = counts.to(rows.device)[..., None]
    fill = torch.where(torch.arange(n, device=rows.device) < n - counts, math.inf, -math.inf)
    threshold = torch.kthvalue(torch.cat([rows, fill.to(rows.dtype)], -1), n + 1, -1, keepdim=True).values
    return take_to_count(rows, threshold, counts)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(..., N) bool: each row's k highest scores, k a host int: `top_k_per_partition` with
    one partition of every feature, without its padding, gather and scatter."""
    k = min(max(k, 0), scores.shape[-1])
    if k == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    key = order_key(scores)
    threshold = torch.kthvalue(key, key.shape[-1] - k + 1, -1, keepdim=True).values
    return take_to_count(key, threshold, k)


def take_to_count(key: torch.Tensor, threshold: torch.Tensor, counts) -> torch.Tensor:
    """(..., n) bool: the keys above each row's threshold (its count-th largest), then as many
    equal to it as the row's count (an int, or a tensor broadcasting as (..., 1)) still
    allows, in index order."""
    greater = key > threshold
    equal = key == threshold
    return greater | (equal & (equal.cumsum(-1) <= counts - greater.sum(-1, keepdim=True)))


def region_sums(layout: ImageLayout, base_scores: torch.Tensor) -> torch.Tensor:
    """(..., side**2) scores over the base tile -> (..., n_crops): each crop's share of them by
    `region_weights` (a product and a sum, so that an image's result never depends on the
    images batched with it, as a matrix product's blocking could make it)."""
    return (base_scores[..., None, :] * layout.region_weights).sum(-1)


def proportional_counts(k: int, layout: ImageLayout) -> torch.Tensor:
    """(P,) k tokens spread over partitions in proportion to their sizes (exact total)."""
    return allocate(k, layout.capacity.double(), layout.capacity, layout.sizes)


def feature_mask(kept: torch.Tensor, n: int) -> torch.Tensor:
    """A selection as a (..., n) bool mask: kept indices (k,) or a mask already."""
    if kept.dtype == torch.bool:
        return kept
    return torch.zeros(n, dtype=torch.bool, device=kept.device).index_fill_(0, kept.long(), True)


def packed_keep_mask(layout: ImageLayout, kept: torch.Tensor, newlines: str) -> torch.Tensor:
    """(..., L) bool over the packed sequence: the kept features plus the newlines the policy
    keeps. `kept`: a (..., N) bool mask over the features, or one image's kept indices.
    "rows": the newline of every canvas row unless selection dropped all of the row's features
    (so a canvas whose rows hold no features, that of a very thin image, keeps its newlines as
    the unpatched model does); "all": every newline; "drop": none."""
    kept = feature_mask(kept, layout.n_features)
    layout = layout.on(kept.device)
    lead = kept.shape[:-1]
    mask = torch.zeros(*lead, layout.packed_source.numel(), dtype=torch.bool, device=kept.device)
    mask.scatter_(-1, layout.feature_positions.expand(*lead, -1), kept)
    newline = layout.newline_positions.expand(*lead, -1)
    if newlines == "all":
        mask.scatter_(-1, newline, True)
    elif newlines == "rows":
        canvas = layout.canvas_features
        kept_in_row = torch.zeros(newline.shape, dtype=torch.long, device=kept.device)
        kept_in_row.scatter_add_(-1, layout.row[canvas].expand(*lead, -1), kept[..., canvas].long())
        mask.scatter_(-1, newline, (kept_in_row > 0) | ~layout.row_has_features)
    return mask


@dataclass(frozen=True, eq=False)
class Grouping:
    """A merging selection of a batch of images: owner[..., i] is the kept feature index whose
    merged token feature i joins (its group's smallest member, so a kept index owns itself),
    -1 where i is dropped; weights[..., i] its weight in that mean (None: plain means)."""

    owner: torch.Tensor  # (..., N) long
    weights: torch.Tensor | None = None  # (..., N) float

    @property
    def kept(self) -> torch.Tensor:
        """(..., N) bool: the positions the merged tokens stand at."""
        return self.owner == torch.arange(self.owner.shape[-1], device=self.owner.device)


def merge(packed: torch.Tensor, layout: ImageLayout, grouping: Grouping) -> torch.Tensor:
    """`packed` (..., L, D) with the vector at each kept feature position replaced by the mean
    of its group's feature vectors (weighted where the grouping has weights), computed in fp32
    and cast back to `packed`'s dtype; a group of one leaves its vector as it is."""
    layout = layout.on(packed.device)
    owner = grouping.owner.to(packed.device)
    dropped = owner < 0
    weights = torch.ones(owner.shape, device=packed.device) if grouping.weights is None else grouping.weights
    weights = torch.where(dropped, 0.0, weights.to(packed.device).float())
    target = owner.clamp(min=0)
    features = packed[..., layout.feature_positions, :]
    sums = torch.zeros(features.shape, device=packed.device).scatter_add_(
        -2, target[..., None].expand(features.shape), features.float() * weights[..., None]
    )
    totals = torch.zeros(owner.shape, device=packed.device).scatter_add_(-1, target, weights)
    means = (sums / totals[..., None]).to(packed.dtype)
    merged = packed.clone()
    merged[..., layout.feature_positions, :] = torch.where(grouping.kept[..., None], means, features)
    return merged
