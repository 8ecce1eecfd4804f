"""Reward role: the preference model, a causal-LM backbone with a scalar head at the final token.

Trained with DeepSpeed on soft-labelled comparisons (`soft_preference_loss`), and serving scores
of (conversation, response) batches to PPO. A trained PM is saved as the backbone in
save_pretrained format plus `reward_head.safetensors` and the tokenizer; `ModelSpec.path` pointing
at such a directory loads the trained head, any other model starts from a fresh head.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cai_ray.actors.group import ActorGroup, WorkerContext
from cai_ray.actors.trainer import DistributedWorker, ds_config, encode_chat, start_ranks
from cai_ray.algorithms.preference import soft_preference_loss
from cai_ray.config import Config, ModelSpec, TrainerConfig
from cai_ray.hardware import torch_dtype
from cai_ray.messages import Comparison, TrainStats
from cai_ray.models import load_tokenizer, quiet_weight_loading, resolve
from cai_ray.runtime import device_of, role_group

HEAD_FILE = "reward_head.safetensors"
# (conversation, response) or (conversation, response, finished): what the PM scores
ScoreItem = tuple[Any, ...]


class ScalarRewardModel(torch.nn.Module):
    """backbone (no LM head) → hidden state of the last real token → linear → one score."""

    def __init__(self, backbone: Any):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.head = torch.nn.Linear(hidden, 1, dtype=backbone.dtype)
        torch.nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [B, T], right-padded → scores [B] (float32)."""
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(dim=1) - 1
        return self.head(h[torch.arange(h.shape[0]), last]).squeeze(-1).float()


def load_reward_model(spec: ModelSpec, dtype: torch.dtype,
                      cls: type[ScalarRewardModel] = ScalarRewardModel) -> ScalarRewardModel:
    from safetensors.torch import load_file
    from transformers import AutoModel

    path = resolve(spec)
    quiet_weight_loading()
    backbone = AutoModel.from_pretrained(path, revision=spec.revision, dtype=dtype,
                                         trust_remote_code=spec.trust_remote_code)
    model = cls(backbone)
    head = Path(path) / HEAD_FILE
    if head.exists():
        model.head.load_state_dict({k: v.to(dtype) for k, v in load_file(str(head)).items()})
    return model


def save_reward_model(model: ScalarRewardModel, tokenizer: Any, out: Path) -> None:
    """Backbone (save_pretrained), head and tokenizer: the directory `load_reward_model` reads."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(out, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()},
              str(out / HEAD_FILE))
    tokenizer.save_pretrained(out)


class RewardWorker(DistributedWorker):
    def __init__(self, ctx: WorkerContext, model: ModelSpec, trainer: TrainerConfig,
                 device: str = "cpu", seed: int = 0):
        super().__init__(ctx)
        self.spec, self.cfg, self.device, self.seed = model, trainer, device, seed
        self.comm_backend = trainer.comm_backend
        self.tokenizer = load_tokenizer(model)
        self.dtype = torch_dtype(trainer.dtype)
        self.engine: Any = None
        self.model: ScalarRewardModel | None = None
        self.step = 0

    def setup(self, master_addr: str, master_port: int, total_steps: int) -> int:
        """Join the process group and wrap the PM in a DeepSpeed engine for training."""
        import deepspeed

        self.join_group(master_addr, master_port)
        torch.manual_seed(self.seed)  # the same fresh head on every rank
        model = load_reward_model(self.spec, self.dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr,
                                weight_decay=self.cfg.weight_decay)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=opt,
            config=ds_config(self.cfg, total_steps, self.ctx.world_size))
        self.model = self.engine.module
        return sum(p.numel() for p in model.parameters())

    def load_for_scoring(self) -> None:
        """Scoring only (PPO's reward role): no optimizer, no process group."""
        torch.manual_seed(self.seed)
        self.model = load_reward_model(self.spec, self.dtype).eval().to(
            "cuda" if self.device == "cuda" else "cpu")

    def _batch(self, items: list[ScoreItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """(conversation, response[, finished]) → right-padded ids and attention mask. A
        response that did not finish (cut at its token budget) is read without an EOS."""
        enc = [encode_chat(self.tokenizer, it[0], it[1], self.cfg.max_length,
                           bool(it[2]) if len(it) > 2 else True)[0] for it in items]
        width = max(len(x) for x in enc)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        attn = torch.zeros((len(enc), width), dtype=torch.long)
        for i, x in enumerate(enc):
            ids[i, : len(x)] = torch.tensor(x)
            attn[i, : len(x)] = 1
        return ids, attn

    def _scores(self, items: list[ScoreItem]) -> torch.Tensor:
        assert self.model is not None, "call setup() or load_for_scoring() first"
        ids, attn = self._batch(items)
        dev = next(self.model.parameters()).device
        return self.model(ids.to(dev), attn.to(dev))

    def train_step(self, batch: list[Comparison]) -> TrainStats:
        """One micro-batch of comparisons: both responses scored in one forward pass."""
        t0 = time.monotonic()
        self.engine.train()
        items: list[ScoreItem] = [(c.messages, c.response_a, c.finished_a) for c in batch] + \
            [(c.messages, c.response_b, c.finished_b) for c in batch]
        r = self._scores(items)
        n = len(batch)
        p = torch.tensor([c.p_a for c in batch], dtype=torch.float32, device=r.device)
        loss = soft_preference_loss(r[:n], r[n:], p)
        self.engine.backward(loss)
        self.engine.step()
        self.step += 1
        return TrainStats(step=self.step, loss=float(loss.item()), tokens=n, lr=self.cfg.lr,
                          grad_norm=None, seconds=time.monotonic() - t0)

    def score(self, items: list[ScoreItem]) -> list[float]:
        """PM score of each (conversation, response[, finished])."""
        if not items:
            return []
        assert self.model is not None
        self.model.eval()
        with torch.no_grad():
            return [float(x) for x in self._scores(items).cpu()]

    def save(self, path: str) -> str:
        import deepspeed

        assert self.model is not None
        # Under ZeRO-3 every rank must join the gather, in the same order; rank 0 writes.
        with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None,
                                               enabled=self.cfg.zero_stage == 3 and
                                               self.engine is not None):
            if self.ctx.rank == 0:
                save_reward_model(self.model, self.tokenizer, Path(path))
        return path

    def close(self) -> None:
        self.engine = self.model = None


def scoring_restore(group: ActorGroup[RewardWorker]) -> Callable[[list[int]], None]:
    """The scoring group's restore hook: a restarted actor loads the PM again."""

    def restore(ranks: list[int]) -> None:
        for r in ranks:
            group.call(r, RewardWorker.load_for_scoring)

    return restore


def reward_group(cfg: Config, spec: ModelSpec, total_steps: int | None
                 ) -> ActorGroup[RewardWorker]:
    """The reward group; `total_steps` set = join a process group and build the trainer."""
    device = device_of(cfg)
    r = cfg.reward
    tcfg = dataclasses.replace(cfg.trainer, lr=r.lr, micro_batch_size=r.micro_batch_size,
                               grad_accum=r.grad_accum, max_length=r.max_length)

    def start(group: ActorGroup[RewardWorker]) -> None:
        if total_steps is None:
            group.call_all(RewardWorker.load_for_scoring)
            group.on_restart = scoring_restore(group)
        else:
            start_ranks(group, RewardWorker.setup, total_steps, cfg.run.startup_timeout_s)

    return role_group(cfg, "reward", RewardWorker, (spec, tcfg, device, cfg.run.seed),
                      {"DS_ACCELERATOR": "cpu"} if device == "cpu" else {}, start)
