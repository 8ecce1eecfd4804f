"""PPO trainer role: the policy and the critic (value model), each its own DeepSpeed engine.

Sequences cross the actor boundary as (prompt ids, response ids) token lists, the exact tokens the
rollout engine produced, so nothing is re-tokenised. Per-token tensors go back and forth flat
([N] over response tokens, row-major), the layout `token_logprobs` produces; the driver turns them
into [B, T] rows for the algorithm (`algorithms/ppo.py`) and back.

The trainer computes the "old" log-probs and values itself just before training (the proximal
policy of decoupled PPO): with `max_staleness` > 0 a batch may come from weights one version older
than the trainer's, and the clipped ratio is taken against the trainer's current weights, while
the gap to the rollout engine's own log-probs is reported as `rollout/logprob_gap`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cai_ray.actors.group import ActorGroup, WorkerContext
from cai_ray.actors.reward import ScalarRewardModel, load_reward_model
from cai_ray.actors.trainer import (
    Sequence,
    TrainerWorker,
    build_optimizer,
    ds_config,
    load_weights_only,
    pack_sequences,
    pad_id,
    start_ranks,
    token_logprobs,
)
from cai_ray.actors.weight_channel import TensorMeta, WeightChannel
from cai_ray.actors.weight_sync import (
    Named,
    WeightExport,
    checksum,
    export_plan,
    iter_buckets,
)
from cai_ray.actors.weight_sync import publish as publish_buckets
from cai_ray.algorithms.masked import masked_mean
from cai_ray.algorithms.ppo import behaviour_weights, kl_penalty, policy_loss, value_loss
from cai_ray.config import Config, ModelSpec, PPOConfig, TrainerConfig
from cai_ray.hardware import release_freed_memory, torch_dtype
from cai_ray.messages import Experience, PolicyForward, PPOStats
from cai_ray.runtime import role_group

log = logging.getLogger(__name__)


class TokenValueModel(ScalarRewardModel):
    """PPO's critic: the same backbone + scalar head, read at every position (the value of the
    state after that token). Initialised from the trained PM, as is usual in RLHF."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] → values [B, T] (float32)."""
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(h).squeeze(-1).float()


