"""Offline DPO on the tiny model: the policy learns a planted preference from soft labels
against its frozen reference, its implicit reward ranks unseen pairs, and the model it writes
loads in vLLM's format (save_pretrained) with the label's side now more likely. Bad
comparison files are named before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

from cai_ray.config import load_config
from cai_ray.stages.dpo import run_dpo
from tests.conftest import run_cli
from tests.integration.test_rm import synthetic

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "cpu-tiny.yaml"


def _sum_logprob(model, tok, prompt: str, response: str) -> float:
    import torch

    from cai_ray.actors.trainer import encode_chat

    ids, mask = encode_chat(tok, [{"role": "user", "content": prompt}], response, 256)
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
    tgt = x[0, 1:]
    sel = torch.tensor(mask[1:], dtype=torch.bool)
    return float(logp[torch.arange(len(tgt)), tgt][sel].sum())


def test_dpo_learns_the_labelled_side_from_soft_labels(ray_local, tiny_model_dir,
                                                       tmp_path: Path) -> None:
    f = tmp_path / "comparisons.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in synthetic(160, 0)))
    cfg = load_config(TINY, ["dpo.lr=0.001", "dpo.epochs=2", "dpo.micro_batch_size=8",
                             "dpo.eval_fraction=0.2", "dpo.beta=0.5"])
    model_dir = run_dpo(cfg, tmp_path, str(f))
    assert (model_dir / "config.json").exists()
    metrics = json.loads((tmp_path / "dpo" / "metrics.json").read_text())
    held = metrics["held_out"]
    assert held["all"]["count"] >= 30 and {"harmless", "helpful"} <= set(held)
    assert held["all"]["accuracy"] >= 0.9 and held["all"]["margin"] > 0, held["all"]
    rows = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "dpo/loss" in r]
    assert len(steps) == metrics["steps"] == 2 * (metrics["train_comparisons"] // 8)
    first, last = steps[0], steps[-1]
    assert last["dpo/loss"] < first["dpo/loss"]
    assert last["dpo/reward_chosen"] > last["dpo/reward_rejected"]
    assert abs(first["dpo/margin"]) < 1e-3  # step 1 starts from the reference itself
    # the saved policy, read back as a plain HF model, prefers the labelled side on unseen
    # prompts; the initial model (the control) does not
    from transformers import AutoModelForCausalLM

    from cai_ray.models import load_tokenizer

    tok = load_tokenizer(cfg.model)
    trained = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    unseen = synthetic(20, 99)

    def gain(model) -> float:
        wins = 0
        for r in unseen:
            good, bad = (r["response_a"], r["response_b"]) if r["p_a"] > 0.5 else \
                (r["response_b"], r["response_a"])
            d_good = _sum_logprob(model, tok, r["prompt"], good) - \
                _sum_logprob(initial, tok, r["prompt"], good)
            d_bad = _sum_logprob(model, tok, r["prompt"], bad) - \
                _sum_logprob(initial, tok, r["prompt"], bad)
            wins += d_good > d_bad
        return wins / len(unseen)

    assert gain(trained) >= 0.9
    assert gain(initial) == 0.0  # no change against itself: the check can fail
    assert run_dpo(cfg, tmp_path, str(f)) == model_dir  # done: a rerun skips


def test_bad_comparisons_are_named_before_dpo_starts(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    rows = synthetic(3, 1)
    rows[0]["p_a"] = "high"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    code, _, err = run_cli("dpo", "--config", str(TINY), "--output", str(tmp_path / "out"),
                           "--comparisons", str(f))
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert "line 1: p_a must be a number in [0, 1], got 'high'" in err
    assert not (tmp_path / "out" / "dpo").exists()
