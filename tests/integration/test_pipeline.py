"""The main job end to end on the tiny model: sl → label → rm → ppo → eval → report, then a
rerun that skips every stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets

ROOT = Path(__file__).resolve().parents[2]


def test_pipeline_runs_every_stage_then_skips_them(tiny_model_dir, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "cai_ray.cli", "pipeline", "--config",
            str(ROOT / "configs" / "cpu-tiny.yaml"), "--output", str(tmp_path),
            "data.red_team.limit=4", "data.helpful.limit=2", "sl.rounds=1",
            "feedback.batch_size=4", "reward.eval_fraction=0.2", "reward.micro_batch_size=1",
            "ppo.eval_every=1"]
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "done in" in first.stdout and "rm:" in first.stdout
    assert len(datasets.load_from_disk(str(tmp_path / "sl" / "data"))) == 4 + 2 * 2
    assert (tmp_path / "sl" / "model" / "config.json").exists()
    comps = datasets.load_from_disk(str(tmp_path / "label" / "comparisons"))
    assert len(comps) == 6
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert metrics["train_comparisons"] + metrics["held_out"]["all"]["count"] <= 6
    assert (tmp_path / "rm" / "model" / "reward_head.safetensors").exists()
    assert (tmp_path / "ppo" / "model" / "config.json").exists()
    ppo = json.loads((tmp_path / "ppo" / "metrics.json").read_text())
    assert ppo["steps"] == 2 and len(ppo["score_curve"]) == 2
    # Live PM Elo at every step (the SL and initial weights swapped in once for their answers)
    # and the ppo@1 snapshot rated by the eval stage with the others.
    live = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in live if "elo/harmlessness_sl" in r] == [1, 2]
    elo = json.loads((tmp_path / "eval" / "elo.json").read_text())
    assert elo["snapshots"] == ["initial", "sl", "ppo@1", "ppo"]
    assert (tmp_path / "report.html").exists() and "report: " in first.stdout
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    for what in ("SL data already complete", "SL model already trained",
                 "comparisons already complete", "preference model already trained",
                 "PPO policy already trained", "evaluation already complete"):
        assert what in again.stderr
