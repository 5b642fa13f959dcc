"""Pareto dominance and the hypervolume: hand values, brute force, grid counts, pymoo."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from gradsurgery.moo import dominated_by, dominates, hypervolume, non_dominated, pareto_front


def _brute_non_dominated(points: np.ndarray, maximize: list[bool]) -> np.ndarray:
    sign = np.where(maximize, -1.0, 1.0)
    f = points * sign
    keep = []
    for i in range(len(f)):
        dominated = False
        for j in range(len(f)):
            if all(f[j] <= f[i]) and any(f[j] < f[i]):
                dominated = True
                break
        keep.append(not dominated)
    return np.array(keep, dtype=bool)


def test_non_dominated_matches_brute_force_with_mixed_directions():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n, m = int(rng.integers(1, 40)), int(rng.integers(1, 5))
        # small integers: many ties and duplicates
        points = rng.integers(0, 5, size=(n, m)).astype(float)
        maximize = [bool(b) for b in rng.integers(0, 2, size=m)]
        expected = _brute_non_dominated(points, maximize)
        assert np.array_equal(non_dominated(points, maximize), expected), trial
        front = pareto_front(points, maximize)
        assert np.array_equal(front, points[expected])


def test_non_dominated_by_hand_and_input_kinds():
    points = [[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [2.0, 3.0], [2.0, 2.0]]
    # (2, 3) is dominated by (1, 3) and (2, 2); the duplicate (2, 2) is kept twice
    assert non_dominated(points).tolist() == [True, True, True, False, True]
    # maximise the second objective: (1, 3) is best in both, it dominates every other point
    assert non_dominated(points, [False, True]).tolist() == [True, False, False, False, False]
    # maximise both: (2, 3) and (3, 1)
    assert non_dominated(points, True).tolist() == [False, False, True, True, False]
    tensor = torch.tensor(points, dtype=torch.float32)
    mask = non_dominated(tensor)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
    assert mask.tolist() == [True, True, True, False, True]
    front = pareto_front(tensor)
    assert isinstance(front, torch.Tensor) and front.dtype == torch.float32
    assert front.tolist() == [[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [2.0, 2.0]]
    assert non_dominated([]).shape == (0,)
    # +-inf are ordered as usual
    assert non_dominated([[math.inf, 0.0], [1.0, 0.0]]).tolist() == [False, True]


def test_dominates_and_dominated_by():
    assert dominates([1, 2], [1, 3]) and not dominates([1, 3], [1, 3])
    assert not dominates([1, 3], [2, 2])
    assert dominates([1, 3], [1, 2], maximize=[False, True])
    front = [[1.0, 3.0], [3.0, 1.0]]
    assert dominated_by([2.0, 3.0], front)
    assert not dominated_by([2.0, 2.0], front)
    assert not dominated_by([1.0, 3.0], front)  # equal to a front point: not dominated
    assert dominated_by([0.5, 0.5], front, maximize=True)
    assert not dominated_by([2.0, 2.0], [])
    assert dominated_by(torch.tensor([4.0, 4.0]), torch.tensor([[1.0, 1.0]]))


def test_pareto_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        non_dominated([1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        non_dominated([[1.0, math.nan]])
    with pytest.raises(ValueError, match="2 entries for 3 objectives"):
        non_dominated([[1.0, 2.0, 3.0]], maximize=[True, False])
    with pytest.raises(ValueError, match="bools"):
        non_dominated([[1.0, 2.0]], maximize=["max", "min"])
    with pytest.raises(ValueError, match="bool or a sequence"):
        non_dominated([[1.0, 2.0]], maximize="max")
    with pytest.raises(ValueError, match="numbers"):
        non_dominated([["a", "b"]])
    with pytest.raises(ValueError, match="objectives"):
        dominates([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match=r"front must be \(k, 2\)"):
        dominated_by([1.0, 2.0], [[1.0, 2.0, 3.0]])


# ---------------------------------------------------------------- hypervolume


def test_hypervolume_by_hand_2d():
    points = [[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]
    # strips: (4 - 1)(4 - 3) + (4 - 2)(3 - 2) + (4 - 3)(2 - 1) = 3 + 2 + 1
    assert hypervolume(points, [4.0, 4.0]) == 6.0
    # dominated points, duplicates and points on the reference's boundary add nothing
    more = [*points, [3.0, 3.0], [2.0, 2.0], [4.0, 0.0], [0.5, 4.0]]
    assert hypervolume(more, [4.0, 4.0]) == 6.0
    assert hypervolume([[1.0, 1.0]], [3.0, 2.0]) == 2.0
    # maximise both: the mirror image
    assert hypervolume([[-1.0, -3.0], [-2.0, -2.0], [-3.0, -1.0]], [-4.0, -4.0], True) == 6.0
    # mixed: minimise a loss, maximise an accuracy; ref (loss 4, acc 0)
    assert hypervolume([[1.0, 0.5], [2.0, 0.75]], [4.0, 0.0], [False, True]) == 3 * 0.5 + 2 * 0.25
    assert hypervolume([], [1.0, 1.0]) == 0.0
    assert hypervolume(torch.tensor([[0.0, 0.0]]), torch.tensor([2.0, 3.0])) == 6.0


def test_hypervolume_by_hand_1d_and_3d():
    assert hypervolume([[3.0], [1.0], [2.0]], [5.0]) == 4.0
    # boxes of volume 6 each, pairwise intersections 2 each, the triple one 1:
    # 18 - 6 + 1 = 13 (inclusion-exclusion)
    points = [[1.0, 2.0, 3.0], [2.0, 3.0, 1.0], [3.0, 1.0, 2.0]]
    assert hypervolume(points, [4.0, 4.0, 4.0]) == 13.0
    assert hypervolume([*points, [3.0, 3.0, 3.0], [1.0, 2.0, 3.0]], [4.0, 4.0, 4.0]) == 13.0
    assert hypervolume([[1.0, 1.0, 1.0]], [2.0, 3.0, 4.0]) == 6.0


def _grid_count(points: np.ndarray, size: int) -> int:
    """Unit cells [c, c + 1]^m of [0, size]^m inside the union of boxes [p, size]."""
    m = points.shape[1]
    cells = np.array(list(itertools.product(range(size), repeat=m)), dtype=float)
    covered = (points[None, :, :] <= cells[:, None, :]).all(axis=2).any(axis=1)
    return int(covered.sum())


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_hypervolume_equals_an_exact_grid_count(m):
    """Integer points: the union of boxes is a union of unit cells, counted one by one."""
    rng = np.random.default_rng(m)
    size = 5 if m >= 4 else 8
    for _ in range(5):
        points = rng.integers(0, size, size=(int(rng.integers(1, 15)), m)).astype(float)
        assert hypervolume(points, [float(size)] * m) == float(_grid_count(points, size))


def test_hypervolume_agrees_with_monte_carlo_in_4d():
    rng = np.random.default_rng(7)
    points = rng.random((12, 4)) * 0.8
    ref = np.ones(4)
    exact = hypervolume(points, ref)
    samples = rng.random((400_000, 4))
    inside = np.zeros(len(samples), dtype=bool)
    for p in points:
        inside |= (samples >= p).all(axis=1)
    estimate = inside.mean()
    stderr = math.sqrt(estimate * (1 - estimate) / len(samples))
    assert abs(exact - estimate) < 4 * stderr + 1e-12, (exact, estimate, stderr)


def test_hypervolume_is_monotone_and_invariant_to_order():
    rng = np.random.default_rng(3)
    points = rng.random((30, 3))
    ref = [1.5, 1.5, 1.5]
    hv = hypervolume(points, ref)
    assert hypervolume(points[::-1], ref) == pytest.approx(hv, rel=1e-12)
    assert hypervolume(points[:20], ref) <= hv
    better = points.copy()
    better[0] -= 0.1  # improving a point never shrinks the volume
    assert hypervolume(np.clip(better, 0, None), ref) >= hv


def test_hypervolume_bad_reference_and_input():
    with pytest.raises(ValueError, match=r"does not bound the set: point 1 .* objective 0"):
        hypervolume([[1.0, 1.0], [5.0, 1.0]], [4.0, 4.0])
    with pytest.raises(ValueError, match=r"objective 1 \(0.5 < 1, maximised\)"):
        hypervolume([[1.0, 0.5]], [4.0, 1.0], [False, True])
    # outside="ignore" drops such points, as pymoo does
    assert hypervolume([[1.0, 1.0], [5.0, 0.0]], [4.0, 4.0], outside="ignore") == 9.0
    with pytest.raises(ValueError, match="reference point has 3 values"):
        hypervolume([[1.0, 1.0]], [4.0, 4.0, 4.0])
    with pytest.raises(ValueError, match="ref must be finite"):
        hypervolume([[1.0, 1.0]], [4.0, math.inf])
    with pytest.raises(ValueError, match="ref must be 1-D"):
        hypervolume([[1.0, 1.0]], [[4.0, 4.0]])
    with pytest.raises(ValueError, match="finite"):
        hypervolume([[1.0, -math.inf]], [4.0, 4.0])
    with pytest.raises(ValueError, match="NaN"):
        hypervolume([[1.0, math.nan]], [4.0, 4.0])
    with pytest.raises(ValueError, match="backend"):
        hypervolume([[1.0, 1.0]], [4.0, 4.0], backend="wfg")
    with pytest.raises(ValueError, match="outside"):
        hypervolume([[1.0, 1.0]], [4.0, 4.0], outside="clip")


@pytest.mark.reference
def test_hypervolume_agrees_with_pymoo():
    pytest.importorskip("pymoo")
    rng = np.random.default_rng(11)
    for m in (2, 3, 4, 5):
        for n in (1, 7, 40):
            points = rng.random((n, m))
            if m >= 3:  # points on a sphere-shaped front: many non-dominated points
                points = points / np.linalg.norm(points, axis=1, keepdims=True)
            ref = np.full(m, 1.1)
            ours = hypervolume(points, ref)
            theirs = hypervolume(points, ref, backend="pymoo")
            assert ours == pytest.approx(theirs, rel=1e-10, abs=1e-14), (m, n)
    # mixed directions go through the same flip
    points = rng.random((20, 3))
    ref = [1.0, 0.0, 1.0]
    ours = hypervolume(points, ref, [False, True, False])
    assert ours == pytest.approx(hypervolume(points, ref, [False, True, False], backend="pymoo"))


def test_pymoo_backend_without_pymoo_says_how_to_get_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pymoo.indicators.hv", None)  # import fails
    with pytest.raises(ImportError, match="pip install pymoo"):
        hypervolume([[1.0, 1.0]], [2.0, 2.0], backend="pymoo")
