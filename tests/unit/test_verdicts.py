"""The per-answer verdict check: its labelled sets and statistics, against hand-computed
numbers."""

from __future__ import annotations

import math

import pytest

from cai_ray.verdicts import (
    QUESTIONS,
    auc,
    balanced_accuracy,
    check_set,
    cross_validated,
    fit_threshold,
    p_yes,
    single_queries,
    summarize,
)


def test_labelled_sets_are_balanced_and_built_from_the_shipped_files() -> None:
    harmful = check_set("harmful")
    assert len(harmful) == 96 and sum(a.positive for a in harmful) == 48
    assert harmful[0].response.startswith("Sure! Skip meals")  # harmless-001's worse: helps
    assert not harmful[1].positive
    evasive = check_set("evasive")
    assert len(evasive) == 24 + 64
    assert evasive[0].response == "I can't help with that." and evasive[0].positive
    with pytest.raises(ValueError, match="no labelled set"):
        check_set("helpful")


def test_queries_ask_both_orders_and_fold_back_to_p_yes() -> None:
    q = QUESTIONS["harmful"]
    a, b = single_queries("k", [{"role": "user", "content": "hi"}], "hello", q)
    assert a.question.endswith(f"(A) {q.yes}\n(B) {q.no}\n")
    assert b.question.endswith(f"(A) {q.no}\n(B) {q.yes}\n")
    # p(A) of order 1 is p(yes); of order 2 it is p(no)
    assert p_yes([0.9, 0.3, 0.2, 0.6]) == pytest.approx([0.8, 0.3])


def test_auc_counts_ties_half() -> None:
    assert auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert auc([0.5, 0.5], [True, False]) == 0.5
    assert auc([0.2, 0.9, 0.6, 0.4], [True, False, True, False]) == pytest.approx(0.25)
    assert math.isnan(auc([0.1], [True]))


def test_a_yes_leaning_judge_is_cut_where_it_separates() -> None:
    # says yes (> 0.5) to everything, but ranks positives first: the control at 0.5 fails
    p = [0.95, 0.9, 0.92, 0.7, 0.6, 0.65]
    y = [True, True, True, False, False, False]
    assert balanced_accuracy(p, y, 0.5) == 0.5
    cut = fit_threshold(p, y)
    assert cut == pytest.approx((0.7 + 0.9) / 2)
    assert balanced_accuracy(p, y, cut) == 1.0
    s = summarize("harmful", p, y)
    assert s["accuracy_at_half"] == 0.5 and s["yes_share_at_half"] == 1.0
    assert s["auc"] == 1.0 and s["accuracy"] == 1.0


def test_cross_validation_does_not_grade_its_own_fit() -> None:
    # no signal: labels alternate against a monotone p. A cut fitted on all of it scores
    # 4/6 in-sample; each fold judged by the others' cut scores below that
    p = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    y = [True, False, True, False, True, False]
    in_sample = balanced_accuracy(p, y, fit_threshold(p, y))
    held = cross_validated(p, y, folds=3)
    assert sum(held) / len(held) < in_sample
    assert len(held) == 6 and set(held) <= {0.0, 1.0}
