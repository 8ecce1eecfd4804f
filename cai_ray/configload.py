"""Loading and saving the run configuration: YAML file and overrides into a validated `Config`.

Resolution order: class defaults < named YAML file (`configs/*.yaml`) < `key.sub=value` overrides
from the command line. `load_config` reports every unknown key, wrong type and impossible value in
one `ValidationError` (each with its dotted path and whether it came from the file or the command
line), then `check_environment` checks what lies outside the config (constitution file, data files,
model names), all before any actor starts. `save_config` writes the resolved config into a run
directory. The schema (the dataclasses and their defaults) is `cai_ray.config`, which re-exports
these names; this module imports it only inside `load_config` and for type checking, so either
module may be imported first.

    cfg = load_config("configs/cpu-smollm.yaml", ["ppo.steps=10", "rollout.engine.dtype=float32"])
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cai_ray.configschema import Problem, ValidationError, build

if TYPE_CHECKING:
    from cai_ray.config import Config


def parse_overrides(items: list[str]) -> tuple[dict[str, Any], list[Problem]]:
    """`a.b=1` strings into a nested dict; values parsed as YAML scalars/lists ("3", "[1,2]")."""
    tree: dict[str, Any] = {}
    problems: list[Problem] = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key.strip()):
            problems.append(Problem(item, "override must look like key.sub=value",
                                    "command line"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(Problem(key, "conflicts with another override", "command line"))
                break
        else:
            node[parts[-1]] = value
    return tree, problems


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _leaf_paths(tree: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for k, v in tree.items():
        p = f"{prefix}{k}"
        paths.add(p)
        if isinstance(v, dict):
            paths |= _leaf_paths(v, p + ".")
    return paths


def read_yaml_mapping(path: Path, problems: list[Problem]) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; problems name the file and line."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(Problem("", "file not found", str(path)))
        return {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problems.append(Problem("", f"invalid YAML: {where}{getattr(e, 'problem', e)}", str(path)))
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(Problem("", f"expected a mapping at the top, got {type(data).__name__}",
                                str(path)))
        return {}
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                check_env: bool = True) -> Config:
    """Resolve defaults < file < overrides; raise ValidationError listing every problem."""
    from cai_ray.config import Config

    problems: list[Problem] = []
    file_data: dict[str, Any] = {}
    if path is not None:
        file_data = read_yaml_mapping(Path(path), problems)
    over_data, over_problems = parse_overrides(overrides or [])
    problems += over_problems
    from_cli = _leaf_paths(over_data)
    file_name = str(path) if path is not None else "defaults"

    def source_of(dotted: str) -> str:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in from_cli:
                return "command line"
        return file_name

    cfg: Config = build(Config, _merge(file_data, over_data), "", problems, source_of)
    if check_env:  # also with schema problems: the user gets every problem in one pass
        from cai_ray.preflight import check_environment
        problems += check_environment(cfg, source_of)
    if problems:
        raise ValidationError(f"invalid config {file_name}", problems)
    return cfg


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config into the run directory (secrets never live in the config)."""
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(cfg.to_yaml(), encoding="utf-8")
    tmp.replace(out)
    return out
