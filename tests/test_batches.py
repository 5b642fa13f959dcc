"""Batch iterators: coverage, determinism, and exact resumption from a state."""

from __future__ import annotations

import io
import math

import pytest
import torch

from gradsurgery.training.batches import MultiInputBatches, SameInputBatches
from gradsurgery.training.data import MultiInputData, MultiTaskData
from gradsurgery.training.samplers import (
    DoReMiSampler,
    ProportionalSampler,
    TaskSampler,
    TemperatureSampler,
    UniformSampler,
)


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _same_data(n: int = 23) -> MultiTaskData:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    mask = torch.arange(n) % 3 != 0
    return MultiTaskData(x, {"a": 10 * torch.arange(n), "b": -torch.arange(n)}, {"b": mask})


def _ids(batch: MultiTaskData) -> list[int]:
    return batch.x[:, 0].long().tolist()


def _epoch_ids(batches: SameInputBatches) -> list[list[int]]:
    return [_ids(b) for b in batches]


# ------------------------------------------------------------------ SameInputBatches


def test_same_input_epoch_covers_every_example_once_and_aligns_targets():
    data = _same_data(23)
    batches = SameInputBatches(data, 5)
    assert len(batches) == 5
    seen = []
    for b in batches:
        ids = _ids(b)
        assert b.targets["a"].tolist() == [10 * i for i in ids]
        assert b.targets["b"].tolist() == [-i for i in ids]
        assert b.mask("b").tolist() == [i % 3 != 0 for i in ids]
        assert b.mask("a").all()
        seen += ids
    assert sorted(seen) == list(range(23))
    assert seen != list(range(23))  # shuffled
    assert batches.epoch == 1 and batches.position == 0


def test_same_input_sizes_and_drop_last():
    data = _same_data(23)
    sizes = [len(b) for b in SameInputBatches(data, 5)]
    assert sizes == [5, 5, 5, 5, 3]
    dropped = SameInputBatches(data, 5, drop_last=True)
    assert len(dropped) == 4
    assert [len(b) for b in dropped] == [5, 5, 5, 5]
    assert len(SameInputBatches(data, 23)) == 1 and len(SameInputBatches(data, 100)) == 1


def test_same_input_reshuffles_each_epoch_and_is_seeded():
    data = _same_data(23)
    a = SameInputBatches(data, 4, seed=3)
    epochs = [_epoch_ids(a) for _ in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
    b = SameInputBatches(data, 4, seed=3)
    assert [_epoch_ids(b) for _ in range(3)] == epochs
    c = SameInputBatches(data, 4, seed=4)
    assert _epoch_ids(c) != epochs[0]
    # epoch e is the e-th randperm of a generator seeded with seed
    g = torch.Generator().manual_seed(3)
    torch.randperm(23, generator=g)
    second = torch.randperm(23, generator=g).tolist()
    assert [i for ids in epochs[1] for i in ids] == second


def test_same_input_without_shuffle_keeps_order():
    batches = SameInputBatches(_same_data(7), 3, shuffle=False)
    for _ in range(2):
        assert _epoch_ids(batches) == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("stop", [0, 2, 5, 13])  # batches handed out before the save
def test_same_input_state_round_trip(stop, shuffle):
    data = _same_data(23)
    full = SameInputBatches(data, 5, shuffle=shuffle, seed=11)
    expected = [ids for _ in range(4) for ids in _epoch_ids(full)]

    run = SameInputBatches(data, 5, shuffle=shuffle, seed=11)
    got: list[list[int]] = []
    while len(got) < stop:  # stop mid-epoch: leave the loop without finishing it
        for b in run:
            got.append(_ids(b))
            if len(got) == stop:
                break
    state = _roundtrip(run.state_dict())

    resumed = SameInputBatches(data, 5, shuffle=shuffle, seed=999)  # the state wins
    resumed.load_state_dict(state)
    assert resumed.epoch == stop // 5 and resumed.position == stop % 5
    while len(got) < len(expected):
        got += _epoch_ids(resumed)
    assert got == expected


def test_same_input_state_after_last_batch_resumes_at_next_epoch():
    data = _same_data(10)
    run = SameInputBatches(data, 4)
    states = []
    for _ in run:
        states.append(run.state_dict())
    assert states[-1]["epoch"] == 1 and states[-1]["position"] == 0
    nxt = _epoch_ids(run)
    resumed = SameInputBatches(data, 4)
    resumed.load_state_dict(states[-1])
    assert _epoch_ids(resumed) == nxt


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"batch_size": 2.0}, "batch_size must be an int >= 1"),
        ({"batch_size": True}, "batch_size must be an int >= 1"),
        ({"batch_size": 4, "shuffle": "yes"}, "shuffle must be True or False"),
        ({"batch_size": 4, "drop_last": 1}, "drop_last must be True or False"),
        ({"batch_size": 4, "seed": -1}, r"seed must be an int in \[0, 2\*\*63\)"),
        ({"batch_size": 4, "seed": 1.5}, "seed must be an int"),
        ({"batch_size": 30, "drop_last": True}, "leaves no batch"),
    ],
)
def test_same_input_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SameInputBatches(_same_data(23), **kwargs)


