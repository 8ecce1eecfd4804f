"""The paper's labelling levers, each measured on the judge-check sets, on one engine.

    .venv/bin/python benchmarks/judge_levers.py [--model qwen2.5-coder-1.5b] \
        [--sets harmless,evasive,helpful,hhh-dev] [--levers base,one-order,...] [--limit N] [--json F]

Every lever is a change of the labelling settings against `base` (chat template, both orders,
probability mean of the orders, one principle, no few-shot examples, principle before the
options, log-prob method); levers join with `+` (`principle-after+k4`). Printed: accuracy with
its 95% bootstrap interval per set, order disagreement, lean towards (A) and the seconds each
lever took, so quality and cost sit side by side. The sets are the labelled ones the project
ships; the hidden HHH-style evaluation is not among them, so choosing a lever here does not
tune on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai_ray.actors.feedback import FeedbackWorker  # noqa: E402
from cai_ray.actors.group import ActorGroup  # noqa: E402
from cai_ray.actors.rollout import vllm_env  # noqa: E402
from cai_ray.config import Config, EngineConfig, ModelSpec, RoleResources  # noqa: E402
from cai_ray.constitution import load_constitution  # noqa: E402
from cai_ray.hardware import dtype_name  # noqa: E402
from cai_ray.judgecheck import table  # noqa: E402
from cai_ray.stages.label import Labeller, check_judge  # noqa: E402

BASE = {"method": "logprob", "both_orders": True, "order_combine": "mean", "num_principles": 1,
        "few_shot": 0,
        "principle_position": "before", "chat_template": True}
LEVERS: dict[str, dict[str, object]] = {
    "base": {},
    "logit-combine": {"order_combine": "logit"},
    "one-order": {"both_orders": False},
    "k4": {"num_principles": 4},
    "few-shot-2": {"few_shot": 2},
    "plain-text": {"chat_template": False},
    "principle-after": {"principle_position": "after"},
    "cot": {"method": "cot", "cot_max_tokens": 96, "cot_temperature": 0.7},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--sets", default="harmless,evasive,helpful,hhh-dev")
    ap.add_argument("--levers", default=",".join(LEVERS))
    ap.add_argument("--limit", type=int, default=0, help="comparisons per set (0 = all)")
    ap.add_argument("--dtype", default=None, help="engine dtype (default: the hardware's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    dtype = args.dtype or dtype_name("auto", "cpu")
    sets = [s for s in args.sets.split(",") if s]
    engine = EngineConfig(dtype=dtype, max_model_len=4096, kv_cache_gib=4, block_size=32)
    group = ActorGroup("feedback", FeedbackWorker, RoleResources(threads=args.threads),
                       local=True, init_args=(ModelSpec(path=args.model), engine, "cpu", 0, True),
                       env_vars=vllm_env(engine, "cpu", args.threads))
    constitution = load_constitution(ROOT / "constitutions" / "default.yaml")
    out: dict[str, object] = {"model": args.model, "dtype": dtype, "sets": sets, "levers": {}}
    try:
        for name in args.levers.split(","):
            settings = dict(BASE)
            for part in name.split("+"):  # levers combine: principle-after+k4
                settings.update(LEVERS[part])
            chat = bool(settings.pop("chat_template"))
            cfg = Config()
            cfg = dataclasses.replace(cfg, feedback=dataclasses.replace(cfg.feedback, **settings))
            group.call_all(FeedbackWorker.set_chat_template, chat)
            t0 = time.monotonic()
            results = check_judge(Labeller(cfg, constitution), group, sets, args.limit)
            secs = time.monotonic() - t0
            print(f"\n== {name} ({secs:.0f} s): {settings | {'chat_template': chat}}")
            print(table(results), flush=True)
            out["levers"][name] = {"seconds": secs, "settings": settings | {"chat_template": chat},
                                   "sets": {r.name: r.as_dict() for r in results}}
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=2))
    finally:
        group.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
