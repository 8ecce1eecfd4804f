"""Tracking: jsonl always, W&B offline without a key (no network), same run id on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_ray.config import TrackingConfig
from cai_ray.tracking import Tracker, wandb_mode


def test_mode_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online" and wandb_mode("disabled") == "disabled"


def test_disabled_writes_jsonl_only(tmp_path: Path) -> None:
    t = Tracker(TrackingConfig(wandb="disabled"), "r", tmp_path)
    t.log({"reward/mean": 0.5}, step=1)
    t.table("samples", ["prompt", "response"], [["p", "r"]], step=1)
    t.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 1, "reward/mean": 0.5}
    assert lines[1]["table"] == "samples" and lines[1]["rows"] == [["p", "r"]]
    assert not (tmp_path / "wandb").exists()


def test_offline_run_and_resume_keeps_run_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    t = Tracker(TrackingConfig(wandb="auto", project="test"), "r", tmp_path, {"a": 1})
    assert t.mode == "offline"
    t.log({"kl": 0.1}, step=0)
    t.close()
    first = (tmp_path / "wandb_run_id").read_text()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    t = Tracker(TrackingConfig(wandb="offline", project="test"), "r", tmp_path)
    t.log({"kl": 0.2}, step=1)
    t.close()
    assert (tmp_path / "wandb_run_id").read_text() == first
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1]


@pytest.mark.parametrize("mode", ["ours", "control"])
def test_an_offline_run_prints_no_wandb_banner(mode: str, tmp_path: Path, monkeypatch,
                                              capfd) -> None:
    """Each stage opens and closes a run: offline, W&B's banner and sync hints said nothing the
    stage's own log line does not. Control: a bare offline `wandb.init` prints them."""
    import wandb

    monkeypatch.delenv("WANDB_SILENT", raising=False)
    monkeypatch.delenv("WANDB_QUIET", raising=False)
    if mode == "ours":
        t = Tracker(TrackingConfig(wandb="offline", project="test"), "r", tmp_path)
        t.log({"kl": 0.1}, step=0)
        t.close()
    else:
        run = wandb.init(project="test", dir=str(tmp_path), mode="offline")
        run.log({"kl": 0.1}, step=0)
        run.finish()
    out = capfd.readouterr()
    assert ("wandb:" in out.out + out.err) is (mode == "control"), out
