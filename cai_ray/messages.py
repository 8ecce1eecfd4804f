"""Typed messages that cross actor boundaries.

Everything sent to or returned from an actor is one of these dataclasses (plain Python data and
CPU tensors), never an untyped dict, and every batch produced by a policy carries the
`weight_version` of the weights that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ChatMessage = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass(frozen=True)
class Prompt:
    """One conversation ending on a user turn, with a stable id for exactly-once accounting."""

    id: str  # "<source>:<row>", stable across runs and shuffles
    messages: list[ChatMessage]  # chat turns; the last one has role "user"
    source: str  # the source's name (donotanswer, mtbench, a file path, ...)

    @property
    def text(self) -> str:
        """The last user turn (what a red-team prompt asks)."""
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class GenerationRequest:
    """Sample `n` continuations of a chat (rendered with the model's chat template)."""

    request_id: str
    messages: list[ChatMessage]
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: bool = False  # return the sampled tokens' log-probs
    continue_final_message: bool = False  # extend the last assistant turn instead of a new one


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]  # generated token ids
    logprobs: list[float] | None  # log-prob of each generated token, when requested
    finish_reason: str | None  # "stop" | "length" | None


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    completions: list[Completion]
    weight_version: int  # the policy weights that produced these samples
    worker_rank: int = 0
    elapsed_s: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class SFTSample:
    """A supervised target: learn `response` as the assistant's reply to `messages`."""

    messages: list[ChatMessage]  # the conversation, ending on a user turn
    response: str  # the assistant reply to learn (loss is taken on these tokens only)
    source: str = ""  # e.g. "revision@2" or "helpful"
    finished: bool = True  # the reply stopped by itself: EOS follows it; False = cut off


@dataclass(frozen=True)
class TrainStats:
    step: int  # micro-steps taken by this rank
    loss: float  # mean loss of the micro-batch
    tokens: int  # loss tokens in the micro-batch
    lr: float
    grad_norm: float | None  # at accumulation boundaries, when DeepSpeed reports it
    seconds: float


@dataclass(frozen=True)
class Comparison:
    """A labelled pair: `p_a` is the probability that response A is the better one."""

    messages: list[ChatMessage]  # the conversation both responses answer
    response_a: str
    response_b: str
    p_a: float  # soft label in [0, 1]
    aspect: str = "harmless"  # "harmless" | "helpful"
    finished_a: bool = True  # response A stopped by itself (False: cut at max_new_tokens)
    finished_b: bool = True


