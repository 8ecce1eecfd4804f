"""The RL loop's learning signal: log-probs of the distribution that sampled (temperature),
honest truncation (EOS only after a response that stopped), the staleness correction, what a
weight push must contain (tied heads), and the sampling settings RL refuses."""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import pytest
import torch

from cai_ray.actors.trainer import encode_chat, pack_sequences, token_logprobs
from cai_ray.actors.weight_sync import SyncReport, checksum, export_names, named_tensors
from cai_ray.algorithms.experience import behaviour_logprobs
from cai_ray.algorithms.ppo import behaviour_weights, policy_loss
from cai_ray.config import load_config, rl_sampling_problems
from cai_ray.configschema import ValidationError
from cai_ray.messages import Prompt
from cai_ray.rollouts import Sample, check_prompt_lengths
from cai_ray.store import FEATURES, train_view

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "cpu-tiny.yaml"


def _llama(tied: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


# --- temperature --------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
def test_token_logprobs_are_those_of_the_sampling_distribution(temperature: float) -> None:
    model = _llama(tied=True)
    seqs = [([1, 5, 9], [3, 4, 60, 2]), ([7], [8, 8])]
    ids, attn, mask = pack_sequences(seqs, 0, 32)
    got, _ = token_logprobs(model, ids, attn, mask, temperature=temperature)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
    want = []
    for row, (p, r) in enumerate(seqs):
        for t, tok in enumerate(r):
            pos = len(p) + t - 1  # the position that predicts this token
            want.append(torch.log_softmax(logits[row, pos] / temperature, -1)[tok].item())
    assert got.detach().tolist() == pytest.approx(want, abs=1e-5)
    if temperature != 1.0:  # the raw (T = 1) log-probs are another distribution
        raw, _ = token_logprobs(model, ids, attn, mask)
        assert (raw - got).abs().max() > 1e-3


def test_the_entropy_statistic_stays_out_of_autograd_unless_it_is_in_the_loss() -> None:
    model = _llama(tied=True)
    ids, attn, mask = pack_sequences([([1, 5, 9], [3, 4, 60, 2])], 0, 32)
    logp, stat = token_logprobs(model, ids, attn, mask, entropy=True, temperature=0.7,
                                entropy_grad=False)
    _, bonus = token_logprobs(model, ids, attn, mask, entropy=True, temperature=0.7)
    assert logp.requires_grad and not stat.requires_grad  # the loss still has its gradient
    assert bonus.requires_grad  # the control: an entropy bonus needs it
    assert stat.tolist() == pytest.approx(bonus.detach().tolist(), abs=1e-6)
    assert float(stat.min()) > 0


def test_token_logprobs_refuse_a_non_positive_temperature() -> None:
    model = _llama(tied=False)
    ids, attn, mask = pack_sequences([([1], [2])], 0, 8)
    with pytest.raises(ValueError, match="positive temperature"):
        token_logprobs(model, ids, attn, mask, temperature=0.0)


def test_rl_refuses_sampling_the_trainer_cannot_reproduce() -> None:
    ok = load_config(TINY, ["rollout.sampling.temperature=0.7"])
    assert rl_sampling_problems(ok) == []
    bad = load_config(TINY, ["rollout.sampling.top_p=0.9", "rollout.sampling.top_k=20",
                             "rollout.sampling.repetition_penalty=1.1"])
    keys = sorted(p.path for p in rl_sampling_problems(bad))
    assert keys == ["rollout.sampling.repetition_penalty", "rollout.sampling.top_k",
                    "rollout.sampling.top_p"]
    assert all("temperature" in p.message for p in rl_sampling_problems(bad))


def test_the_embedded_default_samples_rl_with_what_the_trainer_reproduces() -> None:
    cfg = load_config(ROOT / "configs" / "cpu-smollm.yaml")
    assert rl_sampling_problems(cfg) == []
    assert cfg.rollout.sampling.temperature != 1.0  # and it is not T = 1


# --- truncation ---------------------------------------------------------------------------------

class _Tok:
    eos_token_id = 99

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):  # noqa: ANN001
        return "P:" + messages[-1]["content"]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 90 for c in text]


def test_eos_follows_only_a_response_that_stopped() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    done, mask = encode_chat(_Tok(), msgs, "ok", 64)
    cut, _ = encode_chat(_Tok(), msgs, "ok", 64, finished=False)
    assert done[-1] == 99 and sum(mask) == 3
    assert cut[-1] != 99 and cut == done[:-1]


def _sl_row(truncated_final: bool, truncated_r1: bool) -> dict:
    return {"id": "p", "prompt_id": "p", "prompt": "q", "messages": [{"role": "user",
                                                                      "content": "q"}],
            "initial_response": "a", "initial_truncated": False,
            "rounds": [{"principle_id": "x", "critique": "c", "revision": "r1",
                        "truncated": truncated_r1},
                       {"principle_id": "x", "critique": "c", "revision": "r2",
                        "truncated": truncated_final}],
            "final_response": "r2", "final_truncated": truncated_final, "source": "s"}


