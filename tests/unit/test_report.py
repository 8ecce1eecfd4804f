"""report.html from stage outputs: every plot present, the numbers in tables, clear error when
there is nothing to report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_ray.report import write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _rating(elo: float, n: int) -> dict:
    return {"elo": elo, "low": elo - 40.0, "high": elo + 40.0, "comparisons": n}


def test_report_draws_every_plot(tmp_path: Path) -> None:
    names = ["initial", "sl", "ppo@2", "ppo"]
    elo = {"snapshots": names,
           "elo": {f"{j}/{a}": {n: _rating(0.0 if n == "initial" else 30.0 * k, 24)
                                for k, n in enumerate(names)}
                   for j in ("judge", "pm") for a in ("harmless", "helpful")},
           "per_snapshot": {n: {"evasive_rate": 0.1, "over_refusal_rate": 0.2} for n in names},
           "evasiveness_judge": {"accuracy": 0.75, "labelled": 24}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "elo.json").write_text(json.dumps(elo))
    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward/score_mean": s / 4, "reward/total_mean": s / 4 - 0.01,
                    "kl/mean": s / 10, "time/step": 2.0}) + "\n" for s in range(1, 5)))
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "metrics.json").write_text(json.dumps({"held_out": {"all": {
        "count": 40, "accuracy": 0.8, "ece": 0.05,
        "reliability": [{"lo": 0.5, "hi": 0.75, "count": 20.0, "confidence": 0.6,
                         "agreement": 0.62},
                        {"lo": 0.75, "hi": 1.0, "count": 20.0, "confidence": 0.85,
                         "agreement": 0.8}]}}}))
    page = write_report(tmp_path).read_text()
    for png in ("elo.png", "scatter.png", "elo_steps.png", "ppo.png", "reliability.png"):
        assert f'src="report/{png}"' in page, png
        assert (tmp_path / "report" / png).read_bytes()[:8] == PNG
    assert "ppo@2" in page and "0.75" in page


def test_a_report_with_one_rated_aspect_draws_no_empty_legend(tmp_path: Path) -> None:
    """The efficacy preset rates helpfulness Elo only: the harmlessness panel has no lines, and
    its legend used to print matplotlib's "No artists with labels" warning to the console."""
    import warnings

    names = ["initial", "dpo"]
    elo = {"snapshots": names,
           "elo": {"judge/helpful": {n: _rating(10.0 * k, 24) for k, n in enumerate(names)}},
           "per_snapshot": {n: {"evasive_rate": 0.1, "over_refusal_rate": 0.0} for n in names}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "elo.json").write_text(json.dumps(elo))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        page = write_report(tmp_path).read_text()
    assert 'src="report/elo.png"' in page
    assert not [w for w in seen if "No artists with labels" in str(w.message)], seen


def test_report_without_outputs_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no stage output"):
        write_report(tmp_path)


def test_report_says_what_a_run_of_its_size_can_and_cannot_show(tmp_path: Path) -> None:
    names = ["initial", "sl", "ppo"]
    elo = {"snapshots": names,
           "elo": {"judge/harmless": {"initial": _rating(0.0, 8),
                                      "sl": {"elo": 20.0, "low": -60.0, "high": 90.0,
                                             "comparisons": 8},
                                      "ppo": {"elo": 200.0, "low": 50.0, "high": 300.0,
                                              "comparisons": 8}}}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "elo.json").write_text(json.dumps(elo))
    (tmp_path / "config.yaml").write_text("model: {path: smollm2}\nfeedback: {model: null}\n")
    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward/score_mean": 0.1 * s, "reward/total_mean": 0.1 * s,
                    "kl/mean": 0.0, "time/step": 1.0,
                    "response/truncated_fraction": 0.5}) + "\n" for s in range(1, 3)))
    page = write_report(tmp_path).read_text()
    assert "What this run can and cannot show" in page
    assert "feedback model is the policy model itself (smollm2)" in page
    assert "1 of the ratings&#x27; 95% intervals contain 0 (judge/harmless/sl)" in page
    assert "PPO ran 2 steps" in page and "50% of its responses ran out of tokens" in page


def test_report_shows_ten_before_after_samples_in_eval_order(tmp_path: Path) -> None:
    names = ["initial", "sl", "ppo"]
    elo = {"snapshots": names,
           "elo": {"pm/harmless": {n: _rating(10.0 * k, 12) for k, n in enumerate(names)}},
           "per_snapshot": {n: {"harmful_rate": 0.5} for n in names},
           "verdicts": {"initial": {"harmful": {f"p{i}": 1.0 for i in range(12)},
                                    "evasive": {f"p{i}": 0.0 for i in range(12)}},
                        "ppo": {"harmful": {f"p{i}": float(i % 2) for i in range(12)},
                                "evasive": {f"p{i}": 1.0 if i == 2 else 0.0 for i in range(12)}}}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "elo.json").write_text(json.dumps(elo))
    rows = [{"snapshot": n, "set": s, "prompt_id": f"p{i}", "prompt": f"<ask {i}>",
             "response": f"{n} answer {i}"}
            for n in names for s in ("harmless", "helpful") for i in reversed(range(12))]
    (tmp_path / "eval" / "responses.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    page = write_report(tmp_path).read_text()
    assert "Before and after: 10 held-out red-team prompts" in page
    section = page[page.index("Before and after"):]
    # the eval's own order (p11 first), ten of twelve, initial against the last snapshot
    shown = [i for i in range(12) if f"&lt;ask {i}&gt;" in section]
    assert shown == list(range(2, 12))
    assert section.index("&lt;ask 11&gt;") < section.index("&lt;ask 2&gt;")
    assert "initial answer 5" in section and "ppo answer 5" in section
    assert "sl answer" not in section
    assert "judged harmful</i>" in section           # initial, every prompt
    assert "judged neither harmful nor evasive" in section  # ppo on even prompts
    assert "judged evasive" in section               # ppo on p2
