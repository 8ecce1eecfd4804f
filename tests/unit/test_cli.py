"""The command line: exit codes and messages a user acts on, never a traceback for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cai_ray.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_validate_good_config_prints_resolved() -> None:
    p = cli("validate", "--config", "configs/cpu-smollm.yaml", "ppo.steps=3")
    assert p.returncode == 0, p.stderr
    assert "steps: 3" in p.stdout and "path: smollm2" in p.stdout


def test_validate_names_every_problem_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  engin: {}\nppo:\n  steps: many\nrun:\n  constitution: gone.yaml\n")
    p = cli("validate", "--config", str(bad))
    assert p.returncode == 2
    assert "rollout.engin: unknown key; did you mean 'engine'?" in p.stderr
    assert "ppo.steps: expected an integer, got str 'many'" in p.stderr
    assert "run.constitution: file not found: gone.yaml" in p.stderr
    assert "3 problem(s)" in p.stderr and "Traceback" not in p.stderr


def test_constitution_validate_and_import(tmp_path: Path) -> None:
    p = cli("constitution", "validate", "constitutions/default.yaml")
    assert p.returncode == 0 and "critique/revision pairs" in p.stdout
    bad = tmp_path / "c.yaml"
    bad.write_text("critique_revision:\n  - {id: x, critique: ''}\n")
    p = cli("constitution", "validate", str(bad))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "critique_revision[0].critique: must not be empty" in p.stderr
    assert "critique_revision[0].revision: missing required field" in p.stderr
    src = tmp_path / "cmp.json"
    src.write_text(json.dumps(["Which reply is gentler?", "Which reply is safer?"]))
    out = tmp_path / "imported.yaml"
    p = cli("constitution", "import", "--format", "anthropic", str(src), "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert cli("constitution", "validate", str(out)).returncode == 0


def test_keys_lists_help() -> None:
    p = cli("keys", "ppo")
    assert p.returncode == 0 and "ppo.clip_eps = 0.2" in p.stdout
    assert "policy ratio clip" in p.stdout


def test_unknown_builtin_model() -> None:
    p = cli("models", "prepare", "gpt-5")
    assert p.returncode == 2 and "choose from smollm2, qwen2.5-coder-1.5b, tiny-llama" in p.stderr


def test_ppo_without_a_preference_model_says_what_to_run(tmp_path: Path) -> None:
    p = cli("ppo", "--config", "configs/cpu-tiny.yaml", "--output", str(tmp_path),
            "run.local_mode=true")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "no trained preference model" in p.stderr and "cai-ray rm" in p.stderr
    assert "--resume" in cli("ppo", "--help").stdout


def test_ppo_batch_shapes_are_checked_up_front() -> None:
    p = cli("validate", "--config", "configs/cpu-tiny.yaml", "ppo.mini_batch_size=3",
            "ppo.advantage=grpo")
    assert p.returncode == 2
    assert "ppo.mini_batch_size: must be a multiple of trainer.micro_batch_size" in p.stderr
    assert "ppo.samples_per_prompt: advantage=grpo needs >= 2" in p.stderr


def test_pipeline_with_online_dpo_checks_its_settings_before_sl_runs(tmp_path: Path) -> None:
    p = cli("pipeline", "--config", "configs/cpu-tiny.yaml", "--output", str(tmp_path),
            "pipeline.rl=online_dpo", "run.local_mode=true")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert ("ppo.samples_per_prompt: online DPO pairs each prompt's responses, so it "
            "needs an even number >= 2 of them, got 1") in p.stderr
    assert not (tmp_path / "sl").exists()  # nothing ran



def test_pipeline_warns_before_training_when_eval_prompts_repeat_training_ones(
        tmp_path: Path, monkeypatch, capsys) -> None:
    import argparse
    import contextlib

    from cai_ray import cli as cli_mod
    from cai_ray import runtime

    ran: list[str] = []
    monkeypatch.setattr(runtime, "ray_session", lambda cfg: contextlib.nullcontext())

    def run(out: str, *overrides: str) -> str:
        args = argparse.Namespace(config=str(ROOT / "configs" / "cpu-tiny.yaml"),
                                  overrides=["eval.red_team.name=advbench",
                                             "eval.red_team.limit=120", *overrides],
                                  output=str(tmp_path / out), resume=False)
        assert cli_mod._run_stages(args, lambda cfg, o: [("sl", lambda: ran.append(o))],
                                   evaluates=True) == 0
        return capsys.readouterr().err

    # disjoint AdvBench rows, so no row is shared, but some requests recur in other words
    err = run("a", "data.red_team.name=advbench", "data.red_team.skip=120",
              "data.red_team.limit=null")
    assert ("warning: eval: eval.red_team: 22 of 120 prompts near-duplicate a training prompt"
            in err) and "will not be on held-out prompts" in err
    assert len(ran) == 1  # said before the first stage, which then runs
    # control: the tiny preset trains on Do-Not-Answer, which repeats none of them
    assert "near-duplicate" not in run("b")
