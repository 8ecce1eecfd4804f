"""PPO on one GPU with NCCL weight sync (vLLM's stateless group + PyNccl) between the DeepSpeed
trainer and the vLLM engine, each role on a fraction of the GPU. Skipped without CUDA, vLLM, Ray
or DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ppo_with_nccl_weight_sync(tiny_model_dir, tmp_path: Path) -> None:
    for mod in ("vllm", "ray", "deepspeed"):
        pytest.importorskip(mod)
    import torch

    from cai_ray.actors.reward import load_reward_model, save_reward_model
    from cai_ray.config import ModelSpec, load_config
    from cai_ray.models import load_tokenizer
    from cai_ray.stages.ppo import run_ppo

    spec = ModelSpec(path="tiny-llama")
    torch.manual_seed(0)
    pm = tmp_path / "pm"
    save_reward_model(load_reward_model(spec, torch.float32), load_tokenizer(spec), pm)
    frac = [f"placement.{r}.{k}" for r in ("rollout", "reward", "reference", "trainer")
            for k in ("num_gpus=0.2", "num_cpus=1")]
    cfg = load_config(ROOT / "configs" / "cpu-tiny.yaml", frac + [
        "run.device=cuda", "ppo.weight_sync=nccl", "ppo.steps=3", f"ppo.reward_model={pm}",
        "rollout.engine.gpu_memory_utilization=0.15", "trainer.comm_backend=nccl"])
    run_ppo(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in
            (tmp_path / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "table" not in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["sync/logprob_max_diff"] < 1e-3 for r in rows)
