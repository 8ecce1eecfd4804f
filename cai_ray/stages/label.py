"""RL-CAI labelling: response pairs from the policy, soft labels from the feedback model.

    cai-ray label --config C --output DIR [--pairs FILE.jsonl]

The policy (DIR/sl/model when SL-CAI ran, else `model`) samples two responses per red-team
prompt; helpfulness prompts give pairs too. The feedback model judges each pair under
`feedback.num_principles` principles of the pair's aspect (sampled per comparison, with
replacement), few-shot examples first (each under its own principle), in both orders by default;
p(A) is the mean over principles of the order-averaged probability. Chain-of-thought mode samples
the reasoning first and clamps the result to `feedback.cot_clamp`. Written in resumable shards
to DIR/label/shards, then DIR/label/comparisons.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from tqdm import tqdm

from cai_ray.actors.feedback import FeedbackWorker, feedback_group, judge
from cai_ray.actors.group import ActorGroup
from cai_ray.actors.rollout import RolloutWorker, rollout_group
from cai_ray.config import Config
from cai_ray.configschema import Problem, ValidationError
from cai_ray.constitution import Constitution, load_constitution
from cai_ray.judgecheck import SetResult, load_set, set_label, summarize_set
from cai_ray.judgecheck import table as judge_table
from cai_ray.labelling import (
    Labeller,
)
from cai_ray.messages import GenerationRequest, Prompt
from cai_ray.preflight import resolve_path
from cai_ray.rundir import policy_spec
from cai_ray.runtime import ray_session, request_seed
from cai_ray.store import ShardStore, merge_shards
from cai_ray.tracking import Tracker

log = logging.getLogger(__name__)

_MSG = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
FEATURES = datasets.Features({
    "id": datasets.Value("string"), "prompt_id": datasets.Value("string"),
    "prompt": datasets.Value("string"), "messages": _MSG,
    "response_a": datasets.Value("string"), "response_b": datasets.Value("string"),
    "p_a": datasets.Value("float64"), "principle_ids": [datasets.Value("string")],
    "order_disagreement": datasets.Value("bool"), "method": datasets.Value("string"),
    "aspect": datasets.Value("string"), "labeller": datasets.Value("string"),
    # each response stopped by itself (False: cut at max_new_tokens, read without an EOS)
    "finished_a": datasets.Value("bool"), "finished_b": datasets.Value("bool"),
})


def sample_pairs(group: ActorGroup[RolloutWorker], cfg: Config, prompts: list[Prompt]
                 ) -> tuple[list[tuple[str, str]], list[tuple[bool, bool]]]:
    """Two policy samples per prompt, and whether each stopped by itself."""
    s = cfg.rollout.sampling
    reqs = [GenerationRequest(request_id=p.id, messages=p.messages, n=2,
                              temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              repetition_penalty=s.repetition_penalty,
                              max_tokens=s.max_new_tokens,
                              seed=request_seed(cfg.run.seed, p.id, "pair")) for p in prompts]
    res = group.shard_and_gather(RolloutWorker.generate, reqs)
    return ([(r.completions[0].text.strip(), r.completions[1].text.strip()) for r in res],
            [(r.completions[0].finish_reason != "length",
              r.completions[1].finish_reason != "length") for r in res])


def label_shard(lab: Labeller, fb: ActorGroup[FeedbackWorker], prompts: list[Prompt],
                pairs: list[tuple[str, str]], aspect: str, labeller: str,
                finished: list[tuple[bool, bool]] | None = None) -> list[dict[str, Any]]:
    per_pair = [lab.queries(p.id, p.messages, a, b, aspect) for p, (a, b) in zip(prompts, pairs,
                                                                                strict=True)]
    probs = judge(fb, lab, [q for qs in per_pair for q in qs])
    rows, i = [], 0
    done = finished or [(True, True)] * len(pairs)
    for p, (a, b), qs, (fa, fb_) in zip(prompts, pairs, per_pair, done, strict=True):
        p_a, dis = lab.fold(probs[i:i + len(qs)], aspect)
        i += len(qs)
        ids = [] if lab.pointwise(aspect) else [pr.id for pr in lab.principles(p.id, aspect)]
        rows.append({"id": p.id, "prompt_id": p.id, "prompt": p.text, "messages": p.messages,
                     "response_a": a, "response_b": b, "p_a": p_a, "principle_ids": ids,
                     "order_disagreement": dis, "method": lab.f.method, "aspect": aspect,
                     "labeller": labeller, "finished_a": fa, "finished_b": fb_})
    return rows


def check_judge(lab: Labeller, fb: ActorGroup[FeedbackWorker], sets: list[str],
                limit: int = 0) -> list[SetResult]:
    """The feedback model on labelled pairwise sets, exactly as it will label: the same
    principles, few-shot examples, orders, method and template (`cai_ray.judgecheck`)."""
    results = []
    for name in sets:
        items = load_set(name)
        if limit:
            items = items[:limit]
        per = [lab.queries(f"check:{it.id}", [{"role": "user", "content": it.prompt}],
                           *it.options(), it.aspect) for it in items]
        probs = judge(fb, lab, [q for qs in per for q in qs])
        p_a, dis, i = [], [], 0
        for it, qs in zip(items, per, strict=True):
            p, d = lab.fold(probs[i:i + len(qs)], it.aspect)
            p_a.append(p)
            dis.append(d)
            i += len(qs)
        # lean: p(option A) of every single judgement, whichever response stood there
        results.append(summarize_set(set_label(name), items, p_a,
                                     dis if lab.f.both_orders else None, probs, lab.cfg.run.seed))
    return results


def write_judge_check(out_dir: Path, cfg: Config, results: list[SetResult],
                      seconds: float) -> dict[str, Any]:
    """DIR/label/judge_check.json, a console table, a warning per set at chance, W&B."""
    f = cfg.feedback
    doc = {"labeller": (f.model or cfg.model).path, "method": f.method,
           "both_orders": f.both_orders, "order_combine": f.order_combine,
           "num_principles": f.num_principles,
           "few_shot": f.few_shot, "principle_position": f.principle_position,
           "chat_template": f.chat_template, "seconds": seconds,
           "sets": {r.name: r.as_dict() for r in results}}
    path = out_dir / "label" / "judge_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    log.info("judge check (%s, %.0f s):\n%s", doc["labeller"], seconds, judge_table(results))
    for r in results:
        if r.chance_in_interval:
            log.warning("judge check: on %r the judge's 95%% interval [%.0f%%, %.0f%%] contains "
                        "50%%: its labels on this kind of comparison are not distinguishable "
                        "from chance", r.name, 100 * r.interval[0], 100 * r.interval[1])
    tracker = Tracker(cfg.tracking, f"{cfg.run.name}-label", out_dir / "label", cfg.to_dict())
    try:
        tracker.log({f"judge/{r.name}/{k}": v for r in results for k, v in (
            ("accuracy", r.accuracy), ("accuracy_lo", r.interval[0]),
            ("accuracy_hi", r.interval[1]), ("ece", r.ece), ("lean_a", r.lean_a))
            + ((("order_disagreement", r.order_disagreement),)
               if r.order_disagreement is not None else ())}, step=0)
    finally:
        tracker.close()
    return doc


def run_judge_check(cfg: Config, out_dir: Path, sets: list[str] | None = None,
                    limit: int | None = None, echo: bool = True) -> Path:
    """`cai-ray judge-check`: measure the feedback model without labelling anything. The
    table is logged; `echo` also prints it as the command's output (a pipeline stage
    doesn't, or its console shows it twice)."""
    sets = cfg.feedback.check_sets if sets is None else sets
    for name in sets:
        load_set(name)  # bad files stop here, before any actor starts
    constitution = load_constitution(resolve_path(cfg.run.constitution))
    lab = Labeller(cfg, constitution)
    t0 = time.monotonic()
    with ray_session(cfg):
        fb = feedback_group(cfg)
        try:
            results = check_judge(lab, fb, sets, cfg.feedback.check_limit if limit is None
                                  else limit)
        finally:
            fb.shutdown()
    write_judge_check(out_dir, cfg, results, time.monotonic() - t0)
    if echo:
        print(judge_table(results))
    return out_dir / "label" / "judge_check.json"


