"""PromptStream: a deterministic, sharded, resumable stream over a prompt dataset
(`data.load_prompts`): exactly-once accounting across interrupted runs keys on its state."""

from __future__ import annotations

import datasets
import numpy as np

from cai_ray.messages import Prompt


class PromptStream:
    """Deterministic shuffle + sharding with a resumable position.

    Each epoch uses its own permutation, numpy's default_rng((seed, epoch)), split round-robin
    `perm[rank::world_size]`: shards are disjoint and together cover every row once per epoch,
    and the same (seed, epoch, position) always gives the same next prompts, so a run resumed
    from `state_dict()` neither repeats nor skips any.
    """

    def __init__(self, dataset: datasets.Dataset, seed: int, rank: int = 0,
                 world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self._dataset = dataset
        self._seed, self._rank, self._world_size = seed, rank, world_size
        self._epoch, self._position = 0, 0
        self._order = self._shard(0)

    def _shard(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng((self._seed, epoch)).permutation(len(self._dataset))
        return perm[self._rank::self._world_size]

    def take(self, n: int) -> list[Prompt]:
        """The next `n` prompts of this shard, continuing into the next epoch as needed."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n and not len(self):
            raise ValueError(f"shard {self._rank} of {self._world_size} is empty: the dataset "
                             f"has {len(self._dataset)} rows")
        out: list[Prompt] = []
        while len(out) < n:
            if self._position == len(self._order):  # the epoch is done: start the next one
                self._epoch, self._position = self._epoch + 1, 0
                self._order = self._shard(self._epoch)
            k = min(n - len(out), len(self._order) - self._position)
            batch = self._dataset[self._order[self._position:self._position + k].tolist()]
            out += [Prompt(id=i, messages=m, source=s) for i, m, s in
                    zip(batch["id"], batch["messages"], batch["source"], strict=True)]
            self._position += k
        return out

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Prompts consumed in the current epoch (len(self) once the epoch is done)."""
        return self._position

    def state_dict(self) -> dict[str, int]:
        return {"seed": self._seed, "rank": self._rank, "world_size": self._world_size,
                "epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from `state_dict()`; the shuffle (seed, rank, world_size) must be the same,
        or the resumed run would repeat some prompts and skip others."""
        for key in ("seed", "rank", "world_size"):
            if state[key] != getattr(self, f"_{key}"):
                raise ValueError(f"cannot resume: saved {key}={state[key]}, this stream has "
                                 f"{getattr(self, f'_{key}')} (a different shuffle/sharding)")
        if state["epoch"] < 0 or not 0 <= state["position"] <= len(self):
            raise ValueError(f"cannot resume at epoch {state['epoch']}, position "
                             f"{state['position']}: this shard has {len(self)} prompts per "
                             "epoch (did the dataset change?)")
        self._epoch, self._position = state["epoch"], state["position"]
        self._order = self._shard(self._epoch)

    def __len__(self) -> int:
        return len(self._order)
