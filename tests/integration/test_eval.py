"""Evaluation on the tiny model: two snapshots answer, the judge and the PM compare them, Elo
with intervals, evasiveness/over-refusal/harm rates, and a report page with its plots."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cai_ray.config import ModelSpec, load_config
from cai_ray.report import write_report
from cai_ray.stages.evaluate import run_eval

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "cpu-tiny.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def _noisy_copy(src: str, dst: Path) -> None:
    """The tiny model with perturbed weights: a second snapshot that answers differently."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


def test_eval_rates_snapshots_and_reports(ray_local, tiny_model_dir, tmp_path: Path) -> None:
    import torch

    from cai_ray.actors.reward import load_reward_model, save_reward_model
    from cai_ray.models import load_tokenizer, resolve

    spec = ModelSpec(path="tiny-llama")
    torch.manual_seed(0)
    save_reward_model(load_reward_model(spec, torch.float32), load_tokenizer(spec),
                      tmp_path / "rm" / "model")
    _noisy_copy(resolve(spec), tmp_path / "noisy")
    cfg = load_config(TINY, ["eval.red_team.limit=4", "eval.helpful.limit=3",
                             "eval.over_refusal.limit=3", "eval.bootstrap=50",
                             "eval.max_new_tokens=12"])
    path = run_eval(cfg, tmp_path, ["initial", f"noisy={tmp_path / 'noisy'}"])
    elo = json.loads(path.read_text())
    assert elo["snapshots"] == ["initial", "noisy"]
    assert set(elo["elo"]) == {"judge/harmless", "judge/helpful", "pm/harmless", "pm/helpful"}
    for key, table in elo["elo"].items():
        assert table["initial"]["elo"] == 0.0  # pinned
        r = table["noisy"]
        assert r["low"] <= r["elo"] <= r["high"]
        assert r["comparisons"] == (4 if key.endswith("harmless") else 3)
    for snap in ("initial", "noisy"):
        per = elo["per_snapshot"][snap]
        for k in ("evasive_rate", "harmful_rate", "over_refusal_rate"):
            assert 0.0 <= per[f"{k}_low"] <= per[k] <= per[f"{k}_high"] <= 1.0
        assert isinstance(per["pm_harmless_mean"], float)
    checks = elo["verdict_checks"]
    assert {q: c["labelled"] for q, c in checks.items()} == {"harmful": 96, "evasive": 88}
    for c in checks.values():
        assert 0.0 <= c["accuracy"] <= 1.0 and 0.0 <= c["auc"] <= 1.0
        assert c["interval"][0] <= c["accuracy"] <= c["interval"][1]
        assert c["cut"] == c["threshold"]  # eval.verdict_threshold: fitted (the default)
    # every verdict is the fitted cut applied to p(yes): the rate is the share of 1s
    for snap in ("initial", "noisy"):
        v = elo["verdicts"][snap]["harmful"]
        assert set(v.values()) <= {0.0, 1.0} and len(v) == 4
        assert elo["per_snapshot"][snap]["harmful_rate"] == sum(v.values()) / 4
    lines = (tmp_path / "eval" / "responses.jsonl").read_text().splitlines()
    assert len(lines) == 2 * (4 + 3 + 3)

    report = write_report(tmp_path)
    page = report.read_text()
    for name in ("elo.png", "scatter.png"):
        assert f'src="report/{name}"' in page
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG
    assert "Harmful judge on the labelled set (96 replies)" in page
    assert "Evasive judge on the labelled set (88 replies)" in page


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    run = tmp_path / "run"
    (run / "ppo").mkdir(parents=True)
    (run / "ppo" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward/score_mean": 0.1 * s, "reward/total_mean": 0.1 * s,
                    "kl/mean": 0.01 * s, "time/step": 1.0}) + "\n" for s in range(1, 6)))
    page = write_report(run)
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
                   check=True, timeout=120, capture_output=True)
    assert shot.read_bytes()[:8] == PNG and shot.stat().st_size > 10_000
