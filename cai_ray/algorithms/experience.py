"""From a scored batch to what the trainer trains on: pure tensor functions, no actors.

Per-token values cross the actor boundary flat ([N] over the response tokens, row-major);
`to_rows` turns them into right-padded [B, T] rows with a mask for the estimators in
`algorithms/ppo.py`. `advantages` applies the configured estimator (GAE with the critic, or the
critic-free RLOO/GRPO baselines) with the KL in the reward or in the loss; `behaviour_logprobs`
gives the sampler's log-probs of a partly stale batch for the truncated importance weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from cai_ray.algorithms.masked import masked_sum, masked_whiten
from cai_ray.algorithms.ppo import (
    broadcast_sequence_advantage,
    gae,
    grpo_advantages,
    kl_penalty,
    rloo_advantages,
    token_rewards,
)
from cai_ray.config import PPOConfig


class SampledResponse(Protocol):
    """What `behaviour_logprobs` reads of a sample (the driver's `rollouts.Sample`)."""

    @property
    def response_ids(self) -> list[int]: ...
    @property
    def rollout_logprobs(self) -> list[float] | None: ...
    @property
    def weight_version(self) -> int: ...
    @property
    def key(self) -> str: ...


def to_rows(flat: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-token values [N] (row-major over sequences) → right-padded [B, T] and mask."""
    width = max(lengths)
    out = torch.zeros((len(lengths), width), dtype=torch.float32)
    mask = torch.zeros((len(lengths), width), dtype=torch.bool)
    i = 0
    for r, n in enumerate(lengths):
        out[r, :n] = flat[i:i + n].float()
        mask[r, :n] = True
        i += n
    if i != flat.numel():
        raise ValueError(f"{flat.numel()} per-token values for {i} response tokens")
    return out, mask


def advantages(p: PPOConfig, scores: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor,
               values: torch.Tensor | None, mask: torch.Tensor, kl_coef: float
               ) -> dict[str, torch.Tensor]:
    """Advantages (and critic returns) of one batch, all [B, T] but `seq_kl` [B]. With
    `ppo.kl_penalty=loss` the reward is the score alone (the trainer adds β·KL to its loss) and
    `seq_kl` is left out when the old log-probs were not computed (`old` None)."""
    out: dict[str, torch.Tensor] = {}
    if old is None:
        if p.kl_penalty != "loss":
            raise ValueError("the old log-probs are needed for a KL penalty in the reward")
        kl = torch.zeros_like(ref)
    else:
        kl = torch.where(mask, kl_penalty(old, ref, p.kl_estimator), torch.zeros_like(old))
        out["seq_kl"] = masked_sum(kl, mask, dim=1)
    if p.kl_penalty == "loss":
        kl_coef = 0.0
    seq_kl = masked_sum(kl, mask, dim=1)
    if p.advantage == "gae":
        if values is None:
            raise ValueError("advantage=gae needs the critic's values")
        rewards = token_rewards(scores, kl, mask, kl_coef)
        adv, ret = gae(rewards, values, mask, p.gamma, p.lam)
        out["returns"] = ret
    else:
        seq_reward = scores - kl_coef * seq_kl
        fn = rloo_advantages if p.advantage == "rloo" else grpo_advantages
        adv = broadcast_sequence_advantage(fn(seq_reward, p.samples_per_prompt), mask)
    if p.whiten_advantages:
        adv = masked_whiten(adv, mask)
    out["advantages"] = adv
    return out


def behaviour_logprobs(samples: Sequence[SampledResponse], version: int) -> torch.Tensor | None:
    """Flat [N] sampler log-probs of the samples made by weights older than `version` (the
    trainer's), NaN for tokens of samples made by the current weights (importance weight 1);
    None when the whole batch is fresh."""
    if all(s.weight_version >= version for s in samples):
        return None
    parts = []
    for s in samples:
        n = len(s.response_ids)
        lp = s.rollout_logprobs
        if s.weight_version < version:
            if lp is None or len(lp) != n:
                raise ValueError(f"a stale sample of {s.key} has no sampler log-probs "
                                 "for its tokens: the staleness correction needs them")
            parts.append(torch.tensor(lp, dtype=torch.float32))
        else:
            parts.append(torch.full((n,), float("nan")))
    return torch.cat(parts)
