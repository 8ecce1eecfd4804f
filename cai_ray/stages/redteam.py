"""`cai-ray redteam`: grow a red-team prompt set by few-shot prompting a model with the seed set.

    cai-ray redteam --config C --output DIR --num N

The seeds are `data.red_team` (what SL-CAI and PPO would read); the generator is the policy model
(`model`) on the rollout role. Each round sends `redteam.batch_size` requests, each showing a
fresh random draw of seeds, and keeps the candidates that pass `cai_ray.redteam`'s cleaning,
length, script and de-duplication checks, until N are kept or `redteam.max_rounds` have run.
Rounds are appended to `DIR/redteam/rounds.jsonl` as they finish (an interrupted run resumes
after its last whole round); the kept prompts go to `DIR/redteam/prompts`, a saved dataset with
a `prompt` column that `data.red_team.name` accepts, and the counts of what was dropped and why
to `DIR/redteam/metrics.json`.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import datasets
from tqdm import tqdm

from cai_ray.actors.rollout import RolloutWorker, rollout_group
from cai_ray.config import Config
from cai_ray.data import load_prompts
from cai_ray.messages import GenerationRequest
from cai_ray.redteam import Deduplicator, Tally, clean, few_shot_request, reject_reason
from cai_ray.runtime import ray_session, request_seed

log = logging.getLogger(__name__)


def _read_rounds(path: Path) -> list[dict[str, Any]]:
    """The whole rounds written so far (a torn last line is an unfinished round)."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def run_redteam(cfg: Config, out_dir: Path, num: int) -> Path:
    r = cfg.redteam
    root = out_dir / "redteam"
    final = root / "prompts"
    metrics_path = root / "metrics.json"
    if final.exists() and metrics_path.exists() and \
            json.loads(metrics_path.read_text()).get("requested") == num:
        log.info("red-team prompts already generated in %s; skipping", final)
        return final
    seeds_ds, _ = load_prompts(cfg.data.red_team, cfg.data.on_bad_row)
    seeds = [m[-1]["content"] for m in seeds_ds["messages"]]
    if len(seeds) < 2:
        raise ValueError(f"data.red_team has {len(seeds)} prompt(s); few-shot generation needs "
                         "at least 2 seeds")
    root.mkdir(parents=True, exist_ok=True)
    rounds_path = root / "rounds.jsonl"
    done = _read_rounds(rounds_path)
    with rounds_path.open("w", encoding="utf-8") as f:  # drop a torn last line
        f.writelines(json.dumps(x) + "\n" for x in done)
    dedup = Deduplicator(r.near_duplicate)
    for s in seeds:
        dedup.add(s)
    kept: list[dict[str, Any]] = []
    tally = Tally()
    for row in done:
        for k in row["kept"]:
            dedup.add(k["prompt"])
            kept.append(k)
        tally.dropped.update(row["dropped"])
    tally.kept = len(kept)
    if done:
        log.info("red-team: resuming after round %d with %d prompts kept", len(done), len(kept))
    t0 = time.monotonic()
    s = cfg.rollout.sampling
    with ray_session(cfg):
        group = rollout_group(cfg)
        try:
            with tqdm(total=num, initial=min(len(kept), num), desc="red-team prompts",
                      unit="prompt") as bar:
                for rnd in range(len(done), r.max_rounds):
                    if len(kept) >= num:
                        break
                    rng = random.Random(request_seed(cfg.run.seed, f"round-{rnd}", "redteam"))
                    shown, requests = [], []
                    for i in range(r.batch_size):
                        text, idx = few_shot_request(seeds, r.few_shot, rng)
                        rid = f"redteam:{rnd}:{i}"
                        shown.append(idx)
                        requests.append(GenerationRequest(
                            request_id=rid, messages=[{"role": "user", "content": text}],
                            temperature=r.temperature, top_p=r.top_p,
                            max_tokens=r.max_new_tokens,
                            seed=request_seed(cfg.run.seed, rid, "redteam"),
                            repetition_penalty=s.repetition_penalty))
                    results = group.shard_and_gather(RolloutWorker.generate, requests)
                    new, dropped = [], Tally()
                    for res, idx in zip(results, shown, strict=True):
                        cand = clean(res.completions[0].text)
                        why = reject_reason(cand, r, dedup)
                        if why is not None:
                            dropped.dropped[why] += 1
                            continue
                        dedup.add(cand)
                        new.append({"prompt": cand, "round": rnd,
                                    "seeds": [seeds_ds[j]["id"] for j in idx]})
                    with rounds_path.open("a", encoding="utf-8") as f:
                        f.write(json.dumps({"round": rnd, "kept": new,
                                            "dropped": dict(dropped.dropped)}) + "\n")
                    kept += new
                    tally.kept = len(kept)
                    tally.dropped.update(dropped.dropped)
                    bar.update(min(len(kept), num) - bar.n)
                    bar.set_postfix(dropped=sum(tally.dropped.values()))
        finally:
            group.shutdown()
    if len(kept) < num:
        log.warning("red-team: %d of %d prompts after %d rounds (raise redteam.max_rounds or "
                    "loosen the filters); dropped: %s", len(kept), num, r.max_rounds,
                    dict(tally.dropped))
    kept = kept[:num]
    tmp = root / ".prompts.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    datasets.Dataset.from_dict({
        "id": [f"redteam:{i}" for i in range(len(kept))],
        "prompt": [k["prompt"] for k in kept], "round": [k["round"] for k in kept],
        "seeds": [k["seeds"] for k in kept]}).save_to_disk(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    rounds = _read_rounds(rounds_path)
    metrics = {"requested": num, "seeds": len(seeds),
               "generated": sum(len(x["kept"]) + sum(x["dropped"].values()) for x in rounds),
               "rounds": len(rounds), **tally.as_dict(), "kept": len(kept),
               "near_duplicate": "word-trigram Jaccard >= " + str(r.near_duplicate),
               "seconds": time.monotonic() - t0}
    metrics_path.write_text(json.dumps(metrics, indent=2))
    log.info("red-team: %d prompts -> %s", len(kept), final)
    return final
