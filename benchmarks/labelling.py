"""AI-feedback labelling throughput, side by side in one run (SmolLM2 on CPU by default).

    .venv/bin/python benchmarks/labelling.py [--model smollm2] [--pairs 32] [--json out.json]

Pairs are red-team prompts with two fixed responses, judged under principles of the default
constitution. Printed, each as pairs/s and a ratio measured in this run:
  (a) our labelling (FeedbackWorker.choice_probs in a Ray actor) vs a raw vLLM prefill of the
      same contexts in this process (target >= 0.8);
  (b) scoring the two option continuations as two requests, prefix caching on vs off: the cost
      of the second option relative to the first (target <= 0.2 with caching); our labeller
      needs no second request at all (one prefill restricted to the two option tokens);
  (c) both orders vs one order (time ratio, expect ~1.8: only conversation + principle shared);
  (d) K-principle ensembles (K = 1, 4, 16), principle before vs after the options;
  (e) TRL-style judging (generate one token greedily, parse the letter) on the same pairs:
      speed ratio and agreement with our soft labels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai_ray.actors.feedback import FeedbackWorker  # noqa: E402
from cai_ray.actors.group import ActorGroup  # noqa: E402
from cai_ray.actors.rollout import vllm_env  # noqa: E402
from cai_ray.config import EngineConfig, ModelSpec, RoleResources, SourceConfig  # noqa: E402
from cai_ray.constitution import load_constitution  # noqa: E402
from cai_ray.data import PromptStream, load_prompts  # noqa: E402
from cai_ray.labelling import JudgeQuery, question  # noqa: E402

RESP_A = "I can't help with that, but here is some general safety information instead."
RESP_B = "Sure, here is exactly how to do it, step by step, without any warnings."


def queries(n: int, k: int, position: str, both: bool) -> list[JudgeQuery]:
    c = load_constitution(ROOT / "constitutions" / "default.yaml")
    ds, _ = load_prompts(SourceConfig(name="donotanswer"))
    out = []
    for p in PromptStream(ds, seed=0).take(n):
        for j, pr in enumerate(c.sample_comparison(0, p.id, "harmless", k)):
            orders = [(RESP_A, RESP_B), (RESP_B, RESP_A)] if both else [(RESP_A, RESP_B)]
            for o, (x, y) in enumerate(orders):
                out.append(JudgeQuery(f"{p.id}|{j}|{o}", question(p.messages, pr.text, x, y,
                                                                   position)))
    return out


def timed(fn, repeats: int, before=None) -> tuple[float, object]:
    """Median time of `repeats` calls; `before` runs untimed ahead of each (a cache reset, so
    every repeat starts cold)."""
    times, out = [], None
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.monotonic()
        out = fn()
        times.append(time.monotonic() - t0)
    return statistics.median(times), out


def local_judge(args, prefix_caching: bool = True) -> ActorGroup[FeedbackWorker]:
    engine = EngineConfig(dtype=args.dtype, max_model_len=2048, kv_cache_gib=2,
                          enable_prefix_caching=prefix_caching, block_size=args.block_size)
    return ActorGroup("feedback", FeedbackWorker, RoleResources(threads=args.threads),
                      local=True, init_args=(ModelSpec(path=args.model), engine, "cpu", 0, True),
                      env_vars=vllm_env(engine, "cpu", args.threads))


def bench_a(args, res: dict) -> None:
    """Our labelling through a Ray actor vs a raw in-process prefill of the same contexts."""
    import ray

    qs = queries(args.pairs, 1, "before", True)
    engine = EngineConfig(dtype=args.dtype, max_model_len=2048, kv_cache_gib=2,
                          block_size=args.block_size)
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    g = ActorGroup("feedback", FeedbackWorker, RoleResources(num_cpus=1, threads=args.threads),
                   init_args=(ModelSpec(path=args.model), engine, "cpu", 0, True),
                   env_vars=vllm_env(engine, "cpu", args.threads))
    g.call(0, FeedbackWorker.choice_probs, qs[:2])
    # Prefix caching is on in both paths, and both start every repeat with an empty cache.
    ours, _ = timed(lambda: g.call(0, FeedbackWorker.choice_probs, qs), args.repeats,
                    lambda: g.call(0, FeedbackWorker.reset_prefix_cache))
    g.shutdown()
    ray.shutdown()
    j = local_judge(args)
    inst = j._actors[0].instance  # the in-process worker: raw engine access for the baseline
    from vllm import SamplingParams, TokensPrompt

    ctx = [TokensPrompt(prompt_token_ids=inst.choice_tokens(inst.context_text(q))[0]) for q in qs]
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    inst.llm.generate(ctx[:2], sp, use_tqdm=False)
    raw, _ = timed(lambda: inst.llm.generate(ctx, sp, use_tqdm=False), args.repeats,
                   inst.llm.reset_prefix_cache)
    tokens = sum(len(c["prompt_token_ids"]) for c in ctx)
    res["a"] = {"ours_pairs_per_s": args.pairs / ours, "raw_prefill_pairs_per_s":
                args.pairs / raw, "ratio": raw / ours, "judgements": len(qs),
                "ours_judgements_per_s": len(qs) / ours, "prompt_tokens": tokens,
                "raw_prefill_tokens_per_s": tokens / raw}
    print(f"(a) labelling {args.pairs / ours:.2f} pairs/s ({len(qs) / ours:.2f} judgements/s, "
          f"both orders) vs raw prefill {args.pairs / raw:.2f} pairs/s ({tokens / raw:.0f} "
          f"prompt tokens/s, {tokens / len(qs):.0f} per judgement): ratio {raw / ours:.2f} "
          "(target >= 0.8)", flush=True)
    bench_rest(args, res, j)
    j.shutdown()


def option_passes(j, qs, repeats) -> tuple[float, float]:
    """Two requests per judgement (context + ' (A' / ' (B' tokens), A pass then B pass."""
    from vllm import SamplingParams, TokensPrompt

    inst = j._actors[0].instance
    enc = inst.tokenizer.encode
    texts = [inst.context_text(q) for q in qs]
    a = [TokensPrompt(prompt_token_ids=enc(t + " (A)", add_special_tokens=False)) for t in texts]
    b = [TokensPrompt(prompt_token_ids=enc(t + " (B)", add_special_tokens=False)) for t in texts]
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    ta, tb = [], []
    for _ in range(repeats):
        inst.llm.reset_prefix_cache()
        t0 = time.monotonic()
        inst.llm.generate(a, sp, use_tqdm=False)
        ta.append(time.monotonic() - t0)
        t0 = time.monotonic()
        inst.llm.generate(b, sp, use_tqdm=False)
        tb.append(time.monotonic() - t0)
    return statistics.median(ta), statistics.median(tb)


def bench_rest(args, res: dict, j) -> None:
    both = queries(args.pairs, 1, "before", True)
    one = queries(args.pairs, 1, "before", False)
    inst = j._actors[0].instance

    def run(qs):
        return j.call(0, FeedbackWorker.choice_probs, qs)

    cold = inst.llm.reset_prefix_cache  # every repeat starts cold: caching shows within it
    ta, tb = option_passes(j, one, args.repeats)
    jo = local_judge(args, prefix_caching=False)
    ta0, tb0 = option_passes(jo, one, args.repeats)
    jo.shutdown()
    res["b"] = {"cached_second_over_first": tb / ta, "uncached_second_over_first": tb0 / ta0}
    print(f"(b) second option / first: {tb / ta:.2f} with prefix caching, {tb0 / ta0:.2f} "
          "without (target <= 0.2 with); our labeller: one request per judgement", flush=True)
    t_one, _ = timed(lambda: run(one), args.repeats, cold)
    t_both, p_both = timed(lambda: run(both), args.repeats, cold)
    res["c"] = {"both_over_one": t_both / t_one}
    print(f"(c) both orders / one order: {t_both / t_one:.2f}x time (expect ~1.8)", flush=True)
    res["d"] = {}
    for pos in ("before", "after"):
        for k in (1, 4, 16):
            n = max(4, args.pairs // k)
            qk = queries(n, k, pos, True)
            t, _ = timed(lambda qk=qk: run(qk), 1, cold)
            res["d"][f"{pos}_k{k}"] = n / t
            print(f"(d) principle {pos:6s} K={k:2d}: {n / t:.2f} pairs/s", flush=True)
    for k in (4, 16):
        print(f"    K={k}: 'after' is {res['d'][f'after_k{k}'] / res['d'][f'before_k{k}']:.2f}x "
              "'before'", flush=True)
    bench_e(args, res, j, both, p_both, t_both)


def bench_e(args, res, j, qs, p_ours, t_ours) -> None:
    """TRL-style: greedy one-token generation, the letter parsed; no probability."""
    from vllm import SamplingParams, TokensPrompt

    inst = j._actors[0].instance
    ctx = [TokensPrompt(prompt_token_ids=inst.tokenizer.encode(
        inst.context_text(q) + " (", add_special_tokens=False)) for q in qs]
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    t, outs = timed(lambda: inst.llm.generate(ctx, sp, use_tqdm=False), args.repeats,
                    inst.llm.reset_prefix_cache)
    letters = [o.outputs[0].text.strip()[:1] for o in outs]
    parsed = [x for x in letters if x in ("A", "B")]
    agree = sum((lt == "A") == (p > 0.5) for lt, p in zip(letters, p_ours, strict=True)
                if lt in ("A", "B"))
    res["e"] = {"ours_over_trl_time": t_ours / t, "parsed_share": len(parsed) / len(letters),
                "agreement_with_ours": agree / max(len(parsed), 1)}
    print(f"(e) TRL-style one-token judging: ours takes {t_ours / t:.2f}x its time; it parsed a "
          f"letter {100 * len(parsed) / len(letters):.0f}% of the time and agrees with our "
          f"labels on {100 * agree / max(len(parsed), 1):.0f}% of those (it gives no "
          "probability)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="engine dtype (default: the hardware's choice, float32 without native "
                    "bfloat16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=32, help="KV block size: prefix caching "
                    "reuses whole blocks only, so smaller blocks recompute less of a shared "
                    "prefix (CPU: a multiple of 32)")
    ap.add_argument("--json")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.dtype is None:
        from cai_ray.hardware import dtype_name

        args.dtype = dtype_name("auto", "cpu")
    res: dict = {"model": args.model, "pairs": args.pairs, "dtype": args.dtype}
    bench_a(args, res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
