"""Reference role: the frozen initial policy, for PPO's KL term and DPO's implicit reward.

It answers the log-probs of response tokens at the sampler's temperature, as the trainer's are
(DPO: at temperature 1), with no optimizer and no process group: one actor per shard of a batch.
"""

from __future__ import annotations

from typing import Any

import torch

from cai_ray.actors.group import ActorGroup, Worker, WorkerContext
from cai_ray.actors.trainer import Sequence, pack_sequences, pad_id, token_logprobs
from cai_ray.config import Config, ModelSpec
from cai_ray.models import load_causal_lm, load_tokenizer
from cai_ray.runtime import role_group


class ReferenceWorker(Worker):
    """The frozen initial policy, for the KL term: log-probs of response tokens, no optimizer."""

    def __init__(self, ctx: WorkerContext, model: ModelSpec, dtype: str, max_length: int,
                 micro_batch_size: int, device: str = "cpu", temperature: float = 1.0):
        super().__init__(ctx)
        self.temperature = temperature  # the sampler's, as the trainer's log-probs
        self.tokenizer = load_tokenizer(model)
        self.device = device
        self.model = load_causal_lm(model, dtype, device).eval()
        self.max_length, self.mb = max_length, micro_batch_size

    def logprobs(self, seqs: list[Sequence]) -> Any:
        out = []
        with torch.no_grad():
            for i in range(0, len(seqs), self.mb):
                batch = pack_sequences(seqs[i:i + self.mb], pad_id(self.tokenizer),
                                       self.max_length)
                ids, attn, mask = (x.to(self.device) for x in batch)
                out.append(token_logprobs(self.model, ids, attn, mask,
                                          temperature=self.temperature)[0].cpu())
        return torch.cat(out)

    def logprob_sums(self, seqs: list[Sequence]) -> list[float]:
        """Σ log p of each sequence's response tokens (DPO's reference term), one per sequence."""
        flat = self.logprobs(seqs)
        return [float(x.sum()) for x in torch.split(flat, [len(r) for _, r in seqs])]


def reference_group(cfg: Config, policy: ModelSpec, device: str,
                    temperature: float | None = None) -> ActorGroup[ReferenceWorker]:
    """The reference group: `policy` frozen, read in the trainer's dtype and length, its
    log-probs at `temperature` (None: the sampler's, as PPO's trainer)."""
    t = cfg.rollout.sampling.temperature if temperature is None else temperature
    return role_group(cfg, "reference", ReferenceWorker,
                      (policy, cfg.trainer.dtype, cfg.trainer.max_length,
                       cfg.trainer.micro_batch_size, device, t))
