"""The rollout role on a real vLLM engine inside a Ray actor (tiny model, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from cai_ray.actors.rollout import RolloutWorker, rollout_group
from cai_ray.config import load_config
from cai_ray.messages import GenerationRequest
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rollout(ray_local, tiny_model_dir):
    cfg = load_config(ROOT / "configs" / "cpu-tiny.yaml", ["placement.rollout.num_actors=2"])
    g = rollout_group(cfg)
    yield g
    g.shutdown()


def test_generate_returns_typed_results_with_logprobs(rollout) -> None:
    reqs = [GenerationRequest(request_id=f"r{i}", messages=[{"role": "user",
                              "content": f"Question number {i}?"}], n=2, temperature=1.0,
                              max_tokens=12, ignore_eos=True, logprobs=True, seed=i)
            for i in range(4)]
    out = rollout.shard_and_gather(RolloutWorker.generate, reqs)
    assert [r.request_id for r in out] == ["r0", "r1", "r2", "r3"]
    assert {r.worker_rank for r in out} == {0, 1}  # both actors served a shard
    for r in out:
        assert r.weight_version == 0 and len(r.prompt_token_ids) > 5
        assert len(r.completions) == 2
        for c in r.completions:
            assert len(c.token_ids) == 12 and c.finish_reason == "length"
            assert c.logprobs is not None and len(c.logprobs) == 12
            assert all(lp <= 0 and math.isfinite(lp) for lp in c.logprobs)


def test_same_seed_same_sample_across_actors(rollout) -> None:
    req = GenerationRequest(request_id="x", messages=[{"role": "user", "content": "Hello"}],
                            temperature=1.0, max_tokens=10, seed=123, ignore_eos=True)
    a = rollout.call(0, RolloutWorker.generate, [req])[0].completions[0].token_ids
    b = rollout.call(1, RolloutWorker.generate, [req])[0].completions[0].token_ids
    assert a == b  # a per-request seed makes sampling reproducible whichever actor serves it


def test_seeded_prompts_over_one_step_budget(rollout) -> None:
    """Six long prompts (each under max_model_len) outgrow vLLM's CPU step budget (4096 tokens). A seeded request
    whose prefill is split over steps crashed the CPU engine ("CPU Generator does not use
    offset"); each prompt is now prefilled whole, and its sample is the one it gets alone."""
    text = " ".join(f"word{i}" for i in range(170))
    reqs = [GenerationRequest(request_id=f"long{i}", messages=[{"role": "user",
                              "content": f"{i}: {text}"}], temperature=1.0, max_tokens=4,
                              ignore_eos=True, seed=100 + i) for i in range(6)]
    together = rollout.call(0, RolloutWorker.generate, reqs)
    assert sum(len(r.prompt_token_ids) for r in together) > 4096
    assert all(len(r.prompt_token_ids) < 2048 for r in together)
    alone = rollout.call(0, RolloutWorker.generate, [reqs[5]])[0]
    assert alone.completions[0].token_ids == together[5].completions[0].token_ids


def test_sample_command_end_to_end(ray_local, tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, stdout, err = run_cli("sample", "--config", str(ROOT / "configs" / "cpu-tiny.yaml"),
                                "--output", str(out), "--num-prompts", "5",
                                "rollout.sampling.max_new_tokens=8")
    assert code == 0, err[-3000:]
    assert "5 responses" in stdout
    rows = [json.loads(line) for line in (out / "sample" / "samples.jsonl").open()]
    assert len(rows) == 5 and len({r["id"] for r in rows}) == 5
    assert all(r["id"].startswith("donotanswer:") and r["prompt"] for r in rows)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["rollout"]["sampling"]["max_new_tokens"] == 8  # the override is recorded


def _hf_logprobs(model_dir: Path, ids: list[int]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = m(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_update_weights_swaps_the_policy_in_place(tiny_model_dir, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from cai_ray.actors.group import ActorGroup
    from cai_ray.config import EngineConfig, ModelSpec, RoleResources

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "new")
    ids = [3, 40, 41, 200, 7, 99, 12, 350, 6]
    engine = EngineConfig(dtype="float32", max_model_len=256, kv_cache_gib=1)
    g = ActorGroup("rollout", RolloutWorker, RoleResources(), local=True,
                   init_args=(ModelSpec(path="tiny-llama"), engine, "cpu", 0))
    try:
        def diff(model_dir: Path) -> float:
            got = g.call(0, RolloutWorker.prompt_logprobs, [ids])[0]
            return max(abs(a - b) for a, b in zip(got, _hf_logprobs(model_dir, ids), strict=True))

        assert diff(tiny_model_dir) < 1e-4 and diff(tmp_path / "new") > 1e-2
        assert g.call(0, RolloutWorker.update_weights, 1, path=str(tmp_path / "new")) == 1
        assert diff(tmp_path / "new") < 1e-4
        req = GenerationRequest(request_id="v", messages=[{"role": "user", "content": "hi"}],
                                max_tokens=2)
        assert g.call(0, RolloutWorker.generate, [req])[0].weight_version == 1
        original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        named = [(k, v.clone()) for k, v in original.state_dict().items()]
        g.call(0, RolloutWorker.update_weights, 2, weights=named)
        assert diff(tiny_model_dir) < 1e-4
    finally:
        g.shutdown()
