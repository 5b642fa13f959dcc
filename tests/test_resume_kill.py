"""Crash-safe exact resume: a run killed with SIGKILL mid-epoch and resumed from its last
checkpoint ends with the same parameters, bit for bit, as an uninterrupted run (CPU,
deterministic algorithms), for stateful and stochastic methods."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHILD = Path(__file__).with_name("_resume_child.py")
pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")


def _run(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(CHILD), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


SLOW = pytest.mark.slow  # ~10 s each on 2 cores; PCGrad (stochastic) and FAMO (stateful) stay in CI


@pytest.mark.parametrize(
    "method",
    [
        "pcgrad",
        "famo",
        pytest.param("rlw", marks=SLOW),
        pytest.param("gradnorm", marks=SLOW),
        pytest.param("gradvac", marks=SLOW),
        pytest.param("nash_mtl", marks=SLOW),
    ],
)
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, method):
    if method == "nash_mtl":
        pytest.importorskip("cvxpy", reason="NashMTL's solver")
    full = _run(method, tmp_path / "full", tmp_path / "full.pt", 0, 0)
    assert full.returncode == 0, full.stderr
    # 6 steps per epoch: step 15 is in the middle of epoch 3 (epochs 1 and 2 checkpointed)
    killed = _run(method, tmp_path / "crash", tmp_path / "crash.pt", 15, 0)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "crash.pt").exists()
    resumed = _run(method, tmp_path / "crash", tmp_path / "crash.pt", 0, 1)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "full.pt", weights_only=True)
    b = torch.load(tmp_path / "crash.pt", weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the resumed log continues the killed one: epochs 1-2, the lost part of 3, then 3-4 again
    log = (tmp_path / "crash" / "log.jsonl").read_text()
    assert log.count('"event": "epoch"') == 4
