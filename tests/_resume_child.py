"""Child process for tests/test_resume_kill.py: train, optionally SIGKILL itself mid-epoch.

Usage: python _resume_child.py METHOD RUN_DIR OUT_FILE KILL_AT_STEP RESUME
(KILL_AT_STEP 0: never; RESUME 1: resume=True).
"""

from __future__ import annotations

import os
import signal
import sys

import torch

import gradsurgery as gs
from gradsurgery.training import Callback, MultiTaskData, TaskSpec, Trainer

METHODS = {
    "pcgrad": lambda: gs.PCGrad(seed=7),
    "rlw": lambda: gs.RLW(seed=7),
    "gradnorm": gs.GradNorm,
    "famo": gs.FAMO,
    "gradvac": gs.GradVac,
    "nash_mtl": gs.NashMTL,
}


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, record):
        if record["step"] == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    method, run_dir, out, kill_at, resume = sys.argv[1:6]
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    data = MultiTaskData(
        x,
        {
            "a": (x[:, 0] > 0).long(),
            "b": x[:, 1] - 2 * x[:, 2],
            "c": (x[:, 3] + x[:, 4] > 0).long(),
        },
    )
    torch.manual_seed(0)
    model = gs.models.SharedBottom({"a": 2, "b": 1, "c": 2}, in_features=6, hidden=[16, 8])
    specs = [TaskSpec("a"), TaskSpec("b", loss="mse"), TaskSpec("c")]
    callbacks = [KillAt(int(kill_at))] if int(kill_at) > 0 else []
    trainer = Trainer(
        model,
        specs,
        METHODS[method](),
        epochs=4,
        batch_size=16,
        run_dir=run_dir,
        resume=resume == "1",
        callbacks=callbacks,
        tensorboard=False,
        restore_best=False,
    )
    trainer.fit(data, data)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)


if __name__ == "__main__":
    main()
