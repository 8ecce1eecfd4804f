"""SL-CAI, training: supervised finetuning of the policy on the revisions (DeepSpeed trainer group).

Reads `DIR/sl/train`, trains `sl.epochs` epochs (paper: 1, constant LR), logs the loss of every
step to `DIR/sl/metrics.jsonl` (and W&B) and a progress bar, measures the loss on a fixed subset before
and after, and saves `DIR/sl/model` in save_pretrained format (written aside, then renamed).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import datasets
from tqdm import tqdm

from cai_ray.actors.trainer import TrainerWorker, save_group_model, trainer_group
from cai_ray.config import Config
from cai_ray.messages import SFTSample
from cai_ray.runtime import ray_session
from cai_ray.tracking import Tracker

log = logging.getLogger(__name__)


def _samples(ds: datasets.Dataset, idx: list[int]) -> list[SFTSample]:
    return [SFTSample(messages=ds[i]["messages"], response=ds[i]["response"],
                      source=ds[i]["source"],
                      finished=bool(ds[i]["finished"]) if "finished" in ds.column_names
                      else True) for i in idx]


def run_train(cfg: Config, out_dir: Path) -> Path:
    sl_dir = out_dir / "sl"
    final = sl_dir / "model"
    if (final / "config.json").exists():
        log.info("SL model already trained in %s; skipping", final)
        return final
    train_path = sl_dir / "train"
    if not train_path.exists():
        raise FileNotFoundError(f"{train_path} does not exist: run `cai-ray sl --step "
                                "generate` first")
    ds = datasets.load_from_disk(str(train_path))
    world = cfg.placement.trainer.num_actors
    per_step = cfg.trainer.micro_batch_size * world
    steps_per_epoch = len(ds) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(ds)} training samples are fewer than one step needs "
                         f"({cfg.trainer.micro_batch_size} × {world} ranks)")
    total = steps_per_epoch * cfg.sl.epochs
    optimizer_steps = math.ceil(total / cfg.trainer.grad_accum)
    probe = list(range(min(16, len(ds))))
    log.info("SFT: %d samples, %d micro-steps (%d optimizer steps) over %d rank(s)", len(ds),
             total, optimizer_steps, world)
    t0 = time.monotonic()
    with ray_session(cfg):
        group = trainer_group(cfg, cfg.model, optimizer_steps)
        try:
            before = group.call_all(TrainerWorker.eval_sft, _samples(ds, probe))[0]
            tracker = Tracker(cfg.tracking, f"{cfg.run.name}-sl", sl_dir, cfg.to_dict())
            with tqdm(total=total, desc="SL-CAI finetuning", unit="step") as bar:
                for epoch in range(cfg.sl.epochs):
                    order = list(range(len(ds)))
                    random.Random(cfg.run.seed * 1000 + epoch).shuffle(order)
                    for s in range(steps_per_epoch):
                        idx = order[s * per_step:(s + 1) * per_step]
                        mb = cfg.trainer.micro_batch_size
                        stats = group.get([group.submit(r, TrainerWorker.train_sft,
                                                        _samples(ds, idx[r * mb:(r + 1) * mb]))
                                           for r in range(world)])
                        loss = sum(st.loss for st in stats) / len(stats)
                        rec = {"epoch": epoch, "step": stats[0].step, "loss": loss,
                               "tokens": sum(st.tokens for st in stats), "lr": stats[0].lr,
                               "grad_norm": stats[0].grad_norm,
                               "seconds": max(st.seconds for st in stats)}
                        tracker.log({f"sft/{k}": v for k, v in rec.items()
                                     if v is not None}, step=rec["step"])
                        bar.set_postfix(loss=f"{loss:.3f}")
                        bar.update(1)
            after = group.call_all(TrainerWorker.eval_sft, _samples(ds, probe))[0]
            tracker.log({"sft/probe_loss_before": before, "sft/probe_loss_after": after},
                        step=total)
            tracker.close()
            save_group_model(group, TrainerWorker.save, final)
        finally:
            group.shutdown()
    metrics = {"loss_before": before, "loss_after": after, "samples": len(ds),
               "steps": total, "seconds": time.monotonic() - t0}
    (sl_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("SFT: probe loss %.4f -> %.4f in %.1f s; model -> %s", before, after,
             metrics["seconds"], final)
    return final
