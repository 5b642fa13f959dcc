"""Per-task metrics and delta-m on hand values."""

from __future__ import annotations

import math

import pytest
import torch

from gradsurgery.training.metrics import accuracy, auc, default_metrics, delta_m, mae, rmse


def test_delta_m_hand_values():
    # acc 0.90 vs 0.80 (+12.5%), mae 2.0 vs 4.0 (lower is better: +50%)
    metrics = {"a": {"acc": 0.90}, "b": {"mae": 2.0}}
    base = {"a": {"acc": 0.80}, "b": {"mae": 4.0}}
    up = {"a": {"acc": True}, "b": {"mae": False}}
    assert delta_m(metrics, base, up) == pytest.approx(100 * (0.125 + 0.5) / 2)
    worse = {"a": {"acc": 0.72}, "b": {"mae": 5.0}}  # -10%, -25%
    assert delta_m(worse, base, up) == pytest.approx(-17.5)
    assert delta_m(base, base, up) == 0.0


def test_delta_m_errors():
    up = {"a": {"acc": True}}
    with pytest.raises(ValueError, match="no baseline"):
        delta_m({"a": {"acc": 1.0}}, {"a": {}}, up)
    with pytest.raises(ValueError, match="nonzero"):
        delta_m({"a": {"acc": 1.0}}, {"a": {"acc": 0.0}}, up)
    with pytest.raises(ValueError, match="at least one"):
        delta_m({}, {}, {})


def test_accuracy_multiclass_and_binary_logits():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    binary = torch.tensor([[0.3], [-1.0], [2.0], [-0.1]])
    assert accuracy(binary, torch.tensor([1, 0, 0, 0])) == pytest.approx(0.75)


def test_auc_matches_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 5, (60,), generator=g).float()  # many ties
    y = torch.randint(0, 2, (60,), generator=g)
    pos, neg = score[y == 1], score[y == 0]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert auc(score, y) == pytest.approx(float(pairs.mean()))
    assert math.isnan(auc(score, torch.zeros(60)))


def test_regression_metrics_and_defaults():
    pred, y = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 3.0, 2.0])
    assert mae(pred, y) == pytest.approx(1.0)
    assert rmse(pred, y) == pytest.approx(math.sqrt(5 / 3))
    assert [m.name for m in default_metrics("mse")] == ["mae", "rmse"]
    assert [m.name for m in default_metrics("cross_entropy")] == ["acc"]
