"""LoRA against full finetuning on this machine: trainer memory and step time, one process.

    .venv/bin/python benchmarks/lora.py [--model smollm2] [--rank 8] [--steps 6] [--batch 4]
        [--tokens 128]

The trainer's own step (the code PPO, SFT and DPO share: `TrainerWorker.setup` builds the
model, `with_lora` adds the adapters, DeepSpeed ZeRO-2 on one gloo rank in this process), run
on the same random batch twice: full finetuning, then `trainer.lora.rank`. Per run: trainable
parameters, the optimizer's state bytes, the process's RSS growth over setup and the steps, and
the median seconds of forward + backward + optimizer step (steps 2..N). Each figure is printed
as a ratio to full finetuning, measured in the same run. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from cai_ray.actors.group import WorkerContext  # noqa: E402
from cai_ray.actors.trainer import TrainerWorker, free_port, token_logprobs  # noqa: E402
from cai_ray.config import load_config  # noqa: E402
from cai_ray.hardware import resolve_dtypes  # noqa: E402


def rss() -> float:
    return psutil.Process().memory_info().rss / 2**30


def measure(model: str, rank: int, steps: int, batch: int, tokens: int) -> dict[str, float]:
    import torch

    cfg = load_config(ROOT / "configs" / "cpu-smollm.yaml", [
        f"model.path={model}", f"trainer.lora.rank={rank}", "trainer.zero_stage=2",
        "trainer.comm_backend=gloo", f"trainer.micro_batch_size={batch}"])
    resolve_dtypes(cfg)
    gc.collect()
    r0 = rss()
    w = TrainerWorker(WorkerContext("trainer", 0, 1), cfg.model, cfg.trainer, "cpu", 0)
    w.setup("127.0.0.1", free_port(), steps)
    torch.manual_seed(0)
    vocab = w.policy.config.vocab_size
    ids = torch.randint(0, vocab, (batch, tokens))
    attn = torch.ones_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, tokens // 2:] = True
    times = []
    for _ in range(steps):
        t0 = time.monotonic()
        w.engine.train()
        loss = -token_logprobs(w.policy, ids, attn, mask)[0].mean()
        w.engine.backward(loss)
        w.engine.step()
        times.append(time.monotonic() - t0)
    opt = w.engine.optimizer
    state = sum(t.numel() * t.element_size() for s in opt.state.values()
                for t in s.values() if torch.is_tensor(t)) if hasattr(opt, "state") else 0
    trainable = sum(p.numel() for p in w.engine.module.parameters() if p.requires_grad)
    out = {"trainable_params": float(trainable), "optimizer_state_mib": state / 2**20,
           "rss_growth_gib": rss() - r0, "step_s": statistics.median(times[1:] or times)}
    w.close()
    import deepspeed

    deepspeed.comm.destroy_process_group() if deepspeed.comm.is_initialized() else None
    gc.collect()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    import torch

    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores; "
          f"{a.model}, batch {a.batch} × {a.tokens} tokens, {a.steps} steps")
    full = measure(a.model, 0, a.steps, a.batch, a.tokens)
    lora = measure(a.model, a.rank, a.steps, a.batch, a.tokens)
    print(f"{'':22s}{'full':>14s}{f'LoRA r={a.rank}':>14s}{'LoRA / full':>14s}")
    for k in full:
        ratio = lora[k] / full[k] if full[k] else float("nan")
        print(f"{k:22s}{full[k]:14.4g}{lora[k]:14.4g}{ratio:14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
