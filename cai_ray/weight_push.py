"""The PPO driver's weight sync: the trainer's weights to every rollout engine, then checked.

Two transports (`config.weight_transport`): `collective` broadcasts tensor by tensor from the
trainer's rank 0 to every engine over one stateless group (NCCL on GPU, gloo on CPU), and
`object_store` publishes buckets the engines fetch. Either way each engine audits what it loaded
(`SyncReport`), and the engine's prompt log-probs on a fixed probe are compared with the
trainer's (`sync/logprob_max_diff`); beyond the tolerance the run stops (`WeightSyncError`).
A restarted engine is re-admitted by `restore` (the rollout group's restart hook).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cai_ray.actors.group import ActorCallError, ActorGroup, ActorTimeoutError, Pending
from cai_ray.actors.ppo import PPOTrainerWorker
from cai_ray.actors.rollout import RolloutWorker
from cai_ray.actors.weight_sync import SyncReport, WeightExport
from cai_ray.config import Config
from cai_ray.hardware import dtype_name

log = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    pass


class WeightPusher:
    """Pushes version `version` of the trainer's weights and checks that the engines run it."""

    def __init__(self, cfg: Config, trainer: ActorGroup[PPOTrainerWorker],
                 rollout: ActorGroup[RolloutWorker], transport: str):
        self.cfg, self.trainer, self.rollout, self.transport = cfg, trainer, rollout, transport
        # float32 on both sides agrees to ~1e-6. In bfloat16 the engine's and the trainer's
        # kernels round differently (max |diff| ~0.5 on SmolLM2), so the bound is set from the
        # noise floor measured before the first update (identical weights): 4× it.
        exact = dtype_name(cfg.rollout.engine.dtype) == "float32" and \
            dtype_name(cfg.trainer.dtype) == "float32"
        self.tolerance: float | None = cfg.ppo.sync_tolerance or (1e-3 if exact else None)
        self.noise_floor: float | None = None
        self.probe: list[list[int]] | None = None
        self.version = 0  # the version the engines hold

    # --- the group ------------------------------------------------------------------------------

    def join(self) -> None:
        """Collective: trainer rank 0 and every engine form the weight-sync group (again after
        an engine was replaced: a stateless group is formed anew by all its members)."""
        if self.transport != "collective":
            return
        host, port = self.trainer.call(0, PPOTrainerWorker.address)
        world = 1 + self.rollout.num_actors
        timeout = self.cfg.run.call_timeout_s
        pend: list[Pending[Any]] = [self.trainer.submit(r, PPOTrainerWorker.join_weight_group,
                                                        host, port, world, timeout)
                                    for r in range(self.trainer.num_actors)]
        pend += [self.rollout.submit(r, RolloutWorker.join_weight_group, host, port, r + 1,
                                     world, timeout) for r in range(self.rollout.num_actors)]
        backends = set()
        for grp in (self.trainer, self.rollout):
            backends |= set(grp.get([x for x in pend if x.role == grp.role]))
        log.info("weight-sync group: trainer rank 0 + %d engine(s) over %s",
                 self.rollout.num_actors, ", ".join(sorted(b for b in backends if b)))

    def restore(self, ranks: list[int]) -> None:
        """The rollout group's restart hook: the fresh engines at `ranks` start from the initial
        weights; give them the current ones (collective: the group is formed again and every
        engine reloads the same version) and check what they loaded."""
        if self.transport == "collective":
            self.join()
            if self.version > 0:
                self._collective_push(self.version)
        elif self.version > 0:
            export = self._export()
            for rank in ranks:
                self.rollout.call(rank, RolloutWorker.update_weights, self.version,
                                  buckets=export.buckets, checksums=export.checksums,
                                  fetch_timeout_s=self.cfg.run.call_timeout_s)
        if self.version > 0:
            for rank in ranks:
                self._check_report(self.rollout.call(rank, RolloutWorker.sync_report), rank)

    # --- the push -------------------------------------------------------------------------------

    def _export(self) -> WeightExport:
        return self.trainer.call_all(PPOTrainerWorker.export_weights,
                                     self.cfg.ppo.sync_bucket_mb)[0]

    def push(self, version: int) -> dict[str, float]:
        """Every engine to `version` (the trainer's steps done), then the checks; metrics."""
        t0 = time.monotonic()
        self.version = version
        buckets, sent = 0, -1
        budget = self.cfg.run.max_restarts
        if self.transport == "collective":
            sent = self.rollout.with_restarts(lambda: self._collective_push(version), budget)
        else:
            export = self._export()
            self.rollout.with_restarts(lambda: self.rollout.call_all(
                RolloutWorker.update_weights, version, buckets=export.buckets,
                checksums=export.checksums, fetch_timeout_s=self.cfg.run.call_timeout_s), budget)
            buckets = len(export.buckets)
        t1 = time.monotonic()
        audit = self.check_reports()
        t2 = time.monotonic()
        probe = self.check_probe()
        t3 = time.monotonic()
        # where the sync's seconds go: moving and loading the weights, then the two checks
        out = {"sync/seconds": t3 - t0, "sync/push_s": t1 - t0, "sync/audit_s": t2 - t1,
               "sync/probe_s": t3 - t2, **audit, **probe, "sync/buckets": float(buckets)}
        if sent >= 0:
            out["sync/megabytes"] = sent / 2**20
        return out

    def _collective_push(self, version: int) -> int:
        """Broadcast the trainer's weights to every engine of the group; each engine audits
        what it loaded, then compares it with the sender's checksums. Returns bytes sent."""
        metas = self.trainer.call(0, PPOTrainerWorker.weight_metas)
        pend: list[Pending[int]] = [self.rollout.submit(r, RolloutWorker.receive_weights,
                                                        version, metas)
                                    for r in range(self.rollout.num_actors)]
        try:
            sent, sums = self.trainer.call_all(PPOTrainerWorker.broadcast_weights)[0]
        except ActorCallError as e:
            # an engine that died mid-broadcast broke the group: name it (it is restarted and
            # the group formed again), not the trainer whose send failed
            for x in pend:
                try:
                    self.rollout.get([x])
                except ActorCallError as dead:
                    if dead.actor_died:
                        raise dead from e
                except ActorTimeoutError:
                    pass
            raise
        self.rollout.get(pend)
        self.rollout.call_all(RolloutWorker.check_sender, sums)
        return int(sent)

    # --- the checks -----------------------------------------------------------------------------

    def _check_report(self, report: SyncReport | None, rank: int) -> float:
        """Raise unless engine `rank`'s audit of the last push found every module loaded with
        the trainer's weights; returns its worst relative kernel error."""
        if report is None:
            return 0.0
        if not report.ok:
            raise WeightSyncError(
                f"after sync to version {self.version} rollout[rank {rank}] is not running the "
                f"trained weights: {report.problem()}")
        return report.worst_rel_err

    def check_reports(self) -> dict[str, float]:
        reports = self.rollout.call_all(RolloutWorker.sync_report)
        worst = max((self._check_report(r, i) for i, r in enumerate(reports)), default=0.0)
        if all(r is None for r in reports):
            return {}
        return {"sync/audit_rel_err": worst,
                "sync/audit_modules": float(min(r.modules for r in reports if r is not None))}

    def probe_diff(self) -> tuple[float, float]:
        """(max, mean) |engine − trainer| log-prob over the probe tokens, worst engine."""
        assert self.probe
        # the trainer's forward runs while the engines compute theirs
        mine = [self.trainer.submit(r, PPOTrainerWorker.probe_logprobs, self.probe)
                for r in range(self.trainer.num_actors)]
        worst, mean = 0.0, 0.0
        theirs_all = []
        for r in range(self.rollout.num_actors):
            theirs = self.rollout.with_restarts(
                lambda r=r: self.rollout.call(  # type: ignore[misc]
                    r, RolloutWorker.prompt_logprobs, self.probe), self.cfg.run.max_restarts)
            theirs_all.append(theirs)
        ours = self.trainer.get(mine)[0]
        for theirs in theirs_all:
            diffs = [abs(x - y) for a, b in zip(ours, theirs, strict=True)
                     for x, y in zip(a, b, strict=True)]
            worst, mean = max(worst, max(diffs)), max(mean, sum(diffs) / len(diffs))
        return worst, mean

    def set_probe(self, probe: list[list[int]]) -> None:
        """Fix the probe; with identical weights on both sides, measure the noise floor."""
        self.probe = probe
        if self.tolerance is None:
            self.noise_floor = self.probe_diff()[0]
            self.tolerance = max(4 * self.noise_floor, 0.1)
            log.info("weight-sync check: probe of %d tokens, noise floor %.3g (dtype rounding), "
                     "tolerance %.3g", len(probe[0]), self.noise_floor, self.tolerance)

    def check_probe(self) -> dict[str, float]:
        if not self.probe:
            return {}
        worst, mean = self.probe_diff()
        if self.tolerance is not None and worst > self.tolerance:
            raise WeightSyncError(
                f"after sync to version {self.version} the rollout engine's log-probs differ "
                f"from the trainer's by {worst:.3g} (> tolerance {self.tolerance:.3g}; set "
                "ppo.sync_tolerance to change it): the engine is not running the trained "
                "weights")
        return {"sync/logprob_max_diff": worst, "sync/logprob_mean_diff": mean}
