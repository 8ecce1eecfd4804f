"""The rollout role on CUDA (skipped cleanly where there is no GPU or no CUDA vLLM)."""

from __future__ import annotations

import pytest

from cai_ray.actors.group import ActorGroup
from cai_ray.actors.rollout import RolloutWorker
from cai_ray.config import EngineConfig, ModelSpec, RoleResources
from cai_ray.messages import GenerationRequest


def test_rollout_generates_on_cuda(tiny_model_dir) -> None:
    pytest.importorskip("vllm")
    engine = EngineConfig(dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.3)
    g = ActorGroup("rollout", RolloutWorker, RoleResources(num_actors=1), local=True,
                   init_args=(ModelSpec(path="tiny-llama"), engine, "cuda", 0))
    try:
        req = GenerationRequest(request_id="g", messages=[{"role": "user", "content": "hi"}],
                                n=4, max_tokens=8, ignore_eos=True, logprobs=True)
        (res,) = g.call(0, RolloutWorker.generate, [req])
        assert len(res.completions) == 4
        assert all(len(c.token_ids) == 8 and c.logprobs for c in res.completions)
    finally:
        g.shutdown()
