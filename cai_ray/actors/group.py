"""ActorGroup: N actors of one role on a placement group, called through typed method references.

    group = ActorGroup("rollout", RolloutWorker, cfg.placement.rollout, init_args=(cfg,), ...)
    results = group.call_all(RolloutWorker.ping)          # typed: mypy checks the arguments
    outs = group.shard_and_gather(RolloutWorker.generate, requests)

Methods are named by the function object (`RolloutWorker.generate`), never by a string, so a
rename is caught by the type checker. Every wait has a timeout; an actor error or a timeout is
re-raised naming the role, the rank and the method. `local=True` runs the same workers in this
process (one thread per actor, so calls to one actor stay serial like a Ray actor's), which is how
driver logic is tested without a cluster.

Ctrl-C. Every wait blocks for at most `WAIT_SLICE_S` at a time (the total timeout is unchanged),
so a KeyboardInterrupt lands within that whatever the blocking call does with signals (Ray 2.60's
`ray.wait` hands SIGINT on by itself; a call that does not would hold it for the whole remote
call, minutes for an SFT step). What did hold Ctrl-C for minutes was the clean-up: `shutdown`
waited up to 60 s per group for a `close` queued behind the busy actor's call. After an interrupt
(`note_interrupt`, or a KeyboardInterrupt on its way up) it no longer waits for actors in the
middle of a call and gives the idle ones `INTERRUPT_GRACE_S` to close.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import os
import queue
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from cai_ray.config import RoleResources

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
W = TypeVar("W", bound="Worker")

WAIT_SLICE_S = 0.5  # longest single block of any wait: a KeyboardInterrupt lands within it
INTERRUPT_GRACE_S = 2.0  # how long shutdown waits for `close` after an interrupt
_interrupted = threading.Event()


def note_interrupt() -> None:
    """Record that the run was interrupted (the CLI's SIGINT handler): from now on `shutdown`
    stops actors in the middle of a call without asking them to close (a Ray actor runs one call
    at a time: `close` would queue behind the long call) and waits for the idle ones' `close`
    at most INTERRUPT_GRACE_S."""
    _interrupted.set()


def interrupted() -> bool:
    """Whether the run was interrupted: noted, or a KeyboardInterrupt is being handled or
    propagating through a `finally` that called this."""
    return _interrupted.is_set() or isinstance(sys.exc_info()[1], KeyboardInterrupt)


def _slice(deadline: float | None) -> float:
    if deadline is None:
        return WAIT_SLICE_S
    return max(0.0, min(WAIT_SLICE_S, deadline - time.monotonic()))


def ray_wait(refs: list[Any], num_returns: int = 1, timeout: float | None = None
             ) -> tuple[list[Any], list[Any]]:
    """`ray.wait(refs, num_returns, timeout)` with the same result, waiting in slices of at
    most WAIT_SLICE_S so that signals (Ctrl-C) are handled while it waits."""
    import ray

    if not refs:
        return [], []
    deadline = None if timeout is None else time.monotonic() + timeout
    ready: list[Any] = []
    left = list(refs)
    while True:
        got, left = ray.wait(left, num_returns=min(num_returns - len(ready), len(left)),
                             timeout=_slice(deadline))
        ready += got
        if len(ready) >= num_returns or not left or \
                (deadline is not None and time.monotonic() >= deadline):
            return ready, left


def futures_wait(futures: list[cf.Future], timeout: float | None = None,
                 return_when: str = cf.ALL_COMPLETED) -> tuple[set[cf.Future], set[cf.Future]]:
    """`concurrent.futures.wait` with the same result, waiting in slices of WAIT_SLICE_S."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done, not_done = cf.wait(futures, timeout=_slice(deadline), return_when=return_when)
        if not not_done or (return_when == cf.FIRST_COMPLETED and done) or \
                (deadline is not None and time.monotonic() >= deadline):
            return done, not_done


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


@dataclass(frozen=True)
class Colocation:
    """Roles that share one placement group (`placement.colocate`): bundle i holds rank i of
    every role in `roles`, so it is sized as the sum of their per-actor resources."""

    roles: tuple[str, ...]
    cpus: float  # per bundle: the sum over the roles
    gpus: float
    num_bundles: int

    @classmethod
    def of(cls, roles: list[str], resources: list[RoleResources]) -> Colocation:
        counts = {r.num_actors for r in resources}
        if len(counts) != 1:
            raise ValueError(f"colocated roles {roles} need equal num_actors, got "
                             f"{[r.num_actors for r in resources]}")
        return cls(tuple(roles), float(sum(r.num_cpus for r in resources)),
                   float(sum(r.num_gpus for r in resources)), counts.pop())

    @property
    def bundle(self) -> dict[str, float]:
        return {k: v for k, v in (("CPU", self.cpus), ("GPU", self.gpus)) if v > 0}


@dataclass
class _Shared:
    pg: Any
    refs: int
    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def _alive(pg: Any) -> bool:
    from ray.util.placement_group import placement_group_table

    try:
        return bool(placement_group_table(pg).get("state") == "CREATED")
    except Exception:  # noqa: BLE001 - unknown to this Ray session
        return False


class _SharedPlacements:
    """The placement groups of colocated roles in this driver, reference-counted: the first
    group of a colocated set creates it, the last one to shut down removes it. The colocated
    roles start concurrently: the first waits for the group to be placed (outside the lock,
    so other sets and releases go on), the others wait for its outcome, success or failure.
    An entry whose group Ray no longer holds (a Ray session that ended without the groups
    shutting down) is replaced, never reused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[tuple[str, Colocation, str], _Shared] = {}

    def acquire(self, col: Colocation, strategy: str, timeout_s: float) -> tuple[Any, Any]:
        """(key, placement group), creating and waiting for it on first use."""
        import ray
        from ray.util.placement_group import placement_group

        key = (ray.get_runtime_context().get_job_id(), col, strategy)
        with self._lock:
            entry = self._groups.get(key)
            if entry is not None and entry.ready.is_set() and not _alive(entry.pg):
                entry = None  # left over from an earlier Ray session
            creator = entry is None
            if entry is None:
                entry = _Shared(placement_group(
                    [col.bundle] * col.num_bundles, strategy=strategy,
                    name=f"cai-ray-{'+'.join(col.roles)}-{os.getpid()}"), 1)
                self._groups[key] = entry
            else:
                entry.refs += 1
        if creator:
            ready, _ = ray_wait([entry.pg.ready()], timeout=timeout_s)
            if not ready:
                entry.error = ActorTimeoutError(
                    "+".join(col.roles), list(range(col.num_bundles)),
                    f"placement group ({col.num_bundles} × {col.bundle}, shared; cluster has "
                    f"{ray.available_resources()})", timeout_s)
                with self._lock:
                    self._groups.pop(key, None)
                ray.util.remove_placement_group(entry.pg)
            entry.ready.set()
        elif not entry.ready.wait(timeout_s):
            self.release(key)
            raise ActorTimeoutError("+".join(col.roles), list(range(col.num_bundles)),
                                    "placement group (shared, still being placed)", timeout_s)
        if entry.error is not None:
            raise entry.error
        return key, entry.pg

    def release(self, key: Any) -> None:
        import ray

        with self._lock:
            entry = self._groups.get(key)
            if entry is None:  # failed to place, or already replaced
                return
            entry.refs -= 1
            if entry.refs > 0:
                return
            del self._groups[key]
        ray.util.remove_placement_group(entry.pg)

    def count(self) -> int:
        with self._lock:
            return len(self._groups)


SHARED_PLACEMENTS = _SharedPlacements()


class _LocalActor:
    """One worker in this process, served by one daemon thread: calls run one at a time and a
    hung call cannot block interpreter exit."""

    def __init__(self, factory: Callable[[], Any]):
        self._jobs: queue.Queue[tuple[Callable[..., Any], tuple, dict, cf.Future]] = queue.Queue()
        self.instance: Any = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self.ready: cf.Future = self.submit(lambda: setattr(self, "instance", factory()))

    def _serve(self) -> None:
        while True:
            fn, args, kwargs, fut = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                e.__cai_tb__ = traceback.format_exc()  # type: ignore[attr-defined]
                fut.set_exception(e)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> cf.Future:
        fut: cf.Future = cf.Future()
        self._jobs.put((fn, args, kwargs, fut))
        return fut


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
        self._last_restart = [0.0] * resources.num_actors
        n = resources.num_actors
        threads = resources.threads or max(1, int(resources.num_cpus))
        affinity = tuple(resources.cpu_affinity) if resources.cpu_affinity else None
        ctxs = [WorkerContext(role, r, n, threads, affinity) for r in range(n)]
        kwargs = init_kwargs or {}
        t0 = time.monotonic()
        if local:
            for k, v in (env_vars or {}).items():
                os.environ.setdefault(k, v)
            self._actors = [_LocalActor(functools.partial(worker_cls, c, *init_args, **kwargs))
                            for c in ctxs]
            pend: list[Pending[Any]] = [Pending(role, r, "__init__", a.ready)
                                        for r, a in enumerate(self._actors)]
        else:
            try:
                self._start_ray(ctxs, init_args, kwargs, env_vars or {}, strategy)
            except BaseException:
                self.shutdown(grace_s=5.0)  # a shared placement group is released too
                raise
            pend = [Pending(role, r, "__init__", a.ping.remote())
                    for r, a in enumerate(self._actors)]
        try:
            self.get(pend, timeout=startup_timeout_s)
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
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        res = self.resources
        bundle = {k: v for k, v in (("CPU", res.num_cpus), ("GPU", res.num_gpus)) if v > 0}
        if self.colocation is not None:
            if self.colocation.bundle:
                self._shared_key, self._pg = SHARED_PLACEMENTS.acquire(
                    self.colocation, strategy, self.startup_timeout_s)
        elif bundle:
            self._pg = placement_group([bundle] * res.num_actors, strategy=strategy,
                                       name=f"cai-ray-{self.role}-{os.getpid()}-{id(self)}")
            ready, _ = ray_wait([self._pg.ready()], timeout=self.startup_timeout_s)
            if not ready:
                ray.util.remove_placement_group(self._pg)
                raise ActorTimeoutError(self.role, list(range(res.num_actors)),
                                        f"placement group ({res.num_actors} × {bundle}; cluster "
                                        f"has {ray.available_resources()})",
                                        self.startup_timeout_s)
        remote_cls = ray.remote(self.worker_cls)
        self._spawn: list[Callable[[], Any]] = []
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
        and return the seconds each took; re-raise any other error, in local mode, or past
        `max_restarts`. A death reported by a call to an actor already replaced restarts
        nothing (the caller submits the call again)."""
        if self.local or (isinstance(err, ActorCallError) and not err.actor_died) or \
                err.role != self.role:
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
        return [self.restart(r) for r in ranks]

    def replaced_since(self, rank: int, t: float) -> bool:
        """Whether the actor of `rank` was replaced after `t`: a failure of a call submitted
        before then belongs to the old actor and needs no new restart."""
        return self._last_restart[rank] > t

    def restart(self, rank: int) -> float:
        """Replace the actor of `rank` (dead or hung) by a fresh one on the same bundle, started
        with the same arguments; returns the seconds it took. Its state (weights pushed since
        start-up, caches) is gone: the caller restores what it needs."""
        if self.local:
            raise RuntimeError(f"{self.role}: actors cannot be restarted in local mode")
        import ray

        t0 = time.monotonic()
        try:
            ray.kill(self._actors[rank], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self._actors[rank] = self._spawn[rank]()
        self._inflight[rank] = 0
        self.get([Pending(self.role, rank, "__init__", self._actors[rank].ping.remote())],
                 timeout=self.startup_timeout_s)
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
        name = getattr(fn, "__name__", None)
        if name is None or getattr(self.worker_cls, name, None) is not fn and \
                getattr(Worker, name, None) is not fn:
            raise TypeError(f"{fn!r} is not a method of {self.worker_cls.__name__}")
        return name

    def submit(self, rank: int, fn: Callable[Concatenate[W, P], R], *args: P.args,
               **kwargs: P.kwargs) -> Pending[R]:
        """Start `fn` on actor `rank`; returns at once."""
        name = self._method_name(fn)
        actor = self._actors[rank]
        if self.local:
            handle: Any = actor.submit(lambda: fn(actor.instance, *args, **kwargs))
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
                tb = getattr(e, "__cai_tb__", "")
                raise ActorCallError(self.role, p.rank, p.method,
                                     f"{type(e).__name__}: {e}\n{tb}") from e
        import ray

        try:
            return ray.get(p.handle, timeout=0)  # type: ignore[no-any-return,unused-ignore]
        except ray.exceptions.RayTaskError as e:
            raise ActorCallError(self.role, p.rank, p.method, _remote_detail(e)) from e
        except ray.exceptions.RayActorError as e:
            raise ActorCallError(self.role, p.rank, p.method,
                                 f"the actor died ({_remote_detail(e)})", actor_died=True,
                                 started=p.started) from e

    def get(self, pendings: list[Pending[R]], timeout: float | None = None) -> list[R]:
        """Wait for all calls (at most `timeout`, default run.call_timeout_s); results in order."""
        limit = self.call_timeout_s if timeout is None else timeout
        if not pendings:
            return []
        if self.local:
            _, not_done = futures_wait([p.handle for p in pendings], timeout=limit)
            late = [p for p in pendings if p.handle in not_done]
        else:
            refs = [p.handle for p in pendings]
            _, not_ready = ray_wait(refs, num_returns=len(refs), timeout=limit)
            late = [p for p in pendings if p.handle in set(not_ready)]
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
        done: set[Any]
        if self.local:
            done, _ = futures_wait([p.handle for p in pendings], timeout=limit,
                                   return_when=cf.FIRST_COMPLETED)
        else:
            ready, _ = ray_wait([p.handle for p in pendings], num_returns=1, timeout=limit)
            done = set(ready)
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
        if self.local:
            return
        import ray

        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if key is not None:  # the last colocated role removes it
            SHARED_PLACEMENTS.release(key)
        elif pg is not None:
            ray.util.remove_placement_group(pg)

    @property
    def placement_group_id(self) -> str | None:
        """The hex id of the placement group the actors run on (shared when colocated)."""
        return None if self._pg is None else str(self._pg.id.hex())