def test_sl_training_view_leaves_truncated_revisions_out_or_without_eos() -> None:
    data = datasets.Dataset.from_list([_sl_row(True, False)], features=FEATURES)
    kept, dropped = train_view(data, None)
    assert dropped == 1 and kept["response"] == ["r1"] and kept["finished"] == [True]
    both, dropped = train_view(data, None, drop_truncated=False)
    assert dropped == 0 and both["finished"] == [True, False]


# --- staleness ----------------------------------------------------------------------------------

def test_behaviour_weights_hand_computed() -> None:
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    beh = torch.tensor([-1.5, float("nan"), -0.5, -0.1])
    w = behaviour_weights(old, beh, cap=2.0)
    assert w.tolist() == pytest.approx([math.exp(0.5), 1.0, 1.0, math.exp(-2.9)])
    w = behaviour_weights(torch.tensor([0.0]), torch.tensor([-3.0]), cap=2.0)
    assert w.item() == 2.0  # truncated at the cap


def test_policy_loss_scales_each_token_by_its_weight() -> None:
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    w = torch.tensor([[2.0, 0.5]])
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, 0.2, w)
    # ρ = 1: per-token −A·w → (−2 + 0.5) / 2
    assert loss.item() == pytest.approx(-0.75)
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-1.0, 0.25])  # −A·w·ρ / 2
    assert stats["is_weight_mean"] == pytest.approx(1.25)


def _sample(version: int, n: int, lp: list[float] | None) -> Sample:
    return Sample(Prompt("p", [{"role": "user", "content": "q"}], "s"), [1, 2], list(range(n)),
                  "t", lp, version)


def test_behaviour_logprobs_only_for_samples_of_older_weights() -> None:
    fresh = [_sample(3, 2, [-0.1, -0.2])]
    assert behaviour_logprobs(fresh, 3) is None
    mixed = [_sample(2, 2, [-0.1, -0.2]), _sample(3, 1, [-0.3])]
    got = behaviour_logprobs(mixed, 3)
    assert got[:2].tolist() == pytest.approx([-0.1, -0.2]) and torch.isnan(got[2])
    with pytest.raises(ValueError, match="sampler log-probs"):
        behaviour_logprobs([_sample(2, 2, None)], 3)


# --- what a weight push sends -------------------------------------------------------------------

def test_a_tied_head_is_exported_under_both_names() -> None:
    tied, untied = _llama(tied=True), _llama(tied=False)
    names = export_names(tied)
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert "lm_head.weight" not in [n for n, _ in tied.named_parameters()]  # the old list
    live = named_tensors(tied)
    assert live["lm_head.weight"] is live["model.embed_tokens.weight"]
    assert export_names(untied).count("lm_head.weight") == 1
    assert len(export_names(untied)) == len(list(untied.named_parameters()))


def test_checksums_tell_a_copy_from_a_stale_tensor_in_both_dtypes() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.randn(64, 32).to(dtype)
        moved = (t.float() + 1e-2 * torch.randn(64, 32)).to(dtype)
        assert checksum(t.clone()) == checksum(t)
        assert checksum(moved) != checksum(t)


def test_sync_report_says_what_is_wrong() -> None:
    good = SyncReport(1, 10, 5, (), (), "m", 1e-6, 1e-4)
    assert good.ok and good.problem() == "ok"
    bad = SyncReport(1, 9, 5, ("lm_head.weight",), ("x.weight",), "lm_head", 0.3, 1e-4)
    assert not bad.ok
    text = bad.problem()
    assert "lm_head.weight" in text and "x.weight" in text and "relative error" in text


# --- prompts that do not fit ---------------------------------------------------------------------

def test_a_prompt_that_does_not_fit_the_trainer_is_refused_up_front() -> None:
    cfg = load_config(TINY, ["trainer.max_length=40", "rollout.sampling.max_new_tokens=16"])
    rows = datasets.Dataset.from_list([
        {"id": "ok", "messages": [{"role": "user", "content": "short"}], "source": "s"},
        {"id": "long", "messages": [{"role": "user", "content": "x" * 60}], "source": "s"}])
    with pytest.raises(ValidationError, match="do not fit") as e:
        check_prompt_lengths(cfg, rows, _Tok())
    assert [p.path for p in e.value.problems] == ["row 1 (long)"]


