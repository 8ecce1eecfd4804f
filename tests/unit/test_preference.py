"""Preference loss and metrics against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from cai_ray.algorithms.preference import accuracy, reliability, soft_preference_loss
from cai_ray.labelling import clamp, combine_orders


def _t(*x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def test_soft_loss_hand_values() -> None:
    # rA - rB = 1: log σ(1) = -0.313262, log σ(-1) = -1.313262
    assert soft_preference_loss(_t(1.0), _t(0.0), _t(1.0)).item() == pytest.approx(0.313262, 1e-5)
    assert soft_preference_loss(_t(1.0), _t(0.0), _t(0.0)).item() == pytest.approx(1.313262, 1e-5)
    assert soft_preference_loss(_t(1.0), _t(0.0), _t(0.5)).item() == pytest.approx(0.813262, 1e-5)
    # p = 0.75, margin 2: -(0.75 log σ(2) + 0.25 log σ(-2)) = 0.75·0.126928 + 0.25·2.126928
    assert soft_preference_loss(_t(2.0), _t(0.0), _t(0.75)).item() == pytest.approx(0.626928, 1e-5)
    # equal rewards cost log 2 whatever the label
    assert soft_preference_loss(_t(3.0, 3.0), _t(3.0, 3.0), _t(0.0, 1.0)).item() == \
        pytest.approx(math.log(2), 1e-9)
    # large margins stay finite
    assert math.isfinite(soft_preference_loss(_t(200.0), _t(-200.0), _t(0.0)).item())


def test_soft_loss_minimum_is_at_the_label() -> None:
    d = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([d], lr=1.0)
    for _ in range(500):
        opt.zero_grad()
        soft_preference_loss(d, torch.zeros(1, dtype=torch.float64), _t(0.8)).backward()
        opt.step()
    assert torch.sigmoid(d).item() == pytest.approx(0.8, abs=1e-4)


def test_accuracy_and_calibration() -> None:
    assert accuracy([0.9, 0.2, 0.7, 0.6], [1.0, 0.0, 0.0, 0.5]) == pytest.approx(2 / 3)
    ece, rows = reliability([0.9, 0.1, 0.9, 0.9], [1.0, 0.0, 1.0, 0.0], bins=5)
    # all four at confidence 0.9; the label agrees with 3 of 4 → |0.9 - 0.75| = 0.15
    assert ece == pytest.approx(0.15) and len(rows) == 1 and rows[0]["count"] == 4
    perfect, _ = reliability([0.7] * 10, [0.7] * 10)
    assert perfect == pytest.approx(0.0, abs=1e-12)


def test_order_combination_and_clamp() -> None:
    assert combine_orders(0.8, 0.3) == pytest.approx(0.75)
    assert combine_orders(0.9, 0.9) == pytest.approx(0.5)  # pure position bias cancels
    assert clamp(0.99, 0.4, 0.6) == 0.6 and clamp(0.01, 0.4, 0.6) == 0.4
    assert clamp(0.55, 0.4, 0.6) == 0.55
