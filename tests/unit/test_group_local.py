"""ActorGroup in-process mode: same interface and error behaviour as on Ray, no cluster."""

from __future__ import annotations

import time

import pytest

from cai_ray.actors.group import ActorCallError, ActorGroup, ActorTimeoutError
from cai_ray.config import RoleResources
from tests.workers import BrokenWorker, EchoWorker, not_a_method


def group(n: int = 3, **kw) -> ActorGroup[EchoWorker]:
    return ActorGroup("echo", EchoWorker, RoleResources(num_actors=n), local=True,
                      call_timeout_s=kw.pop("timeout", 5.0), **kw)


def test_call_all_and_shard_and_gather_keep_order() -> None:
    g = group(3, init_kwargs={"scale": 10})
    assert [r for r, _ in g.call_all(EchoWorker.rank_and_pid)] == [0, 1, 2]
    assert g.shard_and_gather(EchoWorker.double, list(range(7))) == [x * 20 for x in range(7)]
    assert g.call_all(EchoWorker.count) == [1, 1, 1]  # every actor got a shard
    assert g.shard_and_gather(EchoWorker.double, [5]) == [100]  # fewer items than actors
    g.shutdown()


def test_actor_error_names_role_rank_and_method() -> None:
    g = group(3)
    with pytest.raises(ActorCallError) as exc:
        g.call_all(EchoWorker.fail_on, 2)
    assert exc.value.role == "echo" and exc.value.rank == 2
    assert "echo[rank 2].fail_on failed: ValueError: boom on rank 2" in str(exc.value)
    g.shutdown()


def test_hanging_call_times_out_naming_the_actor() -> None:
    g = group(2, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(ActorTimeoutError) as exc:
        g.get([g.submit(0, EchoWorker.sleep, 0.0), g.submit(1, EchoWorker.sleep, 30.0)])
    assert time.monotonic() - t0 < 10
    assert exc.value.ranks == [1] and "echo[rank 1].sleep did not finish within 0.5 s" in str(
        exc.value)


def test_results_stream_as_they_finish() -> None:
    g = group(2)
    slow = g.submit(0, EchoWorker.sleep, 0.6)
    fast = g.submit(1, EchoWorker.sleep, 0.05)
    order = [p.rank for p, _ in g.as_completed([slow, fast])]
    assert order == [1, 0]
    g.shutdown()


def test_least_loaded_dispatch_spreads_work() -> None:
    g = group(3)
    pend = [g.submit_least_loaded(EchoWorker.sleep, 0.1) for _ in range(6)]
    assert sorted(p.rank for p in pend) == [0, 0, 1, 1, 2, 2]
    g.get(pend)
    assert g.least_loaded() == 0
    g.shutdown()


def test_start_up_failure_names_rank() -> None:
    with pytest.raises(ActorCallError, match=r"broken\[rank 1\].__init__ failed: RuntimeError: "
                       "cannot load the model"):
        ActorGroup("broken", BrokenWorker, RoleResources(num_actors=2), local=True)


def test_only_methods_of_the_role_can_be_called() -> None:
    g = group(1)
    with pytest.raises(TypeError, match="is not a method of EchoWorker"):
        g.call(0, not_a_method)  # type: ignore[arg-type]
    g.shutdown()
