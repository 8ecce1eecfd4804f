"""Atomic checkpoints, log rewinding, weight buckets and the PPO driver's tensor glue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cai_ray.actors.weight_sync import cut_buckets, iterate, payload_bytes, publish
from cai_ray.algorithms.experience import advantages, to_rows
from cai_ray.checkpoint import Checkpoints, rewind_jsonl
from cai_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_commit_is_atomic_keeps_the_newest_and_ignores_torn(tmp_path: Path) -> None:
    ck = Checkpoints(tmp_path / "ck", keep=2)
    assert ck.latest() == (None, None)
    for step in (2, 4, 6):
        tmp = ck.begin(step)
        (tmp / "weights.bin").write_bytes(b"x" * step)
        assert ck.latest()[0] is None or ck.latest()[1]["step"] < step  # not visible yet
        ck.commit(tmp, step, {"stream": {"position": step}})
    assert [s for s, _ in ck.complete()] == [4, 6]
    path, state = ck.latest()
    assert path is not None and path.name == "step-00000006"
    assert state == {"step": 6, "stream": {"position": 6}}
    # A save killed half-way leaves a .tmp that is never read and is cleaned on resume.
    torn = ck.begin(8)
    (torn / "weights.bin").write_bytes(b"partial")
    assert ck.latest()[1]["step"] == 6
    assert ck.clean_torn() == [torn] and not torn.exists()
    # Saving a step again (after a resume) replaces it whole.
    tmp = ck.begin(6)
    ck.commit(tmp, 6, {"stream": {"position": 60}})
    assert ck.latest()[1]["stream"]["position"] == 60 and not ck.torn()


def test_rewind_jsonl_drops_later_steps_and_a_torn_line(tmp_path: Path) -> None:
    f = tmp_path / "log.jsonl"
    f.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(1, 7))
                 + '{"step": 7, "x"')
    assert rewind_jsonl(f, 4) == 3
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [1, 2, 3, 4]
    assert rewind_jsonl(f, 4) == 0 and rewind_jsonl(tmp_path / "none.jsonl", 1) == 0


def test_buckets_keep_order_and_size() -> None:
    named = [(f"w{i}", torch.zeros(256)) for i in range(10)]  # 1 KiB each
    named.insert(3, ("big", torch.zeros(4096)))  # 16 KiB: a bucket of its own
    buckets = cut_buckets(named, 3 * 1024)
    assert [len(b) for b in buckets] == [3, 1, 3, 3, 1]
    assert [n for n, _ in iterate(publish(buckets))] == [n for n, _ in named]  # no Ray here
    assert payload_bytes(buckets) == 10 * 1024 + 16 * 1024


def test_to_rows_round_trips_flat_token_values() -> None:
    flat = torch.arange(6, dtype=torch.float32)
    rows, mask = to_rows(flat, [1, 3, 2])
    assert rows.tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 0]]
    assert torch.equal(rows[mask], flat)
    with pytest.raises(ValueError):
        to_rows(flat, [2, 2])


def test_advantages_gae_and_grpo_use_the_pm_score_and_the_kl() -> None:
    cfg = load_config(ROOT / "configs" / "cpu-tiny.yaml",
                      ["ppo.whiten_advantages=false", "ppo.lam=1.0"])
    mask = torch.tensor([[True, True], [True, False]])
    old = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0], [-1.0, 0.0]])
    scores = torch.tensor([1.0, -1.0])
    values = torch.zeros(2, 2)
    out = advantages(cfg.ppo, scores, old, ref, values, mask, kl_coef=0.1)
    # k1 KL: 0.5 on the first token of row 0; γ = λ = 1 with zero values: the advantage is
    # the reward-to-go, score − β·KL of the remaining tokens.
    assert out["seq_kl"].tolist() == pytest.approx([0.5, 0.0])
    torch.testing.assert_close(out["advantages"], torch.tensor([[1.0 - 0.05, 1.0], [-1.0, 0.0]]))
    assert torch.equal(out["returns"], out["advantages"])
    cfg = load_config(ROOT / "configs" / "cpu-tiny.yaml",
                      ["ppo.advantage=grpo", "ppo.samples_per_prompt=2",
                       "ppo.whiten_advantages=false"])
    out = advantages(cfg.ppo, scores, old, ref, None, mask, kl_coef=0.0)
    torch.testing.assert_close(out["advantages"], torch.tensor([[1.0, 1.0], [-1.0, 0.0]]),
                               atol=1e-4, rtol=0)
    assert "returns" not in out


def test_kl_in_the_loss_leaves_the_reward_alone_and_needs_no_old_logprobs() -> None:
    over = ["ppo.advantage=grpo", "ppo.samples_per_prompt=2", "ppo.whiten_advantages=false",
            "ppo.rollout_batch_size=1", "ppo.mini_batch_size=2"]
    mask = torch.tensor([[True, True], [True, False]])
    ref = torch.tensor([[-1.5, -2.0], [-1.0, 0.0]])
    scores = torch.tensor([1.0, -1.0])
    loss = load_config(ROOT / "configs" / "cpu-tiny.yaml", over + ["ppo.kl_penalty=loss"])
    assert loss.ppo.single_update
    out = advantages(loss.ppo, scores, None, ref, None, mask, kl_coef=0.5)
    torch.testing.assert_close(out["advantages"], torch.tensor([[1.0, 1.0], [-1.0, 0.0]]),
                               atol=1e-4, rtol=0)  # β is not taken off the score
    assert "seq_kl" not in out
    reward = load_config(ROOT / "configs" / "cpu-tiny.yaml", over)
    assert not reward.ppo.single_update  # the reward's KL needs the old log-probs
    with pytest.raises(ValueError, match="old log-probs are needed"):
        advantages(reward.ppo, scores, None, ref, None, mask, kl_coef=0.5)
    two_epochs = load_config(ROOT / "configs" / "cpu-tiny.yaml",
                             over + ["ppo.kl_penalty=loss", "ppo.ppo_epochs=2"])
    assert not two_epochs.ppo.single_update


RAN: list[str] = []


def _run_on_load(text: str) -> None:
    RAN.append(text)


class _Payload:
    """A pickle that would run code when loaded."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_run_on_load, ("this ran while loading",))


