"""Rollout throughput, side by side in one run: our rollout group vs raw vLLM vs HF generate.

    .venv/bin/python benchmarks/rollout_throughput.py [--model smollm2] [--batch 32]
        [--tokens 64] [--dtype bfloat16]

The same prompts, sampling, dtype and token counts go through (a) a Ray actor group hosting vLLM
(the system's path: typed requests, actor call, typed results), (b) a raw `vllm.LLM` in this
process, (c) batched HF `generate`; each timed `--repeats` times, median reported. Every sequence is forced to the same length (`ignore_eos`;
`min_new_tokens` for HF), so tokens/s compare like for like. Prints tokens/s, the ratios a/b and
a/c, and the peak RSS of each (driver + Ray workers). Each path gets one warm-up call first.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai_ray.actors.rollout import RolloutWorker, engine_kwargs, vllm_env  # noqa: E402
from cai_ray.config import EngineConfig, ModelSpec, RoleResources, SourceConfig  # noqa: E402
from cai_ray.data import PromptStream, load_prompts  # noqa: E402
from cai_ray.messages import GenerationRequest  # noqa: E402
from cai_ray.models import load_tokenizer, resolve  # noqa: E402
from cai_ray.resources import PeakRSS  # noqa: E402


def prompts(n: int) -> list[list[dict[str, str]]]:
    ds, _ = load_prompts(SourceConfig(name="donotanswer"))
    return [p.messages for p in PromptStream(ds, seed=0).take(n)]


def bench_group(args: argparse.Namespace, chats: list, engine: EngineConfig) -> float:
    import ray

    from cai_ray.actors.group import ActorGroup

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    g = ActorGroup("rollout", RolloutWorker, RoleResources(num_cpus=1, threads=args.threads),
                   init_args=(ModelSpec(path=args.model), engine, "cpu", 0),
                   env_vars=vllm_env(engine, "cpu", args.threads))
    reqs = [GenerationRequest(request_id=str(i), messages=m, temperature=0.7, top_p=0.9,
                              max_tokens=args.tokens, ignore_eos=True, seed=i)
            for i, m in enumerate(chats)]
    g.call(0, RolloutWorker.generate, reqs[:2])  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.monotonic()
        out = g.call(0, RolloutWorker.generate, reqs)
        times.append(time.monotonic() - t0)
        assert sum(len(c.token_ids) for r in out for c in r.completions) == \
            len(reqs) * args.tokens
    g.shutdown()
    ray.shutdown()
    return len(reqs) * args.tokens / statistics.median(times)


def bench_raw_vllm(args: argparse.Namespace, chats: list, engine: EngineConfig) -> float:
    for k, v in vllm_env(engine, "cpu", args.threads).items():
        os.environ.setdefault(k, v)
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(ModelSpec(path=args.model), engine, "cpu", 0))
    tok = llm.get_tokenizer()
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
             for m in chats]
    from vllm import TokensPrompt

    ids = [TokensPrompt(prompt_token_ids=tok.encode(t, add_special_tokens=False)) for t in texts]
    params = [SamplingParams(temperature=0.7, top_p=0.9, max_tokens=args.tokens,
                             ignore_eos=True, seed=i) for i in range(len(ids))]
    llm.generate(ids[:2], params[:2], use_tqdm=False)
    times = []
    for _ in range(args.repeats):
        t0 = time.monotonic()
        out = llm.generate(ids, params, use_tqdm=False)
        times.append(time.monotonic() - t0)
        assert sum(len(o.outputs[0].token_ids) for o in out) == len(ids) * args.tokens
    llm.llm_engine.shutdown() if hasattr(llm.llm_engine, "shutdown") else None
    del llm
    gc.collect()
    return len(ids) * args.tokens / statistics.median(times)


def bench_hf(args: argparse.Namespace, chats: list) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    spec = ModelSpec(path=args.model)
    tok = load_tokenizer(spec)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(resolve(spec), dtype=getattr(torch, args.dtype))
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
             for m in chats]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": args.tokens,
          "min_new_tokens": args.tokens, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        model.generate(**{k: v[:2] for k, v in batch.items()}, **{**kw, "max_new_tokens": 4,
                                                                "min_new_tokens": 4})
        times = []
        for _ in range(args.repeats):
            t0 = time.monotonic()
            out = model.generate(**batch, **kw)
            times.append(time.monotonic() - t0)
            assert out.shape[1] - batch["input_ids"].shape[1] == args.tokens
    return len(texts) * args.tokens / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per path (median)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    engine = EngineConfig(dtype=args.dtype, max_model_len=1024, kv_cache_gib=2,
                          max_num_seqs=max(args.batch, 8))
    chats = prompts(args.batch)
    res: dict[str, dict[str, float]] = {}
    # The Ray group first: in-process vLLM sets LD_PRELOAD, which later subprocesses inherit.
    for name, fn in [("a_group", lambda: bench_group(args, chats, engine)),
                     ("b_raw_vllm", lambda: bench_raw_vllm(args, chats, engine)),
                     ("c_hf_generate", lambda: bench_hf(args, chats))]:
        with PeakRSS() as mem:
            tps = fn()
        res[name] = {"tokens_per_s": tps, "peak_rss_gib": mem.peak_gib}
        print(f"{name:14s} {tps:8.1f} tokens/s   peak RSS {mem.peak_gib:5.2f} GiB", flush=True)
    a, b, c = (res[k]["tokens_per_s"] for k in ("a_group", "b_raw_vllm", "c_hf_generate"))
    summary = {"model": args.model, "dtype": args.dtype, "batch": args.batch,
               "tokens": args.tokens, "results": res, "ratio_group_vs_raw_vllm": a / b,
               "ratio_group_vs_hf_generate": a / c}
    print(f"ratio a/b (group / raw vLLM)     = {a / b:.2f}   (target >= 0.9)")
    print(f"ratio a/c (group / HF generate)  = {a / c:.2f}   (target >= 1.5)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
