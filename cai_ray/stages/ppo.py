"""RL-CAI: PPO of the SL-CAI policy against the preference model, one driver over four groups.

    rollout (vLLM) ──Rollouts──▶ reward (PM score) ┐
         ▲                   └─▶ reference (KL)    ├─▶ advantages ─▶ trainer (DeepSpeed PPO)
         └──────────── weights, version v+1 ◀──────┴──────────────────────────────┘

Streaming: the batch of step t+1 (and up to `ppo.max_staleness` batches ahead) is being generated
while step t scores, trains and syncs. A batch submitted after sync v runs on weights v (an actor
runs its calls in order), and is trained at step t ≥ v, so `version − batch version ≤
max_staleness` holds by construction; it is still checked for every batch, and a violation stops
the run rather than train on older weights. In-flight generations are at most max_staleness + 1
batches: that bound is the backpressure.

Every phase is timed (`time/generate_wait` is the part of generation the driver waits for, the
rest overlapped training). After every sync the engine's prompt log-probs on a fixed probe are
compared with the trainer's (`sync/logprob_max_diff`); beyond `ppo.sync_tolerance` the run stops.

Resume: every `checkpoint_every` steps the trainer's engines (policy, critic, optimizers, RNG)
and the driver's state (step, weight version, prompt-stream position, KL coefficient) are saved
atomically (`checkpoint.Checkpoints`). `--resume` loads the newest, pushes its weights to the
engines, and cuts `consumed.jsonl` and `metrics.jsonl` back to its step: every prompt is trained
on exactly once across the runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import datasets
import torch
from tqdm import tqdm

from cai_ray.actors.group import ActorCallError, ActorGroup, ActorTimeoutError, Pending
from cai_ray.actors.ppo import PPOTrainerWorker, ppo_trainer_group
from cai_ray.actors.reference import ReferenceWorker, reference_group
from cai_ray.actors.reward import RewardWorker, reward_group
from cai_ray.actors.rollout import RolloutWorker, rollout_group
from cai_ray.actors.trainer import Sequence, TrainerWorker, save_group_model
from cai_ray.actors.weight_sync import SyncReport, WeightExport
from cai_ray.algorithms.masked import masked_mean, masked_sum, masked_whiten
from cai_ray.algorithms.ppo import (
    AdaptiveKLController,
    FixedKLController,
    broadcast_sequence_advantage,
    gae,
    grpo_advantages,
    kl_penalty,
    rloo_advantages,
    token_rewards,
)
from cai_ray.checkpoint import Checkpoints, rewind_jsonl
from cai_ray.config import (
    Config,
    ModelSpec,
    rl_sampling_problems,
    weight_sync_problems,
    weight_transport,
)
from cai_ray.configschema import Problem, ValidationError
from cai_ray.data import PromptStream, load_prompts
from cai_ray.hardware import dtype_name
from cai_ray.messages import GenerationRequest, GenerationResult, Prompt
from cai_ray.models import load_tokenizer
from cai_ray.rundir import policy_spec, reward_spec
from cai_ray.runtime import device_of, ray_session, request_seed
from cai_ray.tracking import Tracker

log = logging.getLogger(__name__)
T = TypeVar("T")


AHEAD_FILE = "ahead.json"  # in a checkpoint: the batches sampled for the next steps


class ResumeError(RuntimeError):
    pass


class WeightSyncError(RuntimeError):
    pass


class StalenessError(RuntimeError):
    pass


@dataclass
class Batch:
    """Prompts on their way through the rollout group (driver side only)."""

    index: int  # the step (0-based) that trains on it
    prompts: list[Prompt]
    stream_state: dict[str, int]  # the prompt stream just after these prompts were taken
    pending: list[Pending[list[GenerationResult]]]
    submitted: float
    requests: list[GenerationRequest]
    collected: list[Sample] | None = None  # its samples, once gathered (or restored)


@dataclass
class Sample:
    prompt: Prompt
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    rollout_logprobs: list[float] | None  # the sampler's log-probs (after temperature)
    weight_version: int
    finished: bool = True  # stopped by itself; False = cut off at max_new_tokens


# --- algorithm glue (driver side, pure) -------------------------------------------------------

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


def advantages(cfg: Config, scores: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor,
               values: torch.Tensor | None, mask: torch.Tensor, kl_coef: float
               ) -> dict[str, torch.Tensor]:
    """Advantages (and critic returns) of one batch, all [B, T] but `seq_kl` [B]. With
    `ppo.kl_penalty=loss` the reward is the score alone (the trainer adds β·KL to its loss) and
    `seq_kl` is left out when the old log-probs were not computed (`old` None)."""
    p = cfg.ppo
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


def behaviour_logprobs(samples: list[Sample], version: int) -> torch.Tensor | None:
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
                raise ValueError(f"a stale sample of {s.prompt.id} has no sampler log-probs "
                                 "for its tokens: the staleness correction needs them")
            parts.append(torch.tensor(lp, dtype=torch.float32))
        else:
            parts.append(torch.full((n,), float("nan")))
    return torch.cat(parts)


# --- groups -----------------------------------------------------------------------------------

def ppo_prompts(cfg: Config) -> datasets.Dataset:
    """Red-team and helpfulness prompts together (the paper's RL prompts mix both)."""
    parts = [load_prompts(src, cfg.data.on_bad_row)[0]
             for src in (cfg.data.red_team, cfg.data.helpful)]
    return datasets.concatenate_datasets(parts)


def check_prompt_lengths(cfg: Config, prompts: datasets.Dataset, tok: Any) -> None:
    """Refuse, before any actor starts, prompts whose chat rendering plus
    rollout.sampling.max_new_tokens does not fit trainer.max_length: the trainer would have to
    cut the prompt the engine sampled from, and train on a context the policy never saw."""
    limit, budget = cfg.trainer.max_length, cfg.rollout.sampling.max_new_tokens
    bad = []
    for i, row in enumerate(prompts):
        text = tok.apply_chat_template(row["messages"], tokenize=False,
                                       add_generation_prompt=True)
        n = len(tok.encode(text, add_special_tokens=False))
        if n + budget > limit:
            bad.append(Problem(f"row {i} ({row['id']})", f"{n} prompt tokens + {budget} new "
                               f"tokens > trainer.max_length={limit}", row["source"]))
    if bad:
        raise ValidationError(
            f"{len(bad)} RL prompt(s) do not fit trainer.max_length (raise it, lower "
            "rollout.sampling.max_new_tokens, or set the sources' max_prompt_chars/limit)",
            bad[:20])


def check_same_tokenizer(policy_tok: Any, critic_tok: Any, policy: ModelSpec,
                         critic: ModelSpec) -> None:
    """The critic reads the policy's token ids as they are: refuse a critic whose tokenizer
    would read them as other tokens."""
    sample = "Constitutional AI: critique, revise, compare. 12345 ünïcödé <tag>"
    same = (len(policy_tok) == len(critic_tok) and
            policy_tok.eos_token_id == critic_tok.eos_token_id and
            policy_tok.encode(sample, add_special_tokens=False) ==
            critic_tok.encode(sample, add_special_tokens=False) and
            policy_tok.get_vocab() == critic_tok.get_vocab())
    if not same:
        raise ValueError(f"advantage=gae: the critic (from the PM at {critic.path}) does not "
                         f"share the policy's tokenizer ({policy.path}), and it is fed the "
                         "policy's token ids; train the PM on the policy's backbone, or use "
                         "ppo.advantage=grpo/rloo (no critic)")


class PPORun:
    def __init__(self, cfg: Config, out_dir: Path, resume: bool):
        self.cfg, self.out, self.resume = cfg, out_dir, resume
        self.dir = out_dir / "ppo"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpts = Checkpoints(self.dir / "checkpoints", cfg.ppo.keep_checkpoints)
        problems = rl_sampling_problems(cfg)
        if problems:
            raise ValidationError("RL-CAI sampling", problems)
        self.policy = policy_spec(cfg, out_dir)
        self.reward = reward_spec(cfg, out_dir)
        prompts = ppo_prompts(cfg)
        tok = load_tokenizer(self.policy)
        check_prompt_lengths(cfg, prompts, tok)
        if cfg.ppo.advantage == "gae":
            check_same_tokenizer(tok, load_tokenizer(self.reward), self.policy, self.reward)
        self.stream = PromptStream(prompts, seed=cfg.data.shuffle_seed)
        p = cfg.ppo
        self.kl = (AdaptiveKLController(p.kl_coef, p.target_kl) if p.adaptive_kl
                   else FixedKLController(p.kl_coef))
        self.device = device_of(cfg)
        bad = weight_sync_problems(cfg, self.device)  # run.device auto, resolved here
        if bad:
            raise ValidationError("weight sync", [Problem(k, m, "config") for k, m in bad])
        self.transport = weight_transport(cfg, self.device)
        # float32 on both sides agrees to ~1e-6. In bfloat16 the engine's and the trainer's
        # kernels round differently (max |diff| ~0.5 on SmolLM2), so the bound is set from the
        # noise floor measured before the first update (identical weights): 4× it.
        exact = dtype_name(cfg.rollout.engine.dtype) == "float32" and \
            dtype_name(cfg.trainer.dtype) == "float32"
        self.tolerance: float | None = p.sync_tolerance or (1e-3 if exact else None)
        self.noise_floor: float | None = None
        self.step = 0  # PPO steps done = the trainer's weight version
        self.probe: list[list[int]] | None = None
        self.groups: list[ActorGroup[Any]] = []
        self.live: Any = None
        self.recovery_s: list[float] = []
        self.ahead: list[Batch] = []  # batches restored from a checkpoint, already sampled
        self.fault_log: list[dict[str, Any]] = []

    # --- set-up ---------------------------------------------------------------------------------

    def _start(self) -> None:
        cfg, p = self.cfg, self.cfg.ppo
        batch = p.rollout_batch_size * p.samples_per_prompt
        opt_steps = p.steps * p.ppo_epochs * (batch // p.mini_batch_size)
        critic = self.reward if p.advantage == "gae" else None
        # The four groups start at once (model loads and engine start-up overlap).
        makers: dict[str, Callable[[], ActorGroup[Any]]] = {
            "rollout": lambda: rollout_group(cfg, self.policy),
            "reward": lambda: reward_group(cfg, self.reward, None),
            "reference": lambda: reference_group(cfg, self.policy, self.device),
            "trainer": lambda: ppo_trainer_group(cfg, self.policy, critic, self.device,
                                                 opt_steps),
        }
        pool = ThreadPoolExecutor(len(makers))
        try:
            futures = {name: pool.submit(make) for name, make in makers.items()}
            errors = []
            for fut in futures.values():
                try:
                    self.groups.append(fut.result())
                except KeyboardInterrupt:  # Ctrl-C: stop waiting; ray_session ends them all
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
                except BaseException as e:  # noqa: BLE001 - the first one is raised below
                    errors.append(e)
            if errors:
                raise errors[0]
        finally:
            pool.shutdown(wait=False)
        self.rollout, self.scorer, self.reference, self.trainer = self.groups
        if self.transport == "collective":
            self._join_collective()

    def _join_collective(self) -> None:
        """Trainer rank 0 and every engine form the weight-sync group (again after an engine
        was replaced: a stateless group is formed anew by all its members, on a fresh port)."""
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

    def _restore(self) -> None:
        torn = self.ckpts.clean_torn()
        if torn:
            log.warning("removed %d torn checkpoint(s) left by an interrupted save: %s",
                        len(torn), ", ".join(t.name for t in torn))
        path, state = self.ckpts.latest()
        if path is None or state is None:
            log.info("--resume: no checkpoint under %s; starting from step 0", self.ckpts.root)
            self._rewind(0)
            return
        self.trainer.call_all(PPOTrainerWorker.load_checkpoint, str(path))
        self.step = int(state["step"])
        self.ahead = self._restore_ahead(path)
        self.stream.load_state_dict(state["stream"])
        self.kl.coef = float(state["kl_coef"])
        self.probe = state.get("probe")
        if self.tolerance is None and state.get("sync_tolerance") is not None:
            self.tolerance = float(state["sync_tolerance"])
        self._rewind(self.step)
        diff = self.sync()  # the engines start from the initial weights: give them these
        log.info("resumed from %s: step %d, weight version %d (probe diff %.2e)", path.name,
                 self.step, self.step, diff.get("sync/logprob_max_diff", 0.0))

    def _rewind(self, step: int) -> None:
        for name in ("consumed.jsonl", "metrics.jsonl"):
            dropped = rewind_jsonl(self.dir / name, step)
            if dropped:
                log.info("%s: dropped %d entries after step %d", name, dropped, step)

    # --- faults ---------------------------------------------------------------------------------

    def recover(self, group: ActorGroup[Any], err: ActorCallError | ActorTimeoutError) -> None:
        """Restart a dead or hung rollout, reward or reference actor and restore its state, or
        re-raise (trainer failures and hangs, other errors, too many restarts)."""
        if group.role == "trainer" or err.role != group.role or \
                (isinstance(err, ActorCallError) and not err.actor_died):
            raise err
        ranks = [err.rank] if isinstance(err, ActorCallError) else list(err.ranks)
        seconds = group.restart_failed(err, self.cfg.run.max_restarts)
        if group.role == "rollout" and self.transport == "collective" and seconds:
            # the new engine joins a new group with every other member, then gets the
            # current weights through it (the others reload the same version)
            self._join_collective()
            if self.step > 0:
                self._collective_push(self.step)
                for rank in ranks:
                    self._check_report(self.rollout.call(rank, RolloutWorker.sync_report), rank)
        export: WeightExport | None = None
        for rank, s in zip(ranks, seconds, strict=False):  # empty: already replaced
            if group.role == "reward":
                group.call(rank, RewardWorker.load_for_scoring)
            elif group.role == "rollout" and self.step > 0 and \
                    self.transport != "collective":  # a fresh engine: initial weights
                if export is None:
                    export = self.trainer.call_all(PPOTrainerWorker.export_weights,
                                                   self.cfg.ppo.sync_bucket_mb)[0]
                self.rollout.call(rank, RolloutWorker.update_weights, self.step,
                                  buckets=export.buckets, checksums=export.checksums,
                                  fetch_timeout_s=self.cfg.run.call_timeout_s)
                self._check_report(self.rollout.call(rank, RolloutWorker.sync_report), rank)
            self.recovery_s.append(s)
            self.fault_log.append({"step": self.step, "role": group.role, "rank": rank,
                                   "method": err.method, "restart_s": s,
                                   "cause": "hung" if isinstance(err, ActorTimeoutError)
                                   else "died"})

    def retry(self, group: ActorGroup[Any], action: Callable[[], T]) -> T:
        """Run `action` (calls on `group`), recovering from actor deaths and hangs and trying
        again."""
        while True:
            try:
                return action()
            except (ActorCallError, ActorTimeoutError) as e:
                if e.role != group.role:
                    raise
                self.recover(group, e)

    # --- weights --------------------------------------------------------------------------------

    def sync(self) -> dict[str, float]:
        """Push the trainer's weights (version = steps done) to every engine and check them."""
        t0 = time.monotonic()
        version = self.step
        buckets = 0
        if self.transport == "collective":
            sent = self.retry(self.rollout, lambda: self._collective_push(version))
        else:
            export = self.trainer.call_all(PPOTrainerWorker.export_weights,
                                           self.cfg.ppo.sync_bucket_mb)[0]
            self.retry(self.rollout, lambda: self.rollout.call_all(
                RolloutWorker.update_weights, version, buckets=export.buckets,
                checksums=export.checksums, fetch_timeout_s=self.cfg.run.call_timeout_s))
            buckets = len(export.buckets)
            sent = -1
        seconds = time.monotonic() - t0
        out = {"sync/seconds": seconds, **self.check_reports(), **self.check_sync(),
               "sync/buckets": float(buckets)}
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

    def _check_report(self, report: SyncReport | None, rank: int) -> float:
        """Raise unless engine `rank`'s audit of the last push found every module loaded with
        the trainer's weights; returns its worst relative kernel error."""
        if report is None:
            return 0.0
        if not report.ok:
            raise WeightSyncError(
                f"after sync to version {self.step} rollout[rank {rank}] is not running the "
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
        ours = self.trainer.call_all(PPOTrainerWorker.probe_logprobs, self.probe)[0]
        worst, mean = 0.0, 0.0
        for r in range(self.rollout.num_actors):
            theirs = self.retry(self.rollout, lambda r=r: self.rollout.call(  # type: ignore[misc]
                r, RolloutWorker.prompt_logprobs, self.probe))
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

    def check_sync(self) -> dict[str, float]:
        if not self.probe:
            return {}
        worst, mean = self.probe_diff()
        if self.tolerance is not None and worst > self.tolerance:
            raise WeightSyncError(
                f"after sync to version {self.step} the rollout engine's log-probs differ from "
                f"the trainer's by {worst:.3g} (> tolerance {self.tolerance:.3g}; set "
                "ppo.sync_tolerance to change it): the engine is not running the trained "
                "weights")
        return {"sync/logprob_max_diff": worst, "sync/logprob_mean_diff": mean}

    # --- rollouts -------------------------------------------------------------------------------

    def submit(self, index: int) -> Batch:
        cfg = self.cfg
        s = cfg.rollout.sampling
        prompts = self.stream.take(cfg.ppo.rollout_batch_size)
        reqs = [GenerationRequest(request_id=pr.id, messages=pr.messages,
                                  n=cfg.ppo.samples_per_prompt, temperature=s.temperature,
                                  top_p=s.top_p, top_k=s.top_k,
                                  repetition_penalty=s.repetition_penalty,
                                  max_tokens=s.max_new_tokens, logprobs=True,
                                  seed=request_seed(cfg.run.seed, pr.id, f"ppo{index}"))
                for pr in prompts]
        return Batch(index, prompts, self.stream.state_dict(),
                     self.rollout.submit_shards(RolloutWorker.generate, reqs), time.monotonic(),
                     reqs)

    def collect(self, batch: Batch) -> list[Sample]:
        """The batch's samples; if a rollout actor died, it is restarted with the current
        weights and the whole batch is generated again (same requests, same seeds)."""
        if batch.collected is not None:
            return batch.collected
        while True:
            if self.rollout.restarts_since(batch.submitted):  # made partly by a dead actor
                batch.submitted = time.monotonic()
                batch.pending = self.rollout.submit_shards(RolloutWorker.generate,
                                                           batch.requests)
            try:
                results = self.rollout.gather(batch.pending)
                break
            except (ActorCallError, ActorTimeoutError) as e:
                self.recover(self.rollout, e)
        by_id = {p.id: p for p in batch.prompts}
        batch.collected = [Sample(by_id[res.request_id], res.prompt_token_ids, c.token_ids,
                                  c.text, c.logprobs, res.weight_version,
                                  c.finish_reason != "length")
                           for res in results for c in res.completions]
        return batch.collected

    # --- one step -------------------------------------------------------------------------------

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        cfg = self.cfg
        m: dict[str, float] = {}
        seqs: list[Sequence] = [(s.prompt_ids, s.response_ids) for s in samples]
        lengths = [len(s.response_ids) for s in samples]
        t0 = time.monotonic()
        world = self.trainer.num_actors
        bounds = [len(seqs) * r // world for r in range(world + 1)]
        shards = [seqs[bounds[r]:bounds[r + 1]] for r in range(world)]
        items = [(s.prompt.messages, s.text, s.finished) for s in samples]
        score_p = self.scorer.submit_shards(RewardWorker.score, items)
        ref_p = self.reference.submit_shards(ReferenceWorker.logprobs, seqs)
        exp: list[tuple[Any, Any]] = []
        if not cfg.ppo.single_update:  # else the old log-probs are the training forward's own
            exp = self.trainer.get([self.trainer.submit(r, PPOTrainerWorker.experience,
                                                        shards[r]) for r in range(world)])
        # The three run at once on their own actors; each timer is the part of the phase the
        # driver spent waiting for that result after the previous one: they add up, never
        # overlap (time/experience_phase is their sum).
        t_exp = time.monotonic()
        m["time/experience"] = t_exp - t0
        pm_scores = torch.tensor(self.retry(self.scorer, lambda: self.scorer.gather(
            score_p if not self.scorer.restarts_since(t0) else
            self.scorer.submit_shards(RewardWorker.score, items))), dtype=torch.float32)
        truncated = torch.tensor([not s.finished for s in samples])
        scores = pm_scores - cfg.ppo.truncated_penalty * truncated.float()
        t_score = time.monotonic()
        m["time/score"] = t_score - t_exp
        ref_flat = torch.cat(self.retry(self.reference, lambda: self.reference.get(
            ref_p if not self.reference.restarts_since(t0) else
            self.reference.submit_shards(ReferenceWorker.logprobs, seqs))))
        m["time/reference"] = time.monotonic() - t_score
        m["time/experience_phase"] = time.monotonic() - t0

        t1 = time.monotonic()
        ref, mask = to_rows(ref_flat, lengths)
        old = to_rows(torch.cat([e[0] for e in exp]), lengths)[0] if exp else None
        values = to_rows(torch.cat([e[1] for e in exp]), lengths)[0] \
            if exp and exp[0][1] is not None else None
        a = advantages(cfg, scores, old, ref, values, mask, self.kl.coef)
        m["time/advantages"] = time.monotonic() - t1

        t2 = time.monotonic()
        flat = {k: v[mask] for k, v in (("old", old), ("adv", a["advantages"]))
                if v is not None}
        if "returns" in a and values is not None:
            flat["ret"], flat["val"] = a["returns"][mask], values[mask]
        in_loss = cfg.ppo.kl_penalty == "loss"
        if in_loss:
            flat["ref"] = ref_flat
        beh = behaviour_logprobs(samples, self.step) \
            if cfg.ppo.staleness_correction == "truncated_is" else None
        tok_bounds = [sum(lengths[:b]) for b in bounds]
        stats = self.trainer.get([self.trainer.submit(
            r, PPOTrainerWorker.train_ppo, shards[r],
            *[flat[k][tok_bounds[r]:tok_bounds[r + 1]] if k in flat else None
              for k in ("old", "adv", "ret", "val", "ref")],
            kl_coef=self.kl.coef if in_loss else 0.0,
            behaviour_logprobs=beh[tok_bounds[r]:tok_bounds[r + 1]] if beh is not None
            else None, is_cap=cfg.ppo.is_cap) for r in range(world)])
        m["time/train"] = time.monotonic() - t2
        for k in stats[0]:
            m[f"policy/{k}" if k not in ("value_loss", "value_clip_fraction") else
              f"value/{k.removeprefix('value_')}"] = sum(s[k] for s in stats) / len(stats)

        if in_loss:  # what the loss penalised (k3), before this update
            kl_mean, kl_token = m.pop("policy/kl_seq"), m.pop("policy/kl_token")
        else:
            kl_mean = float(a["seq_kl"].mean())
            assert old is not None
            kl_token = float(masked_mean(torch.where(mask, old - ref, 0.0), mask))
        m.update({
            "reward/score_mean": float(scores.mean()), "reward/score_std": float(scores.std())
            if len(scores) > 1 else 0.0,
            "reward/total_mean": float(scores.mean()) - self.kl.coef * kl_mean,
            "kl/mean": kl_mean, "kl/coef": self.kl.coef, "kl/token_mean": kl_token,
            "response/length_mean": float(sum(lengths) / len(lengths)),
            "response/truncated_fraction": float(truncated.float().mean()),
            "reward/pm_score_mean": float(pm_scores.mean()),
        })
        if old is not None:
            gap = [abs(x - y) for s, row in zip(samples, old.tolist(), strict=True)
                   if s.rollout_logprobs for x, y in zip(s.rollout_logprobs, row, strict=False)]
            m["rollout/logprob_gap"] = float(sum(gap) / len(gap)) if gap else 0.0
        self.kl.update(kl_mean, len(samples))
        m["_scores"] = scores.tolist()  # type: ignore[assignment]
        return m

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> Path:
        cfg, p = self.cfg, self.cfg.ppo
        final = self.dir / "model"
        if self.ckpts.complete() and not self.resume:
            raise ResumeError(f"{self.ckpts.root} holds checkpoints of an earlier run: pass "
                              "--resume to continue it, or choose another --output")
        t_start = time.monotonic()
        with ray_session(cfg):
            try:
                self._start()
                if p.eval_every:
                    from cai_ray.live_eval import LiveEval
                    from cai_ray.models import resolve

                    self.live = LiveEval(cfg, resolve(cfg.model), resolve(self.policy),
                                         cfg.eval.live_prompts)
                    self.live.prepare(self.rollout, self.scorer)
                if self.resume:
                    self._restore()
                else:
                    self._rewind(0)
                self._loop()
                save_group_model(self.trainer, TrainerWorker.save, final)
            finally:
                for g in reversed(self.groups):
                    try:
                        g.shutdown()
                    except Exception as e:  # noqa: BLE001 - the other groups still stop
                        log.warning("%s group: shutdown failed: %s", g.role, e)
        summary = self._summary(time.monotonic() - t_start)
        (self.dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        log.info("PPO: %d steps; score %.3f → %.3f; KL %.3f; policy -> %s", p.steps,
                 summary.get("score_first", float("nan")), summary.get("score_last",
                                                                        float("nan")),
                 summary.get("kl_last", float("nan")), final)
        return final

    def _loop(self) -> None:
        cfg, p = self.cfg, self.cfg.ppo
        tracker = Tracker(cfg.tracking, f"{cfg.run.name}-ppo", self.dir, cfg.to_dict())
        consumed = (self.dir / "consumed.jsonl").open("a", encoding="utf-8")
        inflight: deque[Batch] = deque(self.ahead)
        next_index = self.step + len(self.ahead)
        bar = tqdm(total=p.steps, initial=self.step, desc="RL-CAI PPO", unit="step")
        ckpt_s: float | None = None
        try:
            while self.step < p.steps:
                t_step = time.monotonic()
                while len(inflight) <= p.max_staleness and next_index < p.steps:
                    inflight.append(self.submit(next_index))
                    next_index += 1
                batch = inflight.popleft()
                assert batch.index == self.step
                t0 = time.monotonic()
                samples = self.collect(batch)
                m: dict[str, Any] = {"time/generate_wait": time.monotonic() - t0,
                                     "time/generate": time.monotonic() - batch.submitted}
                versions = [s.weight_version for s in samples]
                stale = self.step - min(versions)
                if stale > p.max_staleness:
                    raise StalenessError(f"step {self.step}: batch made with weights "
                                         f"v{min(versions)}, {stale} versions old "
                                         f"(> ppo.max_staleness={p.max_staleness})")
                if self.probe is None:  # before any update: engine and trainer agree
                    self.set_probe([samples[0].prompt_ids + samples[0].response_ids])
                m.update(self.train_step(samples))
                scores = m.pop("_scores")
                self.step += 1
                m.update(self.sync())
                m.update({"version/trainer": self.step - 1, "version/batch": min(versions),
                          "staleness/max": stale, "staleness/mean":
                          sum(self.step - 1 - v for v in versions) / len(versions)})
                consumed.write(json.dumps({"step": self.step,
                                           "prompts": [x.id for x in batch.prompts],
                                           "version": min(versions)}) + "\n")
                consumed.flush()
                m["time/step"] = time.monotonic() - t_step
                m["faults/restarts"] = float(sum(g.restarts for g in self.groups))
                if ckpt_s is not None:  # the previous step's checkpoint
                    m["time/checkpoint"], ckpt_s = ckpt_s, None
                tokens = sum(len(s.response_ids) for s in samples)
                m["throughput/tokens_per_s"] = tokens / m["time/step"]
                m["throughput/episodes_per_s"] = len(samples) / m["time/step"]
                # Logged before the checkpoint, so a checkpointed step always has its metrics.
                tracker.log(m, step=self.step)
                if self.step % cfg.tracking.sample_table_every == 0 or self.step == 1:
                    tracker.table("samples", ["prompt", "response", "score", "version"],
                                  [[s.prompt.text, s.text, sc, s.weight_version]
                                   for s, sc in list(zip(samples, scores, strict=True))[:8]],
                                  step=self.step)
                if p.eval_every and (self.step % p.eval_every == 0 or self.step == p.steps):
                    t_ev = time.monotonic()
                    live, rows = self.live(self.rollout, self.scorer, self.step)
                    tracker.log({**live, "time/live_eval": time.monotonic() - t_ev},
                                step=self.step)
                    tracker.table("eval_samples", ["prompt", "response", "pm_score"], rows,
                                  step=self.step)
                    if self.step < p.steps:
                        # An HF-format snapshot for `cai-ray eval` (ppo@STEP).
                        save_group_model(self.trainer, TrainerWorker.save,
                                         self.dir / "snapshots" / f"step-{self.step:08d}")
                if self.step % p.checkpoint_every == 0 or self.step == p.steps:
                    t_ck = time.monotonic()
                    self.checkpoint(batch, inflight)
                    ckpt_s = time.monotonic() - t_ck
                bar.set_postfix(score=f"{m['reward/score_mean']:.3f}",
                                kl=f"{m['kl/mean']:.3f}", stale=stale)
                bar.update(1)
        finally:
            bar.close()
            consumed.close()
            tracker.close()

    def checkpoint(self, batch: Batch, inflight: deque[Batch] | None = None) -> Path:
        """Trainer state, driver state, and the batches already sampled for the next steps
        (by the previous weights, with max_staleness > 0): a resumed run trains exactly the
        samples, and so the weight versions, the uninterrupted run would have."""
        tmp = self.ckpts.begin(self.step)
        self.trainer.call_all(PPOTrainerWorker.save_checkpoint, str(tmp))
        ahead = list(inflight or [])
        saved = [{"index": b.index, "stream": b.stream_state,
                  "samples": [asdict(x) for x in self.collect(b)]} for b in ahead]
        (tmp / AHEAD_FILE).write_text(json.dumps(saved))
        return self.ckpts.commit(tmp, self.step, {
            "weight_version": self.step,
            "stream": ahead[-1].stream_state if ahead else batch.stream_state,
            "kl_coef": self.kl.coef, "probe": self.probe, "sync_tolerance": self.tolerance})

    def _restore_ahead(self, path: Path) -> list[Batch]:
        """The batches a checkpoint saved for the steps after it (see `checkpoint`)."""
        f = path / AHEAD_FILE
        if not f.exists():
            return []
        out = []
        for b in json.loads(f.read_text()):
            samples = [Sample(**{**x, "prompt": Prompt(**x["prompt"])}) for x in b["samples"]]
            prompts = list({x.prompt.id: x.prompt for x in samples}.values())
            out.append(Batch(int(b["index"]), prompts, b["stream"], [], time.monotonic(), [],
                             samples))
        return out

    def _summary(self, seconds: float) -> dict[str, Any]:
        rows = [json.loads(x) for x in (self.dir / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "reward/score_mean" in r]
        out: dict[str, Any] = {"steps": self.step, "seconds": seconds,
                               "faults": self.fault_log}
        if rows:
            k = max(1, min(5, len(rows) // 2))
            out.update({
                "score_first": sum(r["reward/score_mean"] for r in rows[:k]) / k,
                "score_last": sum(r["reward/score_mean"] for r in rows[-k:]) / k,
                "kl_last": rows[-1]["kl/mean"],
                "sync_max_diff": max(r["sync/logprob_max_diff"] for r in rows),
                "staleness_max": max(r["staleness/max"] for r in rows),
                "score_curve": [round(r["reward/score_mean"], 4) for r in rows],
                "kl_curve": [round(r["kl/mean"], 4) for r in rows],
            })
        return out


def run_ppo(cfg: Config, out_dir: Path, resume: bool = False) -> Path:
    final = out_dir / "ppo" / "model"
    if (final / "config.json").exists():
        log.info("PPO policy already trained in %s; skipping", final)
        return final
    return PPORun(cfg, out_dir, resume).run()
