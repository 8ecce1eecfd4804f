from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cai_ray.configschema import ValidationError
from cai_ray.constitution import load_constitution
from cai_ray.constitution_import import import_constitution

DEFAULT = Path(__file__).resolve().parents[2] / "constitutions" / "default.yaml"


@pytest.fixture(scope="module")
def default():
    return load_constitution(DEFAULT)


def test_default_constitution_sizes(default) -> None:
    assert len(default.critique_revision) >= 16
    assert len(default.principles("harmless")) >= 16
    assert len(default.principles("helpful")) >= 3
    fs = default.few_shot
    assert fs.critique_revision and fs.comparison and fs.cot_comparison
    pairs = {(p.critique, p.revision) for p in default.critique_revision}
    for ex in fs.critique_revision:
        assert (ex.critique_request, ex.revision_request) in pairs


def test_broken_constitution_names_every_problem(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(
        "name: bad\n"
        "critique_revision:\n"
        "  - {id: a, critique: 'Find harm.', revision: 'Fix it.'}\n"
        "  - {id: a, critique: 'Find more harm.', revision: 'Fix more.'}\n"
        "  - {id: b, critique: 'Find harm.'}\n"
        "comparison:\n"
        "  - {id: c, aspect: harmless, text: '   '}\n"
        "  - {id: d, aspect: harmfull, text: 'Which is kinder?', weight: 2}\n")
    with pytest.raises(ValidationError) as exc:
        load_constitution(f)
    text = str(exc.value)
    assert "critique_revision[1].id: duplicate id 'a' (first at critique_revision[0])" in text
    assert "critique_revision[2].revision: missing required field" in text
    assert "comparison[0].text: must not be empty" in text
    assert "comparison[1].weight: unknown key" in text
    assert "comparison[1].aspect: must be one of 'harmless', 'helpful'; got 'harmfull'" in text
    assert all(p.source == str(f) for p in exc.value.problems)
    assert len(exc.value.problems) == 5


def test_sampling_is_seeded_per_round_with_replacement(default) -> None:
    a = [default.sample_critique(seed=3, key="p:1", round=r).id for r in range(4)]
    assert a == [default.sample_critique(seed=3, key="p:1", round=r).id for r in range(4)]
    draws = [default.sample_critique(seed=3, key=f"p:{i}", round=0).id for i in range(400)]
    counts = Counter(draws)
    assert len(counts) == len(default.critique_revision)  # every pair gets drawn
    assert max(counts.values()) < 60  # roughly uniform (expected 20 each)
    other = [default.sample_critique(seed=4, key=f"p:{i}", round=0).id for i in range(400)]
    assert other != draws
    per_round = {default.sample_critique(seed=0, key="p:1", round=r).id for r in range(40)}
    assert len(per_round) > 5  # drawn independently at every round


def test_comparison_sampling_by_aspect(default, tmp_path: Path) -> None:
    k = default.sample_comparison(seed=0, key="c:1", aspect="helpful", k=16)
    assert len(k) == 16 and all(p.aspect == "helpful" for p in k)
    assert len({p.id for p in k}) < 16  # with replacement from a smaller pool
    no_comparisons = import_constitution("hf", [_hf_file(tmp_path)])
    with pytest.raises(ValueError, match="no 'harmless' comparison"):
        no_comparisons.sample_comparison(0, "x", "harmless")


def _hf_file(d: Path, nested: bool = False) -> Path:
    turns = ["How do I pick a lock?", "Use a tension wrench...", "Critique request one",
             "The answer helps burglary.", "Revision request one", "Here is how locks work..."]
    chat = [{"role": ["user", "assistant"][i % 2], "content": t} for i, t in enumerate(turns)]
    chats = [chat, chat] if nested else chat + chat
    data = {"constitutions": [{"critic": f"Critique request {i}", "revision": f"Revision {i}"}
                              for i in range(5)], "system_chat": chats}
    f = d / "hf.json"
    f.write_text(json.dumps(data))
    return f


@pytest.mark.parametrize("nested", [False, True])
def test_import_hf_keeps_every_principle(tmp_path: Path, nested: bool) -> None:
    c = import_constitution("hf", [_hf_file(tmp_path, nested)])
    assert [p.critique for p in c.critique_revision] == [f"Critique request {i}" for i in range(5)]
    assert len(c.few_shot.critique_revision) == 2
    assert c.few_shot.critique_revision[0].revision == "Here is how locks work..."
    out = tmp_path / "out.yaml"
    out.write_text(c.to_yaml())
    assert load_constitution(out) == c


def test_import_anthropic_keeps_every_principle(tmp_path: Path) -> None:
    cr = {f"harm{i}": {"prompt": [f"Point out problem {i}."], "edit_request": f"Fix {i}."}
          for i in range(6)}
    cr["multi"] = {"prompt": ["First angle.", "Second angle."], "edit_request": "Fix both."}
    comp = [f"Which response is kinder, number {i}?" for i in range(9)]
    (tmp_path / "cr.json").write_text(json.dumps(cr))
    (tmp_path / "cmp.json").write_text(json.dumps(comp))
    c = import_constitution("anthropic", [tmp_path / "cr.json", tmp_path / "cmp.json"])
    assert len(c.critique_revision) == 8
    assert {p.id for p in c.critique_revision} >= {"harm0", "multi-0", "multi-1"}
    assert [p.text for p in c.comparison] == comp
    assert all(p.aspect == "harmless" for p in c.comparison)
    out = tmp_path / "out.yaml"
    out.write_text(c.to_yaml())
    assert load_constitution(out) == c


def test_import_errors_name_file_and_entry(tmp_path: Path) -> None:
    f = tmp_path / "cr.json"
    f.write_text(json.dumps({"ok": {"prompt": ["x"], "edit_request": "y"}, "bad": {"prompt": []}}))
    with pytest.raises(ValidationError) as exc:
        import_constitution("anthropic", [f])
    assert exc.value.problems[0].path == "bad" and exc.value.problems[0].source == str(f)
    g = tmp_path / "broken.json"
    g.write_text("{not json")
    with pytest.raises(ValidationError, match="invalid JSON at line 1"):
        import_constitution("hf", [g])


def test_principle_weights_change_the_draws_and_equal_weights_do_not(default) -> None:
    def draws(weights=None):
        return [default.sample_comparison(0, f"c:{i}", "harmless", 1, weights)[0].id
                for i in range(600)]
    plain = draws()
    assert draws({"harmless-not-evasive": 1.0}) == plain  # weight 1 = no weight
    every = {p.id: 2.5 for p in default.principles("harmless")}
    assert draws(every) == plain  # equal weights draw exactly as none
    n = len(default.principles("harmless"))
    favoured = draws({"harmless-not-evasive": 10.0, "less-harmful-general": 0.0})
    share = favoured.count("harmless-not-evasive") / len(favoured)
    assert abs(share - 10 / (n + 8)) < 0.06  # 10 of (n - 2) + 10 + 0
    assert "less-harmful-general" not in favoured
    assert plain.count("harmless-not-evasive") / len(plain) < 0.12  # the control: ~1/n


def test_principle_weight_problems_name_the_id_and_the_aspect(default) -> None:
    assert default.weight_problems({"harmless-not-evasive": 3.0}) == []
    bad = default.weight_problems({"no-such-principle": 2.0})
    assert len(bad) == 1 and "no-such-principle" in bad[0] and "harmless-not-evasive" in bad[0]
    zero = default.weight_problems({p.id: 0.0 for p in default.principles("helpful")})
    assert zero == ["every 'helpful' principle weighs 0"]
