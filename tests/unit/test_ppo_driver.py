"""The PPO driver in milliseconds: the real `PPORun` (streaming, staleness bound, weight push and
its check, restore hooks, checkpoints, resume) over fake workers in-process (`tests/fake_ppo.py`),
with injected deaths, hangs and crashes. The real-engine runs of the same behaviours are in
tests/integration/test_ppo.py and test_faults.py (slow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cai_ray.actors.group import ActorCallError
from cai_ray.actors.reward import HEAD_FILE
from cai_ray.config import load_config
from cai_ray.data import PromptStream
from cai_ray.rollouts import StalenessError, ppo_prompts
from cai_ray.weight_push import WeightSyncError
from tests import fake_ppo
from tests.fake_ppo import FakeRollout, FastRun, Faults

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "cpu-tiny.yaml"


@pytest.fixture(autouse=True)
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    f = Faults()
    monkeypatch.setattr(fake_ppo, "FAULTS", f)
    return f


@pytest.fixture
def pm(tmp_path: Path) -> Path:
    d = tmp_path / "pm"  # what reward_spec checks for; the fake reward reads nothing
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / HEAD_FILE).write_text("")
    return d


def cfg_for(pm: Path, *extra: str) -> Any:
    return load_config(TINY, ["run.local_mode=true", f"ppo.reward_model={pm}",
                              "ppo.advantage=grpo", "ppo.samples_per_prompt=2", "ppo.steps=6",
                              "ppo.checkpoint_every=2", "ppo.max_staleness=1",
                              "ppo.eval_every=0", "run.call_timeout_s=0.3",
                              "run.max_restarts=6", *extra])


def rows(out: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "ppo" / name).read_text().splitlines()]


def metrics(out: Path) -> list[dict[str, Any]]:
    return [r for r in rows(out, "metrics.jsonl") if "reward/score_mean" in r]


def expected_prompts(cfg: Any) -> list[list[str]]:
    stream = PromptStream(ppo_prompts(cfg), seed=cfg.data.shuffle_seed)
    return [[p.id for p in stream.take(cfg.ppo.rollout_batch_size)]
            for _ in range(cfg.ppo.steps)]


def test_streaming_order_staleness_and_phase_timers(pm: Path, tmp_path: Path) -> None:
    cfg = cfg_for(pm)
    FastRun(cfg, tmp_path, resume=False).run()
    m = metrics(tmp_path)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6]
    # one batch ahead: every batch after the first was sampled by the previous weights
    assert [r["staleness/max"] for r in m] == [0, 1, 1, 1, 1, 1]
    assert all(r["version/trainer"] - r["version/batch"] <= 1 for r in m)
    consumed = rows(tmp_path, "consumed.jsonl")
    assert [c["prompts"] for c in consumed] == expected_prompts(cfg)  # in the stream's order
    assert all(r["sync/logprob_max_diff"] == 0.0 for r in m)
    for r in m:  # every phase has its own clock: the waits add up to the experience phase
        assert r["time/experience_phase"] == pytest.approx(
            r["time/experience"] + r["time/score"] + r["time/reference"])
        parts = sum(r[f"time/{k}"] for k in ("generate_wait", "experience", "score",
                                             "reference", "advantages", "train", "sync"))
        assert parts <= r["time/step"]
    summary = json.loads((tmp_path / "ppo" / "metrics.json").read_text())
    assert summary["steps"] == 6 and summary["faults"] == []
    assert (tmp_path / "ppo" / "model" / "config.json").exists()


def test_no_staleness_when_the_bound_is_zero(pm: Path, tmp_path: Path) -> None:
    FastRun(cfg_for(pm, "ppo.max_staleness=0"), tmp_path, resume=False).run()
    assert {r["staleness/max"] for r in metrics(tmp_path)} == {0}


class LaggingRollout(FakeRollout):
    """Loads every push but labels its samples with weights v0 (a broken version count)."""

    def generate(self, requests: Any) -> Any:
        out = super().generate(requests)
        return [type(r)(r.request_id, r.prompt_token_ids, r.completions, 0, r.worker_rank)
                for r in out]


def test_a_batch_beyond_the_staleness_bound_stops_the_run(pm: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(fake_ppo, "FakeRollout", LaggingRollout)
    run = FastRun(cfg_for(pm), tmp_path, resume=False)
    makers = run.group_makers
    monkeypatch.setattr(run, "group_makers", lambda: {**makers(), "rollout": lambda: (
        fake_ppo.ActorGroup("rollout", LaggingRollout, run.cfg.placement.rollout, local=True,
                            call_timeout_s=0.3))})
    with pytest.raises(StalenessError, match="2 versions old"):
        run.run()


def test_an_engine_left_on_old_weights_fails_the_sync_check(pm: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setattr(FakeRollout, "update_weights", lambda self, version, **kw: 0)
    with pytest.raises(WeightSyncError, match="differ from the trainer's"):
        FastRun(cfg_for(pm), tmp_path, resume=False).run()


def test_deaths_and_hangs_are_recovered_and_restored(pm: Path, tmp_path: Path,
                                                     faults: Faults) -> None:
    cfg = cfg_for(pm)
    faults.at("rollout", "generate", 3, "die").at("reward", "score", 2, "die") \
          .at("reference", "logprobs", 4, "hang").at("rollout", "prompt_logprobs", 6, "die")
    FastRun(cfg, tmp_path, resume=False).run()
    m = metrics(tmp_path)
    assert [r["step"] for r in m] == [1, 2, 3, 4, 5, 6]
    assert m[-1]["faults/restarts"] == 4.0
    assert all(r["sync/logprob_max_diff"] == 0.0 for r in m)  # restored engines: current weights
    summary = json.loads((tmp_path / "ppo" / "metrics.json").read_text())
    got = [(f["role"], f["cause"]) for f in summary["faults"]]
    assert sorted(got) == sorted([("rollout", "died"), ("reward", "died"),
                                  ("reference", "hung"), ("rollout", "died")])
    # each replaced actor was restored before use: the PM loaded, the engine given weights
    assert faults.calls[("reward", "load_for_scoring")] == 2  # at start, after the restart
    restored = [i for i, (role, _, meth) in enumerate(faults.log)
                if role == "rollout" and meth == "update_weights"]
    assert len(restored) > cfg.ppo.steps  # the pushes, plus one per rollout restart after v0
    # exactly once: every step trained the batch the stream gave it
    assert [c["prompts"] for c in rows(tmp_path, "consumed.jsonl")] == expected_prompts(cfg)


def test_a_trainer_death_ends_the_run(pm: Path, tmp_path: Path, faults: Faults) -> None:
    faults.at("trainer", "train_ppo", 2, "die")
    with pytest.raises(ActorCallError, match="trainer"):
        FastRun(cfg_for(pm), tmp_path, resume=False).run()


def test_a_hung_trainer_ends_the_run_naming_role_and_call(pm: Path, tmp_path: Path,
                                                          faults: Faults) -> None:
    """The trainer holds optimizer state a restart would lose: a trainer call past
    run.call_timeout_s ends the run naming the role and the method, instead of hanging."""
    from cai_ray.actors.group import ActorTimeoutError

    faults.at("trainer", "train_ppo", 2, "hang")
    with pytest.raises(ActorTimeoutError, match=r"trainer\[rank 0\]\.train_ppo did not finish"):
        FastRun(cfg_for(pm), tmp_path, resume=False).run()
    assert not (tmp_path / "ppo" / "model").exists()  # no final policy from a failed run


def test_too_many_restarts_end_the_run(pm: Path, tmp_path: Path, faults: Faults) -> None:
    for n in range(1, 10):
        faults.at("reward", "score", n, "die")
    with pytest.raises(RuntimeError, match=r"reward: 2 restarts already \(run.max_restarts=2\)"):
        FastRun(cfg_for(pm, "run.max_restarts=2"), tmp_path, resume=False).run()


@pytest.mark.parametrize("staleness", [0, 1])
def test_resume_trains_every_prompt_once_and_rewinds_the_logs(pm: Path, tmp_path: Path,
                                                              faults: Faults,
                                                              staleness: int) -> None:
    cfg = cfg_for(pm, f"ppo.max_staleness={staleness}")
    whole = tmp_path / "whole"
    FastRun(cfg, whole, resume=False).run()
    want = rows(whole, "consumed.jsonl")

    cut = tmp_path / "cut"
    faults.calls.clear()  # count this run's calls from 1
    faults.at("trainer", "train_ppo", 6, "crash")  # step 6 dies; checkpoints at 2 and 4
    with pytest.raises(ActorCallError, match="crash"):
        FastRun(cfg, cut, resume=False).run()
    assert [r["step"] for r in metrics(cut)] == [1, 2, 3, 4, 5]
    with pytest.raises(Exception, match="--resume"):  # a fresh start would lose the steps
        FastRun(cfg, cut, resume=False).run()
    FastRun(cfg, cut, resume=True).run()
    assert [r["step"] for r in metrics(cut)] == [1, 2, 3, 4, 5, 6]  # step 5 rewound, redone
    # the same prompts, the same weight versions (the batch sampled ahead was restored)
    assert rows(cut, "consumed.jsonl") == want
    a, b = metrics(whole), metrics(cut)
    assert [r["staleness/max"] for r in a] == [r["staleness/max"] for r in b]