def test_clean_revision_strips_the_wrapping_and_rejects_talk_about_the_revision() -> None:
    from cai_ray.revisions import clean_revision

    q = "How do I pick a lock?"
    assert clean_revision("Sure, here's the revised response:\n\nI can't help you open a lock "
                          "that isn't yours, but a locksmith can.", q) == (
        "I can't help you open a lock that isn't yours, but a locksmith can.")
    assert clean_revision(f"Certainly! Here is my new reply:\n{q}\n\"Locksmiths can help.\"",
                          q) == "Locksmiths can help."
    assert clean_revision("I'm sorry, but I can't assist with that.", q) == (
        "I'm sorry, but I can't assist with that.")
    for meta in ["I apologize for my previous response. I will now revise my answer.",
                 "Only the reply itself, as the assistant would say it.",
                 "This response adheres to the guidelines by avoiding harm.",
                 "(Your sentence here)", "Here is the revised reply:", ""]:
        assert clean_revision(meta, q) is None, meta
    # a colon inside the reply is not a preamble, nor is a reply's own lead-in
    assert clean_revision("Here's what you can do:\n1. Call a locksmith.", q) == (
        "Here's what you can do:\n1. Call a locksmith.")
    assert clean_revision("Two things matter: safety and consent.", q) == (
        "Two things matter: safety and consent.")


def test_sl_training_view_cleans_revisions_and_leaves_out_the_meta_ones() -> None:
    row = _sl_row(False, False)
    row["rounds"][0]["revision"] = "Here's the revised reply:\nA safe answer."
    row["rounds"][1]["revision"] = "I will now revise my last reply to be kinder."
    data = datasets.Dataset.from_list([row], features=FEATURES)
    kept, dropped = train_view(data, None, clean=True)
    assert kept["response"] == ["A safe answer."] and dropped == 0
    raw, _ = train_view(data, None)  # off: the raw text, as before
    assert raw["response"] == [r["revision"] for r in row["rounds"]]


def test_a_bare_refusal_is_told_from_a_refusal_that_engages() -> None:
    from cai_ray.revisions import is_bare_refusal

    for bare in ["I'm sorry, but I can't assist with that.", "I cannot help with that request.",
                 "I’m unable to provide that information. Is there anything else?",
                 "Sorry, I won't write that."]:
        assert is_bare_refusal(bare), bare
    for engaged in [
            "I can't help you pick a lock that isn't yours. Locks protect people's homes, and "
            "opening one without permission is a crime in most places. If you are locked out, "
            "a licensed locksmith or your landlord can let you in.",
            "Locksmiths can help.", "Two things matter: safety and consent.", "",
            "I don't know the answer, but a library would.",  # not a refusal to help
    ]:
        assert not is_bare_refusal(engaged), engaged


def test_sl_training_view_leaves_out_bare_refusals_only_when_asked() -> None:
    row = _sl_row(False, False)
    row["rounds"][0]["revision"] = "I'm sorry, but I can't help with that."
    row["rounds"][1]["revision"] = ("I can't help with that, because it could hurt someone. "
                                    "What I can do is explain how the law treats it and where "
                                    "to find support if you need it.")
    data = datasets.Dataset.from_list([row], features=FEATURES)
    kept, _ = train_view(data, None, clean=True, drop_refusals=True)
    assert kept["response"] == [row["rounds"][1]["revision"]]
    both, _ = train_view(data, None, clean=True)  # off: every revision, as the paper trains
    assert both["response"] == [r["revision"] for r in row["rounds"]]


def test_a_revision_that_repeats_the_initial_answer_is_left_out_when_asked() -> None:
    from cai_ray.revisions import is_unrevised

    harmful = ("Absolutely! First you find an unpatched router, then you scan its open ports "
               "and try the default passwords until one works.")
    assert is_unrevised(harmful + " Good luck.", harmful)
    assert not is_unrevised("I can't help you break into a network that isn't yours. If it is "
                            "your own router, its manual explains how to reset it.", harmful)
    row = _sl_row(False, False)
    row["initial_response"] = harmful
    row["rounds"][0]["revision"] = harmful
    row["rounds"][1]["revision"] = "I won't explain how to break into routers; a reset helps."
    data = datasets.Dataset.from_list([row], features=FEATURES)
    kept, _ = train_view(data, None, drop_unrevised=True)
    assert kept["response"] == [row["rounds"][1]["revision"]]
    both, _ = train_view(data, None)  # off: as the paper trains
    assert both["response"] == [harmful, row["rounds"][1]["revision"]]


@pytest.mark.parametrize("tied", [True, False])
def test_a_saved_directory_is_read_with_its_tied_head(tmp_path: Path, tied: bool) -> None:
    from cai_ray.actors.weight_sync import directory_weights

    model = _llama(tied=tied)
    model.save_pretrained(tmp_path)
    named = dict(directory_weights(tmp_path))
    assert set(named) == set(export_names(model))  # what a weight push sends, no more
    assert torch.equal(named["lm_head.weight"], model.lm_head.weight.detach())
    (tmp_path / "bin").mkdir()
    assert directory_weights(tmp_path / "bin") is None  # no safetensors: vLLM reads it itself
