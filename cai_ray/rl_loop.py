"""RL-CAI: PPO of the SL-CAI policy against the preference model, one driver over four groups.

    rollout (vLLM) ──Rollouts──▶ reward (PM score) ┐
         ▲                   └─▶ reference (KL)    ├─▶ advantages ─▶ trainer (DeepSpeed PPO)
         └──────────── weights, version v+1 ◀──────┴──────────────────────────────┘

One step reads top to bottom (`PPORun._loop`): the rollout stream hands over the next batch
(`rollouts.RolloutStream`: batches in flight, the staleness bound, resubmission after a
restart), `make_experience` scores it and computes the advantages (`algorithms/experience.py`),
the trainer updates on the typed `Experience`, the weights go to the engines and are checked
(`weight_push.WeightPusher`), and `after_step` logs, runs the live eval, saves snapshots and
checkpoints. `PhaseTimer` gives every phase its own `time/<phase>`: `time/generate_wait` is the
part of generation the driver waits for (the rest overlapped training); `time/experience`,
`time/score` and `time/reference` are the successive waits for three results computed at once,
so they add up and never overlap (`time/experience_phase` is their sum).

Faults: a rollout, reward or reference actor that dies or hangs is restarted by its group, whose
restore hook brings the new actor to the run's state (rollout: the current weights; reward: the
PM loaded for scoring; reference: nothing), and the interrupted call is made again. Trainer
failures end the run.

Resume: every `checkpoint_every` steps the trainer's engines (policy, critic, optimizers, RNG)
and the driver's state (step, weight version, prompt-stream position, KL coefficient, the batches
already sampled for later steps) are saved atomically (`checkpoint.Checkpoints`). `--resume`
loads the newest, pushes its weights to the engines, and cuts `consumed.jsonl` and
`metrics.jsonl` back to its step: every prompt is trained on exactly once across the runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cai_ray.actors.group import ActorGroup
from cai_ray.actors.ppo import PPOTrainerWorker, ppo_trainer_group
from cai_ray.actors.reference import ReferenceWorker, reference_group
from cai_ray.actors.reward import RewardWorker, reward_group
from cai_ray.actors.rollout import rollout_group
from cai_ray.actors.trainer import TrainerWorker, save_group_model
from cai_ray.algorithms.experience import advantages, behaviour_logprobs, to_rows
from cai_ray.algorithms.masked import masked_mean
from cai_ray.algorithms.ppo import AdaptiveKLController, FixedKLController
from cai_ray.checkpoint import Checkpoints, rewind_jsonl
from cai_ray.config import (
    Config,
    ModelSpec,
    rl_sampling_problems,
    weight_sync_problems,
    weight_transport,
)
from cai_ray.configschema import Problem, ValidationError
from cai_ray.data import PromptStream
from cai_ray.messages import Experience, PPOStats, shard_bounds
from cai_ray.models import load_tokenizer
from cai_ray.rollouts import (
    Batch,
    RolloutStream,
    Sample,
    StalenessError,
    check_prompt_lengths,
    check_same_tokenizer,
    ppo_prompts,
)
from cai_ray.rundir import policy_spec, reward_spec
from cai_ray.runtime import device_of, ray_session
from cai_ray.tracking import PhaseTimer, Tracker
from cai_ray.weight_push import WeightPusher, WeightSyncError

log = logging.getLogger(__name__)

AHEAD_FILE = "ahead.json"  # in a checkpoint: the batches sampled for the next steps
__all__ = ["PPORun", "ResumeError", "StalenessError", "WeightSyncError", "ppo_prompts"]


class ResumeError(RuntimeError):
    pass


@dataclass
class Scored:
    """What a step learned of its batch besides the Experience (for metrics and tables)."""

    scores: torch.Tensor  # [B] PM score − truncation penalty
    pm_scores: torch.Tensor  # [B]
    truncated: torch.Tensor  # [B] bool
    old: torch.Tensor | None  # [B, T] the trainer's log-probs before the update
    ref: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T]
    seq_kl: torch.Tensor | None  # [B] KL in the reward


class PPORun:
    stage = "ppo"  # the run's directory under DIR, its tracker name and its log's title
    title = "RL-CAI PPO"

    def __init__(self, cfg: Config, out_dir: Path, resume: bool):
        self.cfg, self.out, self.resume = cfg, out_dir, resume
        self.dir = out_dir / self.stage
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpts = Checkpoints(self.dir / "checkpoints", cfg.ppo.keep_checkpoints)
        problems = rl_sampling_problems(cfg)
        if problems:
            raise ValidationError("RL-CAI sampling", problems)
        self.policy = policy_spec(cfg, out_dir)
        self.reward = self.reward_model(cfg, out_dir)
        prompts = ppo_prompts(cfg)
        tok = load_tokenizer(self.policy)
        check_prompt_lengths(cfg, prompts, tok)
        self.check_models(tok)
        self.stream = PromptStream(prompts, seed=cfg.data.shuffle_seed)
        p = cfg.ppo
        self.kl = (AdaptiveKLController(p.kl_coef, p.target_kl) if p.adaptive_kl
                   else FixedKLController(p.kl_coef))
        self.device = device_of(cfg)
        bad = weight_sync_problems(cfg, self.device)  # run.device auto, resolved here
        if bad:
            raise ValidationError("weight sync", [Problem(k, m, "config") for k, m in bad])
        self.transport = weight_transport(cfg, self.device)
        self.step = 0  # PPO steps done = the trainer's weight version
        self.groups: list[ActorGroup[Any]] = []
        self.live: Any = None
        self.ahead: list[Batch] = []  # batches restored from a checkpoint, already sampled
        self.weights: WeightPusher
        self.rollouts: RolloutStream
        self.step_starts: list[tuple[float, int]] = []  # (monotonic time, step): fault steps
        self.checkpoint_s: float | None = None  # the last checkpoint's time, logged next step

    # --- set-up ---------------------------------------------------------------------------------

    def reward_model(self, cfg: Config, out_dir: Path) -> ModelSpec:
        return reward_spec(cfg, out_dir)

    def check_models(self, tok: Any) -> None:
        """A critic starts from the PM: the two must share the policy's tokenizer."""
        if self.cfg.ppo.advantage == "gae":
            check_same_tokenizer(tok, load_tokenizer(self.reward), self.policy, self.reward)

    def group_makers(self) -> dict[str, Callable[[], ActorGroup[Any]]]:
        """How each role's group is built, in the order rollout, reward, reference, trainer
        (a test substitutes fast in-process workers here)."""
        cfg, p = self.cfg, self.cfg.ppo
        batch = p.rollout_batch_size * p.samples_per_prompt
        opt_steps = p.steps * p.ppo_epochs * (batch // p.mini_batch_size)
        critic = self.reward if p.advantage == "gae" else None
        makers: dict[str, Callable[[], ActorGroup[Any]]] = {
            "rollout": lambda: rollout_group(cfg, self.policy),
            "reward": lambda: reward_group(cfg, self.reward, None),
            "reference": lambda: reference_group(cfg, self.policy, self.device),
            "trainer": lambda: ppo_trainer_group(cfg, self.policy, critic, self.device,
                                                 opt_steps),
        }
        if cfg.trainer.lora.rank:  # the reference is the trainer's frozen base, adapters off
            del makers["reference"]
        return makers

    def _start(self) -> None:
        cfg = self.cfg
        makers = self.group_makers()  # the groups start at once (loads overlap)
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
        named = dict(zip(makers, self.groups, strict=True))
        self.rollout, self.scorer, self.trainer = named["rollout"], named["reward"], \
            named["trainer"]
        self.reference: ActorGroup[ReferenceWorker] | None = named.get("reference")
        self.weights = WeightPusher(cfg, self.trainer, self.rollout, self.transport)
        self.weights.join()
        # One recovery path: each group restarts its dead or hung actors itself and runs its
        # role's restore hook (reward: the PM loaded again, set by reward_group; reference:
        # none, it is stateless); the rollout's is the weight push. The trainer's failures end
        # the run.
        self.rollout.on_restart = self.weights.restore

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
        f = path / AHEAD_FILE
        self.ahead = [Batch.from_json(b) for b in json.loads(f.read_text())] \
            if f.exists() else []
        self.stream.load_state_dict(state["stream"])
        self.kl.coef = float(state["kl_coef"])
        self.weights.probe = state.get("probe")
        if self.weights.tolerance is None and state.get("sync_tolerance") is not None:
            self.weights.tolerance = float(state["sync_tolerance"])
        self._rewind(self.step)
        diff = self.weights.push(self.step)  # the engines hold the initial weights
        log.info("resumed from %s: step %d, weight version %d (probe diff %.2e)", path.name,
                 self.step, self.step, diff.get("sync/logprob_max_diff", 0.0))

    def _rewind(self, step: int) -> None:
        for name in ("consumed.jsonl", "metrics.jsonl"):
            dropped = rewind_jsonl(self.dir / name, step)
            if dropped:
                log.info("%s: dropped %d entries after step %d", name, dropped, step)

    # --- one step -------------------------------------------------------------------------------

    def make_experience(self, samples: list[Sample], timer: PhaseTimer
                        ) -> tuple[Experience, Scored]:
        """Score the batch (PM), the reference's and (unless `single_update`) the trainer's
        log-probs and values, all at once on their own actors; then the advantages."""
        cfg, p = self.cfg, self.cfg.ppo
        budget = cfg.run.max_restarts
        seqs = [(s.prompt_ids, s.response_ids) for s in samples]
        lengths = [len(s.response_ids) for s in samples]
        items = [(s.prompt.messages, s.text, s.finished) for s in samples]
        score_p = self.scorer.submit_shards(RewardWorker.score, items)
        world = self.trainer.num_actors
        b = shard_bounds(len(seqs), world)
        if self.reference is not None:
            ref_p = self.reference.submit_shards(ReferenceWorker.logprobs, seqs)
        else:  # LoRA: each trainer rank, its base with the adapters disabled
            ref_p = [self.trainer.submit(r, PPOTrainerWorker.reference_logprobs,
                                         seqs[b[r]:b[r + 1]]) for r in range(world)]
        fwd = []
        with timer("experience"):
            if not p.single_update:  # else the old log-probs are the training forward's own
                fwd = self.trainer.get([self.trainer.submit(r, PPOTrainerWorker.experience,
                                                            seqs[b[r]:b[r + 1]])
                                        for r in range(world)])
        with timer("score"):
            pm_scores = torch.tensor(self.scorer.gather_again(
                score_p, RewardWorker.score, items, max_restarts=budget), dtype=torch.float32)
        with timer("reference"):
            if self.reference is not None:
                ref_flat = torch.cat(self.reference.gather_again(
                    ref_p, ReferenceWorker.logprobs, seqs, max_restarts=budget, flatten=False))
            else:  # a trainer failure is not retried
                ref_flat = torch.cat(self.trainer.get(ref_p))
        with timer("advantages"):
            truncated = torch.tensor([not s.finished for s in samples])
            scores = pm_scores - p.truncated_penalty * truncated.float()
            ref, mask = to_rows(ref_flat, lengths)
            old = to_rows(torch.cat([f.logprobs for f in fwd]), lengths)[0] if fwd else None
            critic = [f.values for f in fwd if f.values is not None]
            values = to_rows(torch.cat(critic), lengths)[0] if critic else None
            a = advantages(p, scores, old, ref, values, mask, self.kl.coef)
            in_loss = p.kl_penalty == "loss"
            exp = Experience(
                seqs, a["advantages"][mask],
                old_logprobs=old[mask] if old is not None else None,
                returns=a["returns"][mask] if "returns" in a and values is not None else None,
                old_values=values[mask] if "returns" in a and values is not None else None,
                ref_logprobs=ref_flat if in_loss else None,
                behaviour_logprobs=behaviour_logprobs(samples, self.step)
                if p.staleness_correction == "truncated_is" else None,
                kl_coef=self.kl.coef if in_loss else 0.0, is_cap=p.is_cap,
                weight_version=self.step)
        return exp, Scored(scores, pm_scores, truncated, old, ref, mask, a.get("seq_kl"))

    def update(self, exp: Experience) -> PPOStats:
        """Every trainer rank trains on its shard of the batch; their stats, averaged."""
        shards = exp.shard(self.trainer.num_actors)
        return PPOStats.mean(self.trainer.get([
            self.trainer.submit(r, PPOTrainerWorker.train_ppo, shard)
            for r, shard in enumerate(shards)]))

    def step_metrics(self, samples: list[Sample], sc: Scored, stats: PPOStats
                     ) -> dict[str, float]:
        m = stats.metrics()
        if self.cfg.ppo.kl_penalty == "loss":  # what the loss penalised (k3), before the update
            kl_mean, kl_token = stats.kl_seq or 0.0, stats.kl_token or 0.0
        else:
            assert sc.seq_kl is not None and sc.old is not None
            kl_mean = float(sc.seq_kl.mean())
            kl_token = float(masked_mean(torch.where(sc.mask, sc.old - sc.ref, 0.0), sc.mask))
        lengths = [len(s.response_ids) for s in samples]
        m.update({
            "reward/score_mean": float(sc.scores.mean()),
            "reward/score_std": float(sc.scores.std()) if len(sc.scores) > 1 else 0.0,
            "reward/total_mean": float(sc.scores.mean()) - self.kl.coef * kl_mean,
            "kl/mean": kl_mean, "kl/coef": self.kl.coef, "kl/token_mean": kl_token,
            "response/length_mean": float(sum(lengths) / len(lengths)),
            "response/truncated_fraction": float(sc.truncated.float().mean()),
            "reward/pm_score_mean": float(sc.pm_scores.mean()),
        })
        if sc.old is not None:
            gap = [abs(x - y) for s, row in zip(samples, sc.old.tolist(), strict=True)
                   if s.rollout_logprobs for x, y in zip(s.rollout_logprobs, row, strict=False)]
            m["rollout/logprob_gap"] = float(sum(gap) / len(gap)) if gap else 0.0
        self.kl.update(kl_mean, len(samples))
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
        log.info("%s: %d steps; score %.3f → %.3f; KL %.3f; policy -> %s", self.title, p.steps,
                 summary.get("score_first", float("nan")), summary.get("score_last",
                                                                        float("nan")),
                 summary.get("kl_last", float("nan")), final)
        return final

    def _loop(self) -> None:
        cfg, p = self.cfg, self.cfg.ppo
        self.tracker = Tracker(cfg.tracking, f"{cfg.run.name}-{self.stage}", self.dir,
                               cfg.to_dict())
        self.consumed = (self.dir / "consumed.jsonl").open("a", encoding="utf-8")
        self.rollouts = RolloutStream(cfg, self.rollout, self.stream, self.step, self.ahead)
        self.bar = tqdm(total=p.steps, initial=self.step, desc=self.title, unit="step")
        try:
            while self.step < p.steps:
                timer, t_step = PhaseTimer(), time.monotonic()
                self.step_starts.append((t_step, self.step))
                self.rollouts.fill(p.steps)
                with timer("generate_wait"):
                    batch, samples = self.rollouts.next(self.step)
                timer.times["time/generate"] = time.monotonic() - batch.submitted
                if self.weights.probe is None:  # before any update: engine and trainer agree
                    self.weights.set_probe([samples[0].prompt_ids + samples[0].response_ids])
                exp, scored = self.make_experience(samples, timer)
                with timer("train"):
                    stats = self.update(exp)
                self.step += 1
                with timer("sync"):
                    synced = self.weights.push(self.step)
                self.after_step(batch, samples, scored, stats, synced, timer, t_step)
        finally:
            self.bar.close()
            self.consumed.close()
            self.tracker.close()

    def after_step(self, batch: Batch, samples: list[Sample], scored: Scored, stats: PPOStats,
                   synced: dict[str, float], timer: PhaseTimer, t_step: float) -> None:
        """Log the step, then the live eval, a snapshot, a checkpoint, as they fall due."""
        p = self.cfg.ppo
        m: dict[str, float] = {**self.step_metrics(samples, scored, stats), **synced}
        versions = [s.weight_version for s in samples]
        stale = self.step - 1 - min(versions)
        m.update({"version/trainer": self.step - 1, "version/batch": min(versions),
                  "staleness/max": stale, "staleness/mean":
                  sum(self.step - 1 - v for v in versions) / len(versions)})
        self.consumed.write(json.dumps({"step": self.step,
                                        "prompts": [x.id for x in batch.prompts],
                                        "version": min(versions)}) + "\n")
        self.consumed.flush()
        m.update(timer.times)
        m["time/experience_phase"] = sum(m[f"time/{k}"] for k in
                                         ("experience", "score", "reference"))
        m["time/step"] = time.monotonic() - t_step
        m["faults/restarts"] = float(sum(g.restarts for g in self.groups))
        if self.checkpoint_s is not None:  # the previous step's checkpoint
            m["time/checkpoint"], self.checkpoint_s = self.checkpoint_s, None
        tokens = sum(len(s.response_ids) for s in samples)
        m["throughput/tokens_per_s"] = tokens / m["time/step"]
        m["throughput/episodes_per_s"] = len(samples) / m["time/step"]
        # Logged before the checkpoint, so a checkpointed step always has its metrics.
        self.tracker.log(m, step=self.step)
        if self.step % self.cfg.tracking.sample_table_every == 0 or self.step == 1:
            self.tracker.table("samples", ["prompt", "response", "score", "version"],
                               [[s.prompt.text, s.text, sc, s.weight_version] for s, sc in
                                list(zip(samples, scored.scores.tolist(), strict=True))[:8]],
                               step=self.step)
        if p.eval_every and (self.step % p.eval_every == 0 or self.step == p.steps):
            t_ev = time.monotonic()
            live, rows = self.live(self.rollout, self.scorer, self.step)
            self.tracker.log({**live, "time/live_eval": time.monotonic() - t_ev},
                             step=self.step)
            self.tracker.table("eval_samples", ["prompt", "response", "pm_score"], rows,
                               step=self.step)
            if self.step < p.steps:  # an HF-format snapshot for `cai-ray eval` (ppo@STEP)
                save_group_model(self.trainer, TrainerWorker.save,
                                 self.dir / "snapshots" / f"step-{self.step:08d}")
        if self.step % p.checkpoint_every == 0 or self.step == p.steps:
            t_ck = time.monotonic()
            self.checkpoint(batch)
            self.checkpoint_s = time.monotonic() - t_ck
        self.bar.set_postfix(score=f"{m['reward/score_mean']:.3f}", kl=f"{m['kl/mean']:.3f}",
                             stale=stale)
        self.bar.update(1)

    def checkpoint(self, batch: Batch) -> Path:
        """Trainer state, driver state, and the batches already sampled for the next steps
        (by the previous weights, with max_staleness > 0): a resumed run trains exactly the
        samples, and so the weight versions, the uninterrupted run would have."""
        tmp = self.ckpts.begin(self.step)
        self.trainer.call_all(PPOTrainerWorker.save_checkpoint, str(tmp))
        (tmp / AHEAD_FILE).write_text(json.dumps(self.rollouts.ahead()))
        return self.ckpts.commit(tmp, self.step, {
            "weight_version": self.step, "stream": self.rollouts.stream_state(batch),
            "kl_coef": self.kl.coef, "probe": self.weights.probe,
            "sync_tolerance": self.weights.tolerance})

    def fault_log(self) -> list[dict[str, Any]]:
        """Every restart of the run, in order: the step it happened in (steps done), role,
        rank, method, cause (died or hung), restart seconds."""
        out = []
        for f in sorted((f for g in self.groups for f in g.faults), key=lambda f: f["time"]):
            step = max((s for t, s in self.step_starts if t <= f["time"]),
                       default=self.step_starts[0][1] if self.step_starts else self.step)
            out.append({"step": step, **{k: v for k, v in f.items() if k != "time"}})
        return out

    def _summary(self, seconds: float) -> dict[str, Any]:
        rows = [json.loads(x) for x in (self.dir / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "reward/score_mean" in r]
        out: dict[str, Any] = {"steps": self.step, "seconds": seconds,
                               "faults": self.fault_log()}
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
