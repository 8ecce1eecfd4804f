"""PPO vs offline DPO vs online DPO on one preset, side by side: harmlessness gain per CPU-hour.

    .venv/bin/python benchmarks/rl_variants.py [--config configs/cpu-efficacy.yaml]
        [--base runs/efficacy] [--variants ppo,dpo,online_dpo] [--out runs/rl-variants]
        [key=value ...]

Every variant starts from the same SL-CAI policy and is rated on the same held-out eval prompts:

1. The shared part runs once in `--base` (or is reused, when a finished run is given there): SL
   generation and finetuning, and the AI-labelled comparisons (the label stage).
2. Each variant gets its own directory under `--out`, with the base's `sl/` (and, for PPO and
   DPO, its `label/`) linked in, and runs only its RL stage(s):
   - ppo: `rm` (the PM on the base's labels) then `ppo`;
   - dpo: `dpo` on the base's labels;
   - online_dpo: `online_dpo` (the judge labels fresh policy samples in the loop), with two
     samples per prompt unless the command line sets `ppo.samples_per_prompt`, and no live PM
     Elo.
   Each runs at the settings it was measured at (`VARIANT_OVERRIDES`).
   Then `eval` rates the initial policy and the variant's final policy.
3. Cost: the variant's own stages, plus the label stage for the two that learn from its
   comparisons (online DPO labels inside its own stage), as CPU-hours = wall time × the cores
   the run may use (`run.ray_num_cpus` capped at this machine's cores). The eval is not cost.

Printed: one row per variant with the judged-harmful rate (initial → final, 95% intervals), the
gain in points, the evasive and over-refusal rates, the judge's helpfulness Elo against the
initial policy, the cost and the gain per CPU-hour. The variants run their preset's own step
counts; the per-CPU-hour column is what makes unequal budgets comparable. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai_ray.config import Config, load_config  # noqa: E402
from cai_ray.runtime import setup_logging  # noqa: E402

VARIANTS = ("ppo", "dpo", "online_dpo")
# What a variant needs beyond the preset (given before the command line's overrides, which win).
# The preset is set for online DPO (two samples per prompt, no PM for the live Elo, 72 steps at
# 2e-5); PPO gets one sample per prompt, its live Elo and 24 steps, and offline DPO 1e-5, the
# settings each was measured at. Online DPO compares two samples per prompt in any preset
# unless the command line asks for more (e.g. ppo.samples_per_prompt=4 with pointwise labels).
VARIANT_OVERRIDES = {
    "ppo": ["ppo.samples_per_prompt=1", "ppo.eval_every=12", "ppo.steps=24"],
    "dpo": ["dpo.lr=1.0e-5"],
    "online_dpo": ["ppo.samples_per_prompt=2", "ppo.eval_every=0"],
}


def variant_config(path: str, overrides: list[str], variant: str) -> Config:
    return load_config(path, VARIANT_OVERRIDES.get(variant, []) + overrides + [
        f"pipeline.rl={variant}", f"eval.snapshots=[initial,{variant}]"])


def variant_problems(cfg: Config, variant: str) -> list[str]:
    """A variant's config problems, found before anything runs (not an hour in)."""
    if variant != "online_dpo":
        return []
    from cai_ray.stages.online_dpo import online_dpo_problems

    return [f"{variant}: {key}: {msg}" for key, msg in online_dpo_problems(cfg)]


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def stage_seconds(run: Path) -> dict[str, float]:
    path = run / "bench_stage_seconds.json"
    return json.loads(path.read_text()) if path.exists() else {}


def record(run: Path, name: str, seconds: float) -> None:
    times = stage_seconds(run)
    times[name] = times.get(name, 0.0) + seconds
    (run / "bench_stage_seconds.json").write_text(json.dumps(times, indent=2))


def shared_part(cfg: Config, base: Path, label: bool = True) -> None:
    """SL generation + finetuning and (`label`: a variant learns from offline labels) the label
    stage in `base`; each is skipped when done (a finished run given as --base costs nothing
    here)."""
    from cai_ray.stages.label import run_label
    from cai_ray.stages.sl import run_generate
    from cai_ray.stages.sl_train import run_train

    base.mkdir(parents=True, exist_ok=True)
    stages: list[tuple[str, Callable[[], Any], Path]] = [
        ("sl/generate", lambda: run_generate(cfg, base), base / "sl" / "data"),
        ("sl/train", lambda: run_train(cfg, base), base / "sl" / "model")]
    if label:  # online DPO labels its own fresh pairs
        stages.append(("label", lambda: run_label(cfg, base), base / "label" / "comparisons"))
    for name, fn, done in stages:
        if finished(done):
            print(f"base: {name} already done in {base}", flush=True)
            continue
        record(base, name, timed(fn))


def finished(p: Path) -> bool:
    """A stage's output is complete: a JSON file, a saved model or a saved dataset (each
    written aside and renamed by its stage)."""
    if p.suffix == ".json":
        return p.exists()
    return (p / "config.json").exists() or (p / "dataset_info.json").exists()


def label_seconds(base: Path) -> float:
    """The label stage's wall time: as timed here, else as the stage recorded it (labelling
    plus the judge check before it)."""
    if "label" in stage_seconds(base):
        return stage_seconds(base)["label"]
    m = json.loads((base / "label" / "metrics.json").read_text())
    return float(m.get("seconds", float("nan"))) + float(
        m.get("judge_check", {}).get("seconds", 0.0))


