"""Task samplers: exact and empirical frequencies, stratified counts, DoReMi updates, state."""

from __future__ import annotations

import io
import math

import pytest
import torch

from gradsurgery.training.samplers import (
    SAMPLERS,
    DoReMiSampler,
    ProportionalSampler,
    TaskSampler,
    TemperatureSampler,
    UniformSampler,
    make_sampler,
)

SIZES = {"a": 1000, "b": 300, "c": 50, "d": 7}


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _bound(sampler: TaskSampler, sizes: dict[str, int] = SIZES) -> TaskSampler:
    sampler.bind(sizes)
    return sampler


def _p(sampler: TaskSampler) -> torch.Tensor:
    return torch.tensor(list(sampler.probabilities().values()), dtype=torch.float64)


# ------------------------------------------------------------------ exact probabilities


def test_uniform_probabilities_ignore_sizes():
    p = _p(_bound(UniformSampler()))
    torch.testing.assert_close(p, torch.full((4,), 0.25, dtype=torch.float64))


def test_proportional_probabilities():
    p = _p(_bound(ProportionalSampler()))
    n = torch.tensor(list(SIZES.values()), dtype=torch.float64)
    torch.testing.assert_close(p, n / n.sum(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 5.0])
def test_temperature_probabilities(temperature):
    p = _p(_bound(TemperatureSampler(temperature)))
    n = torch.tensor(list(SIZES.values()), dtype=torch.float64)
    expected = n ** (1 / temperature) / (n ** (1 / temperature)).sum()
    torch.testing.assert_close(p, expected, rtol=1e-12, atol=1e-15)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_temperature_limits():
    proportional = _p(_bound(ProportionalSampler()))
    torch.testing.assert_close(_p(_bound(TemperatureSampler(1.0))), proportional)
    uniform = _p(_bound(UniformSampler()))
    torch.testing.assert_close(_p(_bound(TemperatureSampler(math.inf))), uniform)
    near = _p(_bound(TemperatureSampler(1e6)))
    assert (near - uniform).abs().max() < 1e-4
    # higher temperature flattens: the smallest task's share grows monotonically
    shares = [_bound(TemperatureSampler(t)).probabilities()["d"] for t in (1, 2, 5, 50)]
    assert shares == sorted(shares) and shares[0] < shares[-1]


def test_probabilities_keep_task_order():
    sizes = {"z": 3, "a": 1, "m": 2}
    assert list(_bound(ProportionalSampler(), sizes).probabilities()) == ["z", "a", "m"]
    counts = _bound(UniformSampler(), sizes).counts(5, torch.Generator().manual_seed(0))
    assert list(counts) == ["z", "a", "m"]


# ------------------------------------------------------------------ multinomial counts


@pytest.mark.parametrize(
    "sampler",
    [UniformSampler(), ProportionalSampler(), TemperatureSampler(2.0)],
    ids=["uniform", "proportional", "temperature"],
)
def test_empirical_counts_match_probabilities(sampler):
    _bound(sampler)
    p = _p(sampler)
    g = torch.Generator().manual_seed(1)
    batch, steps = 32, 1500
    total = torch.zeros(4, dtype=torch.float64)
    absent = torch.zeros(4)
    for _ in range(steps):
        c = sampler.counts(batch, g)
        assert sum(c.values()) == batch and list(c) == list(SIZES)
        values = torch.tensor(list(c.values()), dtype=torch.float64)
        total += values
        absent += values == 0
    n = batch * steps
    # each task's total is Binomial(n, p_t): within 5 standard deviations
    std = torch.sqrt(n * p * (1 - p))
    assert ((total - n * p).abs() <= 5 * std + 1e-9).all(), (total / n, p)
    # a task is absent from a step with probability (1 - p_t)^B
    expected_absent = steps * (1 - p) ** batch
    absent_std = torch.sqrt(steps * (1 - p) ** batch * (1 - (1 - p) ** batch))
    assert ((absent - expected_absent).abs() <= 5 * absent_std + 1).all()


def test_non_stratified_task_can_be_absent():
    s = _bound(ProportionalSampler())  # p_d = 7/1357: absent from most batches of 8
    g = torch.Generator().manual_seed(0)
    assert any(s.counts(8, g)["d"] == 0 for _ in range(20))


