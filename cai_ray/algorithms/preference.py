"""Preference-model loss and metrics: pure torch / Python, no Ray, no I/O.

Shapes: B = comparisons in a batch. r_a, r_b: [B] scalar rewards of response A and B; p: [B] soft
labels, the feedback model's probability that A is the better response.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def soft_preference_loss(r_a: torch.Tensor, r_b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Mean of -(p·log σ(rA − rB) + (1 − p)·log σ(rB − rA)), the cross-entropy between the soft
    label and the Bradley-Terry probability σ(rA − rB). p ∈ {0, 1} is the hard-label loss;
    p = 0.5 is minimised by rA = rB. logsigmoid keeps it finite for large margins."""
    d = r_a - r_b
    return -(p * F.logsigmoid(d) + (1.0 - p) * F.logsigmoid(-d)).mean()


def accuracy(p_model: Sequence[float], p_label: Sequence[float]) -> float:
    """Share of comparisons where the model prefers the side the label prefers (ties in the
    label, p = 0.5, are left out)."""
    pairs = [(m, y) for m, y in zip(p_model, p_label, strict=True) if y != 0.5]
    if not pairs:
        return float("nan")
    return sum((m > 0.5) == (y > 0.5) for m, y in pairs) / len(pairs)


def reliability(p_model: Sequence[float], p_label: Sequence[float], bins: int = 10
                ) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error and the reliability curve.

    Predictions are folded onto the side they prefer (confidence = max(p, 1 − p)), so the curve
    asks: when the model is 80% sure, is the label on its side 80% of the time? The label's
    agreement is soft: the label's probability mass on the predicted side."""
    edges = [0.5 + 0.5 * i / bins for i in range(bins + 1)]
    rows: list[dict[str, float]] = []
    ece, n = 0.0, len(p_model)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        conf, agree = [], []
        for m, y in zip(p_model, p_label, strict=True):
            c = max(m, 1.0 - m)
            if lo <= c < hi or (hi == 1.0 and c == 1.0):
                conf.append(c)
                agree.append(y if m >= 0.5 else 1.0 - y)
        if conf:
            mc, ma = sum(conf) / len(conf), sum(agree) / len(agree)
            ece += len(conf) / max(n, 1) * abs(mc - ma)
            rows.append({"lo": lo, "hi": hi, "count": float(len(conf)), "confidence": mc,
                         "agreement": ma})
    return ece, rows


def bt_probability(r_a: float, r_b: float) -> float:
    """σ(rA − rB): the PM's probability that A is preferred."""
    return 1.0 / (1.0 + math.exp(-(r_a - r_b)))