def test_checkpoints_are_read_weights_only(tmp_path: Path) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from cai_ray.actors.trainer import load_weights_only

    class Engine:  # what DeepSpeedEngine.load_checkpoint reads every file through
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    load_weights_only(engine)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2), "scaler": LossScaler(1.0), "step": 3}, good)
    out = engine.checkpoint_engine.load(str(good), map_location="cpu")
    assert out["step"] == 3 and torch.equal(out["w"], torch.ones(2))
    bad = tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2), "x": _Payload()}, bad)
    with pytest.raises(Exception, match="Unsupported global: GLOBAL [\\w.]*_run_on_load"):
        engine.checkpoint_engine.load(str(bad), map_location="cpu")
    assert RAN == []
    torch.load(bad, weights_only=False)  # what the unguarded reader would have done
    assert RAN == ["this ran while loading"]


def test_checksum_mismatches_name_changed_tensors_only() -> None:
    import torch

    from cai_ray.actors.weight_sync import checksum, checksum_mismatches

    a, b = torch.randn(64, 32), torch.randn(128)
    sender = {"a": checksum(a), "b": checksum(b)}
    stale = b.clone()
    stale[7] += 1e-3  # one element moved, as after a small optimizer step
    assert checksum_mismatches(sender, {"a": checksum(a.clone()), "b": checksum(b)}) == []
    assert checksum_mismatches(sender, {"a": checksum(a), "b": checksum(stale)}) == ["b"]
    assert checksum_mismatches(sender, {"a": checksum(a)}) == []  # missing: the audit's job