@dataclass
class Shard:
    name: str
    aspect: str  # "harmless" | "helpful"
    prompts: list[Prompt]
    pairs: list[tuple[str, str]] | None = None  # given pairs; None = sample from the policy
    human: bool = False  # pairs are (chosen, rejected) human labels: p_a = 1, no judging


def plan(cfg: Config, constitution: Constitution, pairs_file: str | None = None) -> list[Shard]:
    """Red-team prompts judged for harmlessness; helpfulness from human chosen/rejected pairs
    (`data.helpful_pairs`) or AI-judged helpfulness prompts (when the constitution has
    helpfulness principles); or the user's pairs from `pairs_file`, judged for harmlessness."""
    from cai_ray.data import PromptStream, load_preference_pairs, load_prompts

    size = cfg.feedback.batch_size

    def cut(aspect: str, prompts: list[Prompt], pairs: list[tuple[str, str]] | None = None,
            human: bool = False) -> list[Shard]:
        return [Shard(f"{aspect}{'-human' if human else ''}-{i // size:05d}", aspect,
                      prompts[i:i + size], pairs[i:i + size] if pairs else None, human)
                for i in range(0, len(prompts), size)]

    if pairs_file:
        rows = read_pairs_file(pairs_file)
        prompts = [Prompt(f"pairs:{i}", [{"role": "user", "content": r["prompt"]}], pairs_file)
                   for i, r in enumerate(rows)]
        return cut("harmless", prompts, [(r["response_a"], r["response_b"]) for r in rows])
    ds, _ = load_prompts(cfg.data.red_team, cfg.data.on_bad_row)
    out = cut("harmless", PromptStream(ds, seed=cfg.data.shuffle_seed + 1).take(len(ds)))
    if cfg.data.helpful_pairs is not None:
        human = load_preference_pairs(cfg.data.helpful_pairs)
        prompts = [Prompt(pid, msgs, cfg.data.helpful_pairs.name) for pid, msgs, _, _ in human]
        out += cut("helpful", prompts, [(a, b) for _, _, a, b in human], human=True)
    elif constitution.principles("helpful"):
        ds, _ = load_prompts(cfg.data.helpful, cfg.data.on_bad_row)
        out += cut("helpful", PromptStream(ds, seed=cfg.data.shuffle_seed + 1).take(len(ds)))
    return out