def test_same_input_rejects_other_data_and_bad_states():
    with pytest.raises(ValueError, match="data must be a MultiTaskData"):
        SameInputBatches({"a": torch.zeros(3)}, 2)
    with pytest.raises(ValueError, match="data has no examples"):
        SameInputBatches(MultiTaskData(torch.zeros(0, 2), {"a": torch.zeros(0)}), 2)
    state = SameInputBatches(_same_data(23), 5).state_dict()
    with pytest.raises(ValueError, match="saved with batch_size=5, this iterator has batch_size=4"):
        SameInputBatches(_same_data(23), 4).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with examples=23, this iterator has examples=24"):
        SameInputBatches(_same_data(24), 5).load_state_dict(state)
    with pytest.raises(ValueError, match=r"missing \['epoch', 'position'"):
        SameInputBatches(_same_data(23), 5).load_state_dict({"generator": state["generator"]})
    bad = dict(state, position=5)
    with pytest.raises(ValueError, match=r"position 5 outside \[0, 5\)"):
        SameInputBatches(_same_data(23), 5).load_state_dict(bad)
    bad = dict(state, generator=torch.zeros(3))
    with pytest.raises(ValueError, match="must be a uint8 tensor"):
        SameInputBatches(_same_data(23), 5).load_state_dict(bad)


# ------------------------------------------------------------------ MultiInputBatches

SIZES = {"a": 40, "b": 13, "c": 5}
OFFSET = {"a": 0, "b": 1000, "c": 2000}


def _multi_data(sizes: dict[str, int] = SIZES) -> MultiInputData:
    sets = {}
    for t, n in sizes.items():
        ids = torch.arange(n) + OFFSET[t]
        sets[t] = (ids.float().unsqueeze(1).repeat(1, 2), -ids)
    return MultiInputData(sets)


def _multi_ids(batch: dict) -> dict[str, list[int]]:
    return {t: (x[:, 0].long() - OFFSET[t]).tolist() for t, (x, _) in batch.items()}


def _losses(batch: dict, step: int) -> dict[str, float]:
    """Deterministic per-task losses from the batch content, different per task."""
    return {
        t: float(y.float().abs().mean()) / 1000.0 + 0.3 * j + 0.05 * math.cos(step)
        for j, (t, (_, y)) in enumerate(batch.items())
    }


