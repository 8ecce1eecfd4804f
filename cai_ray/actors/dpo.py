"""DPO trainer role: the policy in a DeepSpeed engine, trained on AI-labelled comparisons
against a frozen reference (`algorithms/dpo.py`).

The reference's summed log-probs are computed once, before training, by the reference role
(`actors/reference.py`), and travel with each micro-batch (`DPOPairs`): no second model lives
beside the policy while it trains. Log-probs are at temperature 1 (DPO's implicit reward is the
model's own likelihood ratio).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

from cai_ray.actors.group import ActorGroup, WorkerContext
from cai_ray.actors.ppo import PPOTrainerWorker
from cai_ray.actors.trainer import (
    Sequence,
    TrainerWorker,
    encode_chat,
    pack_sequences,
    pad_id,
    start_ranks,
    token_logprobs,
)
from cai_ray.algorithms.dpo import dpo_loss
from cai_ray.config import Config, DPOConfig, ModelSpec, PPOConfig, TrainerConfig
from cai_ray.messages import Comparison, DPOPairs, DPOStats
from cai_ray.runtime import device_of, role_group


def comparison_sequences(tok: Any, c: Comparison, limit: int) -> tuple[Sequence, Sequence]:
    """(prompt ids, response ids) of response A and of response B, rendered as the rollout
    engine produced them: the chat template's generation prompt, then the response, with EOS
    only where the response stopped by itself (`finished_a` / `finished_b`)."""
    out = []
    for response, finished in ((c.response_a, c.finished_a), (c.response_b, c.finished_b)):
        ids, mask = encode_chat(tok, c.messages, response, limit - 1, finished)
        cut = mask.index(1) if 1 in mask else len(ids)
        out.append((ids[:cut], ids[cut:]))
    return out[0], out[1]


class DPOSteps:
    """The DPO micro-step, for a trainer rank that has `engine`, `policy`, `tokenizer`,
    `cfg` (TrainerConfig), `dpo` (DPOConfig) and `step`: the offline trainer below and the
    online one (PPO's trainer, with its weight sync, checkpoints and probe)."""

    engine: Any
    tokenizer: Any
    cfg: TrainerConfig
    dpo: DPOConfig
    step: int
    policy: Any  # TrainerWorker's property: the HF model the forwards run

    def _sums(self, seqs: list[Sequence]) -> Any:
        """Σ log π of each sequence's response tokens, [len(seqs)], with gradient."""
        ids, attn, mask = (x.to(self.engine.device) for x in
                           pack_sequences(seqs, pad_id(self.tokenizer), self.cfg.max_length))
        flat = token_logprobs(self.policy, ids, attn, mask)[0]
        return torch.stack([x.sum() for x in torch.split(flat, [len(r) for _, r in seqs])])

    def _loss(self, pairs: DPOPairs) -> Any:
        logp = self._sums(pairs.seqs_a + pairs.seqs_b).float()
        n = len(pairs.seqs_a)
        return dpo_loss(logp[:n], logp[n:], torch.tensor(pairs.ref_a), torch.tensor(pairs.ref_b),
                        torch.tensor(pairs.p_a), self.dpo.beta, self.dpo.loss,
                        self.dpo.label_smoothing)

    def train_dpo(self, pairs: DPOPairs) -> DPOStats:
        """One micro-batch: both responses of every pair in one forward, the loss, backward,
        and an optimizer step at accumulation boundaries."""
        t0 = time.monotonic()
        self.engine.train()
        out = self._loss(pairs)
        self.engine.backward(out.loss)
        self.engine.step()
        self.step += 1
        p = torch.tensor(pairs.p_a)
        a_wins = p >= 0.5
        chosen = torch.where(a_wins, out.reward_a, out.reward_b)
        rejected = torch.where(a_wins, out.reward_b, out.reward_a)
        decided = p != 0.5
        agree = ((out.margin > 0) == (p > 0.5))[decided].float()
        lr = self.engine.get_lr()[0] if self.engine.lr_scheduler else self.cfg.lr
        norm = self.engine.get_global_grad_norm()
        return DPOStats(step=self.step, loss=float(out.loss.item()),
                        margin=float((chosen - rejected).mean()),
                        reward_chosen=float(chosen.mean()),
                        reward_rejected=float(rejected.mean()),
                        accuracy=float(agree.mean()) if agree.numel() else float("nan"),
                        lr=float(lr), grad_norm=float(norm) if norm is not None and
                        math.isfinite(float(norm)) else None, seconds=time.monotonic() - t0)

    def margins(self, pairs: DPOPairs) -> list[float]:
        """The implicit-reward margin of each pair, without updating anything."""
        self.engine.eval()
        with torch.no_grad():
            return [float(x) for x in self._loss(pairs).margin]


class DPOTrainerWorker(DPOSteps, TrainerWorker):
    """The policy under offline DPO. `address` on rank 0, then `setup` on all."""

    def __init__(self, ctx: WorkerContext, model: ModelSpec, trainer: TrainerConfig,
                 dpo: DPOConfig, device: str = "cpu", seed: int = 0):
        TrainerWorker.__init__(self, ctx, model, trainer, device, seed)
        self.dpo = dpo


class OnlineDPOTrainerWorker(DPOSteps, PPOTrainerWorker):
    """The policy under online DPO: PPO's trainer rank (weights out to the engines, the
    probe, checkpoints) with no critic, training one DPO step per batch of judged pairs."""

    def __init__(self, ctx: WorkerContext, model: ModelSpec, trainer: TrainerConfig,
                 ppo: PPOConfig, dpo: DPOConfig, device: str = "cpu", seed: int = 0):
        PPOTrainerWorker.__init__(self, ctx, model, trainer, ppo, None, device, seed, 1.0)
        self.dpo = dpo
        self.grad_accum = 1  # each call is this rank's whole share of the batch: one update


def dpo_trainer_group(cfg: Config, policy: ModelSpec, total_steps: int
                      ) -> ActorGroup[DPOTrainerWorker]:
    """The trainer role running DPO (`trainer.*` settings; `dpo.lr` overrides the rate)."""
    trainer = dataclasses.replace(cfg.trainer, lr=cfg.dpo.lr or cfg.trainer.lr,
                                  micro_batch_size=2 * cfg.dpo.micro_batch_size)
    device = device_of(cfg)
    return role_group(cfg, "trainer", DPOTrainerWorker,
                      (policy, trainer, cfg.dpo, device, cfg.run.seed),
                      {"DS_ACCELERATOR": "cpu"} if device == "cpu" else {},
                      lambda g: start_ranks(g, DPOTrainerWorker.setup, total_steps,
                                            cfg.run.startup_timeout_s))


def online_dpo_trainer_group(cfg: Config, policy: ModelSpec, total_steps: int
                             ) -> ActorGroup[OnlineDPOTrainerWorker]:
    """The trainer role running online DPO (`dpo.lr` overrides the rate)."""
    trainer = dataclasses.replace(cfg.trainer, lr=cfg.dpo.lr or cfg.trainer.lr)
    device = device_of(cfg)
    return role_group(cfg, "trainer", OnlineDPOTrainerWorker,
                      (policy, trainer, cfg.ppo, cfg.dpo, device, cfg.run.seed),
                      {"DS_ACCELERATOR": "cpu"} if device == "cpu" else {},
                      lambda g: start_ranks(g, OnlineDPOTrainerWorker.setup, total_steps,
                                            cfg.run.startup_timeout_s))
