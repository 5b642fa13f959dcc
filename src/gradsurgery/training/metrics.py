r"""Per-task metrics and the multi-task performance delta (delta-m).

Metrics take the predictions and targets of a whole evaluation set (present labels only) and
return a float. :func:`delta_m` is the average relative change against single-task baselines:

.. math::  \Delta_m = \frac{100}{K} \sum_{k=1}^{K} (-1)^{h_k} \frac{M_k - B_k}{B_k}

over all K metrics of all tasks, with ``h_k = 1`` when higher is better (so an improvement is
always positive). Reference: Kevis-Kokitsi Maninis, Ilija Radosavovic, Iasonas Kokkinos.
"Attentive Single-Tasking of Multiple Tasks". CVPR 2019. arXiv:1904.08918 (the sign convention
of later work, e.g. Liu et al. 2021, makes higher better: we report ``-Delta`` of the formula
above as "improvement", i.e. positive is better than single-task).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from gradsurgery.training.tasks import Metric

__all__ = [
    "accuracy",
    "auc",
    "default_metrics",
    "delta_m",
    "mae",
    "mse",
    "rmse",
]


def _labels(pred: Tensor) -> Tensor:
    """Class predictions: argmax of (B, C) logits, or logit > 0 for (B,) / (B, 1) logits."""
    if pred.dim() >= 2 and pred.shape[-1] > 1:
        return pred.argmax(dim=-1)
    return (pred.reshape(pred.shape[0], -1) > 0).long().squeeze(-1)


def _accuracy(pred: Tensor, target: Tensor) -> float:
    labels = _labels(pred)
    return float((labels == target.reshape(labels.shape).long()).double().mean())


def _auc(pred: Tensor, target: Tensor) -> float:
    """ROC AUC of binary logits (the Mann-Whitney statistic, ties counted one half)."""
    score = pred.reshape(-1).double()
    y = target.reshape(-1).double()
    pos, neg = int((y > 0.5).sum()), int((y <= 0.5).sum())
    if pos == 0 or neg == 0:
        return math.nan
    order = torch.argsort(score)
    s = score[order]
    # average ranks over ties
    _, inverse, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks = avg[inverse]
    rank_of = torch.empty_like(ranks)
    rank_of[order] = ranks
    r_pos = rank_of[y > 0.5].sum()
    return float((r_pos - pos * (pos + 1) / 2) / (pos * neg))


def _mse(pred: Tensor, target: Tensor) -> float:
    return float((pred.double().reshape(-1) - target.double().reshape(-1)).pow(2).mean())


def _mae(pred: Tensor, target: Tensor) -> float:
    return float((pred.double().reshape(-1) - target.double().reshape(-1)).abs().mean())


def _rmse(pred: Tensor, target: Tensor) -> float:
    return math.sqrt(_mse(pred, target))


accuracy = Metric("acc", _accuracy, higher_is_better=True)
auc = Metric("auc", _auc, higher_is_better=True)
mse = Metric("mse", _mse, higher_is_better=False)
mae = Metric("mae", _mae, higher_is_better=False)
rmse = Metric("rmse", _rmse, higher_is_better=False)


def default_metrics(loss: str | Callable) -> tuple[Metric, ...]:
    """Accuracy for classification losses, MAE and RMSE for regression, none for a callable."""
    if loss in ("cross_entropy", "bce"):
        return (accuracy,)
    if loss in ("mse", "l1"):
        return (mae, rmse)
    return ()


def delta_m(
    metrics: Mapping[str, Mapping[str, float]],
    baseline: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, Mapping[str, bool]],
) -> float:
    r"""Average relative improvement over the single-task baseline, in percent.

    ``100/K * sum_k s_k (M_k - B_k) / |B_k|`` with ``s_k = +1`` when higher is better and
    ``-1`` otherwise, over every metric of every task in ``metrics`` (positive: better than
    single-task). This is minus Maninis et al.'s Delta_m, the convention of later MTL papers.

    Args:
        metrics: ``{task: {metric: value}}`` of the multi-task model.
        baseline: the same for the single-task baselines (must cover every metric).
        higher_is_better: ``{task: {metric: bool}}``.

    Raises:
        ValueError: a metric missing from the baseline or with a zero or non-finite baseline.
    """
    terms = []
    for task, values in metrics.items():
        for name, value in values.items():
            try:
                base = float(baseline[task][name])
                up = bool(higher_is_better[task][name])
            except KeyError:
                raise ValueError(f"no baseline (or direction) for {task}/{name}") from None
            if base == 0 or not math.isfinite(base):
                raise ValueError(f"baseline {task}/{name} = {base}: delta-m needs it nonzero")
            sign = 1.0 if up else -1.0
            terms.append(sign * (float(value) - base) / abs(base))
    if not terms:
        raise ValueError("delta_m needs at least one metric")
    return 100.0 * sum(terms) / len(terms)
