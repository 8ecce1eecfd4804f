"""ActorGroup on a real local Ray: placement groups, typed calls, errors, timeouts, streaming."""

from __future__ import annotations

import time

import pytest

from cai_ray.actors.group import (
    SHARED_PLACEMENTS,
    ActorCallError,
    ActorGroup,
    ActorTimeoutError,
    Colocation,
)
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


def _wait_free(pg_id: str, expected: list[float], timeout_s: float = 30.0) -> list[float]:
    """CPUs free in each bundle of a placement group, polled until they equal `expected` (Ray
    reports resource use a moment late) or the deadline passes."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        avail = ray.available_resources()
        free = [avail.get(f"CPU_group_{i}_{pg_id}", 0.0) for i in range(len(expected))]
        if free == expected or time.monotonic() > deadline:
            return free
        time.sleep(0.2)


def test_colocated_roles_share_bundles_until_the_last_shuts_down(ray_local) -> None:
    import ray

    res = RoleResources(num_actors=2, num_cpus=1)
    col = Colocation.of(["trainer", "reference"], [res, res])
    groups: list[ActorGroup[EchoWorker]] = []
    try:
        trainer = ActorGroup("trainer", EchoWorker, res, colocation=col, startup_timeout_s=120)
        groups.append(trainer)
        pg = trainer.placement_group_id
        assert pg is not None
        assert _wait_free(pg, [1.0, 1.0]) == [1.0, 1.0]  # one trainer per bundle
        reference = ActorGroup("reference", EchoWorker, res, colocation=col,
                               startup_timeout_s=120)
        groups.append(reference)
        assert reference.placement_group_id == pg
        assert {p for p, _ in trainer.call_all(EchoWorker.placement)
                + reference.call_all(EchoWorker.placement)} == {pg}
        assert _wait_free(pg, [0.0, 0.0]) == [0.0, 0.0]  # bundle i: trainer i and reference i
        old_pid = reference.call(1, EchoWorker.rank_and_pid)[1]
        reference.restart(1)  # the replacement goes back onto the shared bundle 1
        assert reference.call(1, EchoWorker.rank_and_pid)[1] != old_pid
        assert reference.call(1, EchoWorker.placement)[0] == pg
        trainer.shutdown()  # frees its CPU in each bundle; the group stays for the reference
        assert _wait_free(pg, [1.0, 1.0]) == [1.0, 1.0]
        assert ray.util.placement_group_table()[pg]["state"] == "CREATED"
        assert reference.call_all(EchoWorker.double, [1]) == [[2], [2]]
    finally:
        for g in groups:
            g.shutdown()
    assert ray.util.placement_group_table()[pg]["state"] == "REMOVED"
    assert SHARED_PLACEMENTS.count() == 0


def test_colocated_roles_starting_together_share_one_group(ray_local) -> None:
    """The PPO driver starts its groups from a thread pool: two colocated roles acquiring the
    shared group at the same moment get the same one, placed once."""
    from concurrent.futures import ThreadPoolExecutor

    res = RoleResources(num_actors=1, num_cpus=1)
    col = Colocation.of(["reward", "reference"], [res, res])
    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(ActorGroup, role, EchoWorker, res, colocation=col,
                            startup_timeout_s=120) for role in ("reward", "reference")]
        groups = [f.result() for f in futs]
    try:
        assert len({g.placement_group_id for g in groups}) == 1
        assert SHARED_PLACEMENTS.count() == 1
    finally:
        for g in groups:
            g.shutdown()
    assert SHARED_PLACEMENTS.count() == 0


def test_impossible_colocation_times_out_naming_the_roles(ray_local) -> None:
    res = RoleResources(num_actors=1, num_cpus=1, num_gpus=0.5)
    col = Colocation.of(["reference", "reward"], [res, res])
    with pytest.raises(ActorTimeoutError, match=r"reference\+reward\[rank 0\].placement group "
                                                r"\(1 × \{'CPU': 2.0, 'GPU': 1.0\}, shared"):
        ActorGroup("reward", EchoWorker, res, colocation=col, startup_timeout_s=2)
    assert SHARED_PLACEMENTS.count() == 0


def test_frozen_actor_is_restarted_when_its_call_times_out(ray_local) -> None:
    """SIGSTOP leaves the actor alive but silent (a wedged engine): the call times out, the
    actor is replaced on its bundle, and the call is made again."""
    import os
    import signal

    g = ActorGroup("feedback", EchoWorker, RoleResources(num_actors=2, num_cpus=0.5),
                   call_timeout_s=10, startup_timeout_s=120)
    pids: list[int] = []
    out: list[tuple[int, int]] = []
    try:
        pids = [pid for _, pid in g.call_all(EchoWorker.rank_and_pid)]
        os.kill(pids[1], signal.SIGSTOP)
        out = g.with_restarts(lambda: g.call_all(EchoWorker.rank_and_pid), max_restarts=2)
        assert out[0] == (0, pids[0]) and out[1][0] == 1 and out[1][1] != pids[1]
        assert g.restarts == 1
        os.kill(out[1][1], signal.SIGSTOP)
        os.kill(out[0][1], signal.SIGSTOP)  # two more would pass max_restarts=2: refused
        with pytest.raises(RuntimeError, match=r"feedback: 1 restarts already \(run.max_restarts"
                                               r"=2\); last: feedback\[rank 0, 1\].rank_and_pid "
                                               r"did not finish within 10 s"):
            g.with_restarts(lambda: g.call_all(EchoWorker.rank_and_pid), max_restarts=2)
    finally:
        for pid in pids + [p for _, p in out]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        g.shutdown(grace_s=5)


def test_a_weight_bucket_that_never_arrives_fails_the_load(ray_local) -> None:
    """A bucket reference whose object is never produced (its node gone) ends the fetch with
    an error naming the bucket, instead of hanging the engine's weight load."""
    import ray
    import torch

    from cai_ray.actors.weight_sync import iterate, publish

    @ray.remote(num_cpus=0)
    def never() -> list:
        time.sleep(3600)
        return []

    ready = publish([[("w", torch.ones(2))]])
    pending = never.remote()
    try:
        got = iterate([ready[0], pending], timeout_s=1.0)
        name, tensor = next(got)
        assert name == "w" and torch.equal(tensor, torch.ones(2))
        with pytest.raises(TimeoutError, match=r"weight bucket 2/2 .* within 1 s"):
            next(got)
    finally:
        ray.cancel(pending, force=True)
