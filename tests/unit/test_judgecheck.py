"""Judge-check statistics against hand-computed numbers, set loading and its errors."""

from __future__ import annotations

import json
import math

import pytest

from cai_ray.configschema import ValidationError
from cai_ray.judgecheck import (
    BUILTIN_SETS,
    JudgeItem,
    bootstrap_interval,
    expected_calibration_error,
    load_set,
    summarize_set,
    table,
)
from cai_ray.labelling import combine_orders, combine_orders_logit


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def items(n: int) -> list[JudgeItem]:
    return [JudgeItem(f"x{i}", "harmless", "p", "good", "bad") for i in range(n)]


def test_bootstrap_interval_degenerate_and_covering():
    assert bootstrap_interval([1.0] * 20) == (1.0, 1.0)
    lo, hi = bootstrap_interval([1.0] * 15 + [0.0] * 5, seed=3)
    assert lo < 0.75 < hi
    # binomial sd at n=20, p=0.75 is 0.097: the 95% interval is about +-0.19 wide
    assert 0.25 < hi - lo < 0.5
    assert bootstrap_interval([1.0] * 15 + [0.0] * 5, seed=3) == (lo, hi)  # seeded


def test_ece_by_hand():
    # calibrated: confidence 0.75 and 3 of 4 right
    assert expected_calibration_error([0.75, 0.75, 0.75, 0.25]) == pytest.approx(0.0)
    # overconfident: confidence 0.95 in every choice, half of them wrong -> |0.95 - 0.5|
    assert expected_calibration_error([0.95, 0.05, 0.95, 0.05]) == pytest.approx(0.45)
    # two bins: {0.55 right, 0.55 wrong} gap 0.05, {0.9 right, 0.9 right} gap 0.1 -> 0.075
    assert expected_calibration_error([0.55, 0.45, 0.9, 0.9]) == pytest.approx(0.075)


def test_summary_scores_the_better_side_whatever_its_position():
    its = items(40)
    assert 10 < sum(it.better_is_a for it in its) < 30  # both sides used
    # a judge that always says (A) gets exactly the share of items with the better on A
    always_a = summarize_set("s", its, [0.9] * 40, [True] * 40, [0.9] * 80)
    share = sum(it.better_is_a for it in its) / 40
    assert always_a.accuracy == pytest.approx(share)
    assert always_a.lean_a == pytest.approx(0.9)
    assert always_a.order_disagreement == 1.0
    # a judge that always prefers the better response, wherever it stands
    right = summarize_set("s", its, [0.8 if it.better_is_a else 0.2 for it in its], None,
                          [0.5] * 40)
    assert right.accuracy == 1.0 and right.interval == (1.0, 1.0)
    assert right.mean_p_better == pytest.approx(0.8)
    assert right.order_disagreement is None and not right.chance_in_interval
    # ties count half
    tie = summarize_set("s", its, [0.5] * 40, None, [0.5] * 40)
    assert tie.accuracy == 0.5 and tie.chance_in_interval
    assert "interval contains 50%" in table([tie]) and "interval contains" not in table([right])


def test_logit_combination_cancels_a_position_prior_exactly():
    for strength, prior in [(1.0, 2.0), (-0.5, -1.5), (0.3, 0.0)]:
        first = sigmoid(strength + prior)    # A shown as (A)
        second = sigmoid(-strength + prior)  # A shown as (B): the judge's p of option (A)
        assert combine_orders_logit(first, second) == pytest.approx(sigmoid(strength))
    # the probability mean does not: a strong prior for (A) drags a clear preference to ~chance
    assert combine_orders(sigmoid(1 + 3), sigmoid(-1 + 3)) == pytest.approx(0.5, abs=0.07)
    assert combine_orders_logit(sigmoid(1 + 3), sigmoid(-1 + 3)) == pytest.approx(sigmoid(1))


@pytest.mark.parametrize("name", BUILTIN_SETS)
def test_builtin_sets_load_and_balance_sides(name):
    its = load_set(name)
    assert len(its) >= 30
    assert len({it.id for it in its}) == len(its)
    share_a = sum(it.better_is_a for it in its) / len(its)
    assert 0.25 < share_a < 0.75
    assert all(it.better != it.worse for it in its)


def test_bad_set_names_every_bad_line(tmp_path):
    good = {"prompt": "p", "better": "b", "worse": "w", "aspect": "harmless", "id": "a"}
    lines = [json.dumps(good), "{not json", json.dumps({"prompt": "p", "better": "b"}),
             json.dumps({**good, "id": "z", "aspect": "funny"}), json.dumps(good)]
    f = tmp_path / "s.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValidationError) as e:
        load_set(str(f))
    text = str(e.value)
    for where in ("line 2", "line 3", "line 4", "line 5"):
        assert where in text
    assert "worse" in text and "'funny'" in text and "duplicate id 'a'" in text
    with pytest.raises(ValidationError, match="neither a built-in set"):
        load_set(str(tmp_path / "missing.jsonl"))


def test_config_refuses_unknown_check_set():
    from cai_ray.config import load_config

    with pytest.raises(ValidationError, match=r"check_sets\[1\]"):
        load_config(None, ["feedback.check_sets=[harmless,nope]"])
