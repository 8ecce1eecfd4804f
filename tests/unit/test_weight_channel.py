"""The gloo weight channel when an engine dies mid-push: the sender's broadcast fails at once,
and its `abort` frees the surviving engine within about a second (WeightPushAborted), where
it would otherwise wait out the group's timeout for tensors that never come (the control).
(Re-forming the group afterwards is tested with real engines in
tests/integration/test_collective_sync.py.) Three real processes, a real gloo group."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # three processes importing vLLM's group helpers: ~20 s

BIG = 20_000_000  # floats: more than a socket buffer, so the sender is mid-push when it fails


def _member(rank: int, port: int, abort: bool, timeout_s: float, out: Any) -> None:
    import torch

    from cai_ray.actors.weight_channel import WeightChannel

    ch = WeightChannel("127.0.0.1", port, rank, 3, "cpu", timeout_s)
    if rank == 2:  # the engine that dies before the push
        os._exit(9)
    if rank == 0:
        time.sleep(1.0)
        try:
            ch.send([("w", torch.ones(BIG)), ("v", torch.ones(BIG))])
            out.put(("sender", "sent", 0.0))
        except Exception:
            if abort:
                ch.abort()
            out.put(("sender", "failed", 0.0))
        time.sleep(timeout_s + 5)  # keep the store up while the survivor waits
        return
    t0 = time.monotonic()
    try:
        got = list(ch.receive([_meta("w"), _meta("v")]))
        out.put(("survivor", f"received {len(got)}", time.monotonic() - t0))
    except Exception as e:  # noqa: BLE001 - reported to the test
        out.put(("survivor", type(e).__name__, time.monotonic() - t0))
    out.close()
    out.join_thread()  # the report is sent before the process goes
    os._exit(0)  # an aborted receive stays pending in gloo: leave without waiting for it


def _meta(name: str) -> Any:
    from cai_ray.actors.weight_channel import TensorMeta

    return TensorMeta(name, (BIG,), "float32")


def _run(abort: bool, timeout_s: float) -> dict[str, tuple[str, float]]:
    from cai_ray.actors.trainer import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_member, args=(r, port, abort, timeout_s, out), daemon=True)
             for r in range(3)]
    for p in procs:
        p.start()
    seen: dict[str, tuple[str, float]] = {}
    deadline = time.monotonic() + timeout_s + 90
    want = {"sender", "survivor"}
    while not want <= seen.keys() and time.monotonic() < deadline:
        try:
            who, what, dt = out.get(timeout=1)
            seen[who] = (what, dt)
        except Exception:  # noqa: BLE001 - queue.Empty: keep waiting
            pass
    for p in procs:
        p.kill()
    return seen


def test_abort_frees_the_surviving_engine_at_once() -> None:
    seen = _run(abort=True, timeout_s=60)
    assert seen["sender"][0] == "failed", seen
    what, dt = seen["survivor"]
    assert what == "WeightPushAborted", seen
    assert dt < 30, seen  # freed by the poll, well before the group's 60 s timeout


def test_control_without_abort_the_survivor_waits_out_the_timeout() -> None:
    seen = _run(abort=False, timeout_s=8)
    assert seen["sender"][0] == "failed", seen
    what, dt = seen["survivor"]
    assert what != "WeightPushAborted" and dt >= 7, seen
