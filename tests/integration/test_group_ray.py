"""ActorGroup on a real local Ray: placement groups, typed calls, errors, timeouts, streaming."""

from __future__ import annotations

import time

import pytest

from cai_ray.actors.group import ActorCallError, ActorGroup, ActorTimeoutError
from cai_ray.config import RoleResources
from tests.workers import BrokenWorker, EchoWorker


@pytest.fixture(scope="module")
def echo(ray_local) -> ActorGroup[EchoWorker]:
    g = ActorGroup("echo", EchoWorker, RoleResources(num_actors=2, num_cpus=1), local=False,
                   call_timeout_s=60, startup_timeout_s=120, init_kwargs={"scale": 3})
    yield g
    g.shutdown()


def test_actors_are_separate_processes_on_the_placement_group(echo) -> None:
    out = echo.call_all(EchoWorker.rank_and_pid)
    assert [r for r, _ in out] == [0, 1]
    assert len({pid for _, pid in out}) == 2
    assert echo.shard_and_gather(EchoWorker.double, [1, 2, 3]) == [6, 12, 18]


def test_remote_error_names_role_and_rank(echo) -> None:
    with pytest.raises(ActorCallError) as exc:
        echo.call_all(EchoWorker.fail_on, 1)
    assert exc.value.rank == 1
    assert "echo[rank 1].fail_on failed: ValueError: boom on rank 1" in str(exc.value)


def test_hang_ends_in_timeout(echo) -> None:
    t0 = time.monotonic()
    with pytest.raises(ActorTimeoutError, match=r"echo\[rank 0\].sleep did not finish"):
        echo.get([echo.submit(0, EchoWorker.sleep, 20.0)], timeout=1.0)
    assert time.monotonic() - t0 < 10
    echo.get([echo.submit(1, EchoWorker.sleep, 0.0)])  # the other actor still answers


def test_streaming_returns_fast_results_first(echo) -> None:
    pend = [echo.submit(0, EchoWorker.sleep, 1.5),
            echo.submit(1, EchoWorker.sleep, 0.01)]
    first, _ = next(iter(echo.as_completed(pend)))
    assert first.rank == 1
    echo.get(pend)


def test_start_up_failure_names_rank(ray_local) -> None:
    with pytest.raises(ActorCallError, match=r"(?s)broken\[rank 1\].__init__ failed: .*cannot load"):
        ActorGroup("broken", BrokenWorker, RoleResources(num_actors=2, num_cpus=0.5),
                   local=False, startup_timeout_s=120)


def test_impossible_placement_times_out_naming_role(ray_local) -> None:
    with pytest.raises(ActorTimeoutError, match=r"trainer\[rank 0, 1\].placement group"):
        ActorGroup("trainer", EchoWorker, RoleResources(num_actors=2, num_cpus=1, num_gpus=1),
                   local=False, startup_timeout_s=2)