def test_multi_input_batches_sum_to_batch_size_and_align():
    batches = MultiInputBatches(_multi_data(), TemperatureSampler(2.0), 8)
    assert len(batches) == math.ceil(58 / 8) == batches.steps_per_epoch
    n = 0
    for batch in batches:
        n += 1
        assert sum(len(x) for x, _ in batch.values()) == 8
        assert all(len(x) > 0 for x, _ in batch.values())
        assert list(batch) == [t for t in SIZES if t in batch]
        for x, y in batch.values():
            assert torch.equal(y, -x[:, 0].long())
            assert x.shape[1:] == (2,)
    assert n == 8 and batches.epoch == 1
    assert len(MultiInputBatches(_multi_data(), UniformSampler(), 8, steps_per_epoch=3)) == 3


def test_multi_input_streams_see_every_example_once_per_pass():
    batches = MultiInputBatches(_multi_data(), UniformSampler(), 7, steps_per_epoch=50)
    streams: dict[str, list[int]] = {t: [] for t in SIZES}
    for batch in batches:
        for t, ids in _multi_ids(batch).items():
            streams[t] += ids
    for t, n in SIZES.items():
        drawn = streams[t]
        passes = len(drawn) // n
        assert passes >= 2, (t, len(drawn))
        for k in range(passes):
            assert sorted(drawn[k * n : (k + 1) * n]) == list(range(n)), (t, k)
        assert drawn[:n] != drawn[n : 2 * n]  # each pass is reshuffled


def test_multi_input_stratified_sampler_gives_every_task():
    batches = MultiInputBatches(_multi_data(), ProportionalSampler(stratified=True), 4)
    for _ in range(3):
        for batch in batches:
            assert list(batch) == list(SIZES)
    with pytest.raises(ValueError, match=r"batch_size \(2\) must be >= the number of tasks \(3\)"):
        MultiInputBatches(_multi_data(), UniformSampler(stratified=True), 2)


def test_multi_input_absent_tasks_are_left_out():
    batches = MultiInputBatches(_multi_data(), ProportionalSampler(), 2, steps_per_epoch=40)
    keys = [tuple(b) for b in batches]
    assert any(len(k) < 3 for k in keys)
    assert all(len(k) >= 1 for k in keys)


def test_multi_input_frequencies_follow_the_sampler():
    sampler = UniformSampler()
    batches = MultiInputBatches(_multi_data(), sampler, 16, steps_per_epoch=400)
    total = dict.fromkeys(SIZES, 0)
    for batch in batches:
        for t, (x, _) in batch.items():
            total[t] += len(x)
    n = 16 * 400
    for t in SIZES:  # Binomial(n, 1/3) each
        assert abs(total[t] - n / 3) <= 5 * math.sqrt(n * (1 / 3) * (2 / 3))


def test_multi_input_is_seeded():
    def run(seed: int) -> list:
        b = MultiInputBatches(_multi_data(), TemperatureSampler(2.0), 6, seed=seed)
        return [_multi_ids(x) for _ in range(2) for x in b]

    assert run(1) == run(1)
    assert run(1) != run(2)


def _drive(batches: MultiInputBatches, steps: int, start: int, out: list) -> None:
    """Consume ``steps`` batches across epochs, feeding the sampler like the Trainer does."""
    step = start
    while step < start + steps:
        for batch in batches:
            out.append((_multi_ids(batch), batches.sampler.probabilities()))
            batches.sampler.observe(_losses(batch, step))
            step += 1
            if step == start + steps:
                break


def _samplers() -> dict:
    return {
        "uniform": lambda: UniformSampler(),
        "proportional": lambda: ProportionalSampler(stratified=True),
        "temperature": lambda: TemperatureSampler(3.0),
        "doremi": lambda: DoReMiSampler(step_size=2.0, smoothing=0.05),
        "doremi_stratified": lambda: DoReMiSampler(stratified=True, update_every=3),
    }


