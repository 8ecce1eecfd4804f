"""RL prompts and the rollout stream of the PPO driver: batches in flight on the rollout group.

`RolloutStream` keeps up to `ppo.max_staleness + 1` batches generating (the backpressure): the
batch of step t+1 is sampled while step t scores, trains and syncs. A batch submitted after sync
v runs on weights v (an actor runs its calls in order) and is trained at step t ≥ v, so
`t − batch version ≤ max_staleness` holds by construction; `next` still checks it for every batch
and raises `StalenessError` rather than train on older weights. A batch partly made by an actor
that died since is generated again, whole (same requests, same seeds). Batches already sampled
for later steps travel in checkpoints (`to_json` / `from_json`), so a resumed run trains exactly
the samples the uninterrupted one would have.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import datasets

from cai_ray.actors.group import ActorGroup, Pending
from cai_ray.actors.rollout import RolloutWorker
from cai_ray.config import Config, ModelSpec
from cai_ray.configschema import Problem, ValidationError
from cai_ray.data import PromptStream, load_prompts
from cai_ray.messages import GenerationRequest, GenerationResult, Prompt
from cai_ray.runtime import request_seed


class StalenessError(RuntimeError):
    pass


@dataclass
class Sample:
    """One sampled response, as the engine produced it."""

    prompt: Prompt
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    rollout_logprobs: list[float] | None  # the sampler's log-probs (after temperature)
    weight_version: int
    finished: bool = True  # stopped by itself; False = cut off at max_new_tokens

    @property
    def key(self) -> str:
        return self.prompt.id


@dataclass
class Batch:
    """Prompts on their way through the rollout group (driver side only)."""

    index: int  # the step (0-based) that trains on it
    prompts: list[Prompt]
    stream_state: dict[str, int]  # the prompt stream just after these prompts were taken
    pending: list[Pending[list[GenerationResult]]]
    submitted: float
    requests: list[GenerationRequest]
    collected: list[Sample] | None = None  # its samples, once gathered (or restored)

    def to_json(self) -> dict[str, Any]:
        assert self.collected is not None
        return {"index": self.index, "stream": self.stream_state,
                "samples": [asdict(x) for x in self.collected]}

    @staticmethod
    def from_json(b: dict[str, Any]) -> Batch:
        samples = [Sample(**{**x, "prompt": Prompt(**x["prompt"])}) for x in b["samples"]]
        prompts = list({x.prompt.id: x.prompt for x in samples}.values())
        return Batch(int(b["index"]), prompts, b["stream"], [], time.monotonic(), [], samples)


class RolloutStream:
    """The batches in flight, in step order (see the module docstring)."""

    def __init__(self, cfg: Config, group: ActorGroup[RolloutWorker], stream: PromptStream,
                 first_step: int, ahead: list[Batch]):
        self.cfg, self.group, self.stream = cfg, group, stream
        self.inflight: deque[Batch] = deque(ahead)
        self.next_index = first_step + len(ahead)

    def requests(self, prompts: list[Prompt], index: int) -> list[GenerationRequest]:
        s, p = self.cfg.rollout.sampling, self.cfg.ppo
        return [GenerationRequest(request_id=pr.id, messages=pr.messages,
                                  n=p.samples_per_prompt, temperature=s.temperature,
                                  top_p=s.top_p, top_k=s.top_k,
                                  repetition_penalty=s.repetition_penalty,
                                  max_tokens=s.max_new_tokens, logprobs=True,
                                  seed=request_seed(self.cfg.run.seed, pr.id, f"ppo{index}"))
                for pr in prompts]

    def _submit(self, index: int) -> Batch:
        prompts = self.stream.take(self.cfg.ppo.rollout_batch_size)
        reqs = self.requests(prompts, index)
        return Batch(index, prompts, self.stream.state_dict(),
                     self.group.submit_shards(RolloutWorker.generate, reqs), time.monotonic(),
                     reqs)

    def fill(self, steps: int) -> None:
        """Keep max_staleness + 1 batches in flight (never past the run's last step)."""
        while len(self.inflight) <= self.cfg.ppo.max_staleness and self.next_index < steps:
            self.inflight.append(self._submit(self.next_index))
            self.next_index += 1

    def next(self, step: int) -> tuple[Batch, list[Sample]]:
        """The batch that trains step `step` and its samples; checks the staleness bound."""
        batch = self.inflight.popleft()
        assert batch.index == step, (batch.index, step)
        samples = self.collect(batch)
        oldest = min(s.weight_version for s in samples)
        if step - oldest > self.cfg.ppo.max_staleness:
            raise StalenessError(f"step {step}: batch made with weights v{oldest}, "
                                 f"{step - oldest} versions old "
                                 f"(> ppo.max_staleness={self.cfg.ppo.max_staleness})")
        return batch, samples

    def collect(self, batch: Batch) -> list[Sample]:
        """The batch's samples; when a rollout actor was restarted since the batch went out
        (its restore hook gave it the current weights), the whole batch is generated again."""
        if batch.collected is not None:
            return batch.collected
        results = self.group.gather_again(batch.pending, RolloutWorker.generate,
                                          batch.requests, max_restarts=self.cfg.run.max_restarts)
        by_id = {p.id: p for p in batch.prompts}
        batch.collected = [Sample(by_id[res.request_id], res.prompt_token_ids, c.token_ids,
                                  c.text, c.logprobs, res.weight_version,
                                  c.finish_reason != "length")
                           for res in results for c in res.completions]
        return batch.collected

    def ahead(self) -> list[dict[str, Any]]:
        """The batches in flight, sampled to the end, for a checkpoint."""
        for b in self.inflight:
            self.collect(b)
        return [b.to_json() for b in self.inflight]

    def stream_state(self, batch: Batch) -> dict[str, int]:
        """Where the prompt stream resumes: after the last batch taken from it."""
        return self.inflight[-1].stream_state if self.inflight else batch.stream_state


# --- RL prompts --------------------------------------------------------------------------------

def ppo_prompts(cfg: Config) -> datasets.Dataset:
    """Red-team and helpfulness prompts together (the paper's RL prompts mix both)."""
    parts = [load_prompts(src, cfg.data.on_bad_row)[0]
             for src in (cfg.data.red_team, cfg.data.helpful)]
    return datasets.concatenate_datasets(parts)


def check_prompt_lengths(cfg: Config, prompts: datasets.Dataset, tok: Any) -> None:
    """Refuse, before any actor starts, prompts whose chat rendering plus
    rollout.sampling.max_new_tokens does not fit trainer.max_length: the trainer would have to
    cut the prompt the engine sampled from, and train on a context the policy never saw."""
    limit, budget = cfg.trainer.max_length, cfg.rollout.sampling.max_new_tokens
    bad = []
    for i, row in enumerate(prompts):
        text = tok.apply_chat_template(row["messages"], tokenize=False,
                                       add_generation_prompt=True)
        n = len(tok.encode(text, add_special_tokens=False))
        if n + budget > limit:
            bad.append(Problem(f"row {i} ({row['id']})", f"{n} prompt tokens + {budget} new "
                               f"tokens > trainer.max_length={limit}", row["source"]))
    if bad:
        raise ValidationError(
            f"{len(bad)} RL prompt(s) do not fit trainer.max_length (raise it, lower "
            "rollout.sampling.max_new_tokens, or set the sources' max_prompt_chars/limit)",
            bad[:20])


def check_same_tokenizer(policy_tok: Any, critic_tok: Any, policy: ModelSpec,
                         critic: ModelSpec) -> None:
    """The critic reads the policy's token ids as they are: refuse a critic whose tokenizer
    would read them as other tokens."""
    sample = "Constitutional AI: critique, revise, compare. 12345 ünïcödé <tag>"
    same = (len(policy_tok) == len(critic_tok) and
            policy_tok.eos_token_id == critic_tok.eos_token_id and
            policy_tok.encode(sample, add_special_tokens=False) ==
            critic_tok.encode(sample, add_special_tokens=False) and
            policy_tok.get_vocab() == critic_tok.get_vocab())
    if not same:
        raise ValueError(f"advantage=gae: the critic (from the PM at {critic.path}) does not "
                         f"share the policy's tokenizer ({policy.path}), and it is fed the "
                         "policy's token ids; train the PM on the policy's backbone, or use "
                         "ppo.advantage=grpo/rloo (no critic)")
