"""PPO for RLHF at the token level, plus critic-free advantages: pure torch, no Ray, no I/O.

Shapes: B = sequences in a batch, T = response positions, V = vocabulary; N prompts × K samples
for the group baselines (RLOO, GRPO), laid out contiguously as [N*K]. Unless stated, tensors are
[B, T] over response tokens only, and `mask` ([B, T], bool or 0/1) marks the valid ones. Values
at masked positions never affect a result: they are selected away with `torch.where`, not
multiplied by zero, so padding holding inf or nan cannot leak in.

Paper settings (method.md, RL): reward = PM score at the end − β·KL(policy ‖ initial policy),
clip ε = 0.2, γ = 1, no entropy bonus. Whitening advantages is `masked.masked_whiten`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cai_ray.algorithms.masked import masked_mean

KLEstimator = Literal["k1", "k3"]


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy ‖ ref) from log-probs of the sampled tokens. [B, T].

    k1 = log p − log p_ref: unbiased, but negative on single tokens.
    k3 = (r − 1) − log r with r = p_ref / p: unbiased and never negative (log r ≤ r − 1), which
    keeps a per-token penalty from ever becoming a bonus (Schulman, "Approximating KL").
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        # log r = −log_ratio, so k3 = exp(−log_ratio) − 1 + log_ratio
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator {estimator!r} is not supported; choose one of 'k1', 'k3'")


def _last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last true position of each row of `mask` [B, T]; −1 for an empty row. [B]."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(dim=-1).values


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """−kl_coef·kl on every valid token, plus each row's PM score [B] on its last valid token.

    Rows may have different lengths, so the score goes where the mask last is true, not at T−1.
    A row with no valid token gets no reward at all. [B, T].
    """
    valid = mask.bool()
    rewards = torch.where(valid, -kl_coef * kl, torch.zeros_like(kl))
    last = _last_valid_index(valid)
    has_any = last >= 0
    rows = torch.arange(kl.shape[0], device=kl.device)[has_any]
    rewards[rows, last[has_any]] += scores[has_any].to(rewards.dtype)
    return rewards


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, backwards over T. Returns (advantages, returns), [B, T].

    δ_t = r_t + γ·V_{t+1} − V_t, A_t = δ_t + γλ·A_{t+1}, with V = 0 after the last valid token
    (the response ended: nothing to bootstrap). Masked positions are skipped, not treated as
    steps, so a hole in the mask does not discount. returns = advantages + values, the critic's
    target; both are 0 outside the mask. No gradient: these are targets, not outputs.
    """
    valid = mask.bool()
    zero = torch.zeros_like(values[:, 0])
    next_value, next_adv = zero, zero
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_adv = torch.where(valid[:, t], adv_t, next_adv)
        advantages[:, t] = torch.where(valid[:, t], adv_t, zero)
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


