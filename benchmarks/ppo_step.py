"""PPO step time, side by side in one run: streaming vs synchronous, our GRPO vs TRL's, sync cost.

    .venv/bin/python benchmarks/ppo_step.py [--model smollm2] [--steps 5] [--parts a,b,c]
        [--pm DIR] [--out runs/bench-ppo]
    (part b needs TRL: .venv/bin/pip install -e '.[bench]')

(a) The same PPO run (SmolLM2 policy, PM, reference, DeepSpeed trainer, bf16) twice: synchronous
    (`ppo.max_staleness=0`) and streaming (`=1`), with the rollout role pinned to core 0 and the
    trainer, reward and reference roles to core 1 (`placement.*.cpu_affinity`): on a cluster
    each role owns its devices, and on two unpinned cores the phases would only compete. Median
    time per step over steps 2..N (step 1 holds the engines' warm-up); ratio streaming / sync.
(b) Critic-free GRPO, our loop (`ppo.advantage=grpo`: vLLM rollouts, PM scores, DeepSpeed
    update, weight sync) vs TRL's GRPOTrainer (HF generate), with the same policy, PM as
    reward, prompts, batch (P prompts × G samples), generation length, sampling, β, learning rate
    and dtype, one optimizer step per batch, β·KL in the loss as TRL has it
    (`ppo.kl_penalty=loss`, so our trainer skips the old-log-prob forward). Ours twice:
    synchronous (on-policy, like TRL) and streaming (`max_staleness=1`, rollout pinned to
    core 0 and the other roles to core 1 as in (a)). Median episodes/s; ratios ours / TRL.
(c) Weight-sync time per step in the streaming run of (a) and its share of the step.

Without `--pm` the PM is the policy's backbone with a fresh scalar head (timing does not depend
on what the PM has learned). Every number is printed with what it is; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
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


def fresh_pm(model: str, out: Path) -> Path:
    import torch

    from cai_ray.actors.reward import HEAD_FILE, load_reward_model, save_reward_model
    from cai_ray.models import load_tokenizer

    if (out / HEAD_FILE).exists():
        return out
    spec = ModelSpec(path=model)
    torch.manual_seed(0)
    save_reward_model(load_reward_model(spec, torch.bfloat16), load_tokenizer(spec), out)
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
        f"ppo.mini_batch_size={P * G}", "ppo.kl_penalty=loss", "trainer.micro_batch_size=8",
        f"rollout.sampling.max_new_tokens={L}"]
    out: dict[str, Any] = {}
    cfg = load_config(CONFIG, ov)
    for mode, extra in (("sync", ["ppo.max_staleness=0"]),
                        ("stream", ["ppo.max_staleness=1"] + PIN)):
        cfg = load_config(CONFIG, ov + extra)
        rows = run_ours(cfg, Path(args.out) / f"b-ours-{mode}")
        out[f"ours_{mode}_eps"] = P * G / median_after_first([r["time/step"] for r in rows])
        parts = {k: median_after_first([r[f"time/{k}"] for r in rows])
                 for k in ("generate_wait", "score", "reference", "train")}
        print(f"(b) ours {mode:6s} (GRPO, vLLM + DeepSpeed): {out[f'ours_{mode}_eps']:.3f} "
              f"episodes/s ({', '.join(f'{k} {v:.1f} s' for k, v in parts.items())})",
              flush=True)
    out["trl_eps"] = trl_grpo(cfg, pm, P, G, L, args.steps)
    print(f"(b) TRL GRPOTrainer (HF generate): {out['trl_eps']:.3f} episodes/s")
    for mode in ("sync", "stream"):
        out[f"ratio_{mode}"] = out[f"ours_{mode}_eps"] / out["trl_eps"]
        print(f"(b) ours {mode} / TRL episodes/s = {out[f'ratio_{mode}']:.2f} (target >= 1.2)")
    return out


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
    rm = load_reward_model(spec, torch.bfloat16).eval()
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

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            if not stamps:
                stamps.append(time.monotonic())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            stamps.append(time.monotonic())

    s = cfg.rollout.sampling
    args = GRPOConfig(
        output_dir=str(ROOT / "runs" / "bench-ppo" / "trl"), per_device_train_batch_size=P * G,
        num_generations=G, steps_per_generation=1, gradient_accumulation_steps=1,
        max_completion_length=L, beta=cfg.ppo.kl_coef, learning_rate=cfg.trainer.lr,
        temperature=s.temperature, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
        bf16=True, use_cpu=True, max_steps=steps, logging_steps=1, save_strategy="no",
        report_to="none", seed=cfg.run.seed, dataloader_num_workers=0,
        lr_scheduler_type="constant")
    trainer = GRPOTrainer(model=resolve(cfg.model), reward_funcs=reward, args=args,
                          train_dataset=data, callbacks=[Clock()])
    trainer.train()
    per_step = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return P * G / median_after_first(per_step)


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
