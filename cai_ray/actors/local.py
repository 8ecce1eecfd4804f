"""In-process actors for `ActorGroup(local=True)`: the same workers in this process, no cluster.

Each `_LocalActor` is one worker served by one daemon thread, so calls to one actor run one at a
time like a Ray actor's, and a hung call cannot block interpreter exit.

Death. A call that raises `WorkerDied` kills its actor the way a process death kills a Ray
actor: that call fails with it, and so does every call queued behind it or submitted later
(each with a `WorkerDied` naming the earlier death); the thread ends. `kill` does the same from
outside (`ActorGroup.restart`, shutdown): the call in progress, if any, fails at once (its thread
cannot be stopped; it ends when that call returns, and the result is dropped). The group reports
a `WorkerDied` as a dead actor, `ActorCallError(actor_died=True)`; any other exception is an
ordinary call error and the actor lives on.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any


class WorkerDied(RuntimeError):
    """Raised by a method of a local worker (`ActorGroup(local=True)`) to simulate the death of
    its process: the actor serves no more calls and the group reports it as died
    (`ActorCallError.actor_died`), so it can be restarted like a dead Ray actor. In Ray mode it
    is an ordinary error (a real death is the process exiting)."""


def futures_wait(futures: list[cf.Future], timeout: float | None = None,
                 return_when: str = cf.ALL_COMPLETED) -> tuple[set[cf.Future], set[cf.Future]]:
    """`concurrent.futures.wait` with the same result, waiting in slices of WAIT_SLICE_S."""
    from cai_ray.actors.waiting import _slice

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done, not_done = cf.wait(futures, timeout=_slice(deadline), return_when=return_when)
        if not not_done or (return_when == cf.FIRST_COMPLETED and done) or \
                (deadline is not None and time.monotonic() >= deadline):
            return done, not_done


def _settle(fut: cf.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Finish `fut` unless it is finished already (`kill` fails a running call at once)."""
    try:
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)
    except cf.InvalidStateError:
        pass


_Job = tuple[Callable[..., Any], tuple, dict, cf.Future]


class _LocalActor:
    """One worker in this process, served by one daemon thread: calls run one at a time and a
    hung call cannot block interpreter exit. See the module docstring for how it dies."""

    def __init__(self, factory: Callable[[], Any], name: str = "local-actor"):
        self._jobs: queue.Queue[_Job | None] = queue.Queue()  # None: wake the thread to end
        self._lock = threading.Lock()
        self._current: cf.Future | None = None  # the call running now
        self.dead: str | None = None  # why the actor serves no more calls
        self.instance: Any = None
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self.ready: cf.Future = self.submit(lambda: setattr(self, "instance", factory()))

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, kwargs, fut = job
            with self._lock:
                if self.dead is not None:
                    _settle(fut, error=WorkerDied(self.dead))
                    continue
                if not fut.set_running_or_notify_cancel():
                    continue
                self._current = fut
            try:
                result = fn(*args, **kwargs)
            except WorkerDied as e:  # this "process" is gone: so are the calls behind it
                e.__cai_tb__ = traceback.format_exc()  # type: ignore[attr-defined]
                _settle(fut, error=e)
                self.kill(f"an earlier call raised {type(e).__name__}: {e}")
                return
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                e.__cai_tb__ = traceback.format_exc()  # type: ignore[attr-defined]
                _settle(fut, error=e)
            else:
                _settle(fut, result)
            finally:
                with self._lock:
                    self._current = None

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> cf.Future:
        fut: cf.Future = cf.Future()
        with self._lock:
            dead = self.dead
            if dead is None:
                self._jobs.put((fn, args, kwargs, fut))
        if dead is not None:
            _settle(fut, error=WorkerDied(dead))
        return fut

    def kill(self, reason: str) -> None:
        """Stop serving calls (idempotent): the running call and the queued ones fail with
        `WorkerDied(reason)` now, later ones when submitted; the thread ends when idle."""
        with self._lock:
            if self.dead is not None:
                return
            self.dead = reason
            current = self._current
        if current is not None:
            _settle(current, error=WorkerDied(reason))
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                _settle(job[3], error=WorkerDied(reason))
        self._jobs.put(None)
