"""Worker for tests/test_distributed.py: a few steps of gs.backward on one rank's half batch
(or on the full batch with no process group), parameters saved for comparison."""

from __future__ import annotations

import os
import sys

import torch

import gradsurgery as gs

STEPS = 5


def make_method(name: str) -> gs.Method:
    return {
        "equal": lambda: gs.EqualWeights(),
        "pcgrad": lambda: gs.PCGrad(seed=3),
        "mgda": lambda: gs.MGDA(),
        "cagrad": lambda: gs.CAGrad(c=0.4),
        "gradnorm": lambda: gs.GradNorm(alpha=1.5),
        "famo": lambda: gs.FAMO(),
        "uncertainty": lambda: gs.UncertaintyWeighting(tasks=["a", "b", "c"]),
        "mgda-features": lambda: gs.MGDA(),
        "graddrop": lambda: gs.GradDrop(seed=3),
        "nash_mtl": lambda: gs.NashMTL(),
        "gradvac": lambda: gs.GradVac(seed=3),
    }[name]()


def data() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)
    y = {
        "a": x[:, 0] - x[:, 1],
        "b": -x[:, 0] + 0.5 * x[:, 2],  # conflicts with a on x0
        "c": x[:, 3] * x[:, 4],
    }
    return x, y


def train(method_name: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = gs.models.SharedBottom({"a": 1, "b": 1, "c": 1}, in_features=5, hidden=[8, 6])
    model.double()
    method = make_method(method_name).double()
    params = list(model.parameters()) + list(method.parameters())
    opt = torch.optim.SGD(params, lr=0.05)
    x, y = data()
    half = x.shape[0] // world
    rows = slice(rank * half, (rank + 1) * half)
    features = method_name.endswith("-features")
    for _ in range(STEPS):
        out = model(x[rows])
        losses = {t: (out[t].squeeze(-1) - y[t][rows]).pow(2).mean() for t in out}
        opt.zero_grad()
        gs.backward(
            losses,
            list(model.shared_parameters()),
            method=method,
            features=model.features if features else None,
        )
        opt.step()
        if hasattr(method, "after_step"):
            with torch.no_grad():
                out = model(x[rows])
                new = {t: (out[t].squeeze(-1) - y[t][rows]).pow(2).mean() for t in out}
            method.after_step(lambda new=new: new)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def worker(rank: int, world: int, method_name: str, out_dir: str, init_file: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        gs.distributed.set_debug(True)
        state = train(method_name, rank, world)
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":  # single process, full batch: the reference
    name, out = sys.argv[1:3]
    torch.save(train(name, 0, 1), out)


def train_with_trainer(method_name: str, run_dir: str | None) -> dict[str, torch.Tensor]:
    from gradsurgery.training import MultiTaskData, TaskSpec, Trainer

    x, y = data()
    torch.manual_seed(0)
    model = gs.models.SharedBottom({"a": 1, "b": 1, "c": 1}, in_features=5, hidden=[8, 6])
    model.double()
    specs = [TaskSpec(t, loss="mse") for t in "abc"]
    trainer = Trainer(
        model,
        specs,
        make_method(method_name).double(),
        batch_size=16,
        epochs=2,
        lr=1e-2,
        run_dir=run_dir,
        tensorboard=False,
    )
    trainer.fit(MultiTaskData(x, y))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trainer_worker(rank: int, world: int, method_name: str, out_dir: str, init_file: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        state = train_with_trainer(method_name, os.path.join(out_dir, "run"))
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def absent_worker(rank: int, world: int, out_dir: str, init_file: str) -> None:
    """Task b is absent on rank 1 only: every rank must raise the same clear error."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        torch.manual_seed(0)
        model = gs.models.SharedBottom({"a": 1, "b": 1}, in_features=5, hidden=[4])
        out = model(torch.randn(4, 5))
        losses = {"a": out["a"].pow(2).mean(), "b": out["b"].pow(2).mean()}
        if rank == 1:
            losses["b"] = torch.zeros(())
        try:
            gs.backward(losses, list(model.shared_parameters()), method=gs.MGDA())
            message = "no error"
        except ValueError as e:
            message = str(e)
        with open(os.path.join(out_dir, f"err{rank}.txt"), "w") as f:
            f.write(message)
    finally:
        torch.distributed.destroy_process_group()