def human_rows(shard: Shard, labeller: str) -> list[dict[str, Any]]:
    assert shard.pairs is not None
    return [{"id": p.id, "prompt_id": p.id, "prompt": p.text, "messages": p.messages,
             "response_a": a, "response_b": b, "p_a": 1.0, "principle_ids": [],
             "order_disagreement": False, "method": "human", "aspect": shard.aspect,
             "labeller": labeller, "finished_a": True, "finished_b": True}
            for p, (a, b) in zip(shard.prompts, shard.pairs, strict=True)]


def run_label(cfg: Config, out_dir: Path, pairs_file: str | None = None) -> Path:
    final = out_dir / "label" / "comparisons"
    if final.exists():
        log.info("comparisons already complete in %s; skipping", final)
        return final
    constitution = load_constitution(resolve_path(cfg.run.constitution))
    shards = plan(cfg, constitution, pairs_file)  # bad input stops here, before any actor
    for name in cfg.feedback.check_sets:
        load_set(name)  # a bad check set too
    store = ShardStore(out_dir / "label" / "shards", FEATURES)
    known = {p.id for p in constitution.comparison}

    def check(ds: datasets.Dataset, src: str) -> list[Problem]:
        return [Problem(f"row {i}", f"principle id {pid!r} is not in the constitution", src)
                for i, ids in enumerate(ds["principle_ids"]) for pid in ids if pid not in known]

    check_path = out_dir / "label" / "judge_check.json"
    flat = [(sh.name, sh.prompts) for sh in shards]
    done = store.verify(flat, check)
    todo = [sh for sh in shards if sh.name not in done]
    policy = policy_spec(cfg, out_dir)
    labeller = (cfg.feedback.model or cfg.model).path
    log.info("labelling: %d shards planned, %d complete; policy %s, labeller %s", len(shards),
             len(done), policy.path, labeller)
    t0, pairs_done = time.monotonic(), 0
    if todo:
        lab = Labeller(cfg, constitution)
        need_pairs = any(sh.pairs is None for sh in todo)
        with ray_session(cfg):
            rollout = rollout_group(cfg, policy) if need_pairs else None
            fb: ActorGroup[FeedbackWorker] | None = None
            try:
                fb = feedback_group(cfg)
                if cfg.feedback.check_sets and not check_path.exists():
                    tc = time.monotonic()
                    write_judge_check(out_dir, cfg, check_judge(lab, fb, cfg.feedback.check_sets,
                                                                cfg.feedback.check_limit),
                                      time.monotonic() - tc)
                with tqdm(total=sum(len(sh.prompts) for sh in todo), desc="AI feedback",
                          unit="pair") as bar:
                    for sh in todo:
                        if sh.human:
                            rows = human_rows(sh, cfg.data.helpful_pairs.name
                                              if cfg.data.helpful_pairs else "human")
                        else:
                            finished = None
                            if sh.pairs is not None:
                                pairs = sh.pairs
                            else:
                                pairs, finished = sample_pairs(
                                    rollout, cfg, sh.prompts)  # type: ignore[arg-type]
                            rows = label_shard(lab, fb, sh.prompts, pairs, sh.aspect, labeller,
                                               finished)
                        store.write(sh.name, rows)
                        pairs_done += len(sh.prompts)
                        bar.update(len(sh.prompts))
            finally:
                for g in (rollout, fb):
                    if g is not None:
                        g.shutdown()
    data = merge_shards(store, flat, final)
    secs = time.monotonic() - t0
    stats = summarize(data)
    stats.update({"pairs_labelled_now": pairs_done, "seconds": secs,
                  "pairs_per_s": pairs_done / secs if pairs_done else None})
    if check_path.exists():
        stats["judge_check"] = json.loads(check_path.read_text())
    (out_dir / "label" / "metrics.json").write_text(json.dumps(stats, indent=2))
    log.info("labelling: %d comparisons -> %s; order disagreement %.1f%%", len(data), final,
             100 * stats["order_disagreement_rate"])
    return final


