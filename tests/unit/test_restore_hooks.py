"""Each role's restore hook, outside PPO: the PM service's scoring group restarts a dead reward
actor, reloads the PM on it (`scoring_restore`, what `reward_group` installs) and scores the
batch again; without the hook the fresh actor would score with no PM loaded."""

from __future__ import annotations

import pytest

from cai_ray.actors.group import ActorGroup
from cai_ray.actors.reward import RewardWorker, scoring_restore
from cai_ray.config import RoleResources
from cai_ray.serve import pm_handler
from tests import fake_ppo
from tests.fake_ppo import FakeReward, Faults

ITEMS = [{"messages": [{"role": "user", "content": "hi"}], "response": "hello there"}]


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    f = Faults()
    monkeypatch.setattr(fake_ppo, "FAULTS", f)
    return f


def _group(hook: bool) -> ActorGroup[FakeReward]:
    g = ActorGroup("reward", FakeReward, RoleResources(num_actors=1), local=True,
                   call_timeout_s=5)
    g.call_all(RewardWorker.load_for_scoring)
    if hook:
        g.on_restart = scoring_restore(g)
    return g


def test_pm_service_recovers_a_dead_scorer(faults: Faults) -> None:
    faults.at("reward", "score", 1, "die")
    g = _group(hook=True)
    try:
        assert pm_handler(g, max_restarts=2)(ITEMS) == {"scores": [0.1 * (11 % 7)]}
        assert g.restarts == 1 and g.faults[0]["cause"] == "died"
        assert faults.calls[("reward", "load_for_scoring")] == 2  # start, then the restore
    finally:
        g.shutdown()


def test_without_the_hook_the_fresh_scorer_has_no_pm(faults: Faults) -> None:
    faults.at("reward", "score", 1, "die")
    g = _group(hook=False)  # the control: a restart alone does not bring the PM back
    try:
        with pytest.raises(Exception, match="scoring before the PM was loaded"):
            pm_handler(g, max_restarts=2)(ITEMS)
    finally:
        g.shutdown()
