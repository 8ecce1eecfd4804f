"""Waits that Ctrl-C can interrupt, and the run-wide "interrupted" flag.

Ctrl-C. Every wait blocks for at most `WAIT_SLICE_S` at a time (the total timeout is unchanged),
so a KeyboardInterrupt lands within that whatever the blocking call does with signals (Ray 2.60's
`ray.wait` hands SIGINT on by itself; a call that does not would hold it for the whole remote
call, minutes for an SFT step). What did hold Ctrl-C for minutes was the clean-up: `shutdown`
waited up to 60 s per group for a `close` queued behind the busy actor's call. After an interrupt
(`note_interrupt`, or a KeyboardInterrupt on its way up) it no longer waits for actors in the
middle of a call and gives the idle ones `INTERRUPT_GRACE_S` to close.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

WAIT_SLICE_S = 0.5  # longest single block of any wait: a KeyboardInterrupt lands within it
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
