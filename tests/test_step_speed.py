"""Smoke test of benchmarks/step_speed.py: its contenders run and its report renders.

Nothing here asserts a speed (timings belong to the benchmark, never to a unit test); it
checks that every gs contender completes a step, that the memory probe reports a peak, and
that ``--report --markdown`` rewrites only its own block of a Markdown file. TorchJD and
LibMTL contenders are skipped to keep it short.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_speed.py"


@pytest.fixture(scope="module")
def step_speed():
    module = load_script(SCRIPT, "step_speed_under_test")
    yield module
    sys.modules.pop("step_speed_under_test", None)


def test_quick_run_and_report(step_speed, tmp_path):
    threads = torch.get_num_threads()
    results = tmp_path / "speed.json"
    try:
        step_speed.main(
            [
                "--quick",
                "--threads",
                "1",
                "--skip",
                "torchjd,libmtl",
                "--memory",
                "--json",
                str(results),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    report = json.loads(results.read_text())
    runs = sorted(report["runs"].values(), key=lambda r: r["meta"]["tasks"])
    assert [r["meta"]["tasks"] for r in runs] == [2, 10]
    for run in runs:
        rows = {row["contender"]: row for row in run["rows"]}
        assert {"plain", "gs pcgrad", "gs pcgrad features", "gs pcgrad loop", "naive loop"} <= set(
            rows
        )
        assert not any("torchjd" in name or "libmtl" in name for name in rows)
        for row in rows.values():
            assert row["median_ms"] > 0 and row["x_plain"] > 0
            assert row["peak_mib"] is not None and row["peak_mib"] >= 0
        assert run["meta"]["threads"] == 1 and run["meta"]["allocator"] == "default"

    doc = tmp_path / "performance.md"
    block = "<!-- step_speed:begin -->\nold\n<!-- step_speed:end -->"
    doc.write_text(f"# Title\n\nkept above\n\n{block}\nkept below\n")
    step_speed.main(["--report", str(results), "--markdown", str(doc)])
    text = doc.read_text()
    step_speed.main(["--report", str(results), "--markdown", str(doc)])
    assert doc.read_text() == text  # rewriting again changes nothing
    assert text.count("<!-- step_speed:begin -->") == 1 and "old\n" not in text
    assert text.startswith("# Title\n\nkept above") and text.rstrip().endswith("kept below")
    assert "#### MLP (cpu, float32)" in text
    assert "| 10 | pcgrad |" in text


def test_bad_arguments_are_refused(step_speed):
    for argv in (
        ["--models", "resnet"],
        ["--methods", "famo"],
        ["--tasks", "0"],
        ["--repeats", "0"],
    ):
        with pytest.raises(SystemExit):
            step_speed.parse_args(argv)
