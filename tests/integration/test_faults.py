"""Fault tolerance during PPO with real processes: the rollout actor's process is SIGKILLed; the
run restarts it, gives it the current weights, generates the lost batch again and finishes with
the right step count, every prompt trained on exactly once. A frozen reward actor is restarted
when its call times out. A SIGKILLed driver and then a trainer death each stop a run, and
--resume finishes it, every prompt once. The driver's side of these (repeated deaths of every
role, hangs, a hung trainer ending the run, the restore hooks, resume) is tested in
milliseconds in tests/unit/test_ppo_driver.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from cai_ray.config import Config, load_config
from cai_ray.data import PromptStream
from cai_ray.rollouts import ppo_prompts
from cai_ray.stages.ppo import PPORun
from tests.conftest import actor_pids

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "cpu-tiny.yaml"


def _pids(actor_class: str) -> list[int]:
    return actor_pids(actor_class)  # this test's own actors only


def _rollout_pids() -> list[int]:
    return _pids("RolloutWorker")


@contextmanager
def _frozen_after(metrics: Path, actor_class: str, step: int) -> Iterator[list[int]]:
    """SIGSTOP the first `actor_class` actor (alive, never answering: a wedged engine) once
    the run has logged `step`; the frozen pids are yielded and SIGKILLed on the way out."""
    frozen: list[int] = []
    stop = threading.Event()

    def freezer() -> None:
        while not stop.is_set() and not frozen:
            done = [json.loads(x)["step"] for x in metrics.read_text().splitlines()] \
                if metrics.exists() else []
            pids = _pids(actor_class)
            if done and max(done) >= step and pids:
                os.kill(pids[0], signal.SIGSTOP)
                frozen.append(pids[0])
            time.sleep(0.05)

    t = threading.Thread(target=freezer, daemon=True)
    t.start()
    try:
        yield frozen
    finally:
        stop.set()
        t.join(timeout=10)
        for pid in frozen:  # never leave a stopped process behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _assert_each_prompt_once(run: Path, cfg: Config, steps: int) -> None:
    """Every step trained on the next prompts of the seeded stream: none lost, none twice."""
    consumed = [json.loads(x) for x in
                (run / "ppo" / "consumed.jsonl").read_text().splitlines()]
    assert [c["step"] for c in consumed] == list(range(1, steps + 1))
    expected = PromptStream(ppo_prompts(cfg), seed=cfg.data.shuffle_seed).take(
        steps * cfg.ppo.rollout_batch_size)
    assert [i for c in consumed for i in c["prompts"]] == [x.id for x in expected]


def _save_tiny_pm(root: Path) -> None:
    import torch

    from cai_ray.actors.reward import load_reward_model, save_reward_model
    from cai_ray.config import ModelSpec
    from cai_ray.models import load_tokenizer

    spec = ModelSpec(path="tiny-llama")
    torch.manual_seed(0)
    save_reward_model(load_reward_model(spec, torch.float32), load_tokenizer(spec),
                      root / "rm" / "model")


def test_a_killed_rollout_actor_and_a_frozen_reward_actor(ray_local, tiny_model_dir,
                                                          tmp_path: Path) -> None:
    """Two faults in one run. The rollout actor's process is SIGKILLed after step 2: it is
    restarted with the current weights and its batch is generated again. After step 4 the
    reward actor is frozen (SIGSTOP: alive, never answering, a wedged engine): its call times
    out after run.call_timeout_s, it is replaced and the step is scored again. The run finishes
    all its steps with every prompt trained on exactly once."""
    _save_tiny_pm(tmp_path)
    steps = 6
    cfg = load_config(TINY, [f"ppo.steps={steps}", "ppo.max_staleness=1",
                             "ppo.checkpoint_every=3", "run.call_timeout_s=40"])
    run = PPORun(cfg, tmp_path, resume=False)
    metrics = tmp_path / "ppo" / "metrics.jsonl"
    killed: list[tuple[int, int]] = []
    stop = threading.Event()

    def killer() -> None:
        for at in (2,):  # kill once the run has logged this step
            while not stop.is_set():
                done = [json.loads(x)["step"] for x in metrics.read_text().splitlines()] \
                    if metrics.exists() else []
                pids = _rollout_pids()
                if done and max(done) >= at and pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append((at, pids[0]))
                    time.sleep(3)  # let the driver notice before the next one
                    break
                time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        with _frozen_after(metrics, "RewardWorker", 4) as frozen:
            run.run()
            gone = [not psutil.pid_exists(p) or
                    psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in frozen]
    finally:
        stop.set()
        t.join(timeout=10)
    assert len(killed) == 1, killed
    assert len(frozen) == 1 and gone == [True]  # the restart removed the frozen process
    summary = json.loads((tmp_path / "ppo" / "metrics.json").read_text())
    assert summary["steps"] == steps
    assert [(f["role"], f["cause"]) for f in summary["faults"]] == \
        [("rollout", "died"), ("reward", "hung")]
    assert summary["faults"][1]["step"] >= 4
    _assert_each_prompt_once(tmp_path, cfg, steps)
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    rows = [r for r in rows if "reward/score_mean" in r]
    assert rows[-1]["faults/restarts"] == 2.0
    assert all(r["sync/logprob_max_diff"] < 1e-3 for r in rows)  # restarted engines in sync
    assert all(r["staleness/max"] <= 1 for r in rows)


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float) -> None:
    path = run / "ppo" / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        if path.exists() and any(json.loads(x).get("step", 0) >= step
                                 for x in path.read_text().splitlines() if x.strip()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} within {timeout} s")


def test_a_killed_driver_and_a_dead_trainer_each_resume_every_prompt_once(
        tiny_model_dir, tmp_path: Path) -> None:
    """One streaming run (max_staleness 1, T = 0.7, the trainer and the reference sharing
    bundles) meets two failures, each followed by --resume:

    1. the driver is SIGKILLed after step 3 (a lost node): nothing is cleaned up, a rerun
       without --resume refuses to overwrite its checkpoints, and --resume continues;
    2. in that resumed run the trainer dies after step 5: it is not retried, the run stops
       naming the role and the call, the checkpoints stay whole and the shared placement
       group is released; --resume finishes the run.

    Across the three runs every prompt is trained on exactly once, each batch made by the
    weight version the uninterrupted run makes it with (the checkpoint keeps the batch the
    previous weights had already sampled), and the last two checkpoints are the ones kept."""
    _save_tiny_pm(tmp_path)
    steps, staleness = 8, 1
    args = [sys.executable, "-m", "cai_ray.cli", "ppo", "--config", str(TINY), "--output",
            str(tmp_path), f"ppo.steps={steps}", "ppo.checkpoint_every=2",
            "ppo.keep_checkpoints=2", f"ppo.max_staleness={staleness}",
            "rollout.sampling.temperature=0.7", "placement.colocate=[[trainer, reference]]"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_step(tmp_path, 3, proc, timeout=400)  # past the checkpoint at step 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        time.sleep(2)
        try:  # Ray's processes of that run go with it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "ppo" / "model").exists()

    # Without --resume the earlier run's checkpoints are not silently overwritten.
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "--resume" in p.stderr

    proc = subprocess.Popen(args + ["--resume"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(tmp_path, 5, proc, timeout=400)
    trainers = _pids("PPOTrainerWorker")
    assert trainers
    os.kill(trainers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    m = re.search(r"resumed from step-(\d{8})", err)
    assert m and int(m.group(1)) in (2, 4), err[-3000:]
    assert "trainer[rank 0]" in err and "the actor died" in err and "Traceback" not in err
    ckpts = tmp_path / "ppo" / "checkpoints"
    assert any(x.name.startswith("step-") for x in ckpts.iterdir())  # whole ones to resume from

    p = subprocess.run(args + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"resumed from step-(\d{8})", p.stderr)
    assert m and int(m.group(1)) in (4, 6), p.stderr[-3000:]
    cfg = load_config(TINY, [])
    _assert_each_prompt_once(tmp_path, cfg, steps)
    consumed = [json.loads(x) for x in
                (tmp_path / "ppo" / "consumed.jsonl").read_text().splitlines()]
    assert [c["version"] for c in consumed] == [max(0, c["step"] - 1 - staleness)
                                                for c in consumed]
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward/score_mean" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["staleness/max"] == min(staleness, r["step"] - 1) for r in rows)
    assert sorted(x.name for x in ckpts.iterdir()) == ["step-00000006", "step-00000008"]
    state = json.loads((ckpts / "step-00000008" / "state.json").read_text())
    assert state["step"] == steps and state["weight_version"] == steps
    assert (tmp_path / "ppo" / "model" / "config.json").exists()


def test_judge_restarts_a_dead_feedback_actor(ray_local, tiny_model_dir) -> None:
    from cai_ray.actors.feedback import feedback_group, judge
    from cai_ray.actors.group import Worker
    from cai_ray.constitution import load_constitution
    from cai_ray.labelling import Labeller
    from cai_ray.preflight import resolve_path

    cfg = load_config(TINY, [])
    lab = Labeller(cfg, load_constitution(resolve_path(cfg.run.constitution)))
    queries = lab.queries("k", [{"role": "user", "content": "Is it safe?"}], "Yes, here is how.",
                          "No.", "harmless")
    fb = feedback_group(cfg)
    try:
        before = judge(fb, lab, queries)
        os.kill(fb.call(0, Worker.ping)["pid"], signal.SIGKILL)
        time.sleep(1)
        after = judge(fb, lab, queries)  # the dead actor is replaced and the call made again
        assert fb.restarts == 1
        assert after == before
    finally:
        fb.shutdown()
