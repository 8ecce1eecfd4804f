"""Which weight-sync transport a run gets, and the refusals at validate time: never NCCL
between ranks that can share a GPU, never NCCL on the CPU, no engine of more than one GPU."""

from __future__ import annotations

import pytest

from cai_ray.config import load_config, shared_gpu_reason, weight_transport
from cai_ray.configschema import ValidationError

GPU = ["run.device=cuda", "placement.trainer.num_gpus=1", "placement.rollout.num_gpus=1"]


def test_auto_is_nccl_on_separate_gpus_and_object_store_on_cpu() -> None:
    cfg = load_config(None, GPU, check_env=False)
    assert shared_gpu_reason(cfg) is None
    assert weight_transport(cfg, "cuda") == "nccl"
    assert weight_transport(load_config(None, ["run.device=cpu"]), "cpu") == "object_store"


@pytest.mark.parametrize("extra,why", [
    (["placement.colocate=[[trainer,rollout]]", "placement.trainer.num_gpus=0.5",
      "placement.rollout.num_gpus=0.5"], "shared bundles"),
    (["placement.rollout.num_gpus=0.5"], "placement.rollout.num_gpus=0.5 is a fraction"),
])
def test_auto_never_picks_nccl_where_a_gpu_can_be_shared(extra: list[str], why: str) -> None:
    cfg = load_config(None, GPU + extra, check_env=False)
    assert why in (shared_gpu_reason(cfg) or "")
    assert weight_transport(cfg, "cuda") == "object_store"
    with pytest.raises(ValidationError, match=r"ppo\.weight_sync.*two ranks of one group on "
                       "one GPU"):
        load_config(None, GPU + extra + ["ppo.weight_sync=nccl"], check_env=False)


def test_nccl_refused_on_cpu() -> None:
    with pytest.raises(ValidationError, match=r"ppo\.weight_sync.*nccl needs CUDA"):
        load_config(None, ["run.device=cpu", "ppo.weight_sync=nccl"])


@pytest.mark.parametrize("role", ["rollout", "feedback"])
def test_multi_gpu_engines_refused_up_front(role: str) -> None:
    with pytest.raises(ValidationError, match=rf"{role}\.engine\.tensor_parallel_size.*refuses "
                       "a bundle holding more than one GPU"):
        load_config(None, GPU + [f"{role}.engine.tensor_parallel_size=2",
                                 f"placement.{role}.num_gpus=2"], check_env=False)