class PPOTrainerWorker(TrainerWorker):
    """One data-parallel rank of the PPO trainer. `critic` is the model the value head starts
    from (the trained PM); None for the critic-free estimators (rloo, grpo)."""

    def __init__(self, ctx: WorkerContext, model: ModelSpec, trainer: TrainerConfig,
                 ppo: PPOConfig, critic: ModelSpec | None, device: str = "cpu", seed: int = 0,
                 temperature: float = 1.0):
        super().__init__(ctx, model, trainer, device, seed)
        self.ppo, self.critic_spec = ppo, critic
        self.temperature = temperature  # the sampler's: log-probs are of softmax(logits / T)
        per_rank = ppo.mini_batch_size // ctx.world_size
        self.grad_accum = max(1, per_rank // trainer.micro_batch_size)
        self.critic: Any = None
        self.updates = 0  # PPO steps trained (= the policy's weight version)
        self._comm: Any = None

    def setup(self, master_addr: str, master_port: int, total_steps: int) -> int:
        n = super().setup(master_addr, master_port, total_steps)
        if self.critic_spec is not None:
            import deepspeed

            dtype = torch_dtype(self.cfg.dtype)
            value = load_reward_model(self.critic_spec, dtype, TokenValueModel)
            opt = build_optimizer(value.parameters(), self.cfg, self.ppo.critic_lr or self.cfg.lr)
            self.critic, *_ = deepspeed.initialize(
                model=value, optimizer=opt,
                config=ds_config(self.cfg, total_steps, self.ctx.world_size, self.grad_accum))
            n += sum(p.numel() for p in value.parameters())
        return n

    def _pack(self, seqs: list[Sequence]) -> tuple[Any, Any, Any]:
        dev = self.engine.device
        return tuple(x.to(dev) for x in pack_sequences(seqs, pad_id(self.tokenizer),
                                                       self.cfg.max_length))

    def _values(self, ids: Any, attn: Any, mask: Any) -> Any:
        """Critic value of the state before each response token: flat [N]."""
        v = self.critic(ids, attn)[:, :-1]
        return v[mask[:, 1:]]

    def experience(self, seqs: list[Sequence]) -> PolicyForward:
        """Log-probs of the response tokens under the current policy and the critic's values
        (None without a critic), flat [N]; no gradients."""
        self.engine.eval()
        if self.critic is not None:
            self.critic.eval()
        lps, vals = [], []
        mb = self.cfg.micro_batch_size
        with torch.no_grad():
            for i in range(0, len(seqs), mb):
                ids, attn, mask = self._pack(seqs[i:i + mb])
                lps.append(token_logprobs(self.policy, ids, attn, mask,
                                          temperature=self.temperature)[0])
                if self.critic is not None:
                    vals.append(self._values(ids, attn, mask))
        return PolicyForward(torch.cat(lps).cpu(), torch.cat(vals).cpu() if vals else None)

    def reference_logprobs(self, seqs: list[Sequence]) -> Any:
        """With LoRA, the reference for free: the frozen base (the initial policy) with the
        adapters disabled, log-probs of the response tokens at the sampler's temperature, flat
        [N] (what the reference role answers without LoRA); no gradients."""
        if not self.cfg.lora.rank:
            raise RuntimeError("reference_logprobs needs trainer.lora.rank > 0 (else the "
                               "trained weights are not the reference)")
        self.engine.eval()
        out = []
        mb = self.cfg.micro_batch_size
        with torch.no_grad(), self.engine.module.disable_adapter():
            for i in range(0, len(seqs), mb):
                ids, attn, mask = self._pack(seqs[i:i + mb])
                out.append(token_logprobs(self.policy, ids, attn, mask,
                                          temperature=self.temperature)[0])
        return torch.cat(out).cpu() if out else torch.zeros(0)

    def train_ppo(self, exp: Experience) -> PPOStats:
        """PPO epochs over this rank's shard of a batch (`Experience.shard`), in shuffled
        minibatches of mini_batch_size / world sequences (one optimizer step each, accumulated
        over micro-batches).

        `exp.old_logprobs` None (`ppo.single_update`): the batch is one optimizer step, so the
        weights do not move before every micro-batch has run and the log-probs of this very
        forward are the old ones. `exp.ref_logprobs` given (`ppo.kl_penalty=loss`): β·k3 KL to
        the reference, averaged over tokens, is added to the loss (stats kl_token, kl_seq).
        `exp.behaviour_logprobs` given (a batch partly sampled by older weights): each token's
        surrogate is scaled by min(p_old / p_sampler, is_cap), NaN marking fresh tokens
        (`behaviour_weights`; stat is_weight_mean)."""
        seqs, old_logprobs, advantages = exp.sequences, exp.old_logprobs, exp.advantages
        returns, old_values, ref_logprobs = exp.returns, exp.old_values, exp.ref_logprobs
        behaviour_logprobs, kl_coef, is_cap = exp.behaviour_logprobs, exp.kl_coef, exp.is_cap
        t0 = time.monotonic()
        p = self.ppo
        lengths = [len(r) for _, r in seqs]
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)

        def take(x: Any, idx: list[int]) -> Any:
            return torch.cat([x[starts[i]:starts[i + 1]] for i in idx]).to(self.engine.device)

        per_rank = p.mini_batch_size // self.ctx.world_size
        if old_logprobs is None and (p.ppo_epochs != 1 or per_rank < len(seqs)):
            raise ValueError("old log-probs may be left out only when the batch is a single "
                             "optimizer step (ppo.single_update)")
        mb = self.cfg.micro_batch_size
        rng = random.Random(self.seed * 100_003 + self.updates)
        sums: dict[str, float] = {}
        count = 0
        self.engine.train()
        if self.critic is not None:
            self.critic.train()
        kl_tokens, kl_count = 0.0, 0
        for epoch in range(p.ppo_epochs):
            order = list(range(len(seqs)))
            rng.shuffle(order)
            for start in range(0, len(order), per_rank):
                rows = order[start:start + per_rank]
                for m in range(0, len(rows), mb):
                    idx = rows[m:m + mb]
                    ids, attn, mask = self._pack([seqs[i] for i in idx])
                    logp, ent = token_logprobs(self.policy, ids, attn, mask,
                                               entropy=True, temperature=self.temperature,
                                               entropy_grad=bool(p.entropy_coef))
                    ones = torch.ones_like(logp, dtype=torch.bool)
                    adv = take(advantages, idx)
                    old = logp.detach() if old_logprobs is None else take(old_logprobs, idx)
                    w = None
                    if behaviour_logprobs is not None:
                        w = behaviour_weights(old.float(), take(behaviour_logprobs, idx), is_cap)
                    loss, stats = policy_loss(logp, old, adv, ones, p.clip_eps, w)
                    entropy = masked_mean(ent, ones)
                    if p.entropy_coef:
                        loss = loss - p.entropy_coef * entropy
                    if ref_logprobs is not None:
                        kl = kl_penalty(logp, take(ref_logprobs, idx), "k3")
                        loss = loss + kl_coef * kl.mean()
                        if epoch == 0:  # the KL of the batch's policy, before any update
                            kl_tokens += float(kl.detach().sum().item())
                            kl_count += kl.numel()
                    self.engine.backward(loss)
                    self.engine.step()
                    stats.update(policy_loss=float(loss.item()), entropy=float(entropy.item()))
                    if self.critic is not None and returns is not None:
                        v = self._values(ids, attn, mask)
                        vloss, vstats = value_loss(v, take(old_values, idx), take(returns, idx),
                                                   ones, p.value_clip)
                        self.critic.backward(p.value_coef * vloss)
                        self.critic.step()
                        stats.update(vstats, value_loss=float(vloss.item()))
                    for k, val in stats.items():
                        sums[k] = sums.get(k, 0.0) + float(val)
                    count += 1
        self.updates += 1
        out: dict[str, Any] = {k: v / max(count, 1) for k, v in sums.items()}
        if ref_logprobs is not None:
            out["kl_token"] = kl_tokens / max(kl_count, 1)
            out["kl_seq"] = kl_tokens / max(len(seqs), 1)
        norm = self.engine.get_global_grad_norm()
        if norm is not None and math.isfinite(float(norm)):
            out["grad_norm"] = float(norm)
        out["lr"] = self.engine.get_lr()[0] if self.engine.lr_scheduler else self.cfg.lr
        out["seconds"] = time.monotonic() - t0
        out["tokens"] = float(sum(lengths))
        return PPOStats(**out)

    # --- weights out ------------------------------------------------------------------------------

    def _gathered(self) -> Iterator[Named]:
        """The policy's full tensors on rank 0, one at a time, under every name the engine's
        loader expects (`export_names`: a tied output head is sent as `lm_head.weight` too),
        each yielded while it is gathered: the consumer sends or copies it before the next
        gather. Every rank must iterate to the end (ZeRO-3 gathers tensor by tensor, all ranks
        in the same order); other ranks yield nothing."""
        import deepspeed

        for item in export_plan(self.engine.module):
            params = [p for p in item.params if isinstance(p, torch.nn.Parameter)]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None,
                                                   enabled=self.cfg.zero_stage == 3 and
                                                   bool(params)):
                if self.ctx.rank == 0:
                    yield item.name, item.make()

    def export_weights(self, bucket_mb: float) -> WeightExport:
        """Object-store weight sync: rank 0's weights in published buckets, each put into the
        object store as soon as it is full (the host holds one bucket beyond the store), with
        the float64 checksum of every tensor as the trainer holds it now (empty on other
        ranks)."""
        sums: dict[str, tuple[float, float]] = {}

        # A copy of each tensor even on the CPU: DeepSpeed's parameters are views into one
        # flat buffer, and pickling a view writes its whole storage (a bucket of views once
        # grew to 3.8 GB and the trainer to 20 GB).
        def host_copies() -> Iterator[Named]:
            for name, t in self._gathered():
                sums[name] = checksum(t)
                yield name, t.to("cpu", copy=True)

        refs = [ref for b in iter_buckets(host_copies(), int(bucket_mb * 2**20))
                for ref in publish_buckets([b])]
        return WeightExport(refs, sums)

    def weight_metas(self) -> list[TensorMeta]:
        """Names, full shapes (`ds_shape` of a ZeRO-3 partitioned parameter, whose own shape is
        empty) and dtypes of what `broadcast_weights` sends, in its order."""
        return [TensorMeta(x.name, tuple(getattr(x.params[0], "ds_shape", x.params[0].shape)),
                           str(x.params[0].dtype).removeprefix("torch."))
                for x in export_plan(self.engine.module)]

    def join_weight_group(self, host: str, port: int, world_size: int,
                          timeout_s: float = 1800.0) -> str:
        """Collective weight sync: rank 0 (re)forms the group with the rollout engines, as its
        rank 0 (NCCL on GPU, gloo on CPU); returns the backend ("" on other ranks)."""
        if self.ctx.rank != 0:
            return ""
        self._comm = WeightChannel(host, port, 0, world_size,
                                   "cuda:0" if self.device == "cuda" else "cpu", timeout_s)
        return str(self._comm.backend)

    def broadcast_weights(self) -> tuple[int, dict[str, tuple[float, float]]]:
        """Collective weight sync: every tensor from device memory, inside its gather; returns
        the bytes sent and the sender's checksums (rank 0; (0, {}) elsewhere)."""
        gathered = self._gathered()
        if self.ctx.rank != 0:
            for _ in gathered:  # the other ranks take part in each gather
                pass
            return 0, {}
        try:
            return self._comm.send(gathered)
        except Exception:
            self._comm.abort()  # free the engines still waiting for the rest
            for _ in gathered:  # keep the other ranks' gathers in step, then fail
                pass
            raise

    def probe_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """log p(token t | tokens < t), t >= 1, of each sequence: what the rollout engine's
        `prompt_logprobs` returns for the same tokens, to check a weight sync."""
        self.engine.eval()
        with torch.no_grad():
            ids, attn, mask = self._pack([(x[:1], x[1:]) for x in token_ids])
            flat = token_logprobs(self.policy, ids, attn, mask)[0].tolist()
        out, i = [], 0
        for x in token_ids:
            out.append(flat[i:i + len(x) - 1])
            i += len(x) - 1
        return out

    # --- checkpoints ------------------------------------------------------------------------------

    def save_checkpoint(self, path: str) -> str:
        """Policy and critic engines (weights, optimizer, scheduler) + this rank's RNG state."""
        state = {"updates": self.updates, "torch_rng": torch.get_rng_state()}
        self.engine.save_checkpoint(str(Path(path) / "policy"), tag="state",
                                    client_state=state, save_latest=False)
        if self.critic is not None:
            self.critic.save_checkpoint(str(Path(path) / "critic"), tag="state",
                                        save_latest=False)
        before, after = release_freed_memory()
        log.info("checkpoint saved; trainer RSS %.2f GB, %.2f GB after releasing freed memory",
                 before / 1e9, after / 1e9)
        return path

    def load_checkpoint(self, path: str) -> int:
        """Read a checkpoint back (`torch.load(weights_only=True)`: no code runs from it)."""
        load_weights_only(self.engine)
        _, client = self.engine.load_checkpoint(str(Path(path) / "policy"), tag="state")
        if client is None:
            raise FileNotFoundError(f"no policy checkpoint in {path}")
        if self.critic is not None:
            load_weights_only(self.critic)
            self.critic.load_checkpoint(str(Path(path) / "critic"), tag="state")
        self.updates = int(client["updates"])
        torch.set_rng_state(client["torch_rng"])
        return self.updates

    def close(self) -> None:
        self.engine = self.critic = None


def ppo_trainer_group(cfg: Config, policy: ModelSpec, critic: ModelSpec | None, device: str,
                      total_steps: int) -> ActorGroup[PPOTrainerWorker]:
    """The PPO trainer's ranks, started together (`total_steps` optimizer steps for the LR
    schedule); `critic` is the PM the value model starts from (None: no critic)."""
    env = {"DS_ACCELERATOR": "cpu"} if device == "cpu" else {}
    return role_group(
        cfg, "trainer", PPOTrainerWorker,
        (policy, cfg.trainer, cfg.ppo, critic, device, cfg.run.seed,
         cfg.rollout.sampling.temperature), env,
        lambda g: start_ranks(g, PPOTrainerWorker.setup, total_steps, cfg.run.startup_timeout_s))