def test_counts_are_reproducible_from_the_generator():
    s = _bound(TemperatureSampler(3.0))
    a = [s.counts(16, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    g = torch.Generator().manual_seed(7)
    draws = [s.counts(16, g) for _ in range(20)]
    assert len({tuple(d.values()) for d in draws}) > 1


# ------------------------------------------------------------------ stratified counts


def test_stratified_every_task_present_and_unbiased():
    s = _bound(ProportionalSampler(stratified=True))
    p = _p(s)
    batch, steps = 16, 3000
    # quotas B p = (11.79, 3.54, 0.59, 0.08): c and d are raised to 1, a and b share 14
    q = batch * p
    q[2:] = 1.0
    q[:2] = 14 * p[:2] / p[:2].sum()
    g = torch.Generator().manual_seed(3)
    total = torch.zeros(4, dtype=torch.float64)
    for _ in range(steps):
        c = torch.tensor(list(s.counts(batch, g).values()), dtype=torch.float64)
        assert c.sum() == batch and (c >= 1).all()
        assert ((c == torch.floor(q)) | (c == torch.ceil(q))).all(), (c, q)
        total += c
    # each count is floor(q) + Bernoulli(frac q): variance <= 1/4 per batch
    assert ((total / steps - q).abs() <= 5 * 0.5 / math.sqrt(steps)).all(), (total / steps, q)


def test_stratified_rounding_is_unbiased_where_largest_remainder_is_not():
    # p = (0.6, 0.4), B = 3: quotas (1.8, 1.2); a deterministic rounding always gives (2, 1)
    s = _bound(ProportionalSampler(stratified=True), {"a": 3, "b": 2})
    g = torch.Generator().manual_seed(0)
    draws = [tuple(s.counts(3, g).values()) for _ in range(4000)]
    assert set(draws) == {(2, 1), (1, 2)}
    share = sum(d[0] for d in draws) / (3 * len(draws))
    assert share == pytest.approx(0.6, abs=5 * math.sqrt(0.16 / 4000) / 3)


def test_stratified_water_filling_exact():
    s = _bound(ProportionalSampler(stratified=True), {"a": 97, "b": 2, "c": 1})
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # quotas (9.7, 0.2, 0.1) -> (8, 1, 1) deterministically
        assert s.counts(10, g) == {"a": 8, "b": 1, "c": 1}
    assert _bound(UniformSampler(stratified=True)).counts(4, g) == dict.fromkeys(SIZES, 1)


def test_stratified_needs_batch_size_at_least_tasks():
    s = _bound(UniformSampler(stratified=True))
    with pytest.raises(ValueError, match=r"batch_size \(3\) must be >= the number of tasks \(4\)"):
        s.counts(3, torch.Generator())


# ------------------------------------------------------------------ DoReMi


def test_doremi_single_update_matches_the_formula():
    s = DoReMiSampler(smoothing=0.1, reference_losses={"a": 1.0, "b": 1.5, "c": 0.0})
    s.bind({"a": 10, "b": 20, "c": 30})
    assert s.probabilities() == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    s.observe({"a": 2.0, "b": 1.0, "c": 0.5})
    excess = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)  # max(L - Lref, 0)
    alpha = torch.softmax(math.log(1 / 3) + excess, 0)
    alpha = 0.9 * alpha + 0.1 / 3
    torch.testing.assert_close(_p(s), alpha, rtol=1e-12, atol=1e-15)
    assert s.excess_losses == pytest.approx({"a": 1.0, "b": 0.0, "c": 0.5})
    # the second update multiplies the smoothed weights again
    s.observe({"a": 2.0, "b": 1.0, "c": 0.5})
    alpha2 = 0.9 * torch.softmax(torch.log(alpha) + excess, 0) + 0.1 / 3
    torch.testing.assert_close(_p(s), alpha2, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(
        torch.tensor(list(s.average_probabilities().values()), dtype=torch.float64),
        (alpha + alpha2) / 2,
    )


def test_doremi_upweights_highest_excess_and_keeps_the_floor():
    s = DoReMiSampler(step_size=1.0, smoothing=1e-3, reference_losses=dict.fromkeys(SIZES, 1.0))
    s.bind(SIZES)
    for _ in range(50):
        s.observe({"a": 1.2, "b": 0.5, "c": 3.0, "d": 1.0})  # excess (0.2, 0, 2, 0)
        p = _p(s)
        assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
        assert (p >= 1e-3 / 4 - 1e-15).all()
    assert max(s.probabilities(), key=s.probabilities().get) == "c"
    p = s.probabilities()
    # at the fixed point b's weight is the floor c/T re-inflated by 1 / (1 - (1 - c) e^-2)
    assert p["c"] > 0.99 and 1e-3 / 4 <= p["b"] < 1.2 * 1e-3 / 4
    assert p["a"] > p["b"]  # a small positive excess still beats none


def test_doremi_none_reference_is_plain_loss():
    s = DoReMiSampler(smoothing=0.0)
    s.bind({"a": 1, "b": 1})
    s.observe({"a": 0.3, "b": 1.3})
    assert s.excess_losses == pytest.approx({"a": 0.3, "b": 1.3})
    assert s.probabilities()["b"] == pytest.approx(1 / (1 + math.exp(-1.0)))


def test_doremi_window_averages_clipped_step_excess():
    s = DoReMiSampler(smoothing=0.0, update_every=3, reference_losses={"a": 2.0, "b": 0.0})
    s.bind({"a": 1, "b": 1})
    s.observe({"a": 3.0, "b": 1.0})
    s.observe({"a": 1.0})  # clipped to 0 (the mean loss 2.0 would give 0 excess)
    assert s.probabilities() == pytest.approx({"a": 0.5, "b": 0.5})  # no update yet
    s.observe({"a": 3.5, "b": 2.0})
    # a: mean(1, 0, 1.5) over 3 steps; b: mean(1, 2) over the 2 steps it was present
    assert s.excess_losses == pytest.approx({"a": 2.5 / 3, "b": 1.5})
    s.observe({"a": 4.0})  # b absent from the new window: keeps its last excess
    s.observe({"a": 4.0})
    s.observe({"a": 4.0})
    assert s.excess_losses == pytest.approx({"a": 2.0, "b": 1.5})


def test_doremi_accepts_scalar_tensors():
    s = DoReMiSampler(smoothing=0.0)
    s.bind({"a": 1, "b": 1})
    s.observe({"a": torch.tensor(1.0), "b": torch.tensor([0.0])})
    assert s.excess_losses == pytest.approx({"a": 1.0, "b": 0.0})


@pytest.mark.parametrize(
    ("losses", "message"),
    [
        ({"x": 1.0}, "unknown task 'x'"),
        ({"a": float("nan")}, "task 'a' is nan"),
        ({"b": float("inf")}, "task 'b' is inf"),
        ({"a": "high"}, "the loss of task 'a' must be a number"),
        ({"a": torch.ones(2)}, "task 'a' must be a scalar"),
    ],
)
def test_doremi_observe_rejects_bad_losses(losses, message):
    s = DoReMiSampler()
    s.bind({"a": 1, "b": 1})
    with pytest.raises(ValueError, match=message):
        s.observe(losses)


def test_doremi_reference_losses_must_name_the_tasks():
    s = DoReMiSampler(reference_losses={"a": 1.0, "zz": 2.0})
    with pytest.raises(ValueError, match=r"missing \['b'\], unknown \['zz'\]"):
        s.bind({"a": 1, "b": 1})
    assert s.tasks == ()  # a failed bind leaves it unbound


def test_rebinding_same_sizes_keeps_state_other_sizes_reset():
    s = DoReMiSampler(smoothing=0.0)
    s.bind({"a": 1, "b": 1})
    s.observe({"a": 2.0, "b": 0.0})
    learned = s.probabilities()
    s.bind({"a": 1, "b": 1})
    assert s.probabilities() == learned
    s.bind({"a": 1, "b": 2})
    assert s.probabilities() == pytest.approx({"a": 0.5, "b": 0.5})


# ------------------------------------------------------------------ state


def _factories():
    return {
        "uniform": lambda: UniformSampler(),
        "proportional": lambda: ProportionalSampler(stratified=True),
        "temperature": lambda: TemperatureSampler(2.0),
        "doremi": lambda: DoReMiSampler(
            step_size=0.5, smoothing=0.01, update_every=2, reference_losses=dict.fromkeys(SIZES, 1)
        ),
        "doremi_stratified": lambda: DoReMiSampler(stratified=True),
    }


def _run(sampler: TaskSampler, g: torch.Generator, steps: int, start: int) -> list:
    out = []
    for i in range(start, start + steps):
        c = sampler.counts(8, g)
        present = [t for t, k in c.items() if k > 0]
        # deterministic losses that differ per task and step
        sampler.observe({t: 1.0 + 0.5 * j + 0.1 * math.sin(i) for j, t in enumerate(present)})
        out.append((c, sampler.probabilities()))
    return out


@pytest.mark.parametrize("name", list(_factories()))
def test_sampler_state_round_trip(name):
    make = _factories()[name]
    reference = _bound(make())
    g = torch.Generator().manual_seed(5)
    full = _run(reference, g, 12, 0)

    s = _bound(make())
    g2 = torch.Generator().manual_seed(5)
    _run(s, g2, 5, 0)
    state = _roundtrip(s.state_dict())
    generator_state = g2.get_state()

    fresh = make()  # unbound: adopts the saved sizes
    fresh.load_state_dict(state)
    assert fresh.tasks == tuple(SIZES)
    g3 = torch.Generator()
    g3.set_state(generator_state)
    assert _run(fresh, g3, 7, 5) == full[5:]
    fresh.bind(SIZES)  # the batch iterator binds again: the state survives
    assert fresh.probabilities() == full[-1][1]


def test_state_before_bind_round_trips():
    s = TemperatureSampler(3.0)
    fresh = TemperatureSampler(3.0)
    fresh.load_state_dict(_roundtrip(s.state_dict()))
    assert fresh.tasks == ()


def test_load_state_checks_kind_config_and_sizes():
    state = _bound(TemperatureSampler(2.0)).state_dict()
    with pytest.raises(ValueError, match="'temperature' sampler, this one is 'uniform'"):
        UniformSampler().load_state_dict(state)
    with pytest.raises(ValueError, match=r"temperature=2\.0, this sampler has temperature=3\.0"):
        TemperatureSampler(3.0).load_state_dict(state)
    with pytest.raises(ValueError, match="stratified=False, this sampler has stratified=True"):
        TemperatureSampler(2.0, stratified=True).load_state_dict(state)
    other = _bound(TemperatureSampler(2.0), {"a": 1, "b": 2})
    with pytest.raises(ValueError, match="bound to"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not a TaskSampler state"):
        UniformSampler().load_state_dict({"alpha": 1})
    doremi = _bound(DoReMiSampler()).state_dict()
    doremi["alpha"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"'alpha' must have shape \(4,\)"):
        DoReMiSampler().load_state_dict(doremi)


# ------------------------------------------------------------------ construction and errors


def test_make_sampler():
    assert set(SAMPLERS) == {"uniform", "proportional", "temperature", "doremi"}
    s = make_sampler("temperature", temperature=3.0, stratified=True)
    assert isinstance(s, TemperatureSampler) and s.temperature == 3.0 and s.stratified
    assert isinstance(make_sampler("doremi", step_size=0.5), DoReMiSampler)
    assert type(make_sampler("uniform")) is UniformSampler
    with pytest.raises(
        ValueError, match="unknown sampler 'random'; valid: uniform, proportional, temperature"
    ):
        make_sampler("random")


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: UniformSampler(stratified=1), "stratified must be True or False"),
        (lambda: TemperatureSampler(0.0), "temperature must be > 0"),
        (lambda: TemperatureSampler(-2.0), "temperature must be > 0"),
        (lambda: TemperatureSampler(float("nan")), "temperature must be a number, got NaN"),
        (lambda: TemperatureSampler("hot"), "temperature must be a number"),
        (lambda: DoReMiSampler(step_size=-1.0), "step_size must be a finite number >= 0"),
        (lambda: DoReMiSampler(step_size=math.inf), "step_size must be a finite number >= 0"),
        (lambda: DoReMiSampler(smoothing=1.5), r"smoothing must be in \[0, 1\]"),
        (lambda: DoReMiSampler(smoothing=-0.1), r"smoothing must be in \[0, 1\]"),
        (lambda: DoReMiSampler(update_every=0), "update_every must be an int >= 1"),
        (lambda: DoReMiSampler(update_every=2.0), "update_every must be an int >= 1"),
        (lambda: DoReMiSampler(reference_losses=[1.0]), "reference_losses must be a mapping"),
        (
            lambda: DoReMiSampler(reference_losses={"a": math.inf}),
            r"reference_losses\['a'\] must be finite",
        ),
    ],
)
def test_bad_arguments(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({}, "non-empty mapping"),
        ([("a", 1)], "non-empty mapping"),
        ({"a": 0}, r"sizes\['a'\] must be an int >= 1"),
        ({"a": 2.0}, r"sizes\['a'\] must be an int >= 1"),
        ({1: 2}, "task names must be non-empty str"),
    ],
)
def test_bad_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        UniformSampler().bind(sizes)


def test_use_before_bind_and_bad_counts_arguments():
    s = ProportionalSampler()
    with pytest.raises(RuntimeError, match=r"not bound: call bind\(sizes\) first"):
        s.probabilities()
    with pytest.raises(RuntimeError, match="not bound"):
        s.counts(4, torch.Generator())
    with pytest.raises(RuntimeError, match="not bound"):
        DoReMiSampler().observe({"a": 1.0})
    s.bind({"a": 2})
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        s.counts(0, torch.Generator())
    with pytest.raises(ValueError, match=r"generator must be a CPU torch\.Generator"):
        s.counts(4, 0)
    assert s.counts(4, torch.Generator()) == {"a": 4}  # a single task takes the whole batch
