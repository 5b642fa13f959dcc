"""Task grouping from an affinity matrix: the exact search equals brute force (overlapping
groups as in TAG, and partitions) on random matrices with T <= 8; the approximate search
matches it on a sample and recovers planted clusters beyond the exact range."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from gradsurgery.diagnostics import Grouping, group_tasks, grouping_score


def _receive(a: np.ndarray, members: tuple[int, ...], lone: float) -> np.ndarray:
    row = np.full(len(a), -np.inf)
    if len(members) == 1:
        row[members[0]] = lone
        return row
    for j in members:
        row[j] = sum(a[i, j] for i in members if i != j) / (len(members) - 1)
    return row


def _brute_overlap(a: np.ndarray, k: int, singleton: float | None = None) -> float:
    """Every collection of at most k distinct groups that covers all tasks (TAG's search)."""
    n = len(a)
    lone = -np.inf if singleton is None else singleton
    smallest = 1 if singleton is not None else 2
    groups = [c for r in range(smallest, n + 1) for c in itertools.combinations(range(n), r)]
    rows = np.stack([_receive(a, g, lone) for g in groups])
    best = -np.inf
    for m in range(1, k + 1):
        combos = np.array(list(itertools.combinations(range(len(groups)), m)))
        per_task = rows[combos].max(axis=1)  # (combos, n)
        ok = np.isfinite(per_task).all(axis=1)
        if ok.any():
            best = max(best, float(per_task[ok].mean(axis=1).max()))
    return best


def _set_partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]
        yield [[first], *part]


def _brute_partition(a: np.ndarray, k: int, singleton: float | None = None) -> float:
    lone = -np.inf if singleton is None else singleton
    best = -np.inf
    for part in _set_partitions(list(range(len(a)))):
        if len(part) > k:
            continue
        total = sum(_receive(a, tuple(b), lone)[b].sum() for b in part)
        best = max(best, total / len(a))
    return best


CASES = [(n, k, seed) for n in (3, 4, 5, 6) for k in (1, 2, 3) for seed in (0, 1)]
CASES += [(7, 2, 0), (8, 2, 0), (8, 1, 1)]


@pytest.mark.parametrize(("n", "k", "seed"), CASES)
def test_exact_search_equals_brute_force_with_overlap(n, k, seed):
    a = np.random.default_rng(100 * n + 10 * k + seed).normal(size=(n, n))
    g = group_tasks(a, k, method="exact")
    assert g.exact and g.overlap and len(g.groups) <= k
    assert g.score == pytest.approx(_brute_overlap(a, k), abs=1e-12)
    # the reported score is the score of the returned groups
    score, per_task, served = grouping_score(a, g.groups)
    assert score == pytest.approx(g.score, abs=1e-12)
    assert per_task == pytest.approx(g.per_task) and served == g.served_by
    assert g.total == pytest.approx(n * g.score)


@pytest.mark.parametrize(
    ("n", "k", "seed"), [(4, 2, 0), (5, 2, 1), (6, 3, 2), (7, 3, 3), (8, 3, 4)]
)
def test_exact_search_equals_brute_force_for_partitions(n, k, seed):
    a = np.random.default_rng(seed).normal(size=(n, n))
    g = group_tasks(a, k, overlap=False)
    assert g.score == pytest.approx(_brute_partition(a, k), abs=1e-12)
    flat = sorted(t for group in g.groups for t in group)
    assert flat == sorted(str(i) for i in range(n))  # each task exactly once


@pytest.mark.parametrize("overlap", [True, False])
def test_exact_search_with_scored_singletons(overlap):
    for seed in range(3):
        a = np.random.default_rng(seed).normal(size=(5, 5))
        g = group_tasks(a, 3, overlap=overlap, singleton=0.0)
        brute = _brute_overlap(a, 3, 0.0) if overlap else _brute_partition(a, 3, 0.0)
        assert g.score == pytest.approx(brute, abs=1e-12)


def test_the_paper_objective_on_a_hand_example():
    # a and b help each other, c helps nobody and is hurt by everyone
    z = [[0.0, 0.4, -0.2], [0.6, 0.0, -0.4], [-0.1, -0.1, 0.0]]
    g = group_tasks(z, 2, ["a", "b", "c"])
    # c must sit in a group of >= 2: best is with a (receives -0.2) ... or b (-0.4): with a.
    # a and b are served by {a, b}: a receives 0.6, b 0.4; c by {a, c}: -0.2
    assert set(g.groups) == {("a", "b"), ("a", "c")}
    assert g.per_task == pytest.approx({"a": 0.6, "b": 0.4, "c": -0.2})
    assert g.score == pytest.approx(0.8 / 3)
    assert g.groups[g.served_by["c"]] == ("a", "c")
    # one group: everyone together, each receives the mean of the other two
    one = group_tasks(z, 1, ["a", "b", "c"])
    assert one.groups == (("a", "b", "c"),)
    assert one.per_task == pytest.approx({"a": 0.25, "b": 0.15, "c": -0.3})
    json.dumps(g.to_dict())


