"""Shared fixtures: a small multi-task model with a shared backbone and per-task heads."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from gradsurgery._libmtl import weighting_module

# Tiny tensors: one thread avoids oversubscribing a small CI machine (2 cores) and keeps the
# suite's timings stable when other work shares the cores.
torch.set_num_threads(1)


class TwoLevelModel(nn.Module):
    """A backbone (shared) and one head per task; head "c" has two layers."""

    def __init__(self, tasks: tuple[str, ...] = ("a", "b", "c"), width: int = 8) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, width))
        self.heads = nn.ModuleDict()
        for i, task in enumerate(tasks):
            if i == 2:
                self.heads[task] = nn.Sequential(nn.Linear(width, 4), nn.Tanh(), nn.Linear(4, 1))
            else:
                self.heads[task] = nn.Linear(width, 1)
        self.features: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.relu(self.backbone(x))
        self.features = z
        return {t: h(z).squeeze(-1) for t, h in self.heads.items()}


def make_losses(model: TwoLevelModel, seed: int = 0, n: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    out = model(x)
    targets = {t: torch.randn(n, generator=g) * (i + 1) for i, t in enumerate(out)}
    return {t: (out[t] - targets[t]).pow(2).mean() for t in out}


@pytest.fixture
def model() -> TwoLevelModel:
    torch.manual_seed(0)
    return TwoLevelModel()


def grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        name: None if p.grad is None else p.grad.detach().clone()
        for name, p in module.named_parameters()
    }


def per_task_jacobian(losses: dict[str, torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """Independent reference: J by one autograd.grad per task (T x P), zeros where unused."""
    rows = []
    for loss in losses.values():
        gs_ = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(gs_, params)
                ]
            )
        )
    return torch.stack(rows)


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def libmtl_weighting(name: str) -> types.ModuleType:
    """LibMTL 1.1.5's ``LibMTL.weighting.<name>`` (see ``gradsurgery._libmtl``); skips when
    LibMTL 1.1.5 is not installed (``pip install --no-deps LibMTL==1.1.5``)."""
    try:
        return weighting_module(name)
    except ImportError as error:
        pytest.skip(str(error))


def load_script(path: Path, name: str) -> types.ModuleType:
    """Import a script of examples/ or benchmarks/ by its path, as module ``name``.

    The module is registered in ``sys.modules`` before it runs (dataclasses look their module
    up there); the caller pops it when done.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