def link(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.symlink_to(src.resolve(), target_is_directory=True)


def run_variant(cfg: Config, base: Path, out: Path, variant: str) -> None:
    from cai_ray.stages.dpo import run_dpo
    from cai_ray.stages.evaluate import run_eval
    from cai_ray.stages.online_dpo import run_online_dpo
    from cai_ray.stages.ppo import run_ppo
    from cai_ray.stages.rm import run_rm

    out.mkdir(parents=True, exist_ok=True)
    link(base / "sl", out / "sl")
    stages: list[tuple[str, Callable[[], Any], Path]]
    if variant == "online_dpo":
        stages = [("online_dpo", lambda: run_online_dpo(cfg, out, resume=True),
                   out / "online_dpo" / "model")]
    else:
        link(base / "label", out / "label")
        stages = ([("rm", lambda: run_rm(cfg, out), out / "rm" / "model"),
                   ("ppo", lambda: run_ppo(cfg, out, resume=True), out / "ppo" / "model")]
                  if variant == "ppo" else [("dpo", lambda: run_dpo(cfg, out),
                                             out / "dpo" / "model")])
    stages.append(("eval", lambda: run_eval(cfg, out), out / "eval" / "elo.json"))
    for name, fn, done in stages:
        if finished(done):
            print(f"{variant}: {name} already done", flush=True)
            continue
        print(f"{variant}: {name} ...", flush=True)
        record(out, name, timed(fn))


def row(cfg: Config, base: Path, out: Path, variant: str) -> dict[str, Any]:
    elo = json.loads((out / "eval" / "elo.json").read_text())
    snap = elo["per_snapshot"]
    first, last = snap["initial"], snap[variant]
    times = stage_seconds(out)
    own = sum(v for k, v in times.items() if k != "eval")
    label = label_seconds(base) if variant != "online_dpo" else 0.0
    cores = min(cfg.run.ray_num_cpus or os.cpu_count() or 1, os.cpu_count() or 1)
    cpu_h = (own + label) * cores / 3600
    gain = 100 * (first["harmful_rate"] - last["harmful_rate"])
    helpful = elo.get("elo", {}).get("judge/helpful", {}).get(variant, {})
    return {"variant": variant, "harmful_initial": first["harmful_rate"],
            "harmful_initial_ci": [first["harmful_rate_low"], first["harmful_rate_high"]],
            "harmful_final": last["harmful_rate"],
            "harmful_final_ci": [last["harmful_rate_low"], last["harmful_rate_high"]],
            "gain_points": gain, "evasive_initial": first["evasive_rate"],
            "evasive_final": last["evasive_rate"],
            "over_refusal_initial": first["over_refusal_rate"],
            "over_refusal_final": last["over_refusal_rate"],
            "helpful_elo": helpful.get("elo"),
            "helpful_elo_ci": [helpful.get("low"), helpful.get("high")],
            "stage_seconds": times, "label_seconds": label, "cores": cores,
            "cpu_hours": cpu_h, "gain_per_cpu_hour": gain / cpu_h if cpu_h else float("nan")}


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\nvariant      harmful initial -> final [95%]        gain   evasive   over-ref  "
          "helpful Elo [95%]      CPU-h  gain/CPU-h")
    for r in rows:
        lo, hi = r["harmful_final_ci"]
        elo, (elo_lo, elo_hi) = r["helpful_elo"], r["helpful_elo_ci"]
        elo_s = "-" if elo is None else f"{elo:+.0f} [{elo_lo:+.0f}, {elo_hi:+.0f}]"
        print(f"{r['variant']:<12} {pct(r['harmful_initial']):>5} -> {pct(r['harmful_final']):>4}"
              f" [{pct(lo)}, {pct(hi)}]{'':<10} {r['gain_points']:+5.1f}  "
              f"{pct(r['evasive_initial'])}->{pct(r['evasive_final']):<4} "
              f"{pct(r['over_refusal_initial'])}->{pct(r['over_refusal_final']):<4} "
              f"{elo_s:<22} {r['cpu_hours']:5.2f}  {r['gain_per_cpu_hour']:+8.1f}")
    print("(gain: points of judged-harmful rate removed; CPU-h: the variant's own stages plus "
          "the label stage where it learns from it, × cores)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "cpu-efficacy.yaml"))
    ap.add_argument("--base", default=str(ROOT / "runs" / "efficacy"),
                    help="run directory holding (or to hold) the shared SL and label stages")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(ROOT / "runs" / "rl-variants"))
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    setup_logging("INFO")
    base, out = Path(args.base), Path(args.out)
    shared = load_config(args.config, args.overrides)
    configs = {v: variant_config(args.config, args.overrides, v) for v in variants}
    problems = [p for v in variants for p in variant_problems(configs[v], v)]
    if problems:
        ap.error("variant configs:\n  " + "\n  ".join(problems))
    shared_part(shared, base, label=any(v != "online_dpo" for v in variants))
    rows = []
    for v in variants:
        cfg = configs[v]
        run_variant(cfg, base, out / v, v)
        rows.append(row(cfg, base, out / v, v))
    print_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
