"""What the PPO trainer sends to the engines under ZeRO-3 on two gloo ranks: partitioned
parameters are empty tensors on each rank, so the metas must carry their full `ds_shape`, and
the export gathers full tensors under every name the engine's loader expects (a tied head
included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cai_ray.actors.ppo import PPOTrainerWorker
from cai_ray.actors.trainer import start_ranks
from cai_ray.actors.weight_sync import checksum, checksum_mismatches, iterate
from cai_ray.config import load_config
from cai_ray.runtime import role_group

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # real engines and trainers: minutes on 2 cores


def test_zero3_metas_and_export_carry_full_shapes(ray_local, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = load_config(ROOT / "configs" / "cpu-tiny.yaml", [
        "trainer.zero_stage=3", "placement.trainer.num_actors=2", "ppo.advantage=grpo",
        "ppo.samples_per_prompt=2",
        "trainer.dtype=float32", "ppo.mini_batch_size=4", "trainer.micro_batch_size=2"])
    policy = cfg.model
    group = role_group(cfg, "trainer", PPOTrainerWorker,
                       (policy, cfg.trainer, cfg.ppo, None, "cpu", 0, 1.0), None,
                       lambda g: start_ranks(g, PPOTrainerWorker.setup, 1, 300))
    try:
        metas = group.call_all(PPOTrainerWorker.weight_metas)
        exports = group.call_all(PPOTrainerWorker.export_weights, 1.0)
        sent = dict(iterate(exports[0].buckets))  # the trainer owns the buckets: read them first
    finally:
        group.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert metas[0] == metas[1]  # every rank agrees on what rank 0 sends
    assert {m.name: m.shape for m in metas[0]} == want
    assert all(m.dtype == "float32" for m in metas[0])
    assert {k: tuple(v.shape) for k, v in sent.items()} == want
    assert exports[1].buckets == [] and exports[1].checksums == {}
    for k, v in hf.state_dict().items():  # untrained: the gathered weights are the model's
        assert torch.equal(sent[k], v), k
        # equal up to float64 summation order (which follows the thread count), within the
        # tolerance the engines' check uses; a tensor moved by 1e-4 is caught by it
        assert checksum_mismatches({k: exports[0].checksums[k]}, {k: checksum(v)}) == [], k
        assert checksum_mismatches({k: exports[0].checksums[k]},
                                   {k: checksum(v + 1e-4)}) == [k], k
