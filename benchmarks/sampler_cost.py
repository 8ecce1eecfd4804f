"""What each sampling option costs a decode step, measured against greedy decoding in one run.

    .venv/bin/python benchmarks/sampler_cost.py [--config configs/cpu-efficacy.yaml]
        [--role feedback] [--batch 32] [--tokens 64] [--json FILE]

One in-process vLLM engine, built as the config builds the role's (`feedback`: the judge that
writes SL-CAI's critiques and revisions with `sl.reviser: feedback`; `rollout`: the policy),
decodes the same `--batch` chat prompts under each sampler, every sequence forced to the same
length (`ignore_eos`). Each sampler runs twice, for 8 and for 8 + `--tokens` tokens; the
difference is the decode alone (prefill, which the prefix cache serves the second time, and the
first steps drop out). Prints ms per decode step, tokens/s, and the ratio of each step to the
greedy step and to the config's own SL sampler (`sl.temperature`, `sl.top_p`,
`sl.repetition_penalty`, else `rollout.sampling`'s).

On CPU, vLLM sorts the whole vocabulary for `top_p` (Qwen2.5's has 151,936 tokens) and counts
every prompt and output token per sequence for `repetition_penalty`; `min_p` and `top_k` alone
need no sort. Those costs are per sequence and per step, so they scale with the batch, as the
model's matmuls do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai_ray.actors.rollout import (  # noqa: E402
    _quiet_engine,
    engine_kwargs,
    use_engine_logging,
    vllm_env,
)
from cai_ray.configload import load_config  # noqa: E402
from cai_ray.data import load_prompts  # noqa: E402
from cai_ray.prompt_stream import PromptStream  # noqa: E402
from cai_ray.stages.sl import sl_sampling  # noqa: E402


def samplers(sl: dict[str, float | int | None]) -> list[tuple[str, dict[str, float | int]]]:
    own = {k: v for k, v in (("temperature", sl["temperature"]), ("top_p", sl["top_p"]),
                             ("top_k", sl["top_k"]),
                             ("repetition_penalty", sl["repetition_penalty"]))
           if v is not None}
    t = float(sl["temperature"] or 0.7)
    return [("greedy", {"temperature": 0.0}),
            (f"temperature {t}", {"temperature": t}),
            ("+ top_p 0.9", {"temperature": t, "top_p": 0.9}),
            ("+ min_p 0.05", {"temperature": t, "min_p": 0.05}),
            ("+ top_k 50", {"temperature": t, "top_k": 50}),
            ("+ repetition_penalty 1.1", {"temperature": t, "repetition_penalty": 1.1}),
            ("+ min_p 0.05 + repetition_penalty 1.1",
             {"temperature": t, "min_p": 0.05, "repetition_penalty": 1.1}),
            ("the config's SL sampler", own)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "cpu-efficacy.yaml"))
    ap.add_argument("--role", default="feedback", choices=["feedback", "rollout"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed per sampler")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    cfg = load_config(args.config)
    if args.role == "feedback":
        model, engine = cfg.feedback.model or cfg.model, cfg.feedback.engine
    else:
        model, engine = cfg.model, cfg.rollout.engine
    for k, v in vllm_env(engine, "cpu", args.threads).items():
        os.environ.setdefault(k, v)
    use_engine_logging()  # the engine's config dumps and load chatter stay out, as in the system
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.\w+` is deprecated")
    from vllm import LLM, SamplingParams

    _quiet_engine()
    llm = LLM(**engine_kwargs(model, engine, "cpu", cfg.run.seed,
                              max_num_seqs=max(args.batch, engine.max_num_seqs)))
    tok = llm.get_tokenizer()
    ds, _ = load_prompts(cfg.data.red_team, cfg.data.on_bad_row)
    chats = [p.messages for p in PromptStream(ds, seed=0).take(args.batch)]
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
             for m in chats]

    def timed(kw: dict[str, float | int], n: int) -> float:
        ps = [SamplingParams(max_tokens=n, ignore_eos=True, seed=i, **kw)
              for i in range(len(texts))]
        t0 = time.monotonic()
        outs = llm.generate(texts, ps, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return time.monotonic() - t0

    timed({"temperature": 0.0}, 8 + args.tokens)  # a full-length warm-up: the first is slow
    res: dict[str, dict[str, float]] = {}
    for name, kw in samplers(sl_sampling(cfg)):
        step = (timed(kw, 8 + args.tokens) - timed(kw, 8)) / args.tokens
        res[name] = {"ms_per_step": 1000 * step, "tokens_per_s": args.batch / step}
    base, own = res["greedy"]["ms_per_step"], res["the config's SL sampler"]["ms_per_step"]
    print(f"{model.path} ({args.role}), batch {args.batch}, {args.tokens} decode steps, "
          f"{args.threads} threads")
    print(f"{'sampler':42s} {'ms/step':>8s} {'tok/s':>7s} {'÷ greedy':>9s} {'÷ SL':>6s}")
    for name, r in res.items():
        r["vs_greedy"], r["vs_sl"] = r["ms_per_step"] / base, r["ms_per_step"] / own
        print(f"{name:42s} {r['ms_per_step']:8.0f} {r['tokens_per_s']:7.1f} "
              f"{r['vs_greedy']:9.2f} {r['vs_sl']:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
