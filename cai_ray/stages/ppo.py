"""RL-CAI PPO: `cai-ray ppo --config C --output DIR [--resume]`.

The driver is `cai_ray.rl_loop.PPORun` (the streaming loop over the rollout, reward, reference
and trainer groups), shared with online DPO (`stages/online_dpo.py`); its names are re-exported
here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cai_ray.config import Config
from cai_ray.rl_loop import (
    AHEAD_FILE,
    PPORun,
    ResumeError,
    Scored,
    StalenessError,
    WeightSyncError,
    ppo_prompts,
)

log = logging.getLogger(__name__)

__all__ = ["AHEAD_FILE", "PPORun", "ResumeError", "Scored", "StalenessError", "WeightSyncError",
           "ppo_prompts", "run_ppo"]


def run_ppo(cfg: Config, out_dir: Path, resume: bool = False) -> Path:
    final = out_dir / "ppo" / "model"
    if (final / "config.json").exists():
        log.info("PPO policy already trained in %s; skipping", final)
        return final
    return PPORun(cfg, out_dir, resume).run()
