"""The shared selection steps against the reference definitions."""

import random

import pytest
import torch

import reference
from tokendrop.selection import allocate, check_budget, keep_count, top_k_per_partition


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


def test_top_k_per_partition_matches_reference():
    rng = random.Random(1)
    for _ in range(100):
        n = rng.randint(1, 40)
        partition = [rng.randint(0, 2) for _ in range(n)]
        scores = [float(rng.randint(0, 5)) for _ in range(n)]  # many ties
        counts = [rng.randint(0, partition.count(p)) for p in range(3)]
        got = top_k_per_partition(torch.tensor(scores), torch.tensor(partition), torch.tensor(counts))
        assert got.tolist() == reference.top_per_partition(scores, partition, counts)
