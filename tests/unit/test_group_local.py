"""ActorGroup in-process mode: same interface and error behaviour as on Ray, no cluster."""

from __future__ import annotations

import _thread
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import cai_ray.actors.group as group_mod
from cai_ray.actors.group import (
    ActorCallError,
    ActorGroup,
    ActorTimeoutError,
    Worker,
    WorkerContext,
    WorkerDied,
)
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


# --- local restarts: WorkerDied stands for a dead process ---------------------------------------

class FlakyWorker(Worker):
    """Counts its calls (state a restart must reset) and dies or fails on request."""

    def __init__(self, ctx: WorkerContext, built: list[int]):
        super().__init__(ctx)
        built.append(ctx.rank)  # one entry per worker built, restarts included
        self.calls = 0

    def bump(self) -> int:
        self.calls += 1
        return self.calls

    def die(self) -> int:
        raise WorkerDied("simulated crash")

    def fail(self) -> int:
        raise ValueError("an ordinary bug")

    def block(self, release: threading.Event) -> int:
        release.wait(10.0)
        return 0


def flaky(n: int = 2, timeout: float = 5.0) -> tuple[ActorGroup[FlakyWorker], list[int]]:
    built: list[int] = []
    g = ActorGroup("flaky", FlakyWorker, RoleResources(num_actors=n), local=True,
                   call_timeout_s=timeout, startup_timeout_s=5.0, init_kwargs={"built": built})
    return g, built


def test_worker_died_is_reported_as_a_dead_actor_and_restarted_fresh() -> None:
    g, built = flaky(2)
    assert [g.call(0, FlakyWorker.bump) for _ in range(3)] == [1, 2, 3]
    t0 = time.monotonic()
    dying, behind = g.submit(0, FlakyWorker.die), g.submit(0, FlakyWorker.bump)
    with pytest.raises(ActorCallError) as exc:
        g.get([dying])
    err = exc.value
    assert err.actor_died and err.role == "flaky" and err.rank == 0 and err.method == "die"
    assert err.started >= t0
    assert "flaky[rank 0].die failed: the actor died (WorkerDied: simulated crash" in str(err)
    assert isinstance(err.__cause__, WorkerDied)
    for late in (behind, g.submit(0, FlakyWorker.bump)):  # queued behind it, or sent after
        with pytest.raises(ActorCallError, match="the actor died") as stale:
            g.get([late])
        assert stale.value.actor_died
    assert g.call(1, FlakyWorker.bump) == 1  # the other actor lives on
    old = g._actors[0]
    assert g.restarts == 0 and not g.restarts_since(t0)

    seconds = g.restart_failed(err, max_restarts=2)
    assert len(seconds) == 1 and 0 <= seconds[0] < 5.0
    assert g.restarts == 1 and g.restarts_since(t0) and g.replaced_since(0, t0)
    assert sorted(built) == [0, 0, 1]  # rank 0 built again with the same init arguments
    assert g.call(0, FlakyWorker.bump) == 1  # fresh state
    assert g.call(1, FlakyWorker.bump) == 2  # untouched
    old._thread.join(1.0)
    assert not old._thread.is_alive()  # the dead actor's thread ended
    assert g.restart_failed(stale.value, max_restarts=2) == []  # the old actor's: no restart
    assert g.restarts == 1
    g.shutdown()


def test_local_restart_budget_is_the_ray_one() -> None:
    g, built = flaky(2)
    with pytest.raises(ActorCallError) as exc:
        g.call(1, FlakyWorker.die)
    g.restart_failed(exc.value, max_restarts=1)
    with pytest.raises(ActorCallError) as exc:
        g.call(1, FlakyWorker.die)
    with pytest.raises(RuntimeError, match=r"flaky: 1 restarts already \(run.max_restarts=1\)"):
        g.restart_failed(exc.value, max_restarts=1)
    assert g.restarts == 1 and sorted(built) == [0, 1, 1]
    g.shutdown()


def test_with_restarts_retries_the_action_after_a_local_death() -> None:
    g, _ = flaky(2)
    attempts: list[int] = []

    def action() -> list[int]:
        attempts.append(len(attempts))
        if len(attempts) == 1:
            g.call(0, FlakyWorker.die)
        return g.call_all(FlakyWorker.bump)

    assert g.with_restarts(action, max_restarts=2) == [1, 1]
    assert len(attempts) == 2 and g.restarts == 1
    with pytest.raises(RuntimeError, match=r"1 restarts already \(run.max_restarts=1\)"):
        g.with_restarts(lambda: g.call(0, FlakyWorker.die), max_restarts=1)
    g.shutdown()


