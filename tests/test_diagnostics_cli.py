"""``gradsurgery groups``: affinity table, recommended groups and heatmap, end to end on the
planted-clusters problem (registered here as a stand-in benchmark), and its errors."""

from __future__ import annotations

import json

import pytest

typer_testing = pytest.importorskip("typer.testing", reason="the CLI extra (typer) is absent")

import gradsurgery.benchmarks as benchmarks  # noqa: E402
from gradsurgery.benchmarks._base import Benchmark, Splits  # noqa: E402
from gradsurgery.cli import app  # noqa: E402
from gradsurgery.datasets.planted_clusters import (  # noqa: E402
    planted_clusters,
    planted_clusters_model,
)
from gradsurgery.training import MultiTaskData, TaskSpec  # noqa: E402

runner = typer_testing.CliRunner()
TASKS = [f"t{i}" for i in range(5)]
SIZES = (3, 2)


def _load(seed: int) -> Splits:
    x, y, _ = planted_clusters(768, SIZES, seed)

    def part(lo: int, hi: int) -> MultiTaskData:
        return MultiTaskData(x[lo:hi], {t: y[lo:hi, i] for i, t in enumerate(TASKS)})

    return Splits(part(0, 512), part(512, 640), part(640, 768))


PLANTED = Benchmark(
    name="planted",
    description="two planted task clusters",
    tasks=[TaskSpec(t, loss="mse") for t in TASKS],
    load=_load,
    make_model=lambda arch, shape: planted_clusters_model(TASKS, shape[0]),
    defaults={"epochs": 2, "batch_size": 64, "lr": 1e-2, "optimizer": "adam"},
)


@pytest.fixture
def planted(monkeypatch):
    def get_benchmark(name: str) -> Benchmark:
        if name != "planted":
            raise ValueError(f"unknown benchmark {name!r}; valid: planted")
        return PLANTED

    monkeypatch.setattr(benchmarks, "get_benchmark", get_benchmark, raising=False)


def test_groups_prints_the_matrix_and_recovers_the_planted_clusters(planted, tmp_path):
    result = runner.invoke(
        app, ["groups", "-b", "planted", "--groups", "2,3", "--every", "2", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "lookahead affinity" in result.output and "2 group(s)" in result.output
    (run,) = [p for p in tmp_path.iterdir() if p.name.endswith("-groups")]
    data = json.loads((run / "groups.json").read_text())
    assert data["tasks"] == TASKS and len(data["affinity"]) == 5
    assert sorted(map(tuple, data["groups"]["2"]["groups"])) == [("t0", "t1", "t2"), ("t3", "t4")]
    assert len(data["groups"]["3"]["groups"]) <= 3
    assert data["groups"]["2"]["exact"] and data["groups"]["2"]["overlap"]
    assert (run / "groups.md").read_text().startswith("# Task groups for planted")
    assert (run / "diagnostics.jsonl").exists()
    pytest.importorskip("matplotlib")
    assert (run / "affinity.png").stat().st_size > 0


def test_groups_partition_mode(planted, tmp_path):
    result = runner.invoke(
        app, ["groups", "-b", "planted", "-k", "2", "--partition", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    (run,) = list(tmp_path.iterdir())
    g = json.loads((run / "groups.json").read_text())["groups"]["2"]
    assert not g["overlap"] and sorted(t for grp in g["groups"] for t in grp) == TASKS


@pytest.mark.parametrize("bad", ["0", "two", "2,,3", ""])
def test_bad_group_budgets_are_an_error(planted, tmp_path, bad):
    result = runner.invoke(
        app, ["groups", "-b", "planted", "--groups", bad, "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "--groups" in result.output


def test_unknown_benchmark_lists_the_valid_names(planted, tmp_path):
    result = runner.invoke(app, ["groups", "-b", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "nope" in result.output and "planted" in result.output
    missing = runner.invoke(app, ["groups", "--out", str(tmp_path)])
    assert missing.exit_code == 2 and "--benchmark" in missing.output


def test_groups_on_yeast_in_fast_mode(tmp_path):
    """The issue's command on the real Yeast data (skipped when its data package is absent)."""
    result = runner.invoke(
        app,
        [
            "groups",
            "--benchmark",
            "yeast",
            "--groups",
            "2,3",
            "--fast",
            "--every",
            "2",
            "--out",
            str(tmp_path),
        ],
    )
    if result.exit_code == 1 and "pip install" in result.output:
        pytest.skip(f"Yeast data not installed: {result.output.strip()[-200:]}")
    assert result.exit_code == 0, result.output
    (run,) = list(tmp_path.iterdir())
    data = json.loads((run / "groups.json").read_text())
    assert len(data["tasks"]) == 14 and not data["groups"]["2"]["exact"]
    covered = {t for g in data["groups"]["3"]["groups"] for t in g}
    assert covered == set(data["tasks"]) and len(data["groups"]["3"]["groups"]) <= 3
