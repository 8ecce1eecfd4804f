"""Where a run's stages find each other's outputs: the models a stage reads from the run
directory, falling back to the configured ones."""

from __future__ import annotations

from pathlib import Path

from cai_ray.actors.reward import HEAD_FILE
from cai_ray.config import Config, ModelSpec


def policy_spec(cfg: Config, out_dir: Path) -> ModelSpec:
    """The SL-CAI policy (`DIR/sl/model`) when it has been trained, else `model`."""
    sl_model = out_dir / "sl" / "model"
    if (sl_model / "config.json").exists():
        return ModelSpec(path=str(sl_model), dtype=cfg.model.dtype,
                         trust_remote_code=cfg.model.trust_remote_code)
    return cfg.model


def reward_spec(cfg: Config, out_dir: Path) -> ModelSpec:
    """The trained preference model: `ppo.reward_model`, else `DIR/rm/model`."""
    path = Path(cfg.ppo.reward_model) if cfg.ppo.reward_model else out_dir / "rm" / "model"
    if not (path / "config.json").exists() or not (path / HEAD_FILE).exists():
        raise FileNotFoundError(
            f"no trained preference model at {path} (needs config.json and {HEAD_FILE}): run "
            "`cai-ray rm` first, or set ppo.reward_model to a trained PM directory")
    return ModelSpec(path=str(path), dtype=cfg.trainer.dtype,
                     trust_remote_code=cfg.model.trust_remote_code)


def snapshot_step(name: str, final_step: int) -> int | None:
    """The PPO step of an RL snapshot (ppo@N → N, ppo → the last); None for the others."""
    if name == "ppo":
        return final_step
    if name.startswith("ppo@") and name[4:].isdigit():
        return int(name[4:])
    return None
