"""Collective weight sync (gloo on CPU) vs the object store, in one run on this machine.

    .venv/bin/python benchmarks/weight_sync.py [--model tiny-llama|smollm2] [--steps 4]
        [--engines 2] [--zero 3] [--trainers 2] [--out runs/bench-sync]

Two PPO runs of the same config (GRPO, single update, 4 prompts × 2 samples, 16 tokens),
differing only in `ppo.weight_sync`. Per run: median seconds per sync over the steps, the
sync's share of a step (sync seconds / step seconds), megabytes moved, and the worst probe
diff; then each figure as a ratio to the object store's measured in the same run. Nothing is
asserted. A CPU's two cores are shared by every role, so absolute times are this machine's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai_ray.config import load_config  # noqa: E402
from cai_ray.runtime import setup_logging  # noqa: E402

TINY = ROOT / "configs" / "cpu-tiny.yaml"
TRANSPORTS = ("object_store", "collective")


def save_pm(model: str, out: Path) -> Path:
    import torch

    from cai_ray.actors.reward import load_reward_model, save_reward_model
    from cai_ray.config import ModelSpec
    from cai_ray.models import load_tokenizer

    final = out / "pm"
    if not (final / "config.json").exists():
        spec = ModelSpec(path=model)
        torch.manual_seed(0)
        save_reward_model(load_reward_model(spec, torch.float32), load_tokenizer(spec), final)
    return final


def run(transport: str, args: argparse.Namespace, pm: Path, out: Path) -> dict[str, Any]:
    from cai_ray.stages.ppo import run_ppo

    d = out / transport
    shutil.rmtree(d, ignore_errors=True)
    cfg = load_config(TINY, [
        f"model.path={args.model}", f"ppo.reward_model={pm}", f"ppo.steps={args.steps}",
        f"ppo.checkpoint_every={args.steps}", "ppo.advantage=grpo",
        "ppo.kl_penalty=loss", "ppo.rollout_batch_size=4", "ppo.samples_per_prompt=2",
        "ppo.mini_batch_size=8", "trainer.micro_batch_size=2",
        "rollout.sampling.max_new_tokens=16", "trainer.dtype=float32",
        "rollout.engine.dtype=float32", f"trainer.zero_stage={args.zero}",
        f"placement.trainer.num_actors={args.trainers}",
        f"placement.rollout.num_actors={args.engines}", f"ppo.weight_sync={transport}"])
    t0 = time.monotonic()
    run_ppo(cfg, d)
    wall = time.monotonic() - t0
    rows = [json.loads(x) for x in (d / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "sync/seconds" in r and "time/step" in r]
    sync = [r["sync/seconds"] for r in rows]
    share = [r["sync/seconds"] / r["time/step"] for r in rows]
    return {"transport": transport, "sync_s": statistics.median(sync),
            "share": statistics.median(share), "steps": len(rows), "wall_s": wall,
            "megabytes": rows[-1].get("sync/megabytes", float("nan")),
            "probe_max": max(r["sync/logprob_max_diff"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--trainers", type=int, default=2)
    ap.add_argument("--zero", type=int, choices=(2, 3), default=3)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-sync"))
    args = ap.parse_args()
    setup_logging()
    out = Path(args.out)
    pm = save_pm(args.model, out)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((x.split(":", 1)[1].strip() for x in cpu.splitlines()
                 if x.startswith("Model name")), "unknown CPU")
    results = [run(t, args, pm, out) for t in TRANSPORTS]
    base = results[0]
    print(f"\n{name}; {args.model}, ZeRO-{args.zero}, {args.trainers} trainer rank(s), "
          f"{args.engines} engine(s)")
    print(f"{'transport':13s} {'s/sync':>7s} {'÷ obj':>6s} {'share':>6s} {'MB':>8s} "
          f"{'probe max':>10s}")
    for r in results:
        print(f"{r['transport']:13s} {r['sync_s']:7.3f} {r['sync_s'] / base['sync_s']:6.2f} "
              f"{r['share']:6.1%} {r['megabytes']:8.1f} {r['probe_max']:10.2e}")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