@pytest.mark.parametrize("name", list(_samplers()))
@pytest.mark.parametrize("stop", [3, 8, 13])  # mid-epoch, epoch boundary (8 steps), later
def test_multi_input_state_round_trip(name, stop):
    make = _samplers()[name]
    total = 30
    full: list = []
    _drive(MultiInputBatches(_multi_data(), make(), 8, seed=5), total, 0, full)

    got: list = []
    run = MultiInputBatches(_multi_data(), make(), 8, seed=5)
    _drive(run, stop, 0, got)
    state = _roundtrip(run.state_dict())

    # the Trainer's resume path: a fresh sampler and a fresh iterator, then load
    resumed = MultiInputBatches(_multi_data(), make(), 8, seed=123)
    resumed.load_state_dict(state)
    assert resumed.epoch == stop // 8 and resumed.position == stop % 8
    _drive(resumed, total - stop, stop, got)
    assert got == full
    if name.startswith("doremi"):  # the sampler learned something, and it was restored
        assert full[-1][1] != pytest.approx(full[0][1])


def test_multi_input_state_holds_the_sampler_state():
    sampler = DoReMiSampler(smoothing=0.0)
    batches = MultiInputBatches(_multi_data(), sampler, 8)
    _drive(batches, 5, 0, [])
    state = batches.state_dict()
    assert state["sampler"]["name"] == "doremi"
    fresh = DoReMiSampler(smoothing=0.0)
    MultiInputBatches(_multi_data(), fresh, 8).load_state_dict(state)
    assert fresh.probabilities() == sampler.probabilities()


class _BadSampler(TaskSampler):
    name = "bad"

    def _compute_probabilities(self) -> torch.Tensor:
        return torch.full((len(self.tasks),), 1.0 / len(self.tasks), dtype=torch.float64)

    def counts(self, batch_size, generator):
        return {"a": batch_size - 1}


def test_multi_input_checks_counts_and_arguments():
    with pytest.raises(ValueError, match="expected non-negative ints"):
        next(iter(MultiInputBatches(_multi_data(), _BadSampler(), 4)))
    with pytest.raises(ValueError, match="data must be a MultiInputData"):
        MultiInputBatches(_same_data(), UniformSampler(), 4)
    with pytest.raises(ValueError, match="sampler must be a TaskSampler"):
        MultiInputBatches(_multi_data(), "uniform", 4)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        MultiInputBatches(_multi_data(), UniformSampler(), 0)
    with pytest.raises(ValueError, match="steps_per_epoch must be an int >= 1"):
        MultiInputBatches(_multi_data(), UniformSampler(), 4, steps_per_epoch=0)
    with pytest.raises(ValueError, match="seed must be an int"):
        MultiInputBatches(_multi_data(), UniformSampler(), 4, seed="0")


def test_multi_input_rejects_mismatched_states():
    state = MultiInputBatches(_multi_data(), UniformSampler(), 8).state_dict()
    other = MultiInputBatches(_multi_data({"a": 40, "b": 14, "c": 5}), UniformSampler(), 8)
    with pytest.raises(ValueError, match="saved for task sizes"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="saved with batch_size=8, this iterator has batch_size=4"):
        MultiInputBatches(_multi_data(), UniformSampler(), 4).load_state_dict(state)
    with pytest.raises(ValueError, match="'temperature' sampler"):
        MultiInputBatches(_multi_data(), UniformSampler(), 8).load_state_dict(
            MultiInputBatches(_multi_data(), TemperatureSampler(), 8).state_dict()
        )
    bad = dict(state, streams=dict(state["streams"]))
    bad["streams"]["b"] = dict(bad["streams"]["b"], permutation=torch.arange(5))
    with pytest.raises(ValueError, match=r"stream 'b': permutation must have shape \(13,\)"):
        MultiInputBatches(_multi_data(), UniformSampler(), 8).load_state_dict(bad)
    with pytest.raises(ValueError, match=r"missing \["):
        MultiInputBatches(_multi_data(), UniformSampler(), 8).load_state_dict({"epoch": 0})
