"""How well does the judge label the policy's own pairs? Labelling levers measured on pairs the
SL policy samples on training prompts, against the judge's per-answer verdicts, before any RL run
or eval.

    .venv/bin/python benchmarks/policy_pairs.py [--config configs/cpu-efficacy.yaml]
        [--base runs/efficacy] [--prompts 64] [--variants preset,engaging-x4,...]
        [--cuts runs/efficacy/eval/elo.json] [--source policy|revisions]
        [--out runs/policy-pairs.json] [key=value ...]

1. The base run's policy (`--base`/sl/model after SL-CAI, else `model`) samples two responses
   to each of the first `--prompts` training red-team prompts (`data.red_team`, the prompts SL
   and RL train on; the eval's are others), as the label stage and online DPO sample them.
   `--source revisions` takes instead the SL training revisions, each against the initial
   answer it revised. The eval's harmful question presumes a harmful request, so verdicts on
   prompt sets that mix in benign ones (Do-Not-Answer) overcount harm; a development slice of
   AdvBench the eval does not use (`data.red_team.name=advbench data.red_team.skip=120
   data.red_team.sample_seed=null`) fits the question.
2. The feedback model answers the eval's two per-answer questions (`cai_ray/verdicts.py`) about
   every response: harmful? evasive? (yes when p(yes) is over the cut fitted on the labelled
   per-answer sets: refitted here, or read from an eval's `elo.json` with `--cuts`; never
   fitted on eval prompts). Pairs and verdicts are kept in `--out` and reused by a later run
   with the same policy and prompts.
3. Each variant (`VARIANTS`: config overrides such as `feedback.principle_weights`,
   `feedback.few_shot`, `feedback.harmless_labels=pointwise`) labels every pair as the
   harmlessness aspect, both orders.

Printed per variant: over the pairs whose two responses differ in the verdict, the share where
the judge prefers the harmful one (and the evasive one), with 95% bootstrap intervals; the
chosen responses' harmful and evasive shares (the soft label's expectation); order
disagreement; the labelling time and its ratio to the first variant's in the same run (the
first labels with a cold prefix cache, so later ratios flatter a little). A judge that teaches harmlessness prefers the harmful response well under 50%.
The verdicts are themselves ~84% accurate on their labelled sets, so some discordant pairs are
the verdicts' errors. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai_ray.actors.feedback import FeedbackWorker, feedback_group, judge  # noqa: E402
from cai_ray.actors.rollout import rollout_group  # noqa: E402
from cai_ray.config import load_config  # noqa: E402
from cai_ray.constitution import load_constitution  # noqa: E402
from cai_ray.data import PromptStream, load_prompts  # noqa: E402
from cai_ray.judgecheck import bootstrap_interval  # noqa: E402
from cai_ray.labelling import Labeller  # noqa: E402
from cai_ray.preflight import resolve_path  # noqa: E402
from cai_ray.rundir import policy_spec  # noqa: E402
from cai_ray.runtime import ray_session, setup_logging  # noqa: E402
from cai_ray.stages.label import sample_pairs  # noqa: E402
from cai_ray.verdicts import QUESTIONS, check_set, p_yes, single_queries, summarize  # noqa: E402

# the constitution's harmless principles that ask for engagement as well as harmlessness
ENGAGING = ("harmless-not-preachy", "harmless-not-accusatory", "harmless-not-evasive",
            "harmless-plain-refusal", "harmless-respectful-tone")


def weights(favoured: float, others: float | None = None) -> str:
    """A `feedback.principle_weights` override: ENGAGING at `favoured`, the other harmless
    principles at `others` (1 when None)."""
    from cai_ray.constitution import load_constitution

    c = load_constitution(ROOT / "constitutions" / "default.yaml")
    w = {p.id: others for p in c.principles("harmless")} if others is not None else {}
    w |= {k: favoured for k in ENGAGING}
    return "feedback.principle_weights={" + ", ".join(f"{k}: {v}" for k, v in w.items()) + "}"


# each variant: config overrides on top of the preset's labelling settings
VARIANTS = {
    "preset": [],
    "engaging-x4": [weights(4.0)],
    "engaging-only": [weights(1.0, 0.0)],
    "few-shot-2": ["feedback.few_shot=2"],
    "k4": ["feedback.num_principles=4"],
    "plain-text": ["feedback.chat_template=false"],
    # each response asked on its own (helps with harm? evades?), not the pair under a principle
    "pointwise": ["feedback.harmless_labels=pointwise"],
}


def preference_for(flag: list[tuple[bool, bool]], p_a: list[float]) -> dict[str, Any]:
    """Over the pairs where exactly one response has the flag: how often the judge prefers it
    (hard, p > 0.5) and its mean soft preference; over all pairs: the flag's share among the
    chosen (soft)."""
    hard, soft = [], []
    for (fa, fb), p in zip(flag, p_a, strict=True):
        if fa != fb:
            q = p if fa else 1.0 - p
            hard.append(1.0 if q > 0.5 else 0.0)
            soft.append(q)
    share = sum(hard) / len(hard) if hard else float("nan")
    lo, hi = bootstrap_interval(hard)
    chosen = sum(p * fa + (1 - p) * fb for (fa, fb), p in zip(flag, p_a, strict=True))
    return {"discordant_pairs": len(hard), "prefers_flagged": share, "interval": [lo, hi],
            "soft_preference": sum(soft) / len(soft) if soft else float("nan"),
            "chosen_share": chosen / len(p_a)}


class PairPrompt(NamedTuple):
    id: str
    messages: list[dict[str, str]]


def revision_pairs(sl_dir: Path, limit: int
                   ) -> tuple[list[PairPrompt], tuple[list[list[str]], list[list[bool]]]]:
    """The first `limit` revisions of the SL training view (after its filters), each as a pair:
    (the initial answer, the revision), with whether each ended (not cut off)."""
    import datasets

    data = {r["id"]: r for r in datasets.load_from_disk(str(sl_dir / "data"))}
    train = [r for r in datasets.load_from_disk(str(sl_dir / "train"))
             if r["source"].startswith("revision")][:limit]
    prompts, pairs, finished = [], [], []
    for r in train:
        row = data[r["id"].rsplit("@", 1)[0]]
        prompts.append(PairPrompt(r["id"], list(r["messages"])))
        pairs.append([row["initial_response"], r["response"]])
        finished.append([not row["initial_truncated"], bool(r["finished"])])
    return prompts, (pairs, finished)


def cell(r: dict[str, Any]) -> str:
    lo, hi = r["interval"]
    return (f"{100 * r['prefers_flagged']:3.0f}% [{100 * lo:3.0f},{100 * hi:4.0f}]"
            f" of {r['discordant_pairs']:3d}")


def refit(fb: Any, qname: str, seed: int) -> float:
    """The cut the eval fits for `qname` on its labelled per-answer set."""
    items = check_set(qname)
    qs = [q for k, a in enumerate(items) for q in single_queries(
        f"check|{qname}|{k}", [{"role": "user", "content": a.prompt}], a.response,
        QUESTIONS[qname])]
    p = p_yes(fb.shard_and_gather(FeedbackWorker.choice_probs, qs))
    fit: dict[str, Any] = summarize(qname, p, [a.positive for a in items], seed)
    return float(fit["threshold"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/cpu-efficacy.yaml")
    ap.add_argument("--base", default="runs/efficacy", help="a run whose sl/model is the policy")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cuts", help="an eval's elo.json: take its verdict cuts (fitted on the "
                    "labelled per-answer sets) instead of refitting them here")
    ap.add_argument("--source", choices=("policy", "revisions"), default="policy",
                    help="policy: pairs the SL policy samples; revisions: each SL training "
                    "revision against the initial answer it revised (A initial, B revision)")
    ap.add_argument("--out", default="runs/policy-pairs.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    setup_logging("INFO")
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    cfgs = {n: load_config(args.config, args.overrides + VARIANTS[n], check_env=True)
            for n in names}  # every variant's settings checked before any actor starts
    cfg = load_config(args.config, args.overrides, check_env=True)
    c = load_constitution(resolve_path(cfg.run.constitution))
    policy = policy_spec(cfg, Path(args.base))
    given_pairs = None
    prompts: list[Any]  # Prompt rows, or PairPrompt for revisions
    if args.source == "revisions":
        rev, given_pairs = revision_pairs(Path(args.base) / "sl", args.prompts)
        prompts = list(rev)
    else:
        ds, _ = load_prompts(cfg.data.red_team, cfg.data.on_bad_row)
        prompts = PromptStream(ds, seed=cfg.data.shuffle_seed + 1).take(len(ds))[:args.prompts]
    outp = Path(args.out)
    out: dict[str, Any] = json.loads(outp.read_text()) if outp.exists() else {}
    ids = [p.id for p in prompts]
    if out.get("policy") != policy.path or out.get("prompt_ids") != ids:
        out = {"policy": policy.path, "prompt_ids": ids}
    out.setdefault("variants", {})

    def save() -> None:
        outp.parent.mkdir(parents=True, exist_ok=True)
        outp.write_text(json.dumps(out, indent=2))

    with ray_session(cfg):
        if "pairs" not in out and given_pairs is not None:
            out["pairs"], out["finished"] = given_pairs
            save()
        if "pairs" not in out:
            t0 = time.monotonic()
            group = rollout_group(cfg, policy)
            try:
                out["pairs"], out["finished"] = sample_pairs(group, cfg, prompts)
            finally:
                group.shutdown()
            out["sample_seconds"] = time.monotonic() - t0
            save()
        pairs = [tuple(x) for x in out["pairs"]]
        fb = feedback_group(cfg)
        try:
            if "flags" not in out:
                t0 = time.monotonic()
                given = json.loads(Path(args.cuts).read_text())["verdict_checks"] \
                    if args.cuts else {}
                out["flags"], out["cuts"] = {}, {}
                for qname in ("harmful", "evasive"):
                    cut = float(given[qname]["cut"]) if qname in given else refit(
                        fb, qname, cfg.run.seed)
                    qs = [q for p, pair in zip(prompts, pairs, strict=True)
                          for k, r in enumerate(pair) for q in single_queries(
                              f"pairs|{p.id}|{k}", p.messages, r, QUESTIONS[qname])]
                    v = [x > cut for x in p_yes(fb.shard_and_gather(
                        FeedbackWorker.choice_probs, qs))]
                    out["flags"][qname] = list(zip(v[0::2], v[1::2], strict=True))
                    out["cuts"][qname] = cut
                out["verdict_seconds"] = time.monotonic() - t0
                save()
            flags = {k: [tuple(x) for x in v] for k, v in out["flags"].items()}
            share = {k: sum(a + b for a, b in v) / (2 * len(v)) for k, v in flags.items()}
            trunc = sum(not f for fs in out["finished"] for f in fs) / (2 * len(pairs))
            what = ("(initial answer, SL revision)" if args.source == "revisions"
                    else f"{policy.path}'s")
            print(f"{len(pairs)} pairs, {what}, on training prompts: "
                  f"{100 * share['harmful']:.0f}% of responses judged harmful, "
                  f"{100 * share['evasive']:.0f}% evasive, {100 * trunc:.0f}% truncated")
            print(f"{'variant':<14} {'harmful preferred':>24} {'evasive preferred':>24} "
                  f"{'chosen harm':>11} {'chosen ev':>9} {'disagree':>8} {'s':>5} {'÷ first':>7}")
            if args.source == "revisions":  # the label the revision itself gives: B
                fixed = [0.0] * len(pairs)
                h, e = preference_for(flags["harmful"], fixed), preference_for(flags["evasive"], fixed)
                out["revision_label"] = {"harmful": h, "evasive": e}
                save()
                print(f"{'revision':<14} {cell(h):>24} {cell(e):>24} "
                      f"{100 * h['chosen_share']:10.0f}% {100 * e['chosen_share']:8.0f}%")
            first_s = None
            for name in names:
                vc = cfgs[name]
                fb.call_all(FeedbackWorker.set_chat_template, vc.feedback.chat_template)
                lab = Labeller(vc, c)
                t0 = time.monotonic()
                per = [lab.queries(f"pairs|{p.id}", p.messages, a, b, "harmless")
                       for p, (a, b) in zip(prompts, pairs, strict=True)]
                probs = judge(fb, lab, [q for qs in per for q in qs])
                p_a, dis, at = [], 0, 0
                for qs in per:
                    p, d = lab.fold(probs[at:at + len(qs)], "harmless")
                    at += len(qs)
                    p_a.append(p)
                    dis += int(d)
                row: dict[str, Any] = {
                    "overrides": VARIANTS[name],
                    "harmful": preference_for(flags["harmful"], p_a),
                    "evasive": preference_for(flags["evasive"], p_a),
                    "order_disagreement": dis / len(p_a),
                    "label_confidence": sum(abs(p - 0.5) * 2 for p in p_a) / len(p_a),
                    "seconds": time.monotonic() - t0, "p_a": p_a}
                first_s = first_s or row["seconds"]
                row["seconds_vs_first"] = row["seconds"] / first_s
                out["variants"][name] = row
                save()
                print(f"{name:<14} {cell(row['harmful']):>24} {cell(row['evasive']):>24} "
                      f"{100 * row['harmful']['chosen_share']:10.0f}% "
                      f"{100 * row['evasive']['chosen_share']:8.0f}% "
                      f"{100 * row['order_disagreement']:7.0f}% {row['seconds']:5.0f} "
                      f"{row['seconds'] / first_s:6.2f}x",
                      flush=True)
        finally:
            fb.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
