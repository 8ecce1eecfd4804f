"""Cross-field checks that read a whole resolved `Config`, beyond any one section.

`eval_overlaps` (eval sources that are not held out from training), `shared_gpu_reason`,
`weight_transport` and `weight_sync_problems` (which trainer→rollout weight transport a run can
use), and `rl_sampling_problems` (sampling settings the RL stage cannot train on).
`cai_ray.config` re-exports them; this module imports it only for type checking, so there is no
import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cai_ray.configschema import Problem

if TYPE_CHECKING:
    from cai_ray.config import Config


def eval_overlaps(cfg: Config) -> list[str]:
    """Eval sources that share rows with a source the run trains on: efficacy numbers there
    would not be held out."""
    train = {"data.red_team": cfg.data.red_team, "data.helpful": cfg.data.helpful}
    ev = {"eval.red_team": cfg.eval.red_team, "eval.helpful": cfg.eval.helpful}
    if cfg.eval.over_refusal is not None:
        ev["eval.over_refusal"] = cfg.eval.over_refusal
    return [f"{e} ({src.name}) shares rows with {t}: set {e}.skip past {t}'s rows"
            for e, src in ev.items() for t, tsrc in train.items() if src.overlaps(tsrc)]


def shared_gpu_reason(cfg: Config) -> str | None:
    """Why trainer rank 0 and a rollout engine may sit on one GPU (NCCL refuses two ranks of
    one communicator on a device: "Duplicate GPU detected"), or None when each has its own."""
    pl = cfg.placement
    for group in pl.colocate:
        if "trainer" in group and "rollout" in group:
            return "placement.colocate puts the trainer and the rollout engines on shared bundles"
    for role in ("trainer", "rollout"):
        g = getattr(pl, role).num_gpus
        if 0 < g < 1:
            return (f"placement.{role}.num_gpus={g} is a fraction: Ray may put it on a GPU "
                    "another role uses")
    return None


def weight_transport(cfg: Config, device: str) -> str:
    """The weight-sync transport a run uses on `device` ("cpu" or "cuda"): the configured one,
    or for `auto` NCCL on GPU when no two of its ranks can share a device, else the object
    store. `weight_sync_problems` refuses an explicit choice that cannot work."""
    w = cfg.ppo.weight_sync
    if w != "auto":
        return w
    return ("collective" if device == "cuda" and shared_gpu_reason(cfg) is None
            else "object_store")


def weight_sync_problems(cfg: Config, device: str) -> list[tuple[str, str]]:
    """An explicit `collective` sync that cannot work: on GPU its backend is NCCL, which
    refuses two ranks of one group on one device (on CPU it is gloo, which has no such
    limit)."""
    if cfg.ppo.weight_sync != "collective" or device != "cuda":
        return []
    why = shared_gpu_reason(cfg)
    if why:
        return [("ppo.weight_sync", f"collective (NCCL on GPU) cannot work here: {why}, and "
                 "NCCL refuses two ranks of one group on one GPU (use auto or object_store)")]
    return []


def rl_sampling_problems(cfg: Config) -> list[Problem]:
    """Sampling settings the RL stage cannot train on. PPO's ratio, its gradient and the KL
    need the log-probs of the distribution that sampled each token: the trainer reproduces
    the temperature exactly (softmax(logits / T)), but not vLLM's nucleus and top-k cuts or
    its repetition penalty, so those are refused for RL rather than trained on a policy
    that never produced the tokens (SL generation has `sl.top_p` and
    `sl.repetition_penalty` of its own)."""
    s = cfg.rollout.sampling
    bad = []
    if s.top_p < 1.0:
        bad.append(("rollout.sampling.top_p", f"is {s.top_p}; RL needs 1.0"))
    if s.top_k:
        bad.append(("rollout.sampling.top_k", f"is {s.top_k}; RL needs 0 (off)"))
    if s.repetition_penalty != 1.0:
        bad.append(("rollout.sampling.repetition_penalty",
                    f"is {s.repetition_penalty}; RL needs 1.0"))
    if s.temperature <= 0:
        bad.append(("rollout.sampling.temperature", "must be > 0 for RL (greedy decoding "
                    "has no log-probs to train on)"))
    why = ("the PPO trainer computes log-probs of softmax(logits / temperature) and cannot "
           "reproduce this setting of the sampler")
    return [Problem(key, f"{msg}: {why}", "config") for key, msg in bad]
