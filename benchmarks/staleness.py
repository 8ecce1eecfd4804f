"""Streaming with a staleness correction vs without, vs synchronous: which learns faster per
second, in one run, on the tiny learning task (a PM that prefers digits; the tiny Llama policy).

    .venv/bin/python benchmarks/staleness.py [--steps 30] [--seed 0] [--out runs/bench-stale]

Three PPO runs of the same config (GAE, T = 0.7, 8 prompts × 4 samples, 16 tokens), differing
only in `ppo.max_staleness` and `ppo.staleness_correction`:
  sync        max_staleness=0 (every batch from the current weights; no correction needed)
  stream-is   max_staleness=1, truncated importance weights min(p_trainer/p_sampler, 2)
  stream-raw  max_staleness=1, no correction (the stale batch treated as on-policy)
For each: the score gain (mean of the last 5 steps − mean of the first 5), wall seconds of the
PPO loop, gain per minute, and the ratio of each to `sync` measured in this same run. One seed
is noisy: pass several (--seed) and read the spread. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai_ray.config import load_config  # noqa: E402
from cai_ray.runtime import setup_logging  # noqa: E402

TINY = ROOT / "configs" / "cpu-tiny.yaml"
MODES = {"sync": ["ppo.max_staleness=0"],
         "stream-is": ["ppo.max_staleness=1", "ppo.staleness_correction=truncated_is"],
         "stream-raw": ["ppo.max_staleness=1", "ppo.staleness_correction=none"]}


def marker_pm(out: Path) -> Path:
    """The learning test's PM: planted pairs, the preferred response has digits."""
    from cai_ray.models import load_tokenizer
    from cai_ray.stages.rm import run_rm
    from cai_ray.synthetic import marker_pairs

    final = out / "rm" / "model"
    if (final / "config.json").exists():
        return final
    cfg = load_config(TINY, ["reward.lr=0.002", "reward.epochs=2", "reward.micro_batch_size=8",
                             "reward.eval_fraction=0.2"])
    rows = marker_pairs(load_tokenizer(cfg.model), mixed=False)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return run_rm(cfg, out, str(out / "pairs.jsonl"))


def run(mode: str, pm: Path, steps: int, seed: int, out: Path) -> dict[str, Any]:
    from cai_ray.stages.ppo import run_ppo

    d = out / f"{mode}-seed{seed}"
    shutil.rmtree(d, ignore_errors=True)
    cfg = load_config(TINY, [f"ppo.reward_model={pm}", f"ppo.steps={steps}", "trainer.lr=3e-3",
                             "ppo.rollout_batch_size=8", "ppo.samples_per_prompt=4",
                             "ppo.mini_batch_size=16", f"ppo.checkpoint_every={steps}",
                             "ppo.kl_coef=0.05", "rollout.sampling.temperature=0.7",
                             f"run.seed={seed}", *MODES[mode]])
    t0 = time.monotonic()
    run_ppo(cfg, d)
    wall = time.monotonic() - t0
    rows = [json.loads(x) for x in (d / "ppo" / "metrics.jsonl").read_text().splitlines()]
    score = [r["reward/score_mean"] for r in rows if "reward/score_mean" in r]
    loop = sum(r["time/step"] for r in rows if "time/step" in r)
    gain = sum(score[-5:]) / 5 - sum(score[:5]) / 5
    return {"mode": mode, "seed": seed, "gain": gain, "loop_s": loop, "wall_s": wall,
            "gain_per_min": 60 * gain / loop, "score_curve": [round(s, 3) for s in score]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, action="append")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-stale"))
    args = ap.parse_args()
    setup_logging()
    out = Path(args.out)
    pm = marker_pm(out / "pm")
    results = [run(m, pm, args.steps, s, out) for s in (args.seed or [0]) for m in MODES]
    base = {r["seed"]: r for r in results if r["mode"] == "sync"}
    print(f"\n{'mode':11s} {'seed':>4s} {'gain':>7s} {'loop s':>7s} {'gain/min':>9s} "
          f"{'÷ sync':>7s}")
    for r in results:
        b = base[r["seed"]]["gain_per_min"]
        ratio = r["gain_per_min"] / b if b else float("nan")
        print(f"{r['mode']:11s} {r['seed']:4d} {r['gain']:7.2f} {r['loop_s']:7.1f} "
              f"{r['gain_per_min']:9.2f} {ratio:7.2f}")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