def test_affinity_convention_is_row_onto_column():
    # only b -> a is positive: a wants b, b does not want a
    z = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    score, per_task, _ = grouping_score(z, [["a", "b"], ["b", "c"], ["a", "c"]], ["a", "b", "c"])
    assert per_task == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert score == pytest.approx(1 / 3)


def _planted(sizes: list[int], seed: int, noise: float = 0.05) -> tuple[np.ndarray, list[int]]:
    labels = [c for c, s in enumerate(sizes) for _ in range(s)]
    lab = np.array(labels)
    same = lab[:, None] == lab[None, :]
    a = np.where(same, 0.02, -0.02) + noise * 0.02 * np.random.default_rng(seed).normal(
        size=(len(lab), len(lab))
    )
    return a, labels


@pytest.mark.parametrize(("sizes", "k"), [([8, 8], 2), ([7, 6, 7], 3), ([9, 9], 2)])
def test_approximate_search_recovers_planted_clusters(sizes, k):
    a, labels = _planted(sizes, seed=sum(sizes))
    g = group_tasks(a, k)
    assert not g.exact
    clusters = {tuple(str(i) for i, c in enumerate(labels) if c == b) for b in range(len(sizes))}
    assert set(g.groups) == clusters


def test_approximate_search_matches_exact_on_random_matrices():
    rng = np.random.default_rng(7)
    for n, k in [(8, 2), (9, 3), (10, 3)]:
        a = rng.normal(size=(n, n))
        exact = group_tasks(a, k, method="exact")
        approx = group_tasks(a, k, method="search", restarts=4)
        assert not approx.exact
        assert approx.score == pytest.approx(exact.score, abs=1e-12)
        part = group_tasks(a, k, method="search", overlap=False, restarts=4)
        assert part.score == pytest.approx(group_tasks(a, k, overlap=False).score, abs=1e-12)


def test_search_is_reproducible_with_its_seed():
    a = np.random.default_rng(3).normal(size=(13, 13))
    assert group_tasks(a, 3, seed=5).groups == group_tasks(a, 3, seed=5).groups


def test_tensor_input_and_names():
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float32)
    g = group_tasks(a, 3, ["x", "y"])
    assert isinstance(g, Grouping) and g.groups == (("x", "y"),) and g.score == 1.0


def test_grouping_errors():
    with pytest.raises(ValueError, match="square"):
        group_tasks(np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="b->a"):
        group_tasks([[0.0, 1.0], [math.nan, 0.0]], 1, ["a", "b"])
    group_tasks([[math.nan, 1.0], [1.0, math.nan]], 1)  # the diagonal is ignored
    with pytest.raises(ValueError, match="k"):
        group_tasks(np.zeros((3, 3)), 0)
    with pytest.raises(ValueError, match="method"):
        group_tasks(np.zeros((3, 3)), 1, method="greedy")
    with pytest.raises(ValueError, match="single task"):
        group_tasks([[0.0]], 1)
    assert group_tasks([[0.0]], 1, singleton=0.0).groups == (("0",),)
    with pytest.raises(ValueError, match="task names"):
        group_tasks(np.zeros((3, 3)), 1, ["a", "b"])
    with pytest.raises(ValueError, match="duplicate"):
        group_tasks(np.zeros((2, 2)), 1, ["a", "a"])
    with pytest.raises(ValueError, match="max_exact"):
        group_tasks(np.zeros((2, 2)), 1, max_exact=0)
    with pytest.raises(ValueError, match="restarts"):
        group_tasks(np.zeros((2, 2)), 1, restarts=-1)
    with pytest.raises(ValueError, match="20 tasks"):
        group_tasks(np.zeros((21, 21)), 1, method="exact")
    with pytest.raises(TypeError, match="matrix"):
        group_tasks([["a", "b"], ["c", "d"]], 1)
    with pytest.raises(ValueError, match="in no group"):
        grouping_score(np.zeros((3, 3)), [["0", "1"]])
    with pytest.raises(ValueError, match="unknown task"):
        grouping_score(np.zeros((2, 2)), [["0", "z"]])
    with pytest.raises(ValueError, match="repeats"):
        grouping_score(np.zeros((2, 2)), [["0", "0", "1"]])
    with pytest.raises(TypeError, match="sequence"):
        grouping_score(np.zeros((2, 2)), "01")
