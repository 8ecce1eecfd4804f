"""`cai-ray sample`: the policy answers red-team prompts through the rollout group.

The smallest end-to-end use of the system (config → data → Ray actor group → vLLM → typed results
on disk): requests stream to the least-loaded rollout actor and results are written as they
finish, so a slow actor never holds up the others.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm import tqdm

from cai_ray.actors.group import Pending
from cai_ray.actors.rollout import RolloutWorker, rollout_group
from cai_ray.config import Config
from cai_ray.data import PromptStream, load_prompts
from cai_ray.messages import GenerationRequest, GenerationResult, Prompt
from cai_ray.runtime import ray_session

log = logging.getLogger(__name__)


def sample_requests(cfg: Config, prompts: list[Prompt]) -> list[GenerationRequest]:
    s = cfg.rollout.sampling
    return [GenerationRequest(request_id=p.id, messages=p.messages, n=1,
                              temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              repetition_penalty=s.repetition_penalty,
                              max_tokens=s.max_new_tokens, seed=s.seed) for p in prompts]


def run_sample(cfg: Config, out_dir: Path, num_prompts: int, chunk: int | None = None
               ) -> dict[str, float]:
    """Answer `num_prompts` red-team prompts; write `out_dir/sample/samples.jsonl`.

    One actor serves its calls one after another, and vLLM is fastest on large batches, so by
    default each actor gets one call holding its whole share."""
    dataset, _ = load_prompts(cfg.data.red_team, cfg.data.on_bad_row)  # logs skipped rows
    prompts = PromptStream(dataset, seed=cfg.data.shuffle_seed).take(
        min(num_prompts, len(dataset)))
    requests = sample_requests(cfg, prompts)
    chunk = chunk or max(1, -(-len(requests) // cfg.placement.rollout.num_actors))
    by_id = {p.id: p for p in prompts}
    path = out_dir / "sample" / "samples.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = 0
    with ray_session(cfg):
        group = rollout_group(cfg)
        try:
            t0 = time.monotonic()
            pending: list[Pending[list[GenerationResult]]] = [
                group.submit_least_loaded(RolloutWorker.generate, requests[i:i + chunk])
                for i in range(0, len(requests), chunk)]
            with path.open("w", encoding="utf-8") as f, \
                    tqdm(total=len(requests), desc="sampling", unit="prompt") as bar:
                for _, results in group.as_completed(pending):
                    for r in results:
                        c = r.completions[0]
                        tokens += len(c.token_ids)
                        f.write(json.dumps({"id": r.request_id,
                                            "prompt": by_id[r.request_id].text,
                                            "response": c.text,
                                            "finish_reason": c.finish_reason,
                                            "weight_version": r.weight_version,
                                            "worker_rank": r.worker_rank}) + "\n")
                    f.flush()
                    bar.update(len(results))
            elapsed = time.monotonic() - t0
        finally:
            group.shutdown()
    stats = {"prompts": float(len(requests)), "tokens": float(tokens),
             "seconds": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9)}
    log.info("sampled %d responses, %d tokens in %.1f s (%.1f tokens/s) -> %s", len(requests),
             tokens, elapsed, stats["tokens_per_s"], path)
    return stats