def test_an_ordinary_exception_is_not_a_death() -> None:
    g, built = flaky(1)
    assert g.call(0, FlakyWorker.bump) == 1
    with pytest.raises(ActorCallError) as exc:
        g.call(0, FlakyWorker.fail)
    assert not exc.value.actor_died
    assert "flaky[rank 0].fail failed: ValueError: an ordinary bug" in str(exc.value)
    with pytest.raises(ActorCallError):  # re-raised, not restarted
        g.restart_failed(exc.value, max_restarts=5)
    with pytest.raises(ActorCallError, match="ValueError"):
        g.with_restarts(lambda: g.call(0, FlakyWorker.fail), max_restarts=5)
    assert g.restarts == 0 and built == [0]
    assert g.call(0, FlakyWorker.bump) == 2  # the same actor, state kept
    g.shutdown()


def test_hung_local_call_is_restarted_and_fails_as_died() -> None:
    g, built = flaky(1, timeout=0.05)
    release = threading.Event()
    hung = g.submit(0, FlakyWorker.block, release)
    try:
        with pytest.raises(ActorTimeoutError) as exc:
            g.get([hung])
        assert len(g.restart_failed(exc.value, max_restarts=1)) == 1
        with pytest.raises(ActorCallError, match="killed: the actor was restarted") as dead:
            g.get([hung])  # failed at once, though its thread is still blocked
        assert dead.value.actor_died
        assert g.call(0, FlakyWorker.bump) == 1 and built == [0, 0] and g.restarts == 1
    finally:
        release.set()
    g.shutdown()


# --- Ctrl-C: waits happen in short slices -------------------------------------------------------

@contextmanager
def _interrupt_after(seconds: float) -> Iterator[None]:
    """Raise KeyboardInterrupt in this (main) thread after `seconds`, as Ctrl-C does. No real
    signal is sent, so a blocking C call is not cut short: the interrupt lands only when the
    wait returns to the interpreter, which is what the slices are for."""
    timer = threading.Timer(seconds, _thread.interrupt_main)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def test_ctrl_c_lands_during_a_long_local_call(monkeypatch) -> None:
    monkeypatch.setattr(group_mod, "INTERRUPT_GRACE_S", 0.5)
    g = group(1, timeout=60.0)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt), _interrupt_after(0.3):
        g.get([g.submit(0, EchoWorker.sleep, 30.0)])
    assert time.monotonic() - t0 < 2.0
    t1 = time.monotonic()
    with pytest.raises(KeyboardInterrupt), _interrupt_after(0.3):
        g.wait_some([g.submit(0, EchoWorker.sleep, 30.0)])
    assert time.monotonic() - t1 < 2.0
    t2 = time.monotonic()
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:  # shutdown in the clean-up of an interrupt
        g.shutdown()  # does not wait the minute the busy actor would need to close
    assert time.monotonic() - t2 < group_mod.INTERRUPT_GRACE_S + 1.0


class _FakeRay:
    """Stands in for `ray`: `wait` blocks in one call that does not hand signals on (time.sleep
    is not woken by a simulated signal) until enough refs are ready or its timeout ends. Refs
    become ready at the times in `ready_at` (seconds from creation; others never)."""

    def __init__(self, ready_at: dict[str, float]):
        self.t0, self.ready_at = time.monotonic(), ready_at
        self.timeouts: list[float] = []

    def wait(self, refs: list[str], num_returns: int = 1, timeout: float = 1e6
             ) -> tuple[list[str], list[str]]:
        self.timeouts.append(timeout)
        when = sorted(self.ready_at.get(r, 1e9) for r in refs)[num_returns - 1]
        time.sleep(max(0.0, min(when - (time.monotonic() - self.t0), timeout)))
        now = time.monotonic() - self.t0
        ready = [r for r in refs if self.ready_at.get(r, 1e9) <= now][:num_returns]
        return ready, [r for r in refs if r not in ready]


def test_ray_wait_in_slices_keeps_results_and_total_timeout(monkeypatch) -> None:
    fake = _FakeRay({"a": 0.2})
    monkeypatch.setitem(sys.modules, "ray", fake)
    t0 = time.monotonic()
    assert group_mod.ray_wait(["a", "b"], num_returns=1, timeout=10) == (["a"], ["b"])
    assert time.monotonic() - t0 < 1.0  # returns as soon as one is ready
    t0 = time.monotonic()
    assert group_mod.ray_wait(["a", "b"], num_returns=2, timeout=1.2) == (["a"], ["b"])
    assert 1.15 <= time.monotonic() - t0 < 1.8  # the whole timeout, not one slice
    assert max(fake.timeouts) <= group_mod.WAIT_SLICE_S
    assert group_mod.ray_wait([], timeout=5) == ([], [])


def test_ctrl_c_lands_within_a_slice_of_a_blocking_ray_wait(monkeypatch) -> None:
    fake = _FakeRay({})
    monkeypatch.setitem(sys.modules, "ray", fake)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt), _interrupt_after(0.2):
        fake.wait(["never"], timeout=1.5)  # one long wait: Ctrl-C waits for it to end
    assert time.monotonic() - t0 >= 1.4
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt), _interrupt_after(0.2):
        group_mod.ray_wait(["never"], timeout=1800)  # run.call_timeout_s of a long SFT call
    assert time.monotonic() - t0 < 0.2 + group_mod.WAIT_SLICE_S + 0.5
