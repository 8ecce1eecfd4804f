"""Elo during PPO on the groups PPO already runs (see `LiveEval`), and the prompt helpers the
offline eval (`stages/evaluate.py`) shares with it."""

from __future__ import annotations

import itertools
import math
from typing import Any

from cai_ray.actors.group import ActorGroup
from cai_ray.actors.reward import RewardWorker
from cai_ray.actors.rollout import RolloutWorker
from cai_ray.config import Config
from cai_ray.data import load_prompts
from cai_ray.elo import ratings
from cai_ray.messages import GenerationRequest, Prompt
from cai_ray.runtime import request_seed

ActorGroupT = ActorGroup[Any]


def eval_prompts(src: Any, cfg: Config) -> list[Prompt]:
    """The prompts of one eval source, in its order."""
    ds, _ = load_prompts(src, cfg.data.on_bad_row)
    return [Prompt(id=i, messages=m, source=s) for i, m, s in
            zip(ds["id"], ds["messages"], ds["source"], strict=True)]


def mean_or_nan(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


class LiveEval:
    """Elo during PPO (every `ppo.eval_every` steps): the current policy against the initial
    and SL snapshots on a fixed subset of the eval prompts, compared by the PM (the groups PPO
    already runs: its rollout engine answers, its reward group scores). The AI judge, the
    evasiveness and over-refusal rates come from `cai-ray eval` on the saved snapshots."""

    def __init__(self, cfg: Config, initial: str, policy: str, limit: int):
        self.cfg, self.initial, self.policy = cfg, initial, policy
        self.prompts = {"harmless": eval_prompts(cfg.eval.red_team, cfg)[:limit],
                        "helpful": eval_prompts(cfg.eval.helpful, cfg)[:limit]}
        self.refs: dict[str, dict[str, list[float]]] = {}  # snapshot → aspect → PM scores

    def _answer(self, rollout: ActorGroupT
                ) -> dict[str, list[tuple[list[dict[str, str]], str, bool]]]:
        e = self.cfg.eval
        out = {}
        for aspect, prompts in self.prompts.items():
            reqs = [GenerationRequest(request_id=p.id, messages=p.messages,
                                      temperature=e.temperature, max_tokens=e.max_new_tokens,
                                      seed=request_seed(self.cfg.run.seed, p.id, "eval"))
                    for p in prompts]
            res = rollout.shard_and_gather(RolloutWorker.generate, reqs)
            out[aspect] = [(p.messages, r.completions[0].text.strip(),
                            r.completions[0].finish_reason != "length")  # scored as it ended
                           for p, r in zip(prompts, res, strict=True)]
        return out

    def _score(self, scorer: ActorGroupT, answers: dict[str, list[Any]]
               ) -> dict[str, list[float]]:
        return {a: scorer.shard_and_gather(RewardWorker.score, items)
                for a, items in answers.items()}

    def prepare(self, rollout: ActorGroupT, scorer: ActorGroupT) -> None:
        """Answers of the reference snapshots, before any update: the engine holds the SL
        (starting) policy; the initial model's weights are loaded for a moment when it differs.
        Leaves the engine on the starting policy (version 0)."""
        self.refs["sl" if self.policy != self.initial else "initial"] = self._score(
            scorer, self._answer(rollout))
        if self.policy != self.initial:
            rollout.call_all(RolloutWorker.update_weights, 0, path=self.initial)
            self.refs["initial"] = self._score(scorer, self._answer(rollout))
            rollout.call_all(RolloutWorker.update_weights, 0, path=self.policy)

    def __call__(self, rollout: ActorGroupT, scorer: ActorGroupT, step: int
                 ) -> tuple[dict[str, float], list[list[Any]]]:
        """Metrics at this step (the engine holds the current weights) and a sample table."""
        answers = self._answer(rollout)
        now = self._score(scorer, answers)
        names = ["initial"] + [n for n in self.refs if n != "initial"] + ["current"]
        scores = {**self.refs, "current": now}
        m: dict[str, float] = {}
        for aspect in ("harmless", "helpful"):
            comps = [(i, j, 1.0 / (1.0 + math.exp(scores[names[j]][aspect][k] -
                                                  scores[names[i]][aspect][k])))
                     for i, j in itertools.combinations(range(len(names)), 2)
                     for k in range(len(self.prompts[aspect]))]
            rs = ratings(comps, len(names), n_boot=self.cfg.eval.bootstrap,
                         seed=self.cfg.run.seed + step)
            word = "harmlessness" if aspect == "harmless" else "helpfulness"
            m.update({f"elo/{word}": rs[-1].elo, f"elo/{word}_low": rs[-1].low,
                      f"elo/{word}_high": rs[-1].high})
            for n, r in zip(names[1:-1], rs[1:-1], strict=True):
                m[f"elo/{word}_{n}"] = r.elo
            m[f"eval/pm_{aspect}_mean"] = mean_or_nan(now[aspect])
        rows = [[p.text, a[1], s] for p, a, s in zip(self.prompts["harmless"],
                                                        answers["harmless"],
                                                        now["harmless"], strict=True)][:8]
        return m, rows