def shard_bounds(n: int, world: int) -> list[int]:
    """Cut points of `n` items over `world` ranks in contiguous shards, rank r holding
    items[b[r]:b[r + 1]]: the split every sharded call uses (`ActorGroup.submit_shards`)."""
    return [n * r // world for r in range(world + 1)]


@dataclass(frozen=True)
class PolicyForward:
    """The trainer's forward pass over a batch before it trains on it, no gradients."""

    logprobs: Any  # [N] response-token log-probs at the sampler's temperature, flat row-major
    values: Any | None  # [N] the critic's value before each response token; None: no critic


@dataclass
class Experience:
    """One PPO batch as the trainer trains on it. Per-token fields are flat [N] float32 CPU
    tensors over the response tokens of `sequences`, row-major (N = Σ len(response ids)), the
    layout `token_logprobs` produces; None where the configuration does not use them."""

    sequences: list[tuple[list[int], list[int]]]  # (prompt ids, response ids) as sampled
    advantages: Any  # [N]
    old_logprobs: Any | None = None  # [N] proximal policy; None: this very forward's (single
    #                                  update, `ppo.single_update`)
    returns: Any | None = None  # [N] critic targets (advantage=gae)
    old_values: Any | None = None  # [N] critic values before the update (advantage=gae)
    ref_logprobs: Any | None = None  # [N] the reference's, when the KL is in the loss
    behaviour_logprobs: Any | None = None  # [N] the sampler's for tokens of stale samples,
    #                                        NaN for fresh ones; None: all fresh
    kl_coef: float = 0.0  # β of the KL term in the loss (0 when the KL is in the reward)
    is_cap: float = 2.0  # truncation of the staleness importance weights
    weight_version: int = 0  # the trainer's weights this batch is trained from

    @property
    def lengths(self) -> list[int]:
        return [len(r) for _, r in self.sequences]

    def shard(self, world: int) -> list[Experience]:
        """Contiguous shards by sequence (`shard_bounds`), each per-token field cut at the
        same sequence boundaries: shard r is what trainer rank r trains on."""
        seq_b = shard_bounds(len(self.sequences), world)
        lengths = self.lengths
        tok_b = [sum(lengths[:b]) for b in seq_b]
        out = []
        for r in range(world):
            lo, hi = tok_b[r], tok_b[r + 1]
            cut = {k: None if v is None else v[lo:hi] for k, v in (
                ("advantages", self.advantages), ("old_logprobs", self.old_logprobs),
                ("returns", self.returns), ("old_values", self.old_values),
                ("ref_logprobs", self.ref_logprobs),
                ("behaviour_logprobs", self.behaviour_logprobs))}
            out.append(Experience(self.sequences[seq_b[r]:seq_b[r + 1]], **cut,
                                  kl_coef=self.kl_coef, is_cap=self.is_cap,
                                  weight_version=self.weight_version))
        return out


@dataclass(frozen=True)
class PPOStats:
    """One trainer rank's PPO update: means over its micro-batches (`PPOTrainerWorker`)."""

    policy_loss: float
    entropy: float
    clip_fraction: float  # share of tokens where clipping removed the gradient
    approx_kl: float  # ½(log ρ)² against the proximal policy
    ratio_mean: float
    lr: float
    seconds: float
    tokens: float
    grad_norm: float | None = None
    is_weight_mean: float | None = None  # staleness importance weights (truncated_is)
    value_loss: float | None = None  # critic (advantage=gae)
    value_clip_fraction: float | None = None
    kl_token: float | None = None  # KL in the loss (k3) per token, before the update
    kl_seq: float | None = None  # the same per sequence

    _VALUE = {"value_loss": "value/loss", "value_clip_fraction": "value/clip_fraction"}
    _NOT_METRICS = ("kl_token", "kl_seq")  # the driver reports them as kl/...

    def metrics(self) -> dict[str, float]:
        """The logged names: policy/<field>, value/loss, value/clip_fraction."""
        out = {}
        for k, v in self.__dict__.items():
            if v is not None and k not in self._NOT_METRICS:
                out[self._VALUE.get(k, f"policy/{k}")] = float(v)
        return out

    @staticmethod
    def mean(stats: list[PPOStats]) -> PPOStats:
        """Field-wise mean over ranks (a field left out by every rank stays None)."""
        vals: dict[str, float | None] = {}
        for k in stats[0].__dict__:
            xs = [getattr(s, k) for s in stats if getattr(s, k) is not None]
            vals[k] = sum(xs) / len(xs) if xs else None
        return PPOStats(**vals)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DPOPairs:
    """A DPO micro-batch: B comparisons tokenised as the rollout engine renders them, with the
    frozen reference's summed log-probs computed once beforehand."""

    seqs_a: list[tuple[list[int], list[int]]]  # B × (prompt ids, response A ids)
    seqs_b: list[tuple[list[int], list[int]]]  # B × (prompt ids, response B ids)
    ref_a: list[float]  # [B] Σ log π_ref(response A tokens)
    ref_b: list[float]  # [B]
    p_a: list[float]  # [B] soft labels: probability that A is the better response


@dataclass(frozen=True)
class DPOStats:
    """One trainer rank's DPO micro-batch (`DPOTrainerWorker.train_dpo`)."""

    step: int  # micro-steps taken by this rank
    loss: float
    margin: float  # mean implicit-reward margin of the label's side over the other
    reward_chosen: float  # mean implicit reward of the side the label prefers
    reward_rejected: float
    accuracy: float  # share of pairs whose margin has the label's sign (ties left out)
    lr: float
    grad_norm: float | None
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {f"dpo/{k}": float(v) for k, v in self.__dict__.items()
                if v is not None and k != "step"}
