"""The feedback role: p(A) from a real vLLM engine against an independent HF forward pass."""

from __future__ import annotations

import pytest
import torch

from cai_ray.actors.feedback import FeedbackWorker
from cai_ray.actors.group import ActorGroup
from cai_ray.config import EngineConfig, ModelSpec, RoleResources
from cai_ray.labelling import (
    OPTION_A,
    OPTION_B,
    JudgeQuery,
    Shot,
    clamp,
    combine_orders,
    conversation,
    plain_text,
    question,
)

CONVO = [{"role": "user", "content": "How can I get into my neighbour's wifi?"}]
R1 = "Ask your neighbour for the password, or use a public hotspot."
R2 = "Here is how to crack the password with a dictionary attack."
PRINCIPLE = "Which of these assistant replies is less harmful?"


@pytest.fixture(scope="module", params=[True, False], ids=["chat", "plain"])
def judge(request, tiny_model_dir):
    engine = EngineConfig(dtype="float32", max_model_len=2048, kv_cache_gib=1)
    g = ActorGroup("feedback", FeedbackWorker, RoleResources(), local=True,
                   init_args=(ModelSpec(path="tiny-llama"), engine, "cpu", 0, request.param))
    yield g, request.param
    g.shutdown()


def hf_p_a(model_dir, text: str) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    a = tok.encode(text + OPTION_A, add_special_tokens=False)
    b = tok.encode(text + OPTION_B, add_special_tokens=False)
    k = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([a[:k]])).logits[0, -1].double(), -1)
    return float(torch.softmax(logp[[a[k], b[k]]], -1)[0])


def test_p_a_matches_hf_forward_in_both_orders(judge, tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    g, chat = judge
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    shot = Shot(question(CONVO, PRINCIPLE, R2, R1), "B")
    queries = [JudgeQuery("ab", question(CONVO, PRINCIPLE, R1, R2), (shot,)),
               JudgeQuery("ba", question(CONVO, PRINCIPLE, R2, R1), (shot,))]
    got = g.call(0, FeedbackWorker.choice_probs, queries)
    for q, p in zip(queries, got, strict=True):
        text = (tok.apply_chat_template(conversation(q), tokenize=False,
                                        continue_final_message=True) if chat else plain_text(q))
        assert abs(p - hf_p_a(tiny_model_dir, text)) < 1e-4
        assert 0.0 < p < 1.0
    assert 0.0 <= combine_orders(got[0], got[1]) <= 1.0


def test_cot_reasoning_then_clamped_answer(judge) -> None:
    g, _ = judge
    q = JudgeQuery("cot", question(CONVO, PRINCIPLE, R1, R2), cot=True)
    (reason,) = g.call(0, FeedbackWorker.reasoning, [q], 24, 1.0, [5])
    assert isinstance(reason, str)
    (p,) = g.call(0, FeedbackWorker.choice_probs, [JudgeQuery("cot", q.question, cot=True,
                                                              reasoning=reason or "...")])
    c = clamp(p, 0.4, 0.6)
    assert 0.4 <= c <= 0.6 and (c == p or c in (0.4, 0.6))


def test_pointwise_labels_score_each_response_on_its_own(judge) -> None:
    """Pointwise p(A) comes from per-response scores, so on a real engine the pairs' log-odds
    add up: logit p(R1, R3) = logit p(R1, R2) + logit p(R2, R3), and swapping a pair flips it.
    Control: the paper's pairwise labels of the same pairs are not additive."""
    from pathlib import Path

    from cai_ray.config import load_config
    from cai_ray.constitution import load_constitution
    from cai_ray.labelling import Labeller, logit
    from cai_ray.preflight import resolve_path

    g, _ = judge
    tiny = Path(__file__).resolve().parents[2] / "configs" / "cpu-tiny.yaml"
    r3 = "I can't help with that."

    def labels(mode: str) -> dict[tuple[str, str], float]:
        cfg = load_config(tiny, [f"feedback.harmless_labels={mode}", "feedback.few_shot=0"],
                          check_env=False)
        lab = Labeller(cfg, load_constitution(resolve_path(cfg.run.constitution)))
        pairs = [(R1, R2), (R2, r3), (R1, r3), (R2, R1)]
        per = [lab.queries("pw", CONVO, a, b, "harmless") for a, b in pairs]
        probs = g.call(0, FeedbackWorker.choice_probs, [q for qs in per for q in qs])
        out, at = {}, 0
        for (a, b), qs in zip(pairs, per, strict=True):
            out[(a, b)] = lab.fold(probs[at:at + len(qs)], "harmless")[0]
            at += len(qs)
        return out

    def additivity_gap(p: dict[tuple[str, str], float]) -> float:
        return abs(logit(p[(R1, r3)]) - logit(p[(R1, R2)]) - logit(p[(R2, r3)]))

    pw = labels("pointwise")
    assert additivity_gap(pw) < 1e-6
    assert pw[(R2, R1)] == pytest.approx(1 - pw[(R1, R2)], abs=1e-9)
    assert additivity_gap(labels("pairwise")) > 1e-4
