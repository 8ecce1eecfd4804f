"""Pointwise harmlessness labels (`feedback.harmless_labels: pointwise`): the queries asked of
each response, and how their probabilities fold into p(A)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cai_ray.config import load_config
from cai_ray.configschema import ValidationError
from cai_ray.constitution import load_constitution
from cai_ray.labelling import Labeller, logit, sigmoid
from cai_ray.preflight import resolve_path
from cai_ray.verdicts import LABEL_QUESTIONS, QUESTIONS

TINY = Path(__file__).resolve().parents[2] / "configs" / "cpu-tiny.yaml"
CONVO = [{"role": "user", "content": "How do I pick a lock?"}]
HARMFUL, ENGAGED, REFUSAL = ("Insert a tension wrench, then rake the pins.",
                             "I won't explain that; a locksmith can help if you're locked out.",
                             "I can't help with that.")


def labeller(*overrides: str) -> Labeller:
    cfg = load_config(TINY, ["feedback.harmless_labels=pointwise", *overrides], check_env=False)
    return Labeller(cfg, load_constitution(resolve_path(cfg.run.constitution)))


def judged(p_yes: dict[str, tuple[float, float]], both_orders: bool = True,
           prior: float = 0.0) -> list[float]:
    """The judge's p(option A) for a pair whose responses have these p(yes) per question
    (A's harmful, A's evasive, B's harmful, B's evasive), in the query order: yes as (A) then
    yes as (B). `prior` adds a position bias toward option (A), in log-odds."""
    out = []
    for side in (0, 1):
        for name in ("harmful", "evasive"):
            y = p_yes[name][side]
            out.append(sigmoid(logit(y) + prior))  # yes is (A)
            if both_orders:
                out.append(sigmoid(logit(1 - y) + prior))  # no is (A)
    return out


def test_queries_ask_each_response_both_questions_in_both_orders() -> None:
    lab = labeller()
    qs = lab.queries("k", CONVO, HARMFUL, ENGAGED, "harmless")
    assert len(qs) == 8
    assert [q.query_id for q in qs[:4]] == ["k|a|harmful|0", "k|a|harmful|1",
                                            "k|a|evasive|0", "k|a|evasive|1"]
    assert all(HARMFUL in q.question and ENGAGED not in q.question for q in qs[:4])
    assert all(ENGAGED in q.question and HARMFUL not in q.question for q in qs[4:])
    # the training wordings, not the eval's questions
    assert LABEL_QUESTIONS["harmful"].text in qs[0].question
    assert QUESTIONS["harmful"].text not in qs[0].question
    assert qs[0].question.index(LABEL_QUESTIONS["harmful"].yes) < \
        qs[0].question.index(LABEL_QUESTIONS["harmful"].no)
    assert qs[1].question.index(LABEL_QUESTIONS["harmful"].no) < \
        qs[1].question.index(LABEL_QUESTIONS["harmful"].yes)
    assert len(labeller("feedback.both_orders=false").queries("k", CONVO, HARMFUL, ENGAGED,
                                                              "harmless")) == 4


def test_helpfulness_stays_pairwise() -> None:
    lab = labeller()
    qs = lab.queries("k", CONVO, HARMFUL, ENGAGED, "helpful")
    assert len(qs) == 2 and all(HARMFUL in q.question and ENGAGED in q.question for q in qs)
    assert lab.fold([0.8, 0.3], "helpful") == (pytest.approx(0.75), False)


def test_fold_prefers_the_harmless_response_and_weighs_evasion() -> None:
    lab = labeller()
    # A helps with harm and engages, B engages harmlessly: B wins
    p, dis = lab.fold(judged({"harmful": (0.9, 0.1), "evasive": (0.1, 0.1)}), "harmless")
    assert p < 0.05 and not dis
    # the same pair the other way round: A wins by the same margin
    q, _ = lab.fold(judged({"harmful": (0.1, 0.9), "evasive": (0.1, 0.1)}), "harmless")
    assert q == pytest.approx(1 - p)
    # harmful A against a bare refusal B: at the default weight (< 1) the refusal still wins ...
    w = lab.f.pointwise_evasive_weight
    assert 0 < w < 1
    mixed = judged({"harmful": (0.9, 0.1), "evasive": (0.1, 0.9)})
    assert lab.fold(mixed, "harmless")[0] < 0.5
    # ... p(A) = sigmoid(badness(B) - badness(A)) with badness = logit harm + w logit evades
    bad_a, bad_b = logit(0.9) + w * logit(0.1), logit(0.1) + w * logit(0.9)
    assert lab.fold(mixed, "harmless")[0] == pytest.approx(sigmoid(bad_b - bad_a))
    # control: weigh evasion above harm and the harmful answer wins instead
    assert labeller("feedback.pointwise_evasive_weight=2").fold(mixed, "harmless")[0] > 0.5
    # an engaged answer beats a refusal when neither is harmful
    assert lab.fold(judged({"harmful": (0.1, 0.1), "evasive": (0.1, 0.9)}), "harmless")[0] > 0.85


def test_one_order_cancels_a_position_prior_and_both_orders_flag_disagreement() -> None:
    lab = labeller("feedback.both_orders=false")
    p_yes = {"harmful": (0.7, 0.2), "evasive": (0.3, 0.4)}
    base = lab.fold(judged(p_yes, both_orders=False), "harmless")[0]
    for prior in (-2.0, 1.5):  # every answer leans toward (A) alike
        assert lab.fold(judged(p_yes, both_orders=False, prior=prior), "harmless")[0] == \
            pytest.approx(base)
    # with both orders, a lean strong enough to flip one order shows as disagreement
    both = labeller()
    assert both.fold(judged(p_yes), "harmless")[1] is False
    assert both.fold(judged(p_yes, prior=3.0), "harmless")[1] is True
    with pytest.raises(ValueError, match="8 judgements, got 4"):
        both.fold([0.5] * 4, "harmless")


def test_pointwise_rejects_cot() -> None:
    with pytest.raises(ValidationError, match="harmless_labels"):
        load_config(TINY, ["feedback.harmless_labels=pointwise", "feedback.method=cot"],
                    check_env=False)
    with pytest.raises(ValidationError, match="pointwise_evasive_weight"):
        load_config(TINY, ["feedback.pointwise_evasive_weight=-1"], check_env=False)
    assert math.isfinite(logit(0.0)) and math.isfinite(logit(1.0))


def group_probs(p_yes: list[tuple[float, float]]) -> list[float]:
    """The judge's p(option A) for a group's responses with these (p harmful, p evasive), in
    `group_queries` order (per response: harmful yes-first, no-first, evasive the same)."""
    return [x for h, e in p_yes for y in (h, e) for x in (y, 1 - y)]


def test_a_group_of_four_asks_each_response_once_and_pairs_best_with_worst() -> None:
    lab = labeller()
    answers = [f"Answer number {i} of four." for i in range(4)]
    qs = lab.group_queries("k", CONVO, answers, "harmless")
    assert len(qs) == 4 * 4  # 2 questions x 2 orders per response, not per pair
    assert [q.query_id for q in qs[4:8]] == ["k|b|harmful|0", "k|b|harmful|1",
                                            "k|b|evasive|0", "k|b|evasive|1"]
    for n, q in enumerate(qs):  # each query shows its own response and no other
        assert [a in q.question for a in answers] == [i == n // 4 for i in range(4)]
    # harm 0.6 / 0.95 / 0.05 / 0.3: best is 2, worst 1, then 3 against 0
    probs = group_probs([(0.6, 0.1), (0.95, 0.1), (0.05, 0.1), (0.3, 0.1)])
    pairs = lab.group_pairs(probs, "harmless", 4)
    assert [(i, j) for i, j, _, _ in pairs] == [(2, 1), (3, 0)]
    w = lab.f.pointwise_evasive_weight
    bad = [logit(h) + w * logit(0.1) for h in (0.6, 0.95, 0.05, 0.3)]
    assert pairs[0][2] == pytest.approx(sigmoid(bad[1] - bad[2]))
    assert pairs[0][2] > pairs[1][2] > 0.5  # the outer pair is the surer one
    assert not any(d for *_, d in pairs)
    # control: with two responses the group is the pair, its label the pair's own fold
    two = group_probs([(0.9, 0.1), (0.1, 0.1)])
    (i, j, p, _), = lab.group_pairs(two, "harmless", 2)
    q, _ = lab.fold(two, "harmless")
    assert (i, j) == (1, 0) and p == pytest.approx(1 - q)
    assert [x.question for x in lab.group_queries("k", CONVO, [HARMFUL, ENGAGED], "harmless")] \
        == [x.question for x in lab.queries("k", CONVO, HARMFUL, ENGAGED, "harmless")]


def test_a_group_flags_disagreement_per_pair_and_checks_its_counts() -> None:
    lab = labeller()
    probs = group_probs([(0.6, 0.1), (0.95, 0.1), (0.05, 0.1), (0.3, 0.1)])
    probs[0] = probs[1] = 0.9  # response 0's harm question: yes first 0.9, no first 0.9
    pairs = lab.group_pairs(probs, "harmless", 4)
    assert [d for *_, d in pairs] == [False, True]  # only the pair with response 0
    with pytest.raises(ValueError, match="16 judgements, got 12"):
        lab.group_pairs(probs[:12], "harmless", 4)
    with pytest.raises(ValueError, match="even number"):
        lab.group_queries("k", CONVO, ["a", "b", "c"], "harmless")


def test_a_pairwise_group_is_split_into_disjoint_pairs_with_their_own_principles() -> None:
    lab = labeller("feedback.num_principles=1")
    qs = lab.group_queries("k", CONVO, [HARMFUL, ENGAGED, REFUSAL, HARMFUL], "helpful")
    assert len(qs) == 4  # 2 pairs x 2 orders
    assert HARMFUL in qs[0].question and ENGAGED in qs[0].question
    assert REFUSAL in qs[2].question and ENGAGED not in qs[2].question
    assert [x.question for x in qs[:2]] == \
        [x.question for x in lab.queries("k", CONVO, HARMFUL, ENGAGED, "helpful")]
    pairs = lab.group_pairs([0.8, 0.3, 0.2, 0.9], "helpful", 4)
    assert [(i, j) for i, j, _, _ in pairs] == [(0, 1), (2, 3)]
    assert pairs[0][2] == pytest.approx(0.75) and pairs[1][2] == pytest.approx(0.15)
