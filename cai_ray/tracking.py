"""Metrics: W&B (offline unless an API key is set) and a local `DIR/metrics.jsonl`, driver side only.

    tracker = Tracker(cfg.tracking, run_name="ppo", out_dir=run_dir, config=cfg.to_dict())
    tracker.log({"reward/mean": 0.3, "kl": 0.01}, step=3)
    tracker.table("samples", ["prompt", "response", "reward"], rows, step=3)
    tracker.close()

`wandb: auto` runs online when WANDB_API_KEY is set and offline otherwise, and says which in the
log (`wandb sync DIR/wandb/offline-run-*` uploads later). The run id is kept in the run directory
so a resumed run appends to the same W&B run. The jsonl file is always written, so a run is
readable with no W&B account; the config passed here never holds secrets (keys come from the
environment, not from the config).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cai_ray.config import TrackingConfig

log = logging.getLogger(__name__)


def wandb_mode(setting: str) -> str:
    """The W&B mode to use: 'online', 'offline' or 'disabled'."""
    if setting != "auto":
        return setting
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    def __init__(self, cfg: TrackingConfig, run_name: str, out_dir: str | Path,
                 config: dict[str, Any] | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.out_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self.mode = wandb_mode(cfg.wandb)
        self._run: Any = None
        if self.mode == "disabled":
            log.info("W&B disabled; metrics go to %s", self.out_dir / "metrics.jsonl")
            return
        import wandb

        id_file = self.out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        if self.mode == "offline":
            log.info("W&B offline (no WANDB_API_KEY set): logs under %s; upload later with "
                     "`wandb sync`", self.out_dir / "wandb")
        self._run = wandb.init(project=cfg.project, entity=cfg.entity,
                               name=cfg.run_name or run_name, tags=cfg.tags or None,
                               dir=str(self.out_dir), mode=self.mode, id=run_id,
                               resume="allow", config=config or {},
                               # offline, the line above says where the logs are, in place of
                               # W&B's own banner and sync hints at every stage's start and end
                               settings=wandb.Settings(silent=True)
                               if self.mode == "offline" else None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._run is not None:
            self._run.log(metrics, step=step)

    def table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table of samples (W&B Table; one jsonl line per table locally)."""
        self._jsonl.write(json.dumps({"step": step, "table": name, "columns": columns,
                                      "rows": rows}) + "\n")
        self._jsonl.flush()
        if self._run is not None:
            import wandb

            self._run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._run is not None:
            self._run.finish()
            self._run = None


class PhaseTimer:
    """The phases of one step, each timed on its own clock: `with timer("score"): ...` adds
    the seconds spent inside to `time/score` (a phase entered twice adds up), so no phase's
    time includes another's."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            key = f"time/{name}"
            self.times[key] = self.times.get(key, 0.0) + time.monotonic() - t0
