"""RL-CAI by direct preference optimisation on the AI-labelled comparisons, no preference model.

    cai-ray dpo --config C --output DIR [--comparisons FILE.jsonl | DIR]

The comparisons (`DIR/label/comparisons` by default) are mixed and split as the preference
model's are (`reward.helpful_fraction`, a seeded `dpo.eval_fraction` held out). The policy starts
from the SL-CAI model when there is one (`DIR/sl/model`), and that same model, frozen, is the
reference: its summed log-probs of every response are computed once, by the reference role,
before the trainer starts. The soft label p(A) is the loss's target (`dpo.loss`, `dpo.beta`;
`algorithms/dpo.py`). `DIR/dpo/metrics.jsonl` (and W&B) get the loss, the implicit reward of
the chosen and rejected sides, their margin and accuracy per step; `DIR/dpo/metrics.json` the
held-out accuracy and calibration of the implicit reward, overall and per aspect. The model goes
to `DIR/dpo/model` (written aside, then renamed); a rerun with the model in place skips.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cai_ray.actors.dpo import DPOTrainerWorker, comparison_sequences, dpo_trainer_group
from cai_ray.actors.group import ActorGroup
from cai_ray.actors.reference import ReferenceWorker, reference_group
from cai_ray.actors.trainer import Sequence, TrainerWorker, save_group_model
from cai_ray.comparisons import agreement_report, load_comparisons, mix_and_split
from cai_ray.config import Config
from cai_ray.messages import Comparison, DPOPairs, DPOStats
from cai_ray.models import load_tokenizer
from cai_ray.rundir import policy_spec
from cai_ray.runtime import device_of, ray_session
from cai_ray.tracking import Tracker

log = logging.getLogger(__name__)

Encoded = tuple[Comparison, Sequence, Sequence, float, float]  # comp, A, B, ref Σ A, ref Σ B


def reference_sums(group: ActorGroup[ReferenceWorker], seqs: list[Sequence],
                   chunk: int = 64) -> list[float]:
    out: list[float] = []
    with tqdm(total=len(seqs), desc="reference log-probs", unit="seq") as bar:
        for i in range(0, len(seqs), chunk * group.num_actors):
            part = seqs[i:i + chunk * group.num_actors]
            out += group.shard_and_gather(ReferenceWorker.logprob_sums, part)
            bar.update(len(part))
    return out


def pairs_of(rows: list[Encoded]) -> DPOPairs:
    return DPOPairs([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows],
                    [r[4] for r in rows], [r[0].p_a for r in rows])


def held_out_metrics(margins: list[float], comps: list[Comparison]) -> dict[str, Any]:
    """Accuracy and calibration of σ(margin), the policy's implied p(A), against the labels,
    and the mean margin on the label's side."""
    out = agreement_report([1 / (1 + math.exp(-m)) for m in margins], comps)
    for aspect, v in out.items():
        sel = [(m, c) for m, c in zip(margins, comps, strict=True)
               if aspect == "all" or c.aspect == aspect]
        v["margin"] = label_side_margin(sel)
    return out


def label_side_margin(sel: list[tuple[float, Comparison]]) -> float:
    """Mean margin of the side the label prefers over the other (ties left out)."""
    m = [x if c.p_a > 0.5 else -x for x, c in sel if c.p_a != 0.5]
    return sum(m) / len(m) if m else float("nan")