def behaviour_weights(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                      cap: float) -> torch.Tensor:
    """Truncated importance weights min(p_old / p_behaviour, cap) per token, for a batch
    sampled by older weights than the trainer's (decoupled PPO; IMPALA-style truncation).

    p_old is the proximal policy the clipped ratio is taken against (the trainer's current
    weights); p_behaviour the policy that sampled (the rollout engine's log-probs). A NaN
    behaviour log-prob marks a token sampled by the current weights: weight exactly 1. No
    gradient: the weights scale the surrogate, they are not optimised. Same shape as inputs.
    """
    if cap <= 0:
        raise ValueError(f"the importance-weight cap must be positive, got {cap}")
    with torch.no_grad():
        fresh = torch.isnan(behaviour_logprobs)
        log_w = torch.where(fresh, torch.zeros_like(old_logprobs),
                            old_logprobs - torch.nan_to_num(behaviour_logprobs))
        return torch.exp(log_w).clamp(max=cap)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_eps: float, weights: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate: masked mean of w·max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)), ρ = p / p_old,
    w the per-token importance weights of a stale batch (`behaviour_weights`; None = 1).

    Stats: clip_fraction (share of valid tokens where the clipped term is the larger, i.e. where
    clipping removed the gradient), approx_kl (masked mean of ½(log ρ)²), ratio_mean, and with
    weights is_weight_mean.
    """
    valid = mask.bool()
    # Zero the log-ratio at padding before exp, so garbage there cannot overflow into inf·0.
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    adv = torch.where(valid, advantages, torch.zeros_like(advantages))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * torch.where(valid, weights.detach(), torch.zeros_like(weights))
    loss = masked_mean(per_token, valid)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).to(ratio.dtype), valid).item(),
            "approx_kl": masked_mean(0.5 * log_ratio**2, valid).item(),
            "ratio_mean": masked_mean(ratio, valid).item(),
        }
        if weights is not None:
            stats["is_weight_mean"] = masked_mean(weights, valid).item()
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """½ · masked mean of max((v − R)², (clip(v, v_old − c, v_old + c) − R)²).

    Taking the max makes clipping pessimistic: the critic cannot move more than c from the value
    it had at rollout in one step. Stats: value_clip_fraction (share where the clipped error won).
    """
    valid = mask.bool()
    zeros = torch.zeros_like(values)
    v = torch.where(valid, values, zeros)
    v_old = torch.where(valid, old_values, zeros)
    target = torch.where(valid, returns, zeros)
    v_clipped = v_old + torch.clamp(v - v_old, -clip_range, clip_range)
    err = (v - target) ** 2
    err_clipped = (v_clipped - target) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), valid)
    with torch.no_grad():
        frac = masked_mean((err_clipped > err).to(values.dtype), valid).item()
    return loss, {"value_clip_fraction": frac}


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean entropy of the next-token distributions; logits [B, T, V] → scalar.

    H = logsumexp(z) − Σ softmax(z)·z, computed in float32 at least, since bf16 logits lose the
    small probabilities that make up the tail of the sum.
    """
    z = logits if logits.dtype == torch.float64 else logits.float()
    entropy = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)
    valid = mask.bool()
    return masked_mean(torch.where(valid, entropy, torch.zeros_like(entropy)), valid)


def _groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """View [N*K] scores as [N, K], checking k and the length."""
    if k < 2:
        raise ValueError(f"group baselines need k >= 2 samples per prompt, got k={k}")
    if scores.dim() != 1 or scores.numel() % k != 0:
        raise ValueError(f"scores must be 1-D with a length divisible by k={k} "
                         f"(N prompts × K samples, contiguous); got shape {tuple(scores.shape)}")
    return scores.view(-1, k)


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out: each score minus the mean of the other K − 1 samples of its
    prompt. Leaving the sample out keeps the baseline independent of it, hence unbiased. [N*K]."""
    g = _groups(scores, k)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def grpo_advantages(scores: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (score − group mean) / (group std + eps), population std (unbiased=False). [N*K].
    A group whose samples all score the same gets advantage 0, not a division by zero."""
    g = _groups(scores, k)
    mean = g.mean(dim=1, keepdim=True)
    std = g.std(dim=1, unbiased=False, keepdim=True)
    return ((g - mean) / (std + eps)).reshape(-1)


def broadcast_sequence_advantage(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put each sequence's advantage [B] on all its valid tokens; 0 elsewhere. [B, T]."""
    adv = advantages.unsqueeze(-1).expand(mask.shape)
    return torch.where(mask.bool(), adv, torch.zeros_like(adv))


@dataclass
class AdaptiveKLController:
    """Proportional controller of Ziegler et al. (2019) steering the measured KL to `target`.

    The error is clipped to ±0.2 so one noisy batch cannot swing β; `horizon` (in samples or
    steps, as `n_steps` counts) sets how fast β follows.
    """

    coef: float
    target: float
    horizon: int = 10000

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got "
                             f"target={self.target}, horizon={self.horizon}")

    def update(self, current_kl: float, n_steps: int) -> float:
        """coef *= 1 + clip(current/target − 1, −0.2, 0.2) · n_steps / horizon; returns coef."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef


@dataclass
class FixedKLController:
    """Constant β (the paper's setting: β = 0.001); same interface as the adaptive one."""

    coef: float

    def update(self, current_kl: float, n_steps: int) -> float:
        """Return the constant coefficient; arguments are ignored."""
        return self.coef