def summarize(data: datasets.Dataset) -> dict[str, Any]:
    n = max(len(data), 1)
    by_aspect: dict[str, Any] = {}
    for aspect in set(data["aspect"]):
        ps = [r["p_a"] for r in data if r["aspect"] == aspect]
        by_aspect[aspect] = {"count": len(ps), "mean_p_a": sum(ps) / len(ps),
                             "share_prefer_a": sum(p > 0.5 for p in ps) / len(ps)}
    return {"comparisons": len(data), "order_disagreement_rate":
            sum(data["order_disagreement"]) / n, "by_aspect": by_aspect}


def read_pairs_file(path: str) -> list[dict[str, str]]:
    """User pairs (JSONL: prompt, response_a, response_b); every bad line named at once."""
    problems, rows = [], []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(f"line {i}", f"invalid JSON: {e.msg}", path))
            continue
        missing = [k for k in ("prompt", "response_a", "response_b")
                   if not isinstance(row, dict) or not isinstance(row.get(k), str)
                   or not row[k].strip()]
        if missing:
            problems.append(Problem(f"line {i}", f"missing or empty {', '.join(missing)} "
                                    "(each line needs prompt, response_a, response_b)", path))
            continue
        rows.append(row)
    if not rows and not problems:
        problems.append(Problem("", "no pairs in the file", path))
    if problems:
        raise ValidationError("invalid pairs file", problems)
    return rows
