"""PPO step time, side by side in one run: streaming vs synchronous, our GRPO vs TRL's, sync cost.

    .venv/bin/python benchmarks/ppo_step.py [--model smollm2] [--steps 5] [--parts a,b,c]
        [--pm DIR] [--out runs/bench-ppo]
    (part b needs TRL: .venv/bin/pip install -e '.[bench]')

(a) The same PPO run (SmolLM2 policy, PM, reference, DeepSpeed trainer) twice: synchronous
    (`ppo.max_staleness=0`) and streaming (`=1`), with the rollout role pinned to core 0 and the
    trainer, reward and reference roles to core 1 (`placement.*.cpu_affinity`): on a cluster
    each role owns its devices, and on two unpinned cores the phases would only compete. Median
    time per step over steps 2..N (step 1 holds the engines' warm-up); ratio streaming / sync.
(b) Critic-free GRPO, our loop (`ppo.advantage=grpo`: vLLM rollouts, PM scores, DeepSpeed
    update, weight sync) vs TRL's GRPOTrainer (HF generate), with the same policy, PM as
    reward, prompts, batch (P prompts × G samples), generation length, sampling, β, learning rate
    and dtype, one optimizer step per batch, β·KL in the loss as TRL has it
    (`ppo.kl_penalty=loss`, so our trainer skips the old-log-prob forward). Ours twice:
    synchronous (on-policy, like TRL) and streaming (`max_staleness=1`) twice: with the
    rollout pinned to core 0 and the other roles to core 1 as in (a), and with the rollout on
    core 0 and the other roles on both cores (`stream_shared`). Median episodes/s; ratios
    ours / TRL. Our sync is split into moving + loading the weights, the engine's module audit
    and the log-prob probe.
(c) Weight-sync time per step in the streaming run of (a) and its share of the step.

Without `--pm` the PM is the policy's backbone with a fresh scalar head (timing does not depend
on what the PM has learned). Both sides run in the dtype the config's `auto` picks on this CPU
(bf16 where it is native, else fp32); the CPU is printed first. (b) ends with a table of the
seconds per phase of a step on each side. Every number is printed with what it is; nothing is
asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai_ray.config import Config, ModelSpec, load_config  # noqa: E402
from cai_ray.runtime import setup_logging  # noqa: E402

CONFIG = ROOT / "configs" / "cpu-smollm.yaml"


def hardware_dtype() -> str:
    """The dtype the config's `auto` resolves to on this machine (bf16 where the CPU has it
    natively, else fp32), for both sides of every comparison."""
    from cai_ray.hardware import dtype_name

    return dtype_name("auto", "cpu")


def cpu_kind() -> str:
    import torch

    from cai_ray.hardware import cpu_flags

    name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                 .splitlines() if ln.startswith("model name")), "unknown CPU")
    bf16 = "avx512_bf16" in cpu_flags()
    return (f"{name}, {os.cpu_count()} cores, torch {torch.backends.cpu.get_cpu_capability()}"
            f"{' with avx512_bf16' if bf16 else ''}")


def fresh_pm(model: str, out: Path) -> Path:
    import torch

    from cai_ray.actors.reward import HEAD_FILE, load_reward_model, save_reward_model
    from cai_ray.models import load_tokenizer

    if (out / HEAD_FILE).exists():
        return out
    spec = ModelSpec(path=model)
    torch.manual_seed(0)
    save_reward_model(load_reward_model(spec, getattr(torch, hardware_dtype())),
                      load_tokenizer(spec), out)
    return out


def run_ours(cfg: Config, out: Path) -> list[dict[str, Any]]:
    import shutil

    from cai_ray.stages.ppo import run_ppo

    if out.exists():
        shutil.rmtree(out)
    run_ppo(cfg, out)
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "time/step" in r]  # the step records (not tables, not evals)


def median_after_first(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def base_overrides(args: argparse.Namespace, pm: Path) -> list[str]:
    return [f"model.path={args.model}", f"ppo.steps={args.steps}", f"ppo.reward_model={pm}",
            f"ppo.checkpoint_every={args.steps}", "ppo.eval_every=0",
            "tracking.wandb=disabled", "run.log_level=WARNING"]


PIN = ["placement.rollout.cpu_affinity=[0]", "placement.rollout.threads=1"] + [
    f"placement.{r}.{k}" for r in ("trainer", "reward", "reference")
    for k in ("cpu_affinity=[1]", "threads=1")]
# Streaming on two cores with the learner's roles on both: the rollout engine keeps core 0 and
# one thread, and the trainer, reward and reference roles run two threads over cores 0 and 1,
# so core 0 is not idle while the engine waits for new weights (it is, pinned, most of a step).
SHARE = ["placement.rollout.cpu_affinity=[0]", "placement.rollout.threads=1"] + [
    f"placement.{r}.{k}" for r in ("trainer", "reward", "reference")
    for k in ("cpu_affinity=[0,1]", "threads=2")]


def part_a(args: argparse.Namespace, pm: Path) -> dict[str, Any]:
    pin = PIN
    out: dict[str, Any] = {}
    for mode, stale in (("sync", 0), ("stream", 1)):
        cfg = load_config(CONFIG, base_overrides(args, pm) + pin +
                          [f"ppo.max_staleness={stale}"])
        rows = run_ours(cfg, Path(args.out) / f"a-{mode}")
        out[mode] = {
            "step_s": median_after_first([r["time/step"] for r in rows]),
            "generate_wait_s": median_after_first([r["time/generate_wait"] for r in rows]),
            "train_s": median_after_first([r["time/train"] for r in rows]),
            "sync_s": median_after_first([r["sync/seconds"] for r in rows]),
            "tokens_per_step": statistics.mean(r["response/length_mean"] for r in rows) *
            cfg.ppo.rollout_batch_size,
            "staleness_max": max(r["staleness/max"] for r in rows),
        }
        print(f"(a) {mode:6s}: {out[mode]['step_s']:.2f} s/step (waiting on generation "
              f"{out[mode]['generate_wait_s']:.2f} s, train {out[mode]['train_s']:.2f} s, "
              f"sync {out[mode]['sync_s']:.2f} s, ~{out[mode]['tokens_per_step']:.0f} tokens/"
              f"step, max staleness {out[mode]['staleness_max']})", flush=True)
    out["ratio"] = out["stream"]["step_s"] / out["sync"]["step_s"]
    print(f"(a) streaming / synchronous time per step = {out['ratio']:.2f} (target <= 0.75)")
    return out


def part_b(args: argparse.Namespace, pm: Path) -> dict[str, Any]:
    P, G, L = args.grpo_prompts, args.grpo_group, args.grpo_tokens
    ov = base_overrides(args, pm) + [
        "ppo.advantage=grpo", f"ppo.samples_per_prompt={G}", f"ppo.rollout_batch_size={P}",
        f"ppo.mini_batch_size={P * G}", "ppo.kl_penalty=loss",
        f"trainer.micro_batch_size={P * G}",  # one forward of the batch, as TRL's is
        f"rollout.sampling.max_new_tokens={L}"]
    out: dict[str, Any] = {}
    cfg = load_config(CONFIG, ov)
    modes = (("sync", ["ppo.max_staleness=0"]), ("stream", ["ppo.max_staleness=1"] + PIN),
             ("stream_shared", ["ppo.max_staleness=1"] + SHARE))
    for mode, extra in modes:
        cfg = load_config(CONFIG, ov + extra)
        rows = run_ours(cfg, Path(args.out) / f"b-ours-{mode}")
        out[f"ours_{mode}_eps"] = P * G / median_after_first([r["time/step"] for r in rows])
        out[f"ours_{mode}_phases"] = our_phases(rows)
        print(f"(b) ours {mode:13s} (GRPO, vLLM + DeepSpeed): "
              f"{out[f'ours_{mode}_eps']:.3f} episodes/s", flush=True)
    out["trl_eps"], out["trl_phases"] = trl_grpo(cfg, pm, P, G, L, args.steps)
    print(f"(b) TRL GRPOTrainer (HF generate): {out['trl_eps']:.3f} episodes/s")
    print_breakdown({**{f"ours {m}".replace("_", " "): out[f"ours_{m}_phases"]
                        for m, _ in modes}, "TRL": out["trl_phases"]})
    for mode, _ in modes:
        out[f"ratio_{mode}"] = out[f"ours_{mode}_eps"] / out["trl_eps"]
        print(f"(b) ours {mode} / TRL episodes/s = {out[f'ratio_{mode}']:.2f} (target >= 1.2)")
    return out


# where a step's seconds go, in the order they happen; `other` is the rest of the step (the
# driver's own work, logging, transfers not inside a phase)
PHASES = ("generate_wait", "experience", "score", "reference", "advantages", "train", "sync")
SYNC_PARTS = ("push_s", "audit_s", "probe_s")  # inside sync: move + load, module audit, probe


def our_phases(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds per phase over steps 2..N, and `other`: the median step minus the sum."""
    out = {k: median_after_first([r.get(f"time/{k}", 0.0) for r in rows]) for k in PHASES}
    out["step"] = median_after_first([r["time/step"] for r in rows])
    out["other"] = out["step"] - sum(out[k] for k in PHASES)
    for k in SYNC_PARTS:
        if any(f"sync/{k}" in r for r in rows):
            out[f"  sync {k[:-2]}"] = median_after_first([r.get(f"sync/{k}", 0.0) for r in rows])
    return out


