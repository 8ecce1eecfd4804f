"""ActorGroup: N actors of one role on a placement group, called through typed method references.

    group = ActorGroup("rollout", RolloutWorker, cfg.placement.rollout, init_args=(cfg,), ...)
    results = group.call_all(RolloutWorker.ping)          # typed: mypy checks the arguments
    outs = group.shard_and_gather(RolloutWorker.generate, requests)

Methods are named by the function object (`RolloutWorker.generate`), never by a string, so a
rename is caught by the type checker. Every wait has a timeout; an actor error or a timeout is
re-raised naming the role, the rank and the method.

Recovery has one path, here: `with_restarts` (and `gather_again` for a sharded call made
earlier) restarts a dead or hung actor, runs the role's restore hook (`on_restart`, set by the
role's group builder or the driver: rollout gets the current weights, reward loads the PM), logs
the restart in `faults`, and makes the call again, up to `run.max_restarts`.
`local=True` runs the same workers in this process (actors/local.py), which is how driver logic
is tested without a cluster: a worker that raises `WorkerDied` is reported and restarted like a
dead Ray actor. Placement groups shared by colocated roles: actors/placement.py.

Ctrl-C: every wait is cut in slices, and `shutdown` after an interrupt does not wait for busy
actors (actors/waiting.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import os
import re
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from cai_ray.actors.local import WorkerDied, _LocalActor, futures_wait
from cai_ray.actors.placement import SHARED_PLACEMENTS, Colocation, own_placement_group
from cai_ray.actors.placement import _alive as _alive  # re-exported (defined here before)
from cai_ray.actors.placement import _Shared as _Shared
from cai_ray.actors.placement import _SharedPlacements as _SharedPlacements
from cai_ray.actors.waiting import WAIT_SLICE_S as WAIT_SLICE_S  # re-exported
from cai_ray.actors.waiting import _interrupted as _interrupted
from cai_ray.actors.waiting import _slice as _slice
from cai_ray.actors.waiting import interrupted as interrupted
from cai_ray.actors.waiting import note_interrupt as note_interrupt
from cai_ray.actors.waiting import ray_wait as ray_wait
from cai_ray.config import RoleResources

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
W = TypeVar("W", bound="Worker")

INTERRUPT_GRACE_S = 2.0  # how long shutdown waits for `close` after an interrupt


class ActorCallError(RuntimeError):
    """An actor method raised, or the actor died. Names role, rank and method."""

    def __init__(self, role: str, rank: int, method: str, detail: str,
                 actor_died: bool = False, started: float = 0.0):
        self.role, self.rank, self.method, self.actor_died = role, rank, method, actor_died
        self.started = started  # when the failed call was submitted (time.monotonic)
        super().__init__(f"{role}[rank {rank}].{method} failed: {detail}")


class ActorTimeoutError(TimeoutError):
    """A call (or start-up) did not finish in time. Names role, ranks and method."""

    def __init__(self, role: str, ranks: list[int], method: str, timeout_s: float):
        self.role, self.ranks, self.method, self.timeout_s = role, ranks, method, timeout_s
        which = ", ".join(str(r) for r in ranks)
        knob = "startup_timeout_s" if method.startswith(("__init__", "placement group")) \
            else "call_timeout_s"
        super().__init__(f"{role}[rank {which}].{method} did not finish within {timeout_s:g} s "
                         f"(raise run.{knob} if the work is legitimately this slow)")


@dataclass(frozen=True)
class WorkerContext:
    role: str
    rank: int
    world_size: int
    threads: int | None = None  # torch intra-op threads; None leaves the process default
    cpu_affinity: tuple[int, ...] | None = None  # cores this actor's process may run on


class Worker:
    """Base of every actor role: holds its context and sets its thread count on purpose
    (Ray would otherwise pin torch to OMP_NUM_THREADS=num_cpus, often 1)."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        if ctx.cpu_affinity:  # before any thread pool starts: new threads inherit it
            os.sched_setaffinity(0, ctx.cpu_affinity)
        if ctx.threads:
            import torch

            torch.set_num_threads(ctx.threads)

    def ping(self) -> dict[str, Any]:
        return {"role": self.ctx.role, "rank": self.ctx.rank, "pid": os.getpid()}

    def close(self) -> None:
        """Release engines before the actor is killed (vLLM leaves shared memory otherwise)."""


