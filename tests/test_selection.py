"""The shared selection steps against the reference definitions."""

import math
import random

import pytest
import torch

import reference
from tokendrop.adapters import adapter_for
from tokendrop.layout import NEWLINE, ImageLayout, members_of
from tokendrop.presets import build_preset
from tokendrop.selection import allocate, check_budget, keep_count, top_k, top_k_per_partition, top_k_per_tile


@pytest.mark.parametrize(
    "budget, n, expected",
    [(0.2, 576, 115), (0.29, 100, 29), (1.0, 2928, 2928), (0.0001, 50, 1), (7, 50, 7), (500, 50, 50), (1, 50, 1)],
)
def test_keep_count(budget, n, expected):
    assert keep_count(check_budget(budget), n) == expected


def test_allocate_matches_reference_and_is_exact():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 6)
        capacity = [rng.choice([0, 3, 12, 36]) for _ in range(n)]
        weights = [rng.choice([0.0, rng.random(), 10 * rng.random()]) for _ in range(n)]
        total = rng.randint(0, sum(capacity) + 5)
        got = allocate(total, torch.tensor(weights), torch.tensor(capacity)).tolist()
        assert got == reference.allocate(total, weights, capacity)
        assert sum(got) == min(total, sum(capacity))
        assert all(0 <= g <= c for g, c in zip(got, capacity))


def test_allocate_redistributes_overflow():
    # the heavy partition is capped at 4; its overflow goes to the others in proportion
    assert allocate(10, torch.tensor([100.0, 1.0, 1.0]), torch.tensor([4, 10, 10])).tolist() == [4, 3, 3]


def sizes(partition: list[int], n_partitions: int) -> tuple[int, ...]:
    return tuple(partition.count(p) for p in range(n_partitions))


def test_top_k_per_partition_matches_reference():
    rng = random.Random(1)
    for _ in range(100):
        n = rng.randint(1, 40)
        partition = [rng.randint(0, 2) for _ in range(n)]
        scores = [float(rng.randint(0, 5)) for _ in range(n)]  # many ties
        counts = [rng.randint(0, partition.count(p)) for p in range(3)]
        got = top_k_per_partition(
            torch.tensor(scores), members_of(torch.tensor(partition), sizes(partition, 3)), torch.tensor(counts)
        )
        assert torch.nonzero(got).flatten().tolist() == reference.top_per_partition(scores, partition, counts)


def test_top_k_per_partition_ranks_special_values_as_the_scores_order_them():
    # scores from a pool of extremes, many equal: ties (including -0.0 with 0.0) go to the lower
    # index, NaN ranks below -inf, padded partitions and counts of 0 and of a whole partition
    rng = random.Random(3)
    pool = [float("nan"), float("-inf"), float("inf"), -0.0, 0.0, -1.5, 1.5, 1e-45, -1e-45, 3.4e38, -3.4e38]
    for _ in range(200):
        n = rng.randint(1, 30)
        partition = [rng.randint(0, 3) for _ in range(n)]
        scores = [rng.choice(pool) for _ in range(n)]
        counts = [rng.choice([0, partition.count(p), rng.randint(0, partition.count(p))]) for p in range(4)]
        got = top_k_per_partition(
            torch.tensor(scores), members_of(torch.tensor(partition), sizes(partition, 4)), torch.tensor(counts)
        )
        expected = []
        for p, count in enumerate(counts):
            members = [i for i in range(n) if partition[i] == p]
            members.sort(key=lambda i: (math.isnan(scores[i]), -scores[i] if not math.isnan(scores[i]) else 0, i))
            expected += members[:count]
        assert torch.nonzero(got).flatten().tolist() == sorted(expected), (scores, partition, counts)
        # one partition of every feature, the count a host int: `top_k`
        k = rng.randint(0, n + 1)
        ranked = sorted(
            range(n), key=lambda i: (math.isnan(scores[i]), -scores[i] if not math.isnan(scores[i]) else 0, i)
        )
        assert torch.nonzero(top_k(torch.tensor(scores), k)).flatten().tolist() == sorted(ranked[:k]), (scores, k)


def test_top_k_per_partition_batched_equals_one_by_one():
    generator = torch.Generator().manual_seed(2)
    partition = torch.randint(0, 4, (50,), generator=generator)
    scores = torch.randint(0, 6, (7, 50), generator=generator).float()  # many ties
    capacity = torch.bincount(partition, minlength=4)
    counts = (torch.rand(7, 4, generator=generator) * (capacity + 1)).long()
    members = members_of(partition, sizes(partition.tolist(), 4))
    batched = top_k_per_partition(scores, members, counts)
    for row in range(7):
        assert torch.equal(batched[row], top_k_per_partition(scores[row], members, counts[row]))


