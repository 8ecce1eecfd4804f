"""Preference model on the tiny model: learns a planted preference, scores unseen pairs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cai_ray.actors.reward import reward_group
from cai_ray.config import load_config
from cai_ray.configschema import ValidationError
from cai_ray.messages import Comparison
from cai_ray.stages.rm import read_comparisons, run_rm, score_pairs
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "cpu-tiny.yaml"
TOPICS = ["the weather", "a recipe", "my homework", "a trip", "the news", "a poem", "my code",
          "a letter", "the garden", "a movie", "my bike", "the lake"]
WORDS = "we can talk about this here and now with some care for every detail".split()


def synthetic(n: int, seed: int) -> list[dict]:
    """Pairs where the preferred response ends with a marker; A or B at random."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        base = " ".join(rng.choices(WORDS, k=8))
        good, bad = f"{base} Stay safe.", f"{base} Do it now."
        a_good = rng.random() < 0.5
        rows.append({"prompt": f"Tell me about {TOPICS[i % len(TOPICS)]}, please {i}.",
                     "response_a": good if a_good else bad,
                     "response_b": bad if a_good else good,
                     "p_a": 0.9 if a_good else 0.1,
                     "aspect": "harmless" if i % 3 else "helpful"})
    return rows


def test_pm_learns_planted_preference_and_scores_unseen_pairs(ray_local, tiny_model_dir,
                                                               tmp_path: Path) -> None:
    f = tmp_path / "comparisons.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in synthetic(240, 0)))
    cfg = load_config(TINY, ["reward.lr=0.002", "reward.epochs=3", "reward.micro_batch_size=8",
                             "reward.eval_fraction=0.2", "reward.helpful_fraction=0.33"])
    model_dir = run_rm(cfg, tmp_path, str(f))
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    held = metrics["held_out"]
    assert held["all"]["count"] >= 40
    assert held["all"]["accuracy"] >= 0.9, held["all"]
    assert {"harmless", "helpful"} <= set(held) and 0.0 <= held["all"]["ece"] <= 1.0
    unseen = [Comparison([{"role": "user", "content": r["prompt"]}], r["response_a"],
                         r["response_b"], r["p_a"]) for r in synthetic(30, 99)]
    scorer_cfg = load_config(TINY, [f"reward.model.path={model_dir}"])
    g = reward_group(scorer_cfg, scorer_cfg.reward.model, None)
    try:
        scores = score_pairs(g, unseen, 8)
    finally:
        g.shutdown()
    agree = sum((a > b) == (c.p_a > 0.5) for (a, b), c in zip(scores, unseen, strict=True))
    assert agree / len(unseen) >= 0.9


def test_bad_comparisons_are_named(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    rows = synthetic(3, 1)
    rows[1]["p_a"] = 1.5
    del rows[2]["response_b"]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValidationError) as exc:
        read_comparisons(f, str(f))
    text = str(exc.value)
    assert "line 2: p_a must be a number in [0, 1], got 1.5" in text
    assert "line 3: missing response_b" in text
    code, _, err = run_cli("rm", "--config", str(TINY), "--output", str(tmp_path / "out"),
                           "--comparisons", str(f))
    assert code == 2 and "Traceback" not in err and "p_a must be" in err
    assert not (tmp_path / "out" / "rm").exists()
