"""RL-CAI preference model: train on the soft-labelled comparisons, report accuracy and
calibration per aspect.

    cai-ray rm --config C --output DIR [--comparisons FILE.jsonl | DIR]

Harmlessness comparisons are mixed with helpfulness ones at `reward.helpful_fraction`; a seeded
`reward.eval_fraction` is held out. One epoch by default (the paper's), DeepSpeed, the soft-label
loss. `DIR/rm/metrics.json` gets held-out accuracy, ECE and the reliability bins, overall and
per aspect; the model goes to `DIR/rm/model` (written aside, then renamed).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cai_ray.actors.group import ActorGroup
from cai_ray.actors.reward import RewardWorker, reward_group
from cai_ray.actors.trainer import save_group_model
from cai_ray.algorithms.preference import bt_probability
from cai_ray.comparisons import (  # noqa: F401 - read_comparisons: re-exported
    agreement_report,
    load_comparisons,
    mix_and_split,
    read_comparisons,
)
from cai_ray.config import Config
from cai_ray.messages import Comparison
from cai_ray.runtime import ray_session
from cai_ray.tracking import Tracker

log = logging.getLogger(__name__)


def evaluate(scores: list[tuple[float, float]], comps: list[Comparison]) -> dict[str, Any]:
    return agreement_report([bt_probability(a, b) for a, b in scores], comps)


def score_pairs(group: ActorGroup[RewardWorker], comps: list[Comparison], batch: int
                ) -> list[tuple[float, float]]:
    items = [(c.messages, c.response_a, c.finished_a) for c in comps] + \
        [(c.messages, c.response_b, c.finished_b) for c in comps]
    scores: list[float] = []
    for i in range(0, len(items), batch * group.num_actors):
        scores += group.shard_and_gather(RewardWorker.score, items[i:i + batch * group.num_actors])
    n = len(comps)
    return list(zip(scores[:n], scores[n:], strict=True))


def run_rm(cfg: Config, out_dir: Path, comparisons: str | None = None) -> Path:
    rm_dir = out_dir / "rm"
    final = rm_dir / "model"
    if (final / "config.json").exists():
        log.info("preference model already trained in %s; skipping", final)
        return final
    comps = load_comparisons(out_dir, comparisons)
    r = cfg.reward
    train, held = mix_and_split(comps, r.helpful_fraction, r.eval_fraction, cfg.run.seed)
    world = cfg.placement.reward.num_actors
    per_step = r.micro_batch_size * world
    steps_per_epoch = len(train) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train)} training comparisons are fewer than one step needs "
                         f"({r.micro_batch_size} × {world} ranks)")
    total = steps_per_epoch * r.epochs
    spec = r.model or cfg.model
    log.info("PM: %d train / %d held-out comparisons, %d steps, backbone %s", len(train),
             len(held), total, spec.path)
    t0 = time.monotonic()
    rm_dir.mkdir(parents=True, exist_ok=True)
    with ray_session(cfg):
        group = reward_group(cfg, spec, math.ceil(total / r.grad_accum))
        try:
            tracker = Tracker(cfg.tracking, f"{cfg.run.name}-rm", rm_dir, cfg.to_dict())
            with tqdm(total=total, desc="preference model", unit="step") as bar:
                for epoch in range(r.epochs):
                    for s in range(steps_per_epoch):
                        b = train[s * per_step:(s + 1) * per_step]
                        mb = r.micro_batch_size
                        stats = group.get([group.submit(k, RewardWorker.train_step,
                                                        b[k * mb:(k + 1) * mb])
                                           for k in range(world)])
                        loss = sum(x.loss for x in stats) / len(stats)
                        tracker.log({"pm/loss": loss, "pm/epoch": epoch}, step=stats[0].step)
                        bar.set_postfix(loss=f"{loss:.3f}")
                        bar.update(1)
            metrics = {"held_out": evaluate(score_pairs(group, held, r.score_batch_size), held)
                       if held else {}, "train_comparisons": len(train), "steps": total}
            for aspect, m in metrics["held_out"].items():
                tracker.log({f"pm/{aspect}/accuracy": m["accuracy"], f"pm/{aspect}/ece": m["ece"]},
                            step=total)
            tracker.close()
            save_group_model(group, RewardWorker.save, final)
        finally:
            group.shutdown()
    metrics["seconds"] = time.monotonic() - t0
    (rm_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    ho = metrics["held_out"].get("all", {})
    log.info("PM: held-out accuracy %s, ECE %s -> %s", ho.get("accuracy"), ho.get("ece"), final)
    return final
