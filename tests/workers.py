"""Small worker roles used by the actor-group tests (importable by Ray actor processes)."""

from __future__ import annotations

import os
import time

from cai_ray.actors.group import Worker, WorkerContext


class EchoWorker(Worker):
    def __init__(self, ctx: WorkerContext, scale: int = 1):
        super().__init__(ctx)
        self.scale = scale
        self.calls = 0

    def double(self, items: list[int]) -> list[int]:
        self.calls += 1
        return [x * 2 * self.scale for x in items]

    def rank_and_pid(self) -> tuple[int, int]:
        return self.ctx.rank, os.getpid()

    def fail_on(self, rank: int) -> int:
        if self.ctx.rank == rank:
            raise ValueError(f"boom on rank {rank}")
        return self.ctx.rank

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def count(self) -> int:
        return self.calls

    def placement(self) -> tuple[str | None, dict[str, float]]:
        """This actor's placement group id and the Ray resources it was given."""
        import ray

        ctx = ray.get_runtime_context()
        return ctx.get_placement_group_id(), ctx.get_assigned_resources()


class BrokenWorker(Worker):
    def __init__(self, ctx: WorkerContext):
        super().__init__(ctx)
        if ctx.rank == 1:
            raise RuntimeError("cannot load the model on this rank")


def not_a_method(w: EchoWorker) -> int:
    return 0
