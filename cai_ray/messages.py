"""Typed messages that cross actor boundaries.

Everything sent to or returned from an actor is one of these dataclasses (plain Python data and
CPU tensors), never an untyped dict, and every batch produced by a policy carries the
`weight_version` of the weights that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
