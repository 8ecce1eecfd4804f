"""Elo fit: recovers known ratings from simulated comparisons, with honest intervals."""

from __future__ import annotations

import numpy as np
import pytest

from cai_ray.elo import expected, fit, ratings

TRUE = np.array([0.0, 120.0, -80.0, 250.0])  # player 0 is the pinned initial snapshot


def simulate(n: int, seed: int) -> list[tuple[int, int, float]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(len(TRUE), size=2, replace=False)
        out.append((int(a), int(b), float(rng.random() < expected(TRUE[a], TRUE[b]))))
    return out


def test_expected_is_the_elo_logistic() -> None:
    assert expected(0, 0) == pytest.approx(0.5)
    assert expected(400, 0) == pytest.approx(10 / 11)


def test_fit_recovers_ratings_from_exact_soft_outcomes() -> None:
    comps = [(a, b, expected(TRUE[a], TRUE[b])) for a in range(4) for b in range(4) if a != b]
    est = fit(comps * 50, 4, prior_sd=1e6)
    assert est[0] == 0.0
    np.testing.assert_allclose(est, TRUE, atol=1.0)


def test_true_ratings_inside_95_intervals_in_90_percent_of_simulations() -> None:
    covered = total = 0
    for sim in range(50):
        rs = ratings(simulate(300, sim), 4, n_boot=100, seed=sim)
        for k in range(1, 4):  # player 0 is pinned at 0: its interval is a point
            covered += rs[k].low <= TRUE[k] <= rs[k].high
            total += 1
    assert covered / total >= 0.9, covered / total


def test_intervals_shrink_with_more_comparisons() -> None:
    small = ratings(simulate(100, 1), 4, n_boot=100)
    large = ratings(simulate(1600, 1), 4, n_boot=100)
    for k in range(1, 4):
        assert large[k].high - large[k].low < (small[k].high - small[k].low) / 2
    assert large[1].comparisons > small[1].comparisons


def test_a_player_that_always_wins_stays_finite_and_bad_input_is_named() -> None:
    est = fit([(1, 0, 1.0)] * 20, 2)
    assert np.isfinite(est).all() and est[1] > 400
    with pytest.raises(ValueError, match="two different players"):
        fit([(0, 0, 1.0)], 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit([(0, 1, 1.5)], 2)
