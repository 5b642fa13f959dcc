"""Training conveniences built on :func:`gradsurgery.backward`: the Trainer, task specs,
metrics and delta-m, task samplers, batch iterators, checkpoints and callbacks."""

from gradsurgery.training.batches import MultiInputBatches, SameInputBatches
from gradsurgery.training.callbacks import (
    Callback,
    GradientStats,
    JsonlLogger,
    ProgressBar,
    TensorBoardLogger,
)
from gradsurgery.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)
from gradsurgery.training.data import MultiInputData, MultiTaskData
from gradsurgery.training.metrics import accuracy, auc, delta_m, mae, mse, rmse
from gradsurgery.training.samplers import (
    DoReMiSampler,
    ProportionalSampler,
    TaskSampler,
    TemperatureSampler,
    UniformSampler,
    make_sampler,
)
from gradsurgery.training.tasks import Metric, TaskSpec
from gradsurgery.training.trainer import FitResult, Trainer

__all__ = [
    "Callback",
    "CheckpointError",
    "DoReMiSampler",
    "FitResult",
    "GradientStats",
    "JsonlLogger",
    "Metric",
    "MultiInputBatches",
    "MultiInputData",
    "MultiTaskData",
    "ProgressBar",
    "ProportionalSampler",
    "SameInputBatches",
    "TaskSampler",
    "TaskSpec",
    "TemperatureSampler",
    "TensorBoardLogger",
    "Trainer",
    "UniformSampler",
    "accuracy",
    "auc",
    "delta_m",
    "load_checkpoint",
    "load_latest",
    "mae",
    "make_sampler",
    "mse",
    "rmse",
    "save_checkpoint",
]
