from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cai_ray.config import Config, load_config, parse_overrides, save_config
from cai_ray.configschema import ValidationError, describe_fields

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def problems_of(path: str | Path | None, overrides: list[str], check_env: bool = False):
    with pytest.raises(ValidationError) as exc:
        load_config(path, overrides, check_env=check_env)
    return exc.value.problems


@pytest.mark.parametrize("name", ["cpu-tiny", "cpu-smollm", "gpu-1node"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml", check_env=True)
    assert cfg.run.name == name


def test_defaults_are_the_papers() -> None:
    cfg = load_config(None, check_env=False)
    assert cfg.sl.rounds == 4 and cfg.sl.helpful_samples == 2
    assert cfg.ppo.kl_coef == 0.001 and cfg.ppo.clip_eps == 0.2 and cfg.ppo.gamma == 1.0
    assert cfg.ppo.entropy_coef == 0.0 and cfg.ppo.ppo_epochs == 1
    assert cfg.feedback.cot_clamp == [0.4, 0.6] and cfg.rollout.sampling.temperature == 1.0
    assert cfg.model.trust_remote_code is False


def test_file_overrides_defaults_and_cli_overrides_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  steps: 7\n  clip_eps: 0.1\nrollout:\n  engine:\n    dtype: float32\n")
    cfg = load_config(f, ["ppo.steps=3", "feedback.cot_clamp=[0.3, 0.7]"], check_env=False)
    assert cfg.ppo.steps == 3  # command line wins
    assert cfg.ppo.clip_eps == 0.1  # file wins over the default
    assert cfg.rollout.engine.dtype == "float32"
    assert cfg.feedback.cot_clamp == [0.3, 0.7]
    assert cfg.ppo.lam == 0.95  # untouched default


def test_every_problem_reported_at_once_with_path_and_source(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("ppo:\n  stepz: 3\n  clip_eps: high\nrun:\n  constitution: nowhere.yaml\n")
    probs = problems_of(f, ["trainer.zero_stage=4"], check_env=True)
    text = "\n".join(str(p) for p in probs)
    assert "ppo.stepz: unknown key; did you mean 'steps'?" in text
    assert "ppo.clip_eps: expected a number, got str 'high'" in text
    assert "run.constitution: file not found: nowhere.yaml" in text
    assert "command line: trainer.zero_stage: must be one of 2, 3; got 4" in text
    assert all(p.source for p in probs)
    assert str(f) in text


@pytest.mark.parametrize("override, path, fragment", [
    ("ppo.clip_eps=1.5", "ppo.clip_eps", "must be in (0.0, 1.0]"),
    ("feedback.cot_clamp=[0.6, 0.4]", "feedback.cot_clamp", "0 <= lo <= 0.5 <= hi <= 1"),
    ("sl.train_rounds=9", "sl.train_rounds", "must be <= rounds (4)"),
    ("rollout.engine.block_size=48", "rollout.engine.block_size", "multiple of 32"),
    ("placement.colocate=[[trainer, critic]]", "placement.colocate[0]", "unknown role 'critic'"),
    ("ppo.advantage=grpo", "ppo.samples_per_prompt", "needs >= 2 samples"),
    ("rollout.sampling.max_new_tokens=0", "rollout.sampling.max_new_tokens", "must be > 0"),
    ("trainer.dtype=fp16", "trainer.dtype", "one of 'float32', 'bfloat16'"),
    ("run.call_timeout_s=true", "run.call_timeout_s", "expected a number"),
    ("placement.rollout.num_actors=2.5", "placement.rollout.num_actors", "expected an integer"),
    ("feedback.principle_weights={harmless-not-evasive: -1}", "feedback.principle_weights",
     "'harmless-not-evasive' must be >= 0"),
])
def test_impossible_values(override: str, path: str, fragment: str) -> None:
    probs = problems_of(None, [override])
    assert [p.path for p in probs] == [path]
    assert fragment in probs[0].message


def test_colocated_roles_must_fit_one_bundle() -> None:
    probs = problems_of(None, ["placement.colocate=[[trainer, reference]]",
                               "placement.trainer.num_actors=2"])
    assert [p.path for p in probs] == ["placement.colocate[0]"]
    assert "equal num_actors" in probs[0].message and "'reference': 1" in probs[0].message
    probs = problems_of(None, ["placement.colocate=[[reward, reference]]",
                               "placement.reward.num_gpus=0.6", "placement.reference.num_gpus=0.6"])
    assert [p.path for p in probs] == ["placement.colocate[0]"]
    assert "add up to at most 1" in probs[0].message
    cfg = load_config(None, ["placement.colocate=[[reward, reference]]",
                             "placement.reward.num_gpus=0.5", "placement.reference.num_gpus=0.5"],
                      check_env=False)
    assert cfg.placement.colocate == [["reward", "reference"]]


def test_nested_section_must_be_mapping() -> None:
    probs = problems_of(None, ["ppo=3"])
    assert probs[0].path == "ppo" and "expected a mapping" in probs[0].message


def test_override_syntax() -> None:
    tree, probs = parse_overrides(["a.b=1", "a.c=[1, 2]", "x", "d=hello world"])
    assert tree == {"a": {"b": 1, "c": [1, 2]}, "d": "hello world"}
    assert len(probs) == 1 and "key.sub=value" in probs[0].message


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("ppo:\n  steps: [1, 2\n")
    probs = problems_of(f, [])
    assert "invalid YAML: line" in probs[0].message and probs[0].source == str(f)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "cpu-tiny.yaml", ["ppo.steps=5"], check_env=False)
    out = save_config(cfg, tmp_path / "run")
    again = load_config(out, check_env=False)
    assert again == cfg and yaml.safe_load(out.read_text())["ppo"]["steps"] == 5


def test_every_key_has_help() -> None:
    rows = describe_fields(Config)
    sections = {r[0].split(".")[0] for r in rows}
    assert {"model", "rollout", "feedback", "reward", "trainer", "sl", "ppo", "data",
            "placement", "tracking", "run"} <= sections
    assert all(r[3] for r in rows), [r[0] for r in rows if not r[3]]


def test_bad_model_and_data_names_are_reported() -> None:
    probs = problems_of(None, ["model.path=not a model", "data.red_team.name=missing.jsonl"],
                        check_env=True)
    paths = {p.path for p in probs}
    assert "model.path" in paths and "data.red_team.name" in paths


def test_exponent_without_dot_is_a_number(tmp_path: Path) -> None:
    """YAML 1.1 reads 5e-4 as a string; a float field takes it as the number it means."""
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  lr: 5e-4\n")
    cfg = load_config(f, ["reward.lr=2E-5"])
    assert cfg.trainer.lr == 5e-4 and cfg.reward.lr == 2e-5
    assert problems_of(f, ["trainer.lr=5e-x"])[0].path == "trainer.lr"


def test_eval_judge_elo_takes_aspects_only() -> None:
    assert load_config(None, ["eval.judge_elo=[helpful]"]).eval.judge_elo == ["helpful"]
    with pytest.raises(ValidationError, match=r"eval\.judge_elo\[1\].*'harmful' is not an aspect"):
        load_config(None, ["eval.judge_elo=[helpful,harmful]"])


def test_principle_weights_are_checked_against_the_constitution() -> None:
    probs = problems_of(None, ["feedback.principle_weights={harmless-not-evasiv: 3}"],
                        check_env=True)
    bad = [p for p in probs if p.path == "feedback.principle_weights"]
    assert len(bad) == 1 and "'harmless-not-evasiv'" in bad[0].message
    assert "harmless-not-evasive" in bad[0].message  # what is allowed
    cfg = load_config(None, ["feedback.principle_weights={harmless-not-evasive: 3}"],
                      check_env=True)
    assert cfg.feedback.principle_weights == {"harmless-not-evasive": 3.0}
