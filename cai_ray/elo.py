"""Elo ratings from pairwise comparisons: Bradley-Terry by maximum likelihood on the Elo scale,
with bootstrap confidence intervals. Pure (numpy), no Ray, no I/O.

    P(A beats B) = 1 / (1 + 10^((Elo_B − Elo_A) / 400))

Comparisons may be soft: a comparison (a, b, p) says A won with probability p (p = 1: a clear
win, 0.5: a tie, or an AI judge's soft label). Only differences are identified, so one player is
pinned at 0 (the initial snapshot). A small Gaussian prior (`prior_sd`, in Elo points) keeps a
player that won or lost everything finite; with enough comparisons it has no visible effect.

Intervals: the comparisons are resampled with replacement `n_boot` times, the ratings refitted
each time, and the 2.5th and 97.5th percentiles of each player's rating reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCALE = 400.0 / np.log(10.0)  # Elo points per natural-log unit of odds


@dataclass(frozen=True)
class Rating:
    elo: float
    low: float  # 95% bootstrap interval
    high: float
    comparisons: int  # comparisons this player took part in


def expected(elo_a: float, elo_b: float) -> float:
    """P(A beats B) under the Elo model."""
    return float(1.0 / (1.0 + 10.0 ** ((elo_b - elo_a) / 400.0)))


def fit(comparisons: Sequence[tuple[int, int, float]], n_players: int, anchor: int = 0,
        prior_sd: float = 1000.0, iters: int = 100) -> np.ndarray:
    """Maximum-likelihood Elo of `n_players` from (i, j, p_i_wins) comparisons; `anchor` = 0.

    Newton's method on the (concave) soft Bradley-Terry log-likelihood in natural units, with a
    Gaussian prior of sd `prior_sd` Elo on every free rating.
    """
    if not 0 <= anchor < n_players:
        raise ValueError(f"anchor {anchor} is not a player (0..{n_players - 1})")
    if not comparisons:
        return np.zeros(n_players)
    c = np.asarray(comparisons, dtype=np.float64)
    i, j, p = c[:, 0].astype(int), c[:, 1].astype(int), c[:, 2]
    if (i == j).any() or i.min() < 0 or j.min() < 0 or max(i.max(), j.max()) >= n_players:
        raise ValueError("comparisons must name two different players in 0..n_players-1")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("comparison outcomes must lie in [0, 1]")
    free = np.array([k for k in range(n_players) if k != anchor])
    theta = np.zeros(n_players)
    lam = (SCALE / prior_sd) ** 2
    for _ in range(iters):
        q = 1.0 / (1.0 + np.exp(theta[j] - theta[i]))  # P(i beats j)
        r = p - q
        grad = np.zeros(n_players)
        np.add.at(grad, i, r)
        np.add.at(grad, j, -r)
        grad -= lam * theta
        w = q * (1.0 - q)
        hess = np.zeros((n_players, n_players))
        np.add.at(hess, (i, i), w)
        np.add.at(hess, (j, j), w)
        np.add.at(hess, (i, j), -w)
        np.add.at(hess, (j, i), -w)
        hess += lam * np.eye(n_players)
        step = np.linalg.solve(hess[np.ix_(free, free)], grad[free])
        theta[free] += step
        if np.abs(step).max() < 1e-10:
            break
    return theta * SCALE


def ratings(comparisons: Sequence[tuple[int, int, float]], n_players: int, anchor: int = 0,
            n_boot: int = 200, seed: int = 0, prior_sd: float = 1000.0) -> list[Rating]:
    """Elo with 95% bootstrap intervals and the number of comparisons behind each player."""
    point = fit(comparisons, n_players, anchor, prior_sd)
    counts = np.zeros(n_players, dtype=int)
    for a, b, _ in comparisons:
        counts[a] += 1
        counts[b] += 1
    rng = np.random.default_rng(seed)
    n = len(comparisons)
    boots = np.empty((n_boot, n_players))
    arr = list(comparisons)
    for k in range(n_boot):
        idx = rng.integers(0, n, size=n) if n else np.array([], dtype=int)
        boots[k] = fit([arr[t] for t in idx], n_players, anchor, prior_sd)
    lo, hi = np.percentile(boots, [2.5, 97.5], axis=0) if n_boot else (point, point)
    return [Rating(float(point[k]), float(lo[k]), float(hi[k]), int(counts[k]))
            for k in range(n_players)]
