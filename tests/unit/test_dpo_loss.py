"""The DPO losses against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cai_ray.algorithms.dpo import dpo_loss, target


def _t(*x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_soft_loss_is_the_cross_entropy_with_the_label() -> None:
    # policy gains 2 nats on A and loses 1 on B against the reference: h = 0.5·(2 − (−1)) = 1.5
    out = dpo_loss(_t(-10.0), _t(-21.0), _t(-12.0), _t(-20.0), _t(0.8), beta=0.5)
    h = 1.5
    want = -(0.8 * math.log(_sig(h)) + 0.2 * math.log(_sig(-h)))
    assert out.margin.item() == pytest.approx(h)
    assert out.reward_a.item() == pytest.approx(1.0) and out.reward_b.item() == pytest.approx(-0.5)
    assert out.loss.item() == pytest.approx(want)  # 0.8·0.2014 + 0.2·1.7014 = 0.5014
    assert out.loss.item() == pytest.approx(0.50141, abs=1e-4)


def test_hard_label_one_is_plain_dpo_and_smoothing_is_cdpo() -> None:
    args = (_t(-10.0), _t(-21.0), _t(-12.0), _t(-20.0), _t(0.7))
    plain = dpo_loss(*args, beta=0.5, loss="hard").loss.item()
    assert plain == pytest.approx(-math.log(_sig(1.5)))  # 0.2014: the label's 0.7 is rounded
    smooth = dpo_loss(*args, beta=0.5, loss="hard", label_smoothing=0.1).loss.item()
    assert smooth == pytest.approx(-(0.9 * math.log(_sig(1.5)) + 0.1 * math.log(_sig(-1.5))))
    assert target(_t(0.2, 0.5, 0.9), "hard", 0.1).tolist() == pytest.approx([0.1, 0.5, 0.9])


def test_ipo_fits_the_target_margin() -> None:
    # h = 1.5, β = 0.5: h/β = 3; target margin (2·1 − 1)/(2·0.5) = 1 → (3 − 1)² = 4
    out = dpo_loss(_t(-10.0), _t(-21.0), _t(-12.0), _t(-20.0), _t(1.0), beta=0.5, loss="ipo")
    assert out.loss.item() == pytest.approx(4.0)
    # a tie wants no margin: (3 − 0)² = 9
    tie = dpo_loss(_t(-10.0), _t(-21.0), _t(-12.0), _t(-20.0), _t(0.5), beta=0.5, loss="ipo")
    assert tie.loss.item() == pytest.approx(9.0)


def test_gradient_moves_the_policy_toward_the_labelled_side() -> None:
    pi_a = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    pi_b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    out = dpo_loss(pi_a, pi_b, _t(0.0), _t(0.0), _t(0.9), beta=0.1)
    out.loss.backward()
    # d/dh = σ(h) − p = 0.5 − 0.9 = −0.4; dh/dpi_a = β
    assert pi_a.grad.item() == pytest.approx(-0.04) and pi_b.grad.item() == pytest.approx(0.04)
    # at p = 0.5 and h = 0 the soft loss is at its minimum: no push either way
    pi_a.grad = None
    dpo_loss(pi_a, pi_b, _t(0.0), _t(0.0), _t(0.5), beta=0.1).loss.backward()
    assert pi_a.grad.item() == pytest.approx(0.0)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="soft, hard, ipo"):
        dpo_loss(_t(0.0), _t(0.0), _t(0.0), _t(0.0), _t(0.5), beta=0.1, loss="kto")
    with pytest.raises(ValueError, match="beta must be positive"):
        dpo_loss(_t(0.0), _t(0.0), _t(0.0), _t(0.0), _t(0.5), beta=0.0)
