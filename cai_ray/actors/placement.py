"""Placement groups of actor groups.

A role that is not colocated gets its own group (`own_placement_group`). Colocated roles
(`placement.colocate`) share one, sized by `Colocation`: bundle i holds rank i of every role in
the set. `SHARED_PLACEMENTS` is this driver's reference-counted registry of the shared groups:
the first ActorGroup of a colocated set creates and places the group, the last one to shut down
removes it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

from cai_ray.config import RoleResources


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


def own_placement_group(role: str, bundle: dict[str, float], num_bundles: int, strategy: str,
                        timeout_s: float, suffix: str) -> Any:
    """A placement group of `num_bundles` × `bundle` for one role, once placed (removed again
    if it is not placed within `timeout_s`, or the wait is interrupted)."""
    import ray
    from ray.util.placement_group import placement_group

    from cai_ray.actors.group import ActorTimeoutError, ray_wait  # at call time: see acquire

    pg = placement_group([bundle] * num_bundles, strategy=strategy,
                         name=f"cai-ray-{role}-{suffix}")
    try:
        ready, _ = ray_wait([pg.ready()], timeout=timeout_s)
    except BaseException:
        ray.util.remove_placement_group(pg)
        raise
    if not ready:
        ray.util.remove_placement_group(pg)
        raise ActorTimeoutError(role, list(range(num_bundles)),
                                f"placement group ({num_bundles} × {bundle}; cluster "
                                f"has {ray.available_resources()})", timeout_s)
    return pg


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

        # at call time: group.py imports this module
        from cai_ray.actors.group import ActorTimeoutError, ray_wait

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
