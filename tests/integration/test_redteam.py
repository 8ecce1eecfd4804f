"""`cai-ray redteam` on the tiny model: it writes the requested number of unique prompts as a
dataset `data.red_team.name` reads, none equal to a seed; a larger --num resumes after the
rounds already run (each kept prompt once); a finished run skips."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from cai_ray.config import load_config
from cai_ray.data import load_prompts
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "cpu-tiny.yaml"


def test_redteam_writes_unique_prompts_and_resumes(ray_local, tiny_model_dir,
                                                   tmp_path: Path) -> None:
    args = ["redteam", "--config", str(TINY), "--output", str(tmp_path), "redteam.batch_size=8",
            "redteam.max_new_tokens=24"]
    code, out, err = run_cli(*args, "--num", "6")
    assert code == 0, err[-3000:]
    rounds = [json.loads(x) for x in (tmp_path / "redteam" / "rounds.jsonl").read_text()
              .splitlines()]
    assert len(rounds) == 1
    first = [k["prompt"] for k in rounds[0]["kept"]]

    code, out, err = run_cli(*args, "--num", "20")
    assert code == 0, err[-3000:]
    assert "resuming after round 1" in err
    ds = datasets.load_from_disk(str(tmp_path / "redteam" / "prompts"))
    prompts = list(ds["prompt"])
    assert len(prompts) == 20 and len(set(prompts)) == 20
    assert prompts[:len(first)] == first  # the first run's prompts, kept, not made again
    cfg = load_config(TINY, [f"data.red_team.name={tmp_path / 'redteam' / 'prompts'}",
                             "data.red_team.limit=null"])
    seeds, _ = load_prompts(load_config(TINY, []).data.red_team)
    assert not {m[-1]["content"] for m in seeds["messages"]} & set(prompts)
    again, _ = load_prompts(cfg.data.red_team)  # usable as a red-team source
    assert [m[-1]["content"] for m in again["messages"]] == prompts
    metrics = json.loads((tmp_path / "redteam" / "metrics.json").read_text())
    assert metrics["requested"] == 20 and metrics["kept"] == 20
    assert metrics["generated"] == 8 * metrics["rounds"]

    code, _, err = run_cli(*args, "--num", "20")
    assert code == 0 and "already generated" in err


def test_num_must_be_positive(tmp_path: Path) -> None:
    code, _, err = run_cli("redteam", "--config", str(TINY), "--output", str(tmp_path),
                           "--num", "0")
    assert code == 2 and "--num: must be a positive number of prompts, got 0" in err
    assert not (tmp_path / "redteam").exists()
