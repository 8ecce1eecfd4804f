"""SL-CAI on the tiny model: critique→revision rounds on real vLLM actors, resumable shards,
DeepSpeed finetuning, and the checkpoint read back by a fresh vLLM engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch

from cai_ray.actors.group import ActorGroup
from cai_ray.actors.rollout import RolloutWorker
from cai_ray.config import EngineConfig, ModelSpec, RoleResources, load_config
from cai_ray.configschema import ValidationError
from cai_ray.constitution import load_constitution
from cai_ray.stages.sl import run_generate
from cai_ray.stages.sl_train import run_train
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "cpu-tiny.yaml"
BASE = ["data.red_team.limit=6", "data.helpful.limit=2", "sl.shard_size=2", "sl.rounds=3",
        "sl.max_new_tokens=12", "run.seed=7"]


def cfg_with(*extra: str):
    return load_config(TINY, BASE + list(extra))


@pytest.fixture(scope="module")
def sl_run(ray_local, tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sl")
    run_generate(cfg_with(), out)
    return out


def test_rounds_principles_and_training_view(sl_run: Path) -> None:
    data = datasets.load_from_disk(str(sl_run / "sl" / "data"))
    constitution = load_constitution(ROOT / "constitutions" / "default.yaml")
    red = [r for r in data if r["rounds"]]
    helpful = [r for r in data if not r["rounds"]]
    assert len(red) == 6 and len(helpful) == 2 * 2  # 2 helpful prompts × 2 samples
    for row in red:
        assert len(row["rounds"]) == 3
        expected = [constitution.sample_critique(7, row["prompt_id"], r).id for r in range(3)]
        assert [r["principle_id"] for r in row["rounds"]] == expected
        assert all(r["critique"] is not None and r["revision"] is not None
                   for r in row["rounds"])
        assert row["final_response"] == row["rounds"][-1]["revision"]
    train = datasets.load_from_disk(str(sl_run / "sl" / "train"))
    assert len(train) == 6 * 3 + 4
    assert sorted(set(train["source"])) == ["helpful", "revision@1", "revision@2", "revision@3"]
    # Cut-off revisions are kept (sl.drop_truncated=false in this config) but never given an
    # EOS: `finished` mirrors the truncation recorded with each round.
    cut = [rnd["truncated"] for r in red for rnd in r["rounds"]] + \
        [r["final_truncated"] for r in helpful]
    assert sorted(train["finished"]) == sorted(not c for c in cut)
    assert any(cut)  # 12 tokens: the random model runs out of budget


def test_same_seed_same_principles_and_direct_mode(sl_run: Path, tmp_path: Path) -> None:
    run_generate(cfg_with("sl.direct_revision=true", "data.helpful.limit=1"), tmp_path)
    direct = datasets.load_from_disk(str(tmp_path / "sl" / "data"))
    first = {r["prompt_id"]: r for r in datasets.load_from_disk(str(sl_run / "sl" / "data"))}
    for row in (r for r in direct if r["rounds"]):
        assert [r["principle_id"] for r in row["rounds"]] == \
            [r["principle_id"] for r in first[row["prompt_id"]]["rounds"]]
        assert all(r["critique"] is None and r["revision"] for r in row["rounds"])
        assert row["initial_response"] == first[row["prompt_id"]]["initial_response"]  # seeded


def test_killed_generation_resumes_with_every_prompt_once(tiny_model_dir, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "cai_ray.cli", "sl", "--config", str(TINY), "--output",
            str(tmp_path), "--step", "generate", *BASE, "sl.shard_size=1",
            "run.local_mode=true"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    shards = tmp_path / "sl" / "shards"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if shards.exists() and len([p for p in shards.iterdir() if p.name.startswith("red")]) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "generation ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()
              if not p.name.startswith(".")}
    assert 2 <= len(before) < 8 and not (tmp_path / "sl" / "data").exists()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already complete" in done.stderr
    after = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    assert all(after[name] == mtime for name, mtime in before.items())  # not redone
    data = datasets.load_from_disk(str(tmp_path / "sl" / "data"))
    red_ids = [r["prompt_id"] for r in data if r["rounds"]]
    assert len(red_ids) == 6 and len(set(red_ids)) == 6
    assert len(data) == len(set(data["id"])) == 6 + 4


def test_resume_refuses_unknown_principle(sl_run: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(sl_run / "sl" / "shards", tmp_path / "sl" / "shards")
    shard = tmp_path / "sl" / "shards" / "red-00000"
    ds = datasets.load_from_disk(str(shard))
    rows = ds.to_list()
    rows[1]["rounds"][0]["principle_id"] = "no-such-principle"
    shutil.rmtree(shard)
    datasets.Dataset.from_list(rows, features=ds.features).save_to_disk(str(shard))
    with pytest.raises(ValidationError) as exc:
        run_generate(cfg_with(), tmp_path)
    assert "row 1: principle id 'no-such-principle' is not in the constitution" in str(exc.value)
    assert str(shard) in str(exc.value)
    assert not (tmp_path / "sl" / "data").exists()


@pytest.mark.parametrize("content, fragment", [
    ("", "no usable prompts"),
    ('{"prompt": "How do I stay safe online?"}\n{"text": "no prompt field"}\n', "line 2"),
])
def test_bad_prompt_file_is_reported_before_anything_runs(tmp_path: Path, content: str,
                                                          fragment: str) -> None:
    f = tmp_path / "prompts.jsonl"
    f.write_text(content)
    code, _, err = run_cli("sl", "--config", str(TINY), "--output", str(tmp_path / "out"),
                           "--prompts", str(f))
    assert code == 2, err[-2000:]
    assert fragment in err and str(f) in err and "Traceback" not in err
    assert not (tmp_path / "out" / "sl" / "shards").exists() or \
        not any((tmp_path / "out" / "sl" / "shards").iterdir())


def _hf_logprobs(model_dir: Path, ids: list[int]) -> list[float]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = m(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_sft_learns_and_checkpoint_matches_in_vllm(sl_run: Path, tiny_model_dir) -> None:
    cfg = cfg_with("trainer.lr=0.003", "sl.epochs=2")
    model_dir = run_train(cfg, sl_run)
    metrics = json.loads((sl_run / "sl" / "train_metrics.json").read_text())
    assert metrics["loss_after"] < metrics["loss_before"] - 0.1
    log = [json.loads(x) for x in (sl_run / "sl" / "metrics.jsonl").open()]
    steps = [r for r in log if "sft/loss" in r]
    assert len(steps) == metrics["steps"] and all(r["sft/tokens"] > 0 for r in steps)
    from safetensors.torch import load_file

    new = load_file(str(model_dir / "model.safetensors"))
    old = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(new[k], old[k]) for k in old)
    ids = [5, 17, 200, 33, 41, 8, 99, 120, 7, 64, 300, 12]
    engine = EngineConfig(dtype="float32", max_model_len=256, kv_cache_gib=1)
    g = ActorGroup("rollout", RolloutWorker, RoleResources(), local=True,
                   init_args=(ModelSpec(path=str(model_dir)), engine, "cpu", 0))
    try:
        got = g.call(0, RolloutWorker.prompt_logprobs, [ids])[0]
    finally:
        g.shutdown()
    want = _hf_logprobs(model_dir, ids)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
    stale = _hf_logprobs(tiny_model_dir, ids)
    assert max(abs(a - b) for a, b in zip(got, stale, strict=True)) > 1e-2


def test_sft_zero3_on_two_ranks(sl_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two data-parallel ranks (gloo) under ZeRO-3: parameters are partitioned, the loss still
    falls, and the saved checkpoint holds the full, gathered weights."""
    import shutil

    shutil.copytree(sl_run / "sl" / "train", tmp_path / "sl" / "train")
    cfg = cfg_with("trainer.zero_stage=3", "placement.trainer.num_actors=2",
                   "trainer.lr=0.003", "sl.epochs=2", "trainer.micro_batch_size=2")
    model_dir = run_train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "sl" / "train_metrics.json").read_text())
    assert metrics["loss_after"] < metrics["loss_before"] - 0.1
    from safetensors.torch import load_file

    new = load_file(str(model_dir / "model.safetensors"))
    old = load_file(str(tiny_model_dir / "model.safetensors"))
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in old.items()}
    assert any(not torch.equal(new[k], old[k]) for k in old)
