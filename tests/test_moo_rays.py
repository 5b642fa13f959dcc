"""Preference rays on the simplex, the generic sweep and the front of its results."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradsurgery.moo import (
    SweepPoint,
    WeightedSum,
    das_dennis,
    front_of,
    objective_matrix,
    preference_rays,
    sweep,
)


def test_two_task_rays_are_evenly_spaced_with_both_corners():
    rays = preference_rays(2, 5)
    expected = [[1.0, 0.0], [0.75, 0.25], [0.5, 0.5], [0.25, 0.75], [0.0, 1.0]]
    assert rays.tolist() == expected and rays.dtype == torch.float64
    assert preference_rays(2, 1).tolist() == [[0.5, 0.5]]
    centre = preference_rays(3, 1, dtype=torch.float32)
    assert centre.dtype == torch.float32
    torch.testing.assert_close(centre, torch.full((1, 3), 1 / 3))


@pytest.mark.parametrize("t,h", [(2, 4), (3, 1), (3, 4), (4, 3), (5, 2)])
def test_das_dennis_lattice(t, h):
    rays = das_dennis(t, h)
    assert rays.shape == (math.comb(h + t - 1, t - 1), t)
    torch.testing.assert_close(rays.sum(1), torch.ones(rays.shape[0], dtype=torch.float64))
    assert (rays >= 0).all()
    # exactly the vectors k / H with integer k >= 0 summing to H, each once
    counts = (rays * h).round()
    torch.testing.assert_close(counts, rays * h)
    assert len({tuple(row) for row in counts.tolist()}) == rays.shape[0]
    corners = {tuple(row) for row in torch.eye(t, dtype=torch.float64).tolist()}
    assert corners <= {tuple(row) for row in rays.tolist()}


def test_many_task_rays_use_the_largest_lattice_that_fits():
    assert preference_rays(3, 10).shape == (10, 3)  # H = 3: C(5, 2) = 10
    assert preference_rays(3, 14).shape == (10, 3)  # H = 4 would give 15 > 14
    assert preference_rays(3, 15).shape == (15, 3)
    assert preference_rays(3, 3).tolist() == torch.eye(3, dtype=torch.float64).tolist()
    assert preference_rays(4, 40).shape == (35, 4)  # H = 4: C(7, 3) = 35; H = 5 gives 56


def test_rays_bad_input():
    with pytest.raises(ValueError, match="num_tasks"):
        preference_rays(0, 3)
    with pytest.raises(ValueError, match="positive int"):
        preference_rays(2, 0)
    with pytest.raises(ValueError, match="positive int"):
        preference_rays(2, 2.5)
    with pytest.raises(ValueError, match="cannot cover the 4 corners"):
        preference_rays(4, 3)
    with pytest.raises(ValueError, match="n = 1"):
        preference_rays(1, 3)
    with pytest.raises(ValueError, match="partitions"):
        das_dennis(3, -1)


def _fake_run(ray):
    """A stand-in for training: a known trade-off (the convex front L1 = (1 - w)^2, ...)."""
    w = ray[0] if isinstance(ray, tuple) else ray["a"]
    return {"loss_a": (1 - w) ** 2, "acc_b": 1 - w**2, "steps": torch.tensor(10.0)}


def test_sweep_runs_one_train_fn_per_ray_in_order():
    seen = []

    def train(ray):
        seen.append(ray)
        return _fake_run(ray)

    rays = preference_rays(2, 3)
    results = sweep(train, rays)
    assert seen == [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]
    assert [r.ray for r in results] == seen
    assert isinstance(results[0], SweepPoint)
    ray, metrics = results[1]  # unpacks as (ray, metrics)
    assert ray == (0.5, 0.5)
    assert metrics == {"loss_a": 0.25, "acc_b": 0.75, "steps": 10.0}
    named = sweep(_fake_run, rays, tasks=["a", "b"])
    assert named[0].ray == {"a": 1.0, "b": 0.0}
    WeightedSum(named[0].ray)  # a ray dict is a valid weights spec


def test_front_of_keeps_the_non_dominated_runs_with_mixed_directions():
    results = [
        ((1.0, 0.0), {"loss": 0.0, "acc": 0.2}),
        ((0.5, 0.5), {"loss": 0.3, "acc": 0.6}),
        ((0.0, 1.0), {"loss": 0.9, "acc": 0.9}),
        ((0.7, 0.3), {"loss": 0.4, "acc": 0.5}),  # dominated by the second run
        ((0.2, 0.8), {"loss": 0.95, "acc": 0.9}),  # dominated by the third
    ]
    front = front_of(results, {"loss": "min", "acc": "max"})
    assert front == results[:3]
    # only accuracy: the two best (tied) runs
    assert front_of(results, {"acc": "max"}) == [results[2], results[4]]
    matrix, maximize = objective_matrix(results, {"acc": "max", "loss": "min"})
    assert matrix.shape == (5, 2) and maximize == [True, False]
    assert matrix[3].tolist() == [0.5, 0.4]
    assert front_of([], {"loss": "min"}) == []


def test_front_of_nonfinite_policy():
    results = [
        ((1.0, 0.0), {"loss": 0.1, "acc": 0.2}),
        ((0.5, 0.5), {"loss": math.nan, "acc": 0.9}),
        ((0.0, 1.0), {"loss": 0.2, "acc": 0.3}),
    ]
    with pytest.raises(ValueError, match=r"result\(s\) \[1\] have a non-finite objective"):
        front_of(results, {"loss": "min", "acc": "max"})
    front = front_of(results, {"loss": "min", "acc": "max"}, nonfinite="skip")
    assert front == [results[0], results[2]]


def test_sweep_and_front_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        sweep(_fake_run, [[0.5, -0.5]])
    with pytest.raises(ValueError, match="at least one positive"):
        sweep(_fake_run, [[0.0, 0.0]])
    with pytest.raises(ValueError, match=r"\(R, T\)"):
        sweep(_fake_run, [0.5, 0.5])
    with pytest.raises(ValueError, match="2 distinct names"):
        sweep(_fake_run, [[0.5, 0.5]], tasks=["a"])
    with pytest.raises(ValueError, match="must return a dict"):
        sweep(lambda ray: 1.0, [[0.5, 0.5]])
    with pytest.raises(ValueError, match="must be a number"):
        sweep(lambda ray: {"loss": "low"}, [[0.5, 0.5]])
    calls = iter([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(ValueError, match="same metrics"):
        sweep(lambda ray: next(calls), [[0.5, 0.5], [1.0, 0.0]])
    results = [((1.0,), {"loss": 1.0})]
    with pytest.raises(ValueError, match=r"no metric\(s\) \['acc'\]"):
        front_of(results, {"acc": "max"})
    with pytest.raises(ValueError, match="'min' or 'max'"):
        front_of(results, {"loss": "minimize"})
    with pytest.raises(ValueError, match="non-empty dict"):
        front_of(results, {})
    with pytest.raises(ValueError, match="pair"):
        front_of([1.0], {"loss": "min"})
    with pytest.raises(ValueError, match="nonfinite"):
        front_of(results, {"loss": "min"}, nonfinite="drop")


def test_objective_matrix_feeds_the_hypervolume():
    from gradsurgery.moo import hypervolume

    results = sweep(_fake_run, preference_rays(2, 3))
    matrix, maximize = objective_matrix(results, {"loss_a": "min", "acc_b": "max"})
    # (loss, acc): (0, 0), (0.25, 0.75), (1, 1); ref (1, 0): only the middle point has volume
    assert np.allclose(matrix, [[0.0, 0.0], [0.25, 0.75], [1.0, 1.0]])
    assert hypervolume(matrix, [1.0, 0.0], maximize) == pytest.approx(0.75 * 0.75)
