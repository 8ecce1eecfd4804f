"""RL-CAI by online DPO: the feedback model labels fresh policy samples in the loop, no PM, no
critic (the algorithm most robust to stale samples in the asynchronous-RLHF study of
Noukhovitch et al., 2024).

    cai-ray online-dpo --config C --output DIR [--resume]
    cai-ray pipeline ... pipeline.rl=online_dpo

It is PPO's streaming driver (`PPORun`) with three roles swapped: each step the rollout role
samples `ppo.samples_per_prompt` responses per prompt (the next batches are generated while
this one trains, at most `ppo.max_staleness` weight versions behind); the feedback role labels
them in N/2 pairs per prompt (soft p(A), `feedback.*`, as `cai-ray label` does): pairwise,
the disjoint pairs (0, 1), (2, 3), ... under sampled principles in both orders; with pointwise
harmlessness labels, each response on its own, then the best paired with the worst, the second
best with the second worst, ... (two samples of a prompt mostly agree in harm, the extremes of
N far less often); the reference role's summed log-probs (temperature 1) of every response;
then one DPO step of the trainer over the batch's pairs (`dpo.*`), and the weight sync with
its audit and probe. Checkpoints, `--resume` (every prompt once), restarts of the
rollout, feedback and reference actors, and the metrics (`dpo/*`, `judge/*`, sync, staleness,
phase timers) are PPO's. `DIR/online_dpo/model` is the policy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cai_ray.actors.dpo import OnlineDPOTrainerWorker, online_dpo_trainer_group
from cai_ray.actors.feedback import FeedbackWorker, feedback_group, judge
from cai_ray.actors.group import ActorGroup
from cai_ray.actors.reference import ReferenceWorker, reference_group
from cai_ray.actors.rollout import rollout_group
from cai_ray.config import Config, ModelSpec
from cai_ray.configschema import Problem, ValidationError
from cai_ray.constitution import load_constitution
from cai_ray.labelling import Labeller
from cai_ray.messages import DPOPairs, DPOStats, shard_bounds
from cai_ray.preflight import resolve_path
from cai_ray.rl_loop import PPORun
from cai_ray.rollouts import Sample
from cai_ray.tracking import PhaseTimer

log = logging.getLogger(__name__)


@dataclass
class Judged:
    """What a step learned of its batch besides the pairs (for metrics and the samples table)."""

    scores: torch.Tensor  # [B] the judge's probability that each response is its pair's better
    p_a: list[float]  # [B/2] per pair
    disagreements: int  # pairs whose two orders disagreed
    truncated: torch.Tensor  # [B] bool
    judge_rss: tuple[int, int] = (0, 0)  # the feedback actors' largest RSS before/after a trim


def online_dpo_problems(cfg: Config) -> list[tuple[str, str]]:
    p = cfg.ppo
    out = []
    if p.samples_per_prompt < 2 or p.samples_per_prompt % 2:
        out.append(("ppo.samples_per_prompt", "online DPO pairs each prompt's responses, so it "
                    f"needs an even number >= 2 of them, got {p.samples_per_prompt}"))
    if p.eval_every:
        out.append(("ppo.eval_every", "the live PM Elo needs a PM, which online DPO does not "
                    "train; set 0 and rate the policy with `cai-ray eval`"))
    if p.rollout_batch_size % cfg.placement.trainer.num_actors:
        out.append(("ppo.rollout_batch_size", "must be a multiple of the trainer ranks "
                    f"({cfg.placement.trainer.num_actors}): every rank trains on its pairs"))
    return out


def check_online_dpo(cfg: Config) -> None:
    """Raise ValidationError naming every online-DPO setting that is wrong."""
    bad = online_dpo_problems(cfg)
    if bad:
        raise ValidationError("online DPO", [Problem(k, m, "config") for k, m in bad])


class OnlineDPORun(PPORun):
    stage = "online_dpo"
    title = "RL-CAI online DPO"

    def __init__(self, cfg: Config, out_dir: Path, resume: bool):
        check_online_dpo(cfg)
        super().__init__(cfg, out_dir, resume)
        self.lab = Labeller(cfg, load_constitution(resolve_path(cfg.run.constitution)))

    def reward_model(self, cfg: Config, out_dir: Path) -> ModelSpec:
        return cfg.feedback.model or cfg.model  # the judge, not a PM

    def check_models(self, tok: Any) -> None:
        """No critic: the judge reads text, so its tokenizer may differ from the policy's."""

    def group_makers(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "rollout": lambda: rollout_group(cfg, self.policy),
            "reward": lambda: feedback_group(cfg),  # the scorer slot: the judge
            "reference": lambda: reference_group(cfg, self.policy, self.device,
                                                 temperature=1.0),
            "trainer": lambda: online_dpo_trainer_group(cfg, self.policy, cfg.ppo.steps),
        }

    def _aspect(self, sample: Sample) -> str:
        return "helpful" if sample.prompt.source == self.cfg.data.helpful.name else "harmless"

    def make_experience(self, samples: list[Sample], timer: PhaseTimer
                        ) -> tuple[DPOPairs, Judged]:  # type: ignore[override]
        """Judge each prompt's samples (`Labeller.group_queries`: pointwise, every response;
        pairwise, disjoint pairs in both orders under sampled principles), pair them
        (`Labeller.group_pairs`: pointwise, best against worst outside-in) and take the
        reference's sums, at once on their own actors."""
        budget = self.cfg.run.max_restarts
        seqs = [(s.prompt_ids, s.response_ids) for s in samples]
        assert self.reference is not None
        ref_p = self.reference.submit_shards(ReferenceWorker.logprob_sums, seqs)
        n = self.cfg.ppo.samples_per_prompt
        groups = [samples[i:i + n] for i in range(0, len(samples), n)]
        per_group: list[tuple[int, str]] = []
        queries = []
        for g in groups:
            assert len({s.prompt.id for s in g}) == 1, \
                "a batch holds each prompt's samples together"
            aspect = self._aspect(g[0])
            q = self.lab.group_queries(f"online:{self.step}:{g[0].prompt.id}",
                                       g[0].prompt.messages, [s.text for s in g], aspect)
            per_group.append((len(q), aspect))
            queries += q
        with timer("experience"):
            pass  # no trainer forward before the update: DPO's log-probs are the update's own
        with timer("score"):
            probs = judge(self.scorer, self.lab, queries)
        with timer("reference"):
            sums = self.reference.gather_again(ref_p, ReferenceWorker.logprob_sums, seqs,
                                               max_restarts=budget)
        # (index of a, index of b, p(a better)) over the batch, pairs in group order
        pairs: list[tuple[int, int, float]] = []
        dis, at = 0, 0
        for gi, (k, aspect) in enumerate(per_group):
            for i, j, p, d in self.lab.group_pairs(probs[at:at + k], aspect, n):
                pairs.append((gi * n + i, gi * n + j, p))
                dis += int(d)
            at += k
        p_a = [p for _, _, p in pairs]
        scores = torch.zeros(len(samples))
        for i, j, p in pairs:
            scores[i], scores[j] = p, 1.0 - p
        exp = DPOPairs([seqs[i] for i, _, _ in pairs], [seqs[j] for _, j, _ in pairs],
                       [sums[i] for i, _, _ in pairs], [sums[j] for _, j, _ in pairs], p_a)
        truncated = torch.tensor([not s.finished for s in samples])
        return exp, Judged(scores, p_a, dis, truncated, self._trim_judge())

    def _trim_judge(self) -> tuple[int, int]:
        """After each step's judgements, the feedback actors hand their freed heap back: in
        long runs the judge's actor was the one that grew until the node ran out of memory.
        (largest RSS before, after) over the actors."""
        group = self.scorer
        sizes = group.get([group.submit(r, FeedbackWorker.release_memory)
                           for r in range(group.num_actors)])
        return max(b for b, _ in sizes), max(a for _, a in sizes)

    def update(self, exp: DPOPairs) -> list[DPOStats]:  # type: ignore[override]
        """Every trainer rank takes one DPO step on its contiguous share of the pairs."""
        world = self.trainer.num_actors
        b = shard_bounds(len(exp.p_a), world)
        parts = [DPOPairs(exp.seqs_a[b[r]:b[r + 1]], exp.seqs_b[b[r]:b[r + 1]],
                          exp.ref_a[b[r]:b[r + 1]], exp.ref_b[b[r]:b[r + 1]],
                          exp.p_a[b[r]:b[r + 1]]) for r in range(world)]
        trainer: ActorGroup[OnlineDPOTrainerWorker] = self.trainer  # type: ignore[assignment]
        return trainer.get([trainer.submit(r, OnlineDPOTrainerWorker.train_dpo, part)
                            for r, part in enumerate(parts)])

    def step_metrics(self, samples: list[Sample], sc: Judged,  # type: ignore[override]
                     stats: list[DPOStats]) -> dict[str, float]:
        per = [s.metrics() for s in stats]
        m = {k: sum(x[k] for x in per) / len(per) for k in per[0]}
        beta = self.cfg.dpo.beta
        # Σ(log π − log π_ref) per response over the batch's samples: a k1 estimate of the KL
        # to the reference (the samples come from the policy, up to max_staleness versions old)
        kl = (m["dpo/reward_chosen"] + m["dpo/reward_rejected"]) / (2 * beta)
        lengths = [len(s.response_ids) for s in samples]
        confidence = [abs(p - 0.5) * 2 for p in sc.p_a]
        m.update({
            # the score the run logs: the judge's mean confidence in its labels (the pairs'
            # mean preference is 0.5 by construction); the PPO-named keys keep the shared
            # logging and summary working
            "reward/score_mean": sum(confidence) / len(confidence),
            "reward/score_std": float(torch.tensor(confidence).std()) if len(confidence) > 1
            else 0.0,
            "judge/label_confidence": sum(confidence) / len(confidence),
            "judge/order_disagreement": sc.disagreements / len(sc.p_a),
            "judge/pairs": float(len(sc.p_a)),
            "memory/judge_rss_gib": sc.judge_rss[1] / 2**30,
            "memory/judge_trimmed_gib": (sc.judge_rss[0] - sc.judge_rss[1]) / 2**30,
            "kl/mean": kl, "kl/coef": beta,
            "response/length_mean": float(sum(lengths) / len(lengths)),
            "response/truncated_fraction": float(sc.truncated.float().mean()),
        })
        return m


def run_online_dpo(cfg: Config, out_dir: Path, resume: bool = False) -> Path:
    final = out_dir / "online_dpo" / "model"
    if (final / "config.json").exists():
        log.info("online DPO policy already trained in %s; skipping", final)
        return final
    return OnlineDPORun(cfg, out_dir, resume).run()
