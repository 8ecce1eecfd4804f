"""PPO on GPUs with the DeepSpeed trainer and vLLM engines. NCCL weight sync (vLLM's stateless
group + PyNccl) needs the trainer and the engine on GPUs of their own (NCCL refuses two ranks of
one group on one device), so it takes three GPUs: trainer, engine, and one shared by the PM and
the reference. On one GPU every role takes a fraction and `auto` syncs through the object
store. Skipped without CUDA (or enough GPUs), vLLM, Ray or DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(tiny_model_dir: Path, tmp_path: Path, overrides: list[str]) -> list[dict]:
    import torch

    from cai_ray.actors.reward import load_reward_model, save_reward_model
    from cai_ray.config import ModelSpec, load_config
    from cai_ray.models import load_tokenizer
    from cai_ray.stages.ppo import run_ppo

    spec = ModelSpec(path="tiny-llama")
    torch.manual_seed(0)
    pm = tmp_path / "pm"
    save_reward_model(load_reward_model(spec, torch.float32), load_tokenizer(spec), pm)
    cfg = load_config(ROOT / "configs" / "cpu-tiny.yaml", overrides + [
        "run.device=cuda", "ppo.steps=3", f"ppo.reward_model={pm}",
        "rollout.engine.gpu_memory_utilization=0.15", "trainer.comm_backend=nccl"])
    run_ppo(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in
            (tmp_path / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "table" not in r]


def _needs(gpus: int) -> None:
    for mod in ("vllm", "ray", "deepspeed"):
        pytest.importorskip(mod)
    import torch

    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPU(s), found {torch.cuda.device_count()}")


def test_ppo_with_nccl_weight_sync(tiny_model_dir, tmp_path: Path) -> None:
    _needs(3)
    own = [f"placement.{r}.num_gpus=1" for r in ("trainer", "rollout")]
    shared = [f"placement.{r}.num_gpus=0.5" for r in ("reward", "reference")]
    cpus = [f"placement.{r}.num_cpus=1" for r in ("rollout", "reward", "reference", "trainer")]
    rows = _run(tiny_model_dir, tmp_path, own + shared + cpus + ["ppo.weight_sync=collective"])
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["sync/logprob_max_diff"] < 1e-3 for r in rows)


def test_ppo_on_one_gpu_syncs_through_the_object_store(tiny_model_dir, tmp_path: Path) -> None:
    _needs(1)
    frac = [f"placement.{r}.{k}" for r in ("rollout", "reward", "reference", "trainer")
            for k in ("num_gpus=0.2", "num_cpus=1")]
    rows = _run(tiny_model_dir, tmp_path, frac)  # weight_sync auto: the object store here
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["sync/logprob_max_diff"] < 1e-3 for r in rows)
