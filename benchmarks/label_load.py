"""Labelling under load: many synthetic pairs through the feedback group with a bounded queue.

    .venv/bin/python benchmarks/label_load.py [--pairs 5000] [--model tiny-llama] [--chunk 64]
        [--depth 2]

Pairs are made up on the fly (never all held), judged in chunks of `--chunk` pairs with at most
`--depth` chunks in flight per feedback actor (backpressure: a new chunk is submitted only when
one returns), each pair under a sampled principle in both orders, as `cai-ray label` does.
Prints pairs/s and the RSS of the whole process tree (driver + Ray workers) after each fifth of
the pairs: memory must stay flat as the count grows.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cai_ray.config import load_config  # noqa: E402
from cai_ray.constitution import load_constitution  # noqa: E402
from cai_ray.preflight import resolve_path  # noqa: E402
from cai_ray.resources import PeakRSS, current_rss_bytes  # noqa: E402
from cai_ray.runtime import ray_session, setup_logging  # noqa: E402

WORDS = ("the of and to a in is it you that he was for on are with as I his they be at one "
         "have this from or had by word but what some we can out other were all there when up "
         "use your how said an each she which do their time if will way about many then them")


def pairs(n: int, seed: int) -> Iterator[tuple[str, list[dict[str, str]], str, str]]:
    rng = random.Random(seed)
    words = WORDS.split()
    for i in range(n):
        prompt = " ".join(rng.choices(words, k=12)) + "?"
        a, b = (" ".join(rng.choices(words, k=rng.randint(10, 40))) for _ in range(2))
        yield f"load:{i}", [{"role": "user", "content": prompt}], a, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=5000)
    ap.add_argument("--config", default=str(ROOT / "configs" / "cpu-tiny.yaml"))
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2, help="chunks in flight per actor")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. "
                    "feedback.engine.max_num_seqs=32")
    args = ap.parse_args()
    setup_logging("WARNING")
    from cai_ray.actors.feedback import FeedbackWorker, feedback_group
    from cai_ray.labelling import Labeller

    cfg = load_config(args.config, ["tracking.wandb=disabled", *args.overrides])
    lab = Labeller(cfg, load_constitution(resolve_path(cfg.run.constitution)))
    gib = 2**30
    with PeakRSS() as mem, ray_session(cfg):
        fb = feedback_group(cfg)
        try:
            it = pairs(args.pairs, 0)
            inflight: list = []
            done, t0 = 0, time.monotonic()
            marks = {args.pairs * k // 5 for k in range(1, 6)}
            exhausted = False
            while inflight or not exhausted:
                while not exhausted and len(inflight) < args.depth * fb.num_actors:
                    chunk = [p for _, p in zip(range(args.chunk), it, strict=False)]
                    if not chunk:
                        exhausted = True
                        break
                    qs = [q for key, convo, a, b in chunk
                          for q in lab.queries(key, convo, a, b, "harmless")]
                    inflight.append((len(chunk), len(qs), fb.submit_least_loaded(
                        FeedbackWorker.choice_probs, qs)))
                if not inflight:
                    break
                finished, _ = fb.wait_some([p for _, _, p in inflight])
                ids = {id(p) for p, _ in finished}
                for n, nq, p in [x for x in inflight if id(x[2]) in ids]:
                    probs = dict((id(pp), r) for pp, r in finished)[id(p)]
                    assert len(probs) == nq
                    before = done
                    done += n
                    for m in sorted(marks):
                        if before < m <= done:
                            el = time.monotonic() - t0
                            print(f"{done:>6} pairs  {done / el:7.1f} pairs/s  RSS now "
                                  f"{current_rss_bytes() / 2**30:.2f} GiB (peak so far "
                                  f"{mem.peak_gib:.2f}; driver {psutil.Process().memory_info().rss / gib:.2f}, "
                                  f"feedback actor "
                                  f"{current_rss_bytes('ray::FeedbackWorker') / gib:.2f})",
                                  flush=True)
                inflight = [x for x in inflight if id(x[2]) not in ids]
            el = time.monotonic() - t0
            print(f"total: {done} pairs ({2 * done} judgements) in {el:.1f} s = "
                  f"{done / el:.1f} pairs/s; peak RSS {mem.peak_gib:.2f} GiB")
        finally:
            fb.shutdown()


if __name__ == "__main__":
    main()
