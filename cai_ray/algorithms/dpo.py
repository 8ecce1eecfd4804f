"""Direct preference optimisation on soft AI labels: pure torch, no Ray, no I/O.

Shapes: B = comparisons in a batch. pi_a, pi_b, ref_a, ref_b: [B] summed log-probabilities of
response A / B under the policy and the frozen reference. p: [B] the feedback model's soft label,
the probability that A is the better response.

The implicit reward of a response is β·(log π − log π_ref); its margin is
h = β·((pi_a − ref_a) − (pi_b − ref_b)), and σ(h) is the policy's implied probability that A wins.

Losses (`dpo.loss`):
* `soft` (the default): the cross-entropy between the soft label and σ(h),
  −(p·log σ(h) + (1 − p)·log σ(−h)). With p ∈ {0, 1} this is the DPO loss of Rafailov et al.;
  with p = 1 − ε on the preferred side it is the conservative DPO (label smoothing ε). So the AI
  label's confidence sets how hard each pair pushes.
* `hard`: the label rounded to its side (p > 0.5 → A), then smoothed by `dpo.label_smoothing` ε:
  target 1 − ε on the preferred side (cDPO). Ties (p = 0.5) get target 0.5.
* `ipo`: the squared loss of IPO (Azar et al.) with a soft target margin,
  (h/β − (2p − 1)/(2β))², which for p = 1 is IPO's (h/β − 1/(2β))².
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("soft", "hard", "ipo")


@dataclass(frozen=True)
class DPOLoss:
    loss: torch.Tensor  # [] mean over the batch, with gradient
    margin: torch.Tensor  # [B] h = β·((pi_a − ref_a) − (pi_b − ref_b)), detached
    reward_a: torch.Tensor  # [B] β·(pi_a − ref_a), detached
    reward_b: torch.Tensor  # [B] β·(pi_b − ref_b), detached


def target(p: torch.Tensor, loss: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """The probability that A wins which the loss fits: the soft label itself (`soft`, `ipo`),
    or the label rounded to its side and smoothed by ε (`hard`)."""
    if loss == "hard":
        side = (p > 0.5).to(p.dtype) - (p < 0.5).to(p.dtype)  # +1 A, −1 B, 0 tie
        return 0.5 + side * (0.5 - label_smoothing)
    return p


def dpo_loss(pi_a: torch.Tensor, pi_b: torch.Tensor, ref_a: torch.Tensor, ref_b: torch.Tensor,
             p: torch.Tensor, beta: float, loss: str = "soft",
             label_smoothing: float = 0.0) -> DPOLoss:
    if loss not in LOSSES:
        raise ValueError(f"dpo loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if beta <= 0:
        raise ValueError(f"dpo beta must be positive, got {beta}")
    ra, rb = beta * (pi_a - ref_a), beta * (pi_b - ref_b)
    h = ra - rb
    q = target(p.to(h.dtype), loss, label_smoothing)
    if loss == "ipo":
        per = (h / beta - (2 * q - 1) / (2 * beta)) ** 2
    else:
        per = -(q * F.logsigmoid(h) + (1 - q) * F.logsigmoid(-h))
    return DPOLoss(per.mean(), h.detach(), ra.detach(), rb.detach())
