"""`cai-ray plan`: which role lands on which bundle, and what each GPU will hold, before any
actor starts; an impossible layout is refused with the reason.

Bundles follow `placement`: a role gets one bundle per actor ({CPU, GPU} as configured); roles
listed together in `placement.colocate` share bundles (one actor of each per bundle, so they
need equal actor counts and their GPU fractions add up on the shared GPU). Memory per GPU is an
estimate from the parameter count (config.json of a local model, else the size in the hub name,
e.g. "7B"): vLLM roles take `gpu_memory_utilization` of the GPU; the trainer holds bf16 weights
and gradients plus fp32 Adam states and master weights (16 bytes/parameter, divided over the
ranks for what its ZeRO stage partitions) and a critic as large as the PM under GAE; reference
and reward hold bf16 weights. Activations come on top.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from cai_ray.config import ROLES, Config, ModelSpec

GIB = 2**30


@dataclass
class Bundle:
    roles: list[str]
    cpus: float
    gpus: float
    mem_gib: float | None  # estimated GPU memory held by this bundle's actors


def param_count(spec: ModelSpec) -> float | None:
    """Parameters of a model, from a local config.json or the size in its hub name."""
    from cai_ray.models import BUILTIN_MODELS, cache_dir

    path = Path(spec.path)
    if spec.path in BUILTIN_MODELS:
        path = cache_dir() / "models" / spec.path
    cfg_file = path / "config.json"
    if cfg_file.exists():
        c = json.loads(cfg_file.read_text())
        h, n, v = c.get("hidden_size"), c.get("num_hidden_layers"), c.get("vocab_size")
        inter = c.get("intermediate_size") or (4 * h if h else None)
        if h and n and v and inter:
            per_layer = 4 * h * h + 3 * h * inter
            return float(n * per_layer + v * h * (1 if c.get("tie_word_embeddings") else 2))
    m = re.search(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", spec.path)
    if m:
        return float(m.group(1)) * 1e9
    m = re.search(r"(\d+)\s*[mM](?![a-zA-Z])", spec.path)
    return float(m.group(1)) * 1e6 if m else None


def role_memory_gib(cfg: Config, role: str, gpu_gib: float) -> float | None:
    res = getattr(cfg.placement, role)
    if role in ("rollout", "feedback"):
        eng = cfg.rollout.engine if role == "rollout" else cfg.feedback.engine
        return eng.gpu_memory_utilization * gpu_gib * min(res.num_gpus, 1.0)
    policy = param_count(cfg.model)
    pm = param_count(cfg.reward.model or cfg.model)
    if role == "trainer":
        if policy is None:
            return None
        world = res.num_actors
        z = cfg.trainer.zero_stage
        def per_rank(p: float) -> float:
            weights, grads, opt = 2 * p, 2 * p, 12 * p
            if z == 3:
                return (weights + grads + opt) / world
            return weights + (grads + opt) / world  # ZeRO-2 partitions grads and states
        total = per_rank(policy)
        if cfg.ppo.advantage == "gae" and pm is not None:
            total += per_rank(pm)
        return total / GIB / max(math.ceil(res.num_gpus), 1)
    p = policy if role == "reference" else pm
    return None if p is None else 2 * p / GIB


def plan(cfg: Config, gpus: int, gpu_gib: float) -> tuple[list[Bundle], list[str]]:
    """Bundles (in placement order) and the problems that make the layout impossible."""
    problems: list[str] = []
    groups = [list(g) for g in cfg.placement.colocate]
    grouped = {r for g in groups for r in g}
    groups += [[r] for r in ROLES if r not in grouped]
    bundles: list[Bundle] = []
    for g in groups:
        counts = {getattr(cfg.placement, r).num_actors for r in g}
        if len(counts) > 1:
            problems.append(f"colocated roles {g} need equal num_actors, got "
                            f"{[getattr(cfg.placement, r).num_actors for r in g]}")
        for _ in range(max(counts)):
            res = [getattr(cfg.placement, r) for r in g]
            mems = [role_memory_gib(cfg, r, gpu_gib) if getattr(cfg.placement, r).num_gpus
                    else 0.0 for r in g]
            gpu = sum(x.num_gpus for x in res)
            if len(g) > 1 and gpu > 1 and any(x.num_gpus % 1 for x in res):
                problems.append(f"colocated roles {g} ask for {gpu:g} GPUs per bundle in "
                                "fractions: they must add up to at most 1")
            bundles.append(Bundle(g, sum(x.num_cpus for x in res), gpu,
                                  None if any(m is None for m in mems) else sum(mems)))
    need = sum(math.ceil(b.gpus) if b.gpus >= 1 else b.gpus for b in bundles)
    if cfg.run.device != "cpu" and math.ceil(need - 1e-9) > gpus:
        problems.append(f"the placement needs {math.ceil(need - 1e-9)} GPUs, the cluster has "
                        f"{gpus}")
    for b in bundles:
        per_gpu = b.mem_gib / max(math.ceil(b.gpus), 1) if b.mem_gib is not None and b.gpus \
            else None
        if per_gpu is not None and per_gpu > gpu_gib:
            problems.append(f"{'+'.join(b.roles)}: about {per_gpu:.0f} GiB per GPU, over the "
                            f"{gpu_gib:g} GiB a GPU has (more ranks, ZeRO-3 or smaller models)")
    return bundles, problems


def render(cfg: Config, bundles: list[Bundle], gpus: int, gpu_gib: float) -> str:
    lines = [f"{'bundle':>6}  {'roles':24} {'CPUs':>5} {'GPUs':>5}  est. GiB/GPU",
             "-" * 60]
    for i, b in enumerate(bundles):
        mem = "-" if not b.gpus else ("?" if b.mem_gib is None else
                                      f"{b.mem_gib / max(math.ceil(b.gpus), 1):.1f}")
        lines.append(f"{i:>6}  {'+'.join(b.roles):24} {b.cpus:>5g} {b.gpus:>5g}  {mem}")
    total = sum(b.gpus for b in bundles)
    lines.append("-" * 60)
    lines.append(f"total: {sum(b.cpus for b in bundles):g} CPUs, {total:g} GPUs of {gpus} "
                 f"({gpu_gib:g} GiB each); policy ~{_b(param_count(cfg.model))}, PM "
                 f"~{_b(param_count(cfg.reward.model or cfg.model))} parameters")
    return "\n".join(lines)


def _b(p: float | None) -> str:
    if p is None:
        return "?"
    return f"{p / 1e9:.2f}B" if p >= 1e8 else f"{p / 1e6:.0f}M"