def print_breakdown(sides: dict[str, dict[str, float]]) -> None:
    """One row per phase, one column per run: seconds of a step (median of steps 2..N)."""
    rows = [k for k in ("generate_wait", "experience", "score", "reference", "old_logprobs",
                        "advantages", "train", "sync", *(f"  sync {k[:-2]}" for k in SYNC_PARTS),
                        "other", "step")
            if any(k in v for v in sides.values())]
    print("(b) seconds per step, by phase (median of steps 2..N; generate_wait = the part of "
          "generation the step waited for):")
    print(f"    {'phase':<14}" + "".join(f"{name:>20}" for name in sides))
    for k in rows:
        print(f"    {k:<14}" + "".join(
            f"{v[k]:20.2f}" if k in v else f"{'-':>20}" for v in sides.values()))


def trl_grpo(cfg: Config, pm: Path, P: int, G: int, L: int, steps: int) -> float:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from cai_ray.actors.reward import load_reward_model
    from cai_ray.actors.trainer import encode_chat
    from cai_ray.models import load_tokenizer, resolve
    from cai_ray.rollouts import ppo_prompts

    torch.set_num_threads(2)
    spec = ModelSpec(path=str(pm))
    dtype = hardware_dtype()
    rm = load_reward_model(spec, getattr(torch, dtype)).eval()
    rtok = load_tokenizer(spec)

    def reward(prompts: list, completions: list, **_: Any) -> list[float]:
        items = [encode_chat(rtok, p, c[-1]["content"], cfg.reward.max_length)[0]
                 for p, c in zip(prompts, completions, strict=True)]
        width = max(len(x) for x in items)
        ids = torch.zeros((len(items), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, x in enumerate(items):
            ids[i, :len(x)], attn[i, :len(x)] = torch.tensor(x), 1
        with torch.no_grad():
            return [float(s) for s in rm(ids, attn)]

    ds = ppo_prompts(cfg)
    data = datasets.Dataset.from_dict({"prompt": ds["messages"]})
    stamps: list[float] = []
    steps_phases: list[dict[str, float]] = []  # per optimizer step: seconds per phase
    now: dict[str, float] = {}

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            if not stamps:
                stamps.append(time.monotonic())
            now.clear()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            stamps.append(time.monotonic())
            steps_phases.append(dict(now))

    s = cfg.rollout.sampling
    args = GRPOConfig(
        output_dir=str(ROOT / "runs" / "bench-ppo" / "trl"), per_device_train_batch_size=P * G,
        num_generations=G, steps_per_generation=1, gradient_accumulation_steps=1,
        max_completion_length=L, beta=cfg.ppo.kl_coef, learning_rate=cfg.trainer.lr,
        temperature=s.temperature, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
        bf16=dtype == "bfloat16", use_cpu=True, max_steps=steps, logging_steps=1, save_strategy="no",
        report_to="none", seed=cfg.run.seed, dataloader_num_workers=0,
        lr_scheduler_type="constant")
    trainer = GRPOTrainer(model=resolve(cfg.model), reward_funcs=reward, args=args,
                          train_dataset=data, callbacks=[Clock()])
    time_trl_phases(trainer, now)
    trainer.train()
    per_step = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    phases = {k: median_after_first([p.get(k, 0.0) for p in steps_phases])
              for k in ("generate_wait", "score", "reference", "old_logprobs", "prepare")}
    phases["step"] = median_after_first(per_step)
    phases["train"] = median_after_first([t - p.get("prepare", 0.0)
                                          for t, p in zip(per_step, steps_phases[1:],
                                                          strict=False)])
    # TRL's generation is all waited for; its `other` is the rest of _prepare_inputs
    # (tokenising, padding, advantages), since train is the step minus _prepare_inputs
    phases["other"] = phases.pop("prepare") - sum(
        phases[k] for k in ("generate_wait", "score", "reference", "old_logprobs"))
    return P * G / phases["step"], phases


def time_trl_phases(trainer: Any, now: dict[str, float]) -> None:
    """Time TRL's phases by wrapping its methods on this instance: generation, the reward
    function, the reference's and the old policy's log-prob forwards (no grad), and
    `_prepare_inputs` (all of those plus the batch's assembly); the training forward and
    backward are the step minus `_prepare_inputs`."""
    import functools

    import torch

    def timed(name: str | None, fn: Any) -> Any:
        @functools.wraps(fn)
        def inner(*a: Any, **k: Any) -> Any:
            key = name
            if key is None:  # the log-prob forward: which one
                if torch.is_grad_enabled():
                    return fn(*a, **k)  # the training forward: part of train
                key = "reference" if a and a[0] is trainer.ref_model else "old_logprobs"
            t0 = time.monotonic()
            try:
                return fn(*a, **k)
            finally:
                now[key] = now.get(key, 0.0) + time.monotonic() - t0
        return inner

    for attr, name in (("_generate", "generate_wait"), ("_calculate_rewards", "score"),
                       ("_get_per_token_logps_and_entropies", None),
                       ("_prepare_inputs", "prepare")):
        setattr(trainer, attr, timed(name, getattr(trainer, attr)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=5, help="PPO steps per run (first = warm-up)")
    ap.add_argument("--parts", default="a,b,c")
    ap.add_argument("--pm", help="trained PM directory (default: a fresh head on the policy)")
    ap.add_argument("--grpo-prompts", type=int, default=4)
    ap.add_argument("--grpo-group", type=int, default=4)
    ap.add_argument("--grpo-tokens", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-ppo"))
    args = ap.parse_args()
    setup_logging("WARNING")
    print(f"CPU: {cpu_kind()}; dtype (config auto): {hardware_dtype()} on both sides",
          flush=True)
    parts = set(args.parts.split(","))
    pm = Path(args.pm) if args.pm else fresh_pm(args.model, Path(args.out) / "pm")
    results: dict[str, Any] = {}
    if parts & {"a", "c"}:
        results["a"] = part_a(args, pm)
        st = results["a"]["stream"]
        results["c"] = {"sync_s": st["sync_s"], "share": st["sync_s"] / st["step_s"]}
        print(f"(c) weight sync: {st['sync_s']:.2f} s per step = "
              f"{100 * results['c']['share']:.1f}% of a streaming step (target <= 5%)")
    if "b" in parts:
        results["b"] = part_b(args, pm)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