def run_dpo(cfg: Config, out_dir: Path, comparisons: str | None = None) -> Path:
    dpo_dir = out_dir / "dpo"
    final = dpo_dir / "model"
    if (final / "config.json").exists():
        log.info("DPO policy already trained in %s; skipping", final)
        return final
    comps = load_comparisons(out_dir, comparisons)
    d = cfg.dpo
    train, held = mix_and_split(comps, cfg.reward.helpful_fraction, d.eval_fraction,
                                cfg.run.seed)
    world = cfg.placement.trainer.num_actors
    per_step = d.micro_batch_size * world
    steps_per_epoch = len(train) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train)} training comparisons are fewer than one step needs "
                         f"(dpo.micro_batch_size {d.micro_batch_size} × {world} ranks)")
    total = steps_per_epoch * d.epochs
    policy = policy_spec(cfg, out_dir)
    log.info("DPO: %d train / %d held-out comparisons, %d steps, β=%g, loss %s, policy %s",
             len(train), len(held), total, d.beta, d.loss, policy.path)
    t0 = time.monotonic()
    dpo_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(policy)
    everything = train + held
    seqs = [comparison_sequences(tok, c, cfg.trainer.max_length) for c in everything]
    with ray_session(cfg):
        ref = reference_group(cfg, policy, device_of(cfg), temperature=1.0)
        try:
            sums = reference_sums(ref, [s for pair in seqs for s in pair])
        finally:
            ref.shutdown()
        rows: list[Encoded] = [(c, a, b, sums[2 * i], sums[2 * i + 1])
                               for i, (c, (a, b)) in enumerate(zip(everything, seqs, strict=True))]
        train_rows, held_rows = rows[:len(train)], rows[len(train):]
        group = dpo_trainer_group(cfg, policy, math.ceil(total / cfg.trainer.grad_accum))
        try:
            tracker = Tracker(cfg.tracking, f"{cfg.run.name}-dpo", dpo_dir, cfg.to_dict())
            mb = d.micro_batch_size
            with tqdm(total=total, desc="dpo", unit="step") as bar:
                for epoch in range(d.epochs):
                    for s in range(steps_per_epoch):
                        b = train_rows[s * per_step:(s + 1) * per_step]
                        stats = group.get([group.submit(k, DPOTrainerWorker.train_dpo,
                                                        pairs_of(b[k * mb:(k + 1) * mb]))
                                           for k in range(world)])
                        m = mean_metrics(stats)
                        tracker.log({**m, "dpo/epoch": epoch}, step=stats[0].step)
                        bar.set_postfix(loss=f"{m['dpo/loss']:.3f}",
                                        margin=f"{m['dpo/margin']:.2f}")
                        bar.update(1)
            margins = held_out_margins(group, held_rows, mb)
            metrics: dict[str, Any] = {
                "held_out": held_out_metrics(margins, held) if held else {},
                "train_comparisons": len(train), "steps": total, "beta": d.beta, "loss": d.loss,
                "policy": policy.path}
            for aspect, v in metrics["held_out"].items():
                tracker.log({f"dpo/held_out/{aspect}/accuracy": v["accuracy"],
                             f"dpo/held_out/{aspect}/margin": v["margin"]}, step=total)
            tracker.close()
            save_group_model(group, TrainerWorker.save, final)
        finally:
            group.shutdown()
    metrics["seconds"] = time.monotonic() - t0
    (dpo_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    ho = metrics["held_out"].get("all", {})
    log.info("DPO: held-out implicit-reward accuracy %s -> %s", ho.get("accuracy"), final)
    return final


def held_out_margins(group: ActorGroup[DPOTrainerWorker], rows: list[Encoded], mb: int
                     ) -> list[float]:
    """The trained policy's implicit-reward margin of each row, `mb` pairs per call, every
    rank answering its share (in order). Every rank takes part in every wave (ZeRO-3 gathers
    need them all): a short last wave is filled with a repeat whose answer is dropped."""
    chunks = [rows[i:i + mb] for i in range(0, len(rows), mb)]
    out: list[float] = []
    n = group.num_actors
    for i in range(0, len(chunks), n):
        wave = chunks[i:i + n]
        real = len(wave)
        wave += [wave[0]] * (n - real)
        parts = group.get([group.submit(k, DPOTrainerWorker.margins, pairs_of(c))
                           for k, c in enumerate(wave)])
        for part in parts[:real]:
            out += part
    return out


def mean_metrics(stats: list[DPOStats]) -> dict[str, float]:
    """The ranks' metrics, averaged (a metric no rank reported is left out)."""
    per = [s.metrics() for s in stats]
    keys = {k for m in per for k in m}
    return {k: sum(m[k] for m in per if k in m) / sum(k in m for m in per) for k in sorted(keys)}