@dataclass
class Pending(Generic[R]):
    """An in-flight call: which actor, which method, and the handle to its result."""

    role: str
    rank: int
    method: str
    handle: Any  # ray.ObjectRef in Ray mode, concurrent.futures.Future in local mode
    started: float = field(default_factory=time.monotonic)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _remote_detail(err: BaseException) -> str:
    """The useful part of a remote failure: the original exception and its last frames, without
    terminal colours or caret lines."""
    cause = getattr(err, "cause", None)
    text = "".join(traceback.format_exception(cause)) if cause is not None else str(err)
    lines = [ln for ln in _ANSI.sub("", text).strip().splitlines()
             if ln.strip() and not set(ln.strip()) <= {"^", "~"}]
    head = f"{type(cause).__name__}: {cause}" if cause is not None else type(err).__name__
    return head + "\n    " + "\n    ".join(lines[-6:])


class ActorGroup(Generic[W]):
    """N actors of one role. See the module docstring."""

    def __init__(self, role: str, worker_cls: type[W], resources: RoleResources, *,
                 init_args: tuple = (), init_kwargs: dict[str, Any] | None = None,
                 local: bool = False, call_timeout_s: float = 900.0,
                 startup_timeout_s: float = 600.0, env_vars: dict[str, str] | None = None,
                 strategy: str = "PACK", colocation: Colocation | None = None):
        self.role = role
        self.worker_cls = worker_cls
        self.resources = resources
        self.local = local
        self.call_timeout_s = call_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self._inflight = [0] * resources.num_actors
        self._pg: Any = None
        self._shared_key: Any = None  # set when the placement group is shared (colocation)
        if colocation is not None and (role not in colocation.roles
                                       or colocation.num_bundles != resources.num_actors):
            raise ValueError(f"{role}: colocation {colocation} does not hold {role} with "
                             f"{resources.num_actors} actor(s)")
        self.colocation = colocation
        self._actors: list[Any] = []
        self.restarts = 0
        self._restart_times: list[float] = []
        # The role's restore hook: run with the ranks just restarted, before the failed call
        # is made again (rollout: the current weights; reward: the PM loaded; None: nothing).
        self.on_restart: Callable[[list[int]], object] | None = None
        self.faults: list[dict[str, Any]] = []  # every restart: role, rank, method, cause, ...
        self._last_restart = [0.0] * resources.num_actors
        n = resources.num_actors
        threads = resources.threads or max(1, int(resources.num_cpus))
        affinity = tuple(resources.cpu_affinity) if resources.cpu_affinity else None
        ctxs = [WorkerContext(role, r, n, threads, affinity) for r in range(n)]
        kwargs = init_kwargs or {}
        self._spawn: list[Callable[[], Any]] = []  # rank -> start a fresh actor (a restart)
        t0 = time.monotonic()
        if local:
            for k, v in (env_vars or {}).items():
                os.environ.setdefault(k, v)
            self._spawn = [functools.partial(
                _LocalActor, functools.partial(worker_cls, c, *init_args, **kwargs),
                f"{role}[rank {c.rank}]") for c in ctxs]
            self._actors = [spawn() for spawn in self._spawn]
        else:
            try:
                self._start_ray(ctxs, init_args, kwargs, env_vars or {}, strategy)
            except BaseException:
                self.shutdown(grace_s=5.0)  # a shared placement group is released too
                raise
        try:
            self.get([self._started(r) for r in range(n)], timeout=startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        where = "in-process" if local else "on Ray"
        if colocation is not None and not local:
            where += f", sharing bundles with {'+'.join(r for r in colocation.roles if r != role)}"
        log.info("%s group: %d actor(s) %s in %.1f s", role, n, where, time.monotonic() - t0)

    # --- start-up -------------------------------------------------------------------------------

    def _start_ray(self, ctxs: list[WorkerContext], init_args: tuple, kwargs: dict[str, Any],
                   env_vars: dict[str, str], strategy: str) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        res = self.resources
        bundle = {k: v for k, v in (("CPU", res.num_cpus), ("GPU", res.num_gpus)) if v > 0}
        if self.colocation is not None:
            if self.colocation.bundle:
                self._shared_key, self._pg = SHARED_PLACEMENTS.acquire(
                    self.colocation, strategy, self.startup_timeout_s)
        elif bundle:
            self._pg = own_placement_group(self.role, bundle, res.num_actors, strategy,
                                           self.startup_timeout_s, f"{os.getpid()}-{id(self)}")
        remote_cls = ray.remote(self.worker_cls)
        for ctx in ctxs:
            opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus,
                                    "runtime_env": {"env_vars": env_vars} if env_vars else None}
            if self._pg is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=ctx.rank)
            spawn = functools.partial(lambda o, c: remote_cls.options(**o).remote(
                c, *init_args, **kwargs), opts, ctx)
            self._spawn.append(spawn)
            self._actors.append(spawn())

    def _started(self, rank: int) -> Pending[Any]:
        """The call that finishes once the actor of `rank` has started (its `__init__` ran)."""
        a = self._actors[rank]
        return Pending(self.role, rank, "__init__", a.ready if self.local else a.ping.remote())

    def _kill(self, actor: Any, why: str) -> None:
        """Stop one actor without `close`; calls still running on it fail as an actor death."""
        if self.local:
            actor.kill(f"killed: {why}")
            return
        import ray

        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def restarts_since(self, t: float) -> bool:
        """Whether an actor was restarted at or after monotonic time `t` (calls submitted
        before then may have gone to a dead actor and need submitting again)."""
        return any(x >= t for x in self._restart_times)

    def with_restarts(self, action: Callable[[], R], max_restarts: int) -> R:
        """Run `action` (calls on this group); when an actor died or a call hung past its
        timeout, restart that actor and run the action again (for stateless roles: the judge,
        a scorer), up to `max_restarts` restarts of this group in all."""
        while True:
            try:
                return action()
            except (ActorCallError, ActorTimeoutError) as e:
                self.restart_failed(e, max_restarts)

    def restart_failed(self, err: ActorCallError | ActorTimeoutError, max_restarts: int
                       ) -> list[float]:
        """Restart the actors behind `err` (a death, or calls that hung past their timeout)
        and return the seconds each took; re-raise any other error, or past `max_restarts`.
        A death reported by a call to an actor already replaced restarts nothing (the caller
        submits the call again)."""
        if (isinstance(err, ActorCallError) and not err.actor_died) or err.role != self.role:
            raise err
        if isinstance(err, ActorCallError):
            if self.replaced_since(err.rank, err.started):
                return []
            ranks = [err.rank]
        else:
            ranks = list(err.ranks)
        if self.restarts + len(ranks) > max_restarts:
            raise RuntimeError(f"{self.role}: {self.restarts} restarts already "
                               f"(run.max_restarts={max_restarts}); last: {err}") from err
        log.warning("%s; restarting %s", err, "it" if len(ranks) == 1 else f"ranks {ranks}")
        seconds = []
        for r in ranks:
            seconds.append(self.restart(r))
            self.faults.append({"role": self.role, "rank": r, "method": err.method,
                                "cause": "hung" if isinstance(err, ActorTimeoutError)
                                else "died", "restart_s": seconds[-1],
                                "time": self._last_restart[r]})
        if self.on_restart is not None:
            self.on_restart(ranks)
        return seconds

    def replaced_since(self, rank: int, t: float) -> bool:
        """Whether the actor of `rank` was replaced after `t`: a failure of a call submitted
        before then belongs to the old actor and needs no new restart."""
        return self._last_restart[rank] > t

    def restart(self, rank: int) -> float:
        """Replace the actor of `rank` (dead or hung) by a fresh one on the same bundle, started
        with the same arguments; returns the seconds it took. Its state (weights pushed since
        start-up, caches) is gone: the caller restores what it needs. In local mode too: the
        old actor's thread stops and a fresh worker is built on a new one."""
        t0 = time.monotonic()
        self._kill(self._actors[rank], "the actor was restarted")
        self._actors[rank] = self._spawn[rank]()
        self._inflight[rank] = 0
        self.get([self._started(rank)], timeout=self.startup_timeout_s)
        seconds = time.monotonic() - t0
        self.restarts += 1
        self._restart_times.append(t0)
        self._last_restart[rank] = t0
        log.warning("%s[rank %d]: restarted in %.1f s (restart %d)", self.role, rank, seconds,
                    self.restarts)
        return seconds

    # --- calls ----------------------------------------------------------------------------------

    @property
    def num_actors(self) -> int:
        return len(self._actors)

    def _method_name(self, fn: Callable[..., Any]) -> str:
        # a method of the worker class or of a class it derives from (called by name, so a
        # subclass's override answers: a test's fast fake of a role)
        name = getattr(fn, "__name__", None)
        if name is None or not any(vars(c).get(name) is fn for c in self.worker_cls.__mro__):
            raise TypeError(f"{fn!r} is not a method of {self.worker_cls.__name__}")
        return name

    def submit(self, rank: int, fn: Callable[Concatenate[W, P], R], *args: P.args,
               **kwargs: P.kwargs) -> Pending[R]:
        """Start `fn` on actor `rank`; returns at once."""
        name = self._method_name(fn)
        actor = self._actors[rank]
        if self.local:
            # by name, as Ray calls it: a subclass's override answers
            handle: Any = actor.submit(lambda: getattr(actor.instance, name)(*args, **kwargs))
        else:
            handle = getattr(actor, name).remote(*args, **kwargs)
        self._inflight[rank] += 1
        return Pending(self.role, rank, name, handle)

    def least_loaded(self) -> int:
        return min(range(self.num_actors), key=lambda r: self._inflight[r])

    def submit_least_loaded(self, fn: Callable[Concatenate[W, P], R], *args: P.args,
                            **kwargs: P.kwargs) -> Pending[R]:
        return self.submit(self.least_loaded(), fn, *args, **kwargs)

    def call(self, rank: int, fn: Callable[Concatenate[W, P], R], *args: P.args,
             **kwargs: P.kwargs) -> R:
        return self.get([self.submit(rank, fn, *args, **kwargs)])[0]

    def call_all(self, fn: Callable[Concatenate[W, P], R], *args: P.args,
                 **kwargs: P.kwargs) -> list[R]:
        """The same call on every actor; results in rank order."""
        return self.get([self.submit(r, fn, *args, **kwargs) for r in range(self.num_actors)])

    def shard_and_gather(self, fn: Callable[Concatenate[W, list[T], P], list[R]],
                         items: list[T], *args: P.args, **kwargs: P.kwargs) -> list[R]:
        """Split `items` into contiguous shards, one per actor; concatenate results in order."""
        return self.gather(self.submit_shards(fn, items, *args, **kwargs))

    def submit_shards(self, fn: Callable[Concatenate[W, list[T], P], list[R]],
                      items: list[T], *args: P.args, **kwargs: P.kwargs
                      ) -> list[Pending[list[R]]]:
        """`shard_and_gather` without waiting: one call per non-empty contiguous shard."""
        n = self.num_actors
        bounds = [len(items) * r // n for r in range(n + 1)]
        return [self.submit(r, fn, items[bounds[r]:bounds[r + 1]], *args, **kwargs)
                for r in range(n) if bounds[r + 1] > bounds[r]]

    def gather(self, pendings: list[Pending[list[R]]], timeout: float | None = None
               ) -> list[R]:
        """Wait for `submit_shards` calls and concatenate their results in order."""
        return [x for part in self.get(pendings, timeout) for x in part]

    def gather_again(self, pendings: list[Pending[Any]], fn: Callable[..., Any],
                     items: list[Any], *args: Any, max_restarts: int, flatten: bool = True,
                     **kwargs: Any) -> list[Any]:
        """The results of `submit_shards(fn, items, *args)` submitted earlier as `pendings`,
        recovering as `with_restarts` does: once an actor was restarted (and restored) after
        they went out, the whole sharded call is submitted again. `flatten` False: one result
        per shard, as `get` returns them."""
        pend, since = pendings, min((p.started for p in pendings), default=time.monotonic())

        def action() -> list[Any]:
            nonlocal pend, since
            if self.restarts_since(since):  # partly answered by a replaced actor
                since = time.monotonic()
                pend = self.submit_shards(fn, items, *args, **kwargs)
            got: list[Any] = self.get(pend)
            return [x for part in got for x in part] if flatten else got

        return self.with_restarts(action, max_restarts)

    # --- waiting --------------------------------------------------------------------------------

    def _done(self, p: Pending[Any]) -> None:
        self._inflight[p.rank] = max(0, self._inflight[p.rank] - 1)

    def _result(self, p: Pending[R]) -> R:
        """The result of a finished call, with errors re-raised naming role, rank, method."""
        self._done(p)
        if self.local:
            try:
                return p.handle.result(timeout=0)  # type: ignore[no-any-return,unused-ignore]
            except Exception as e:
                died = isinstance(e, WorkerDied)  # the local stand-in for a dead process
                detail = f"{type(e).__name__}: {e}\n{getattr(e, '__cai_tb__', '')}"
                raise ActorCallError(self.role, p.rank, p.method,
                                     f"the actor died ({detail})" if died else detail,
                                     actor_died=died, started=p.started if died else 0.0) from e
        import ray

        try:
            return ray.get(p.handle, timeout=0)  # type: ignore[no-any-return,unused-ignore]
        except ray.exceptions.RayTaskError as e:
            raise ActorCallError(self.role, p.rank, p.method, _remote_detail(e)) from e
        except ray.exceptions.RayActorError as e:
            raise ActorCallError(self.role, p.rank, p.method,
                                 f"the actor died ({_remote_detail(e)})", actor_died=True,
                                 started=p.started) from e

    def _wait(self, pendings: list[Pending[Any]], limit: float, first: bool) -> set[Any]:
        """The handles of the calls done within `limit` s: all, or (`first`) one at least."""
        handles = [p.handle for p in pendings]
        if self.local:
            when = cf.FIRST_COMPLETED if first else cf.ALL_COMPLETED
            return futures_wait(handles, limit, when)[0]
        return set(ray_wait(handles, num_returns=1 if first else len(handles), timeout=limit)[0])

    def get(self, pendings: list[Pending[R]], timeout: float | None = None) -> list[R]:
        """Wait for all calls (at most `timeout`, default run.call_timeout_s); results in order."""
        limit = self.call_timeout_s if timeout is None else timeout
        if not pendings:
            return []
        done = self._wait(pendings, limit, first=False)
        late = [p for p in pendings if p.handle not in done]
        if late:
            raise ActorTimeoutError(self.role, sorted({p.rank for p in late}), late[0].method,
                                    limit)
        return [self._result(p) for p in pendings]

    def wait_some(self, pendings: list[Pending[R]], timeout: float | None = None
                  ) -> tuple[list[tuple[Pending[R], R]], list[Pending[R]]]:
        """Block until at least one call finishes (at most `timeout`, default
        run.call_timeout_s); return (finished calls with results, calls still running).
        A driver that submits follow-up work as results arrive loops on this."""
        limit = self.call_timeout_s if timeout is None else timeout
        if not pendings:
            return [], []
        done = self._wait(pendings, limit, first=True)
        first = [p for p in pendings if p.handle in done]
        if not first:
            raise ActorTimeoutError(self.role, sorted({p.rank for p in pendings}),
                                    pendings[0].method, limit)
        left = [p for p in pendings if p.handle not in done]
        return [(p, self._result(p)) for p in first], left

    def as_completed(self, pendings: list[Pending[R]], timeout: float | None = None
                     ) -> Iterator[tuple[Pending[R], R]]:
        """Yield (call, result) as each finishes, so results stream instead of waiting for a
        barrier; each wait is bounded by `timeout` (default run.call_timeout_s)."""
        left = list(pendings)
        while left:
            done, left = self.wait_some(left, timeout)
            yield from done

    def shutdown(self, grace_s: float | None = None) -> None:
        """Close every worker (waiting at most `grace_s`, default the smaller of 60 s and the
        call timeout; after an interrupt only the idle ones, for at most INTERRUPT_GRACE_S), stop
        the actors and release the placement group (idempotent; the actors are stopped and the
        group released whatever `close` does)."""
        grace = min(60.0, self.call_timeout_s) if grace_s is None else grace_s
        ranks = list(range(self.num_actors))
        stopping = interrupted()
        if stopping:  # a busy actor would close only after its call: do not wait for it
            grace = min(grace, INTERRUPT_GRACE_S)
            busy = [r for r in ranks if self._inflight[r] > 0]
            ranks = [r for r in ranks if r not in busy]
            if busy:
                log.info("%s group: interrupted; stopping rank(s) %s in the middle of a call",
                         self.role, ", ".join(map(str, busy)))
        try:
            if ranks:
                self.get([self.submit(r, Worker.close) for r in ranks], timeout=grace)
        except Exception as e:  # noqa: BLE001 - stopping anyway
            log.warning("%s group: close failed, killing anyway: %s", self.role, e)
        finally:
            self._stop()

    def _stop(self) -> None:
        actors, pg, key = self._actors, self._pg, self._shared_key
        self._actors, self._pg, self._shared_key = [], None, None
        for a in actors:
            self._kill(a, "the group was shut down")
        if self.local:
            return
        import ray

        if key is not None:  # the last colocated role removes it
            SHARED_PLACEMENTS.release(key)
        elif pg is not None:
            ray.util.remove_placement_group(pg)

    @property
    def placement_group_id(self) -> str | None:
        """The hex id of the placement group the actors run on (shared when colocated)."""
        return None if self._pg is None else str(self._pg.id.hex())