def ranked_per_partition(scores: list[float], partition: list[int], counts: list[int]) -> list[int]:
    """Each partition's counts[p] best features by the sort definition (descending score,
    NaN last, ties to the lower index), ascending."""
    kept = []
    for p, count in enumerate(counts):
        members = [i for i in range(len(scores)) if partition[i] == p]
        members.sort(key=lambda i: (math.isnan(scores[i]), -scores[i] if not math.isnan(scores[i]) else 0, i))
        kept += members[:count]
    return sorted(kept)


@pytest.mark.parametrize("preset", ["tiny", "tiny-onevision"])
def test_top_k_per_tile_ranks_as_the_features_would(preset):
    # scores given per tile cell, many equal and some special: what each partition keeps is its
    # features' ranking, whatever cells the crops' padding leaves empty (tiny-onevision's
    # large images are resampled canvases)
    model, _ = build_preset(preset)
    adapter = adapter_for(model)
    rng = random.Random(7)
    pool = [float("nan"), float("-inf"), float("inf"), -0.0, 0.0, 0.25, 0.5, 0.75, 1e-45]
    for size in [(38, 96), (96, 38), (60, 100), (300, 700), (1500, 1500)]:
        layout = adapter.layout(size)
        assert layout.features_in_tile_order
        tiles = torch.tensor([rng.choice(pool) for _ in range(3 * layout.n_partitions * layout.tile)])
        tiles = tiles.view(3, layout.n_partitions, layout.tile)
        counts = torch.tensor([[rng.randint(0, c) for c in layout.sizes] for _ in range(3)])
        got = top_k_per_tile(layout, tiles, counts)
        for row in range(3):
            scores = layout.per_feature(tiles[row]).tolist()
            expected = ranked_per_partition(scores, layout.partition.tolist(), counts[row].tolist())
            assert torch.nonzero(got[row]).flatten().tolist() == expected, size


@pytest.mark.parametrize("crop", [[5, 4], [4, 4, 5]], ids=["out of raster order", "two tokens in one cell"])
def test_top_k_per_tile_ranks_features_where_cells_cannot(crop):
    # a canvas whose tokens do not stand for distinct cells in raster order: ranked per feature
    layout = ImageLayout(side=2, grid=(1, 1), packed_source=torch.tensor([0, 1, 2, 3, *crop, NEWLINE]))
    assert not layout.features_in_tile_order
    tiles = torch.tensor([[0.0, 0.5, 0.5, 0.25], [0.0, 1.0, 0.0, 0.0]])
    scores = layout.per_feature(tiles).tolist()
    for counts in ([2, 1], [1, 2], [0, len(crop)]):
        got = top_k_per_tile(layout, tiles, torch.tensor(counts))
        assert torch.nonzero(got).flatten().tolist() == ranked_per_partition(scores, layout.partition.tolist(), counts)


def allocate_by_rounds(total, weights, capacity):
    """The loop `allocate` ran before it ran on the device: one round at a time, reading the
    remaining count back after each (kept here as the reference re-computation)."""
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


def test_allocate_equals_the_round_by_round_loop():
    rng = random.Random(3)
    for _ in range(2000):
        n = rng.randint(1, 9)
        capacity = [rng.choice([0, 1, 3, 12, 36, 552, 576]) for _ in range(n)]
        weights = [rng.choice([0.0, 1.0, 1 / 3, rng.random(), 10 * rng.random(), 1e-12]) for _ in range(n)]
        total = rng.randint(0, sum(capacity) + 5)
        got = allocate(total, torch.tensor(weights), torch.tensor(capacity))
        assert torch.equal(got, allocate_by_rounds(total, torch.tensor(weights), torch.tensor(capacity)))
        # only 1 + (the partitions that cannot hold the whole total) rounds, when told the capacities
        assert torch.equal(allocate(total, torch.tensor(weights), torch.tensor(capacity), capacity), got)


def test_allocate_batched_equals_one_by_one():
    generator = torch.Generator().manual_seed(4)
    capacity = torch.tensor([576, 552, 552, 0, 552])
    weights = torch.rand(64, 5, generator=generator) ** 4  # skewed: some rows overflow a partition
    totals = torch.randint(0, 2300, (64,), generator=generator)
    got = allocate(totals, weights, capacity)
    for row in range(64):
        assert torch.equal(got[row], allocate_by_rounds(int(totals[row]), weights[row], capacity))
    assert got.sum(-1).tolist() == [min(int(t), int(capacity.sum())) for t in totals]
    assert math.isclose(float(got[:, 3].sum()), 0.0)
