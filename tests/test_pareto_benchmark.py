"""The fixed-weight front of a benchmark (Trainer-based sweep) and the `gradsurgery pareto`
command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradsurgery.benchmarks import get_benchmark
from gradsurgery.benchmarks.pareto import ParetoReport, pareto_benchmark
from gradsurgery.cli import _shrink


def _report() -> ParetoReport:
    r = ParetoReport("toy", ["a/acc", "b/acc"], [True, True], "weighted_sum")
    for w, v in [
        ((1, 0), (0.9, 0.5)),
        ((0.5, 0.5), (0.8, 0.8)),
        ((0, 1), (0.5, 0.9)),
        ((0.7, 0.3), (0.7, 0.7)),
    ]:
        r.sweep.append({"weights": list(w), "values": list(v), "source": "ray"})
    r.methods = {"inside": [0.6, 0.6], "beyond": [0.85, 0.85]}
    return r


def test_report_front_dominance_and_hypervolume_by_hand():
    r = _report()
    assert r.front_mask().tolist() == [True, True, True, False]
    ref = r.reference_point()
    # worst values 0.5 and 0.5, range 0.4: moved out by 5% of it
    assert np.allclose(ref, [0.48, 0.48])
    # union of boxes [0.48, x] x [0.48, y] for (0.9,0.5), (0.8,0.8), (0.5,0.9), by hand
    hv = (0.8 - 0.48) * (0.8 - 0.48) + (0.9 - 0.8) * (0.5 - 0.48) + (0.5 - 0.48) * (0.9 - 0.8)
    assert r.hypervolume() == pytest.approx(hv)
    rows = {row["method"]: row for row in r.summary()}
    assert rows["inside"]["dominated_by_front"] and rows["inside"]["hv_gain"] == pytest.approx(0)
    assert not rows["beyond"]["dominated_by_front"] and rows["beyond"]["hv_gain"] > 0
    assert "| inside |" in r.markdown()


def test_sweep_on_a_benchmark_fast():
    bench = get_benchmark("mmoe-synthetic")
    report = pareto_benchmark(
        bench, 3, ["pcgrad"], overrides={"epochs": 1}, shrink=_shrink, seeds=[0, 1]
    )
    assert [s["weights"] for s in report.sweep] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    assert len(report.method_runs["pcgrad"]) == 2
    assert len(report.methods["pcgrad"]) == 2 and report.maximize == [False, False]
    assert report.front_mask().any()


def test_nsga2_search_adds_runs():
    pytest.importorskip("pymoo")
    bench = get_benchmark("mmoe-synthetic")
    report = pareto_benchmark(
        bench, 2, [], overrides={"epochs": 1}, shrink=_shrink, search="nsga2", budget=3
    )
    sources = [s["source"] for s in report.sweep]
    assert sources == ["ray", "ray", "nsga2", "nsga2", "nsga2"]
    for s in report.sweep:
        assert sum(s["weights"]) == pytest.approx(1.0) and min(s["weights"]) >= 0


def test_bad_arguments():
    bench = get_benchmark("mmoe-synthetic")
    with pytest.raises(ValueError, match="scalarization"):
        pareto_benchmark(bench, 3, [], scalarization="lexicographic")
    with pytest.raises(ValueError, match="rays"):
        pareto_benchmark(bench, 0, [])
    with pytest.raises(ValueError, match="budget"):
        pareto_benchmark(bench, 3, [], search="nsga2")
    with pytest.raises(ValueError, match="unknown method"):
        pareto_benchmark(bench, 3, ["nope"])


def test_cli_pareto_fast(tmp_path):
    typer_testing = pytest.importorskip("typer.testing")
    from gradsurgery.cli import app

    result = typer_testing.CliRunner().invoke(
        app,
        [
            "pareto",
            "-b",
            "mmoe-synthetic",
            "--rays",
            "3",
            "--methods",
            "mgda",
            "--fast",
            "--out",
            str(tmp_path),
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    (run,) = list(tmp_path.iterdir())
    data = json.loads((run / "pareto.json").read_text())
    assert len(data["sweep"]) == 3 and data["methods"][0]["method"] == "mgda"
    assert "dominated" in result.output
