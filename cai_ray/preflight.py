"""Checks of what a config points at (constitution, models, data), run before any actor starts.

The config schema catches wrong keys, types and values; this catches a constitution file that is
missing or broken, a model name that cannot be loaded, a data file that is not there. Each problem
names the config field that points at the thing, and the file it came from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cai_ray.config import Config
from cai_ray.configschema import Problem, ValidationError

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(name: str) -> Path:
    """A relative path is looked up in the working directory, then in the project root (so
    `constitutions/default.yaml` works from any directory with an editable install)."""
    p = Path(name).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


def check_constitution(cfg: Config) -> list[Problem]:
    from cai_ray.constitution import load_constitution

    path = resolve_path(cfg.run.constitution)
    if not path.exists():
        return [Problem("run.constitution", f"file not found: {cfg.run.constitution} (looked in "
                        f"{Path.cwd()} and {REPO_ROOT})")]
    try:
        c = load_constitution(path)
    except ValidationError as e:
        return [Problem(f"run.constitution -> {p.path}", p.message, p.source) for p in e.problems]
    out = []
    if not c.critique_revision:
        out.append(Problem("run.constitution", f"{path} has no critique_revision pairs (needed "
                           "by the SL-CAI stage)"))
    if not c.principles("harmless"):
        out.append(Problem("run.constitution", f"{path} has no comparison principles with aspect "
                           "'harmless' (needed by the labelling stage)"))
    out += [Problem("feedback.principle_weights", m)
            for m in c.weight_problems(cfg.feedback.principle_weights)]
    return out


def check_environment(cfg: Config, source_of: Callable[[str], str | None] = lambda _p: None
                      ) -> list[Problem]:
    """Every problem with what the config refers to (no download, no model loading)."""
    from cai_ray.data import check_source
    from cai_ray.models import check_model

    problems = check_constitution(cfg)
    specs = [("model", cfg.model), ("feedback.model", cfg.feedback.model),
             ("reward.model", cfg.reward.model)]
    for path, spec in specs:
        if spec is not None:
            problems += check_model(spec, path)
    problems += check_source(cfg.data.red_team, "data.red_team")
    problems += check_source(cfg.data.helpful, "data.helpful")
    if cfg.data.helpful_pairs is not None:
        problems += check_source(cfg.data.helpful_pairs, "data.helpful_pairs")
    problems += check_source(cfg.eval.red_team, "eval.red_team")
    problems += check_source(cfg.eval.helpful, "eval.helpful")
    if cfg.eval.over_refusal is not None:
        problems += check_source(cfg.eval.over_refusal, "eval.over_refusal")
    return [p if p.source else Problem(p.path, p.message, source_of(p.path)) for p in problems]
