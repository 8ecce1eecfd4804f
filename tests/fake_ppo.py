"""Fast in-process PPO workers for testing the driver (`stages/ppo.py`) in milliseconds.

Each fake subclasses the real role and overrides only what the driver calls, answering with
tiny deterministic data: the "weights" are a version number. The trainer's version is its
update count; an engine holds the version last pushed to it, and its probe log-probs are a
function of that version, so the driver's sync check sees a stale engine exactly as it sees
one on real weights. `Faults` injects deaths (`WorkerDied`), hangs (a sleep past the call
timeout) and interrupts at a given call of a given role's method.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import torch

from cai_ray.actors.group import ActorGroup, WorkerContext, WorkerDied
from cai_ray.actors.ppo import PPOTrainerWorker
from cai_ray.actors.reference import ReferenceWorker
from cai_ray.actors.reward import RewardWorker, scoring_restore
from cai_ray.actors.rollout import RolloutWorker
from cai_ray.actors.weight_sync import WeightExport
from cai_ray.config import Config
from cai_ray.messages import (
    Completion,
    Experience,
    GenerationRequest,
    GenerationResult,
    PolicyForward,
    PPOStats,
)
from cai_ray.stages.ppo import PPORun


class Faults:
    """What to inject: (role, method, n) → "die" | "hang" | "crash" at the n-th call
    (1-based, counted over the whole run, restarted actors included); `log` lists what ran."""

    def __init__(self) -> None:
        self.plan: dict[tuple[str, str, int], str] = {}
        self.calls: dict[tuple[str, str], int] = {}
        self.log: list[tuple[str, int, str]] = []  # (role, rank, method)
        self.hang_s = 1.0
        self.lock = threading.Lock()

    def at(self, role: str, method: str, n: int, what: str) -> Faults:
        self.plan[(role, method, n)] = what
        return self

    def hit(self, ctx: WorkerContext, method: str) -> None:
        with self.lock:
            k = self.calls.get((ctx.role, method), 0) + 1
            self.calls[(ctx.role, method)] = k
            self.log.append((ctx.role, ctx.rank, method))
            what = self.plan.pop((ctx.role, method, k), None)
        if what == "die":
            raise WorkerDied(f"{ctx.role}[{ctx.rank}] killed in {method}")
        if what == "hang":
            time.sleep(self.hang_s)
        if what == "crash":  # an ordinary failure (a bug, a driver crash): not recovered
            raise RuntimeError(f"{ctx.role}[{ctx.rank}] crash in {method} (injected)")


FAULTS = Faults()


def probe_value(version: int, n: int) -> list[float]:
    return [-1.0 - 0.01 * version - 0.001 * i for i in range(n)]


class FakeRollout(RolloutWorker):
    def __init__(self, ctx: WorkerContext, response_len: int = 3):
        self.ctx = ctx
        self.weight_version = 0
        self.response_len = response_len
        self.frozen = False  # True: ignores pushes (a stale engine)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        FAULTS.hit(self.ctx, "generate")
        out = []
        for r in requests:
            pid = [1 + (sum(map(ord, r.request_id)) % 50), 2]
            comps = [Completion(f"{r.request_id}#{j}", [3 + j, 4, 5][: self.response_len],
                                [-0.5] * self.response_len, "stop" if j % 2 else "length")
                     for j in range(r.n)]
            out.append(GenerationResult(r.request_id, pid, comps, self.weight_version,
                                        self.ctx.rank))
        return out

    def update_weights(self, version: int, weights: Any = None, path: str | None = None,
                       buckets: Any = None, fetch_timeout_s: float = 600.0,
                       checksums: Any = None) -> int:
        FAULTS.hit(self.ctx, "update_weights")
        if not self.frozen:
            self.weight_version = version
        return self.weight_version

    def sync_report(self) -> None:
        return None

    def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        FAULTS.hit(self.ctx, "prompt_logprobs")
        return [probe_value(self.weight_version, len(x) - 1) for x in token_ids]


class FakeReward(RewardWorker):
    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.loaded = False

    def load_for_scoring(self) -> None:
        FAULTS.hit(self.ctx, "load_for_scoring")
        self.loaded = True

    def score(self, items: list[Any]) -> list[float]:
        FAULTS.hit(self.ctx, "score")
        if not self.loaded:
            raise RuntimeError("scoring before the PM was loaded")
        return [0.1 * (len(x[1]) % 7) for x in items]


class FakeReference(ReferenceWorker):
    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx

    def logprobs(self, seqs: list[Any]) -> Any:
        FAULTS.hit(self.ctx, "logprobs")
        return torch.full((sum(len(r) for _, r in seqs),), -0.6)


class FakeTrainer(PPOTrainerWorker):
    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.updates = 0
        self.trained: list[list[tuple[list[int], list[int]]]] = []

    def experience(self, seqs: list[Any]) -> PolicyForward:
        FAULTS.hit(self.ctx, "experience")
        return PolicyForward(torch.full((sum(len(r) for _, r in seqs),), -0.55), None)

    def train_ppo(self, exp: Experience) -> PPOStats:
        FAULTS.hit(self.ctx, "train_ppo")
        assert exp.advantages.numel() == sum(exp.lengths)
        self.trained.append(exp.sequences)
        self.updates += 1
        return PPOStats(policy_loss=0.1, entropy=1.0, clip_fraction=0.0, approx_kl=0.0,
                        ratio_mean=1.0, lr=1e-5, seconds=0.0, tokens=float(sum(exp.lengths)))

    def export_weights(self, bucket_mb: float) -> WeightExport:
        FAULTS.hit(self.ctx, "export_weights")
        return WeightExport([], {})

    def probe_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        return [probe_value(self.updates, len(x) - 1) for x in token_ids]

    def save_checkpoint(self, path: str) -> str:
        FAULTS.hit(self.ctx, "save_checkpoint")
        d = Path(path) / "policy"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"rank{self.ctx.rank}.json").write_text(json.dumps({"updates": self.updates}))
        return path

    def load_checkpoint(self, path: str) -> int:
        self.updates = json.loads((Path(path) / "policy" /
                                   f"rank{self.ctx.rank}.json").read_text())["updates"]
        return self.updates

    def save(self, path: str) -> str:
        if self.ctx.rank == 0:
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "config.json").write_text(json.dumps({"updates": self.updates}))
        return path

    def close(self) -> None:
        pass


class FastRun(PPORun):
    """PPORun over the fake workers, every group in-process (`run.local_mode`)."""

    def group_makers(self) -> dict[str, Any]:
        cfg: Config = self.cfg

        def group(role: str, cls: type) -> ActorGroup[Any]:
            return ActorGroup(role, cls, getattr(cfg.placement, role), local=True,
                              call_timeout_s=cfg.run.call_timeout_s, startup_timeout_s=10)

        def reward() -> ActorGroup[Any]:
            g = group("reward", FakeReward)
            g.call_all(RewardWorker.load_for_scoring)
            g.on_restart = scoring_restore(g)  # the restore hook reward_group installs
            return g

        return {"rollout": lambda: group("rollout", FakeRollout), "reward": reward,
                "reference": lambda: group("reference", FakeReference),
                "trainer": lambda: group("trainer", FakeTrainer)}
