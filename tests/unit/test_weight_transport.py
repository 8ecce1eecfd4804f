"""Which weight-sync transport a run gets, and the refusals at validate time: never the
collective (NCCL) sync between ranks that can share a GPU, gloo for it on the CPU, no engine of
more than one GPU."""

from __future__ import annotations

import pytest

from cai_ray.config import load_config, shared_gpu_reason, weight_transport
from cai_ray.configschema import ValidationError

GPU = ["run.device=cuda", "placement.trainer.num_gpus=1", "placement.rollout.num_gpus=1"]


def test_auto_is_collective_on_separate_gpus_and_object_store_on_cpu() -> None:
    cfg = load_config(None, GPU, check_env=False)
    assert shared_gpu_reason(cfg) is None
    assert weight_transport(cfg, "cuda") == "collective"
    assert weight_transport(load_config(None, ["run.device=cpu"]), "cpu") == "object_store"


@pytest.mark.parametrize("extra,why", [
    (["placement.colocate=[[trainer,rollout]]", "placement.trainer.num_gpus=0.5",
      "placement.rollout.num_gpus=0.5"], "shared bundles"),
    (["placement.rollout.num_gpus=0.5"], "placement.rollout.num_gpus=0.5 is a fraction"),
])
def test_auto_never_picks_collective_where_a_gpu_can_be_shared(extra: list[str], why: str) -> None:
    cfg = load_config(None, GPU + extra, check_env=False)
    assert why in (shared_gpu_reason(cfg) or "")
    assert weight_transport(cfg, "cuda") == "object_store"
    with pytest.raises(ValidationError, match=r"ppo\.weight_sync.*two ranks of one group on "
                       "one GPU"):
        load_config(None, GPU + extra + ["ppo.weight_sync=collective"], check_env=False)


def test_collective_on_cpu_is_gloo_and_allowed_however_roles_share() -> None:
    cfg = load_config(None, ["run.device=cpu", "ppo.weight_sync=collective",
                             "placement.colocate=[[trainer,rollout]]"])
    assert weight_transport(cfg, "cpu") == "collective"
    with pytest.raises(ValidationError, match="'nccl'"):  # the old name is gone
        load_config(None, ["ppo.weight_sync=nccl"])


@pytest.mark.parametrize("role", ["rollout", "feedback"])
def test_multi_gpu_engines_refused_up_front(role: str) -> None:
    with pytest.raises(ValidationError, match=rf"{role}\.engine\.tensor_parallel_size.*refuses "
                       "a bundle holding more than one GPU"):
        load_config(None, GPU + [f"{role}.engine.tensor_parallel_size=2",
                                 f"placement.{role}.num_gpus=2"], check_env=False)
