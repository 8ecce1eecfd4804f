"""Labelling on the tiny model: pairs from the policy, soft labels from the feedback group."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest

from cai_ray.config import load_config
from cai_ray.configschema import ValidationError
from cai_ray.constitution import load_constitution
from cai_ray.stages.label import run_label
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "cpu-tiny.yaml"
BASE = ["data.red_team.limit=4", "data.helpful.limit=2", "feedback.batch_size=3",
        "rollout.sampling.max_new_tokens=8"]


@pytest.fixture(scope="module")
def labelled(ray_local, tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("label")
    human = out / "helpful_pairs.jsonl"
    human.write_text("\n".join(json.dumps({"prompt": f"Name a fruit ({i})", "chosen": "Apple.",
                                           "rejected": "No."}) for i in range(2)))
    run_label(load_config(TINY, BASE + ["feedback.num_principles=2",
                                        f"data.helpful_pairs.name={human}"]), out)
    return out


def test_comparisons_dataset(labelled: Path) -> None:
    data = datasets.load_from_disk(str(labelled / "label" / "comparisons"))
    c = load_constitution(ROOT / "constitutions" / "default.yaml")
    aspect_of = {p.id: p.aspect for p in c.comparison}
    assert len(data) == 6 and sorted(set(data["aspect"])) == ["harmless", "helpful"]
    human = [r for r in data if r["method"] == "human"]
    assert len(human) == 2 and all(r["aspect"] == "helpful" and r["p_a"] == 1.0 and
                                   r["response_a"] == "Apple." for r in human)
    for row in (r for r in data if r["method"] != "human"):
        assert 0.0 <= row["p_a"] <= 1.0 and row["method"] == "logprob"
        assert len(row["principle_ids"]) == 2
        assert all(aspect_of[p] == row["aspect"] for p in row["principle_ids"])
        assert row["response_a"] != row["response_b"] and row["labeller"] == "tiny-llama"
    metrics = json.loads((labelled / "label" / "metrics.json").read_text())
    assert metrics["comparisons"] == 6 and 0.0 <= metrics["order_disagreement_rate"] <= 1.0


def test_judge_checked_before_labelling(labelled: Path) -> None:
    check = json.loads((labelled / "label" / "judge_check.json").read_text())
    assert check["labeller"] == "tiny-llama" and check["num_principles"] == 2
    assert sorted(check["sets"]) == ["evasive", "harmless", "helpful"]
    for r in check["sets"].values():
        assert r["n"] == 8  # cpu-tiny's check_limit
        assert r["interval"][0] <= r["accuracy"] <= r["interval"][1]
        assert 0.0 <= r["ece"] <= 1.0 and 0.0 <= r["order_disagreement"] <= 1.0
        assert 0.0 < r["lean_a"] < 1.0
    metrics = json.loads((labelled / "label" / "metrics.json").read_text())
    assert metrics["judge_check"]["sets"] == check["sets"]


def test_bad_check_set_stops_before_any_actor(tmp_path: Path) -> None:
    bad = tmp_path / "set.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "better": "b", "worse": "w"}) + "\n"
                   + json.dumps({"prompt": "p", "better": "b"}) + "\n")
    with pytest.raises(ValidationError, match=r"line 2: missing or empty worse"):
        run_label(load_config(TINY, BASE + [f"feedback.check_sets=[{bad}]"]), tmp_path / "o")
    assert not (tmp_path / "o" / "label" / "shards").exists()


def test_cot_labels_are_clamped(ray_local, tiny_model_dir, tmp_path: Path) -> None:
    # the judge check before labelling runs the CoT labeller too (on one small set here)
    run_label(load_config(TINY, BASE + ["feedback.method=cot", "feedback.cot_max_tokens=8",
                                        "data.helpful.limit=1", "feedback.check_sets=[harmless]",
                                        "feedback.check_limit=2"]), tmp_path)
    check = json.loads((tmp_path / "label" / "judge_check.json").read_text())
    assert check["method"] == "cot" and check["sets"]["harmless"]["n"] == 2
    data = datasets.load_from_disk(str(tmp_path / "label" / "comparisons"))
    assert set(data["method"]) == {"cot"}
    assert all(0.4 <= p <= 0.6 for p in data["p_a"])


def test_resume_refuses_unknown_principle(labelled: Path, tmp_path: Path) -> None:
    shutil.copytree(labelled / "label" / "shards", tmp_path / "label" / "shards")
    shard = tmp_path / "label" / "shards" / "harmless-00000"
    ds = datasets.load_from_disk(str(shard))
    rows = ds.to_list()
    rows[0]["principle_ids"] = ["made-up-principle"]
    shutil.rmtree(shard)
    datasets.Dataset.from_list(rows, features=ds.features).save_to_disk(str(shard))
    with pytest.raises(ValidationError, match="row 0: principle id 'made-up-principle' is not "
                       "in the constitution"):
        run_label(load_config(TINY, BASE + ["feedback.num_principles=2"]), tmp_path)
    assert not (tmp_path / "label" / "comparisons").exists()


def test_pairs_file_without_response_b(tmp_path: Path) -> None:
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "response_a": "x", "response_b": "y"}) + "\n" +
                 json.dumps({"prompt": "hello", "response_a": "x"}) + "\n")
    code, _, err = run_cli("label", "--config", str(TINY), "--output", str(tmp_path / "out"),
                           "--pairs", str(f))
    assert code == 2 and "Traceback" not in err
    assert f"{f}: line 2: missing or empty response_b" in err
    assert not (tmp_path / "out" / "label").exists()


def test_judge_check_command(ray_local, tiny_model_dir, tmp_path: Path) -> None:
    own = tmp_path / "mine.jsonl"
    own.write_text("\n".join(json.dumps({"prompt": f"Question {i}?", "better": "A real answer.",
                                         "worse": "No.", "aspect": "helpful"})
                             for i in range(3)) + "\n")
    code, stdout, err = run_cli("judge-check", "--config", str(TINY), "--output",
                                str(tmp_path / "out"), "--sets", f"harmless,{own}", "--limit",
                                "4", "feedback.few_shot=0")
    assert code == 0, err[-2000:]
    check = json.loads((tmp_path / "out" / "label" / "judge_check.json").read_text())
    assert check["sets"]["harmless"]["n"] == 4 and check["sets"]["mine"]["n"] == 3
    assert check["few_shot"] == 0
    assert "harmless" in stdout and "95% interval" in stdout
    assert not (tmp_path / "out" / "label" / "comparisons").exists()  # labels nothing
