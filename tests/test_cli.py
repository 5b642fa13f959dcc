"""The `gradsurgery` command: list, errors with valid names, config validation, and the demo
in its fast mode (the main job, end to end)."""

from __future__ import annotations

import json

import pytest

typer_testing = pytest.importorskip("typer.testing", reason="the CLI extra (typer) is absent")

from gradsurgery.cli import DEMO_METHODS, app  # noqa: E402

runner = typer_testing.CliRunner()


def test_list_names_methods_models_and_benchmarks():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    for name in ("pcgrad", "mgda", "gradnorm", "SharedBottom", "MMoE", "multimnist", "yeast"):
        assert name in result.output


def test_unknown_benchmark_lists_the_valid_names(tmp_path):
    result = runner.invoke(app, ["bench", "--benchmark", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "nope" in result.output and "multimnist" in result.output


def test_unknown_method_lists_the_valid_names(tmp_path):
    result = runner.invoke(
        app, ["bench", "-b", "multimnist", "--methods", "equal,magic", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "magic" in result.output and "pcgrad" in result.output


def test_config_with_an_unknown_key_is_an_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("benchmark: multimnist\nmethods: [equal]\nlearning_rate: 0.1\n")
    result = runner.invoke(app, ["bench", "--config", str(cfg), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "learning_rate" in result.output and "valid" in result.output


def test_bench_from_a_config_in_fast_mode(tmp_path):
    pytest.importorskip("sklearn")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "benchmark: mmoe-synthetic\nmethods: {equal: {}, cagrad: {c: 0.4}}\nseeds: 1\n"
        f"epochs: 1\nout: {tmp_path / 'runs'}\n"
    )
    result = runner.invoke(app, ["bench", "--config", str(cfg), "--fast"])
    assert result.exit_code == 0, result.output
    (run,) = [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]
    data = json.loads((run / "results.json").read_text())
    assert data["methods"] == ["equal", "cagrad"]
    assert {r["method"] for r in data["runs"]} == {"single_task", "equal", "cagrad"}


def test_demo_fast_runs_end_to_end(tmp_path):
    from gradsurgery.benchmarks import get_benchmark
    from gradsurgery.benchmarks._base import MissingDataError

    try:
        get_benchmark("multimnist").load(0)
    except MissingDataError as e:
        pytest.skip(str(e))
    result = runner.invoke(
        app, ["demo", "--fast", "--seeds", "1", "--out", str(tmp_path), "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    (run,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    data = json.loads((run / "results.json").read_text())
    rows = {row["method"]: row for row in data["summary"]}
    assert set(rows) == {"single_task", *DEMO_METHODS}
    assert rows["equal"]["time_ratio"] == pytest.approx(1.0)
    for row in rows.values():
        for mean, _ in row["metrics"].values():
            assert 0.0 <= mean <= 1.0  # accuracies
    table = (run / "results.md").read_text()
    assert "| pcgrad |" in table and "delta-m" in table
    assert str(run) in result.output.replace("\n", "")
    if pytest.importorskip("matplotlib"):
        for name in ("loss_curves.png", "task_weights.png", "grad_cosine.png"):
            assert (run / name).stat().st_size > 1000
    # the baseline is cached: a second demo reuses it
    cache = list((tmp_path / ".baselines").glob("multimnist-seed0-*.json"))
    assert len(cache) == 1
