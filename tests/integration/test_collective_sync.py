"""The collective weight sync (`ppo.weight_sync: collective`) on the CPU, where its backend is
gloo: the same protocol as NCCL on GPU (a stateless group of trainer rank 0 and the engines,
tensor-by-tensor broadcast from inside the ZeRO gather, audit and sender checksums). ZeRO-3 on
two trainer ranks with two rollout engines, the probe checked after every sync; an engine that
dies is restarted and re-admitted into a newly formed group. One run covers both: the
sync checks hold on every step, before and after the re-admission."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from cai_ray.config import load_config
from cai_ray.stages.ppo import PPORun
from tests.conftest import actor_pids

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # real engines and trainers: minutes on 2 cores
TINY = ROOT / "configs" / "cpu-tiny.yaml"
COLLECTIVE = ["ppo.weight_sync=collective", "trainer.zero_stage=3",
              "placement.trainer.num_actors=2", "placement.rollout.num_actors=2",
              "trainer.micro_batch_size=2", "ppo.mini_batch_size=4"]


def _save_tiny_pm(root: Path) -> None:
    import torch

    from cai_ray.actors.reward import load_reward_model, save_reward_model
    from cai_ray.config import ModelSpec
    from cai_ray.models import load_tokenizer

    spec = ModelSpec(path="tiny-llama")
    torch.manual_seed(0)
    save_reward_model(load_reward_model(spec, torch.float32), load_tokenizer(spec),
                      root / "rm" / "model")


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/score_mean" in r]


def test_zero3_two_ranks_two_engines_every_sync_checked_and_a_dead_engine_readmitted(
        ray_local, tiny_model_dir, tmp_path: Path) -> None:
    """Every sync of a ZeRO-3 2+2 run is audited and probed; after step 2 one engine is
    SIGKILLed (when that lands mid-push, the survivor is freed by the trainer's abort, not
    after the group's 60 s timeout), restarted, and re-admitted into a new group."""
    _save_tiny_pm(tmp_path)
    steps = 5
    cfg = load_config(TINY, COLLECTIVE + [f"ppo.steps={steps}", "ppo.checkpoint_every=10",
                                          "run.call_timeout_s=60"])
    run = PPORun(cfg, tmp_path, resume=False)
    assert run.transport == "collective"
    metrics = tmp_path / "ppo" / "metrics.jsonl"
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set() and not killed:
            done = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()] \
                if metrics.exists() else []
            pids = actor_pids("RolloutWorker")
            if done and max(done) >= 2 and pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        run.run()
    finally:
        stop.set()
        t.join(timeout=10)
    assert len(killed) == 1
    summary = json.loads((tmp_path / "ppo" / "metrics.json").read_text())
    assert summary["steps"] == steps
    assert [(f["role"], f["cause"]) for f in summary["faults"]] == [("rollout", "died")]
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:  # both engines in sync after every push, the restarted one too
        assert r["sync/logprob_max_diff"] < 1e-3, r
        assert r["sync/megabytes"] > 0 and r["sync/buckets"] == 0
        assert r["sync/audit_modules"] > 0 and r["sync/audit_rel_err"] < 1e-4
