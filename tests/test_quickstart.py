"""The README's main job runs and learns both tasks (its --quick smoke mode)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_quick_mode_learns_both_tasks(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("quickstart", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "quickstart", module)  # dataclasses look themselves up
    spec.loader.exec_module(module)
    results = module.main(["--quick", "--threads", "1"])
    assert set(results) == {"single-task", "equal weights", "PCGrad", "MGDA"}
    for method, per_task in results.items():
        # 5 epochs on digits: far above chance (10% and 50%) for every method
        assert per_task["digit"][0] > 0.8, method
        assert per_task["parity"][0] > 0.8, method
    out = capsys.readouterr().out
    assert "Δm" in out and "PCGrad" in out
