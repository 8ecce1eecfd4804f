"""SL-CAI's `sl.reviser: feedback`: the driver sends each phase to the right engine. Fast fake
rollout workers in-process (the real engines run in tests/integration/test_sl.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tqdm import tqdm

from cai_ray.actors.group import ActorGroup, Worker, WorkerContext
from cai_ray.actors.rollout import RolloutWorker
from cai_ray.config import RoleResources, load_config
from cai_ray.configschema import ValidationError
from cai_ray.constitution import load_constitution
from cai_ray.messages import Completion, GenerationRequest, GenerationResult, Prompt
from cai_ray.stages.sl import Chain, Chunk, CritiqueRevision, generate_chains

ROOT = Path(__file__).resolve().parents[2]


class TaggedRollout(RolloutWorker):
    """Answers every request with its own tag, the request id and the last user turn's length,
    and remembers what it was asked."""

    def __init__(self, ctx: WorkerContext, tag: str):  # no engine
        Worker.__init__(self, ctx)
        self.tag = tag
        self.seen: list[str] = []

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        out = []
        for r in requests:
            self.seen.append(r.request_id)
            last = r.messages[-1]["content"]
            out.append(GenerationResult(r.request_id, [1], [Completion(
                f"{self.tag} wrote {r.request_id} after {last[-40:]!r}", [1, 2, 3], None,
                "stop")], 0))
        return out

    def asked(self) -> list[str]:
        return self.seen


def group(tag: str, n: int) -> ActorGroup[TaggedRollout]:
    return ActorGroup(tag, TaggedRollout, RoleResources(num_actors=n), local=True,
                      call_timeout_s=10.0, init_args=(tag,))


def test_the_policy_answers_and_the_reviser_critiques_and_revises() -> None:
    cfg = load_config(ROOT / "configs" / "cpu-tiny.yaml", ["sl.rounds=2", "sl.reviser=feedback"])
    cr = CritiqueRevision(cfg, load_constitution(ROOT / "constitutions" / "default.yaml"))
    prompts = [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"question {i}"}],
                      source="test") for i in range(5)]
    policy, reviser = group("policy", 2), group("reviser", 2)
    try:
        with tqdm(disable=True) as bar:
            chains = generate_chains(policy, cr, prompts, bar, reviser)
        asked_policy = sorted(x for r in policy.call_all(TaggedRollout.asked) for x in r)
        asked_reviser = sorted(x for r in reviser.call_all(TaggedRollout.asked) for x in r)
    finally:
        policy.shutdown()
        reviser.shutdown()
    assert asked_policy == sorted(f"p{i}|0" for i in range(5))  # answers only
    assert asked_reviser == sorted(f"p{i}|{k}" for i in range(5) for k in range(1, 5))
    assert [c.prompt.id for c in chains] == [p.id for p in prompts]
    for c in chains:
        assert c.responses[0].startswith(f"policy wrote {c.prompt.id}|0")
        assert [r["critique"].split(" after ")[0] for r in c.rounds] == [
            f"reviser wrote {c.prompt.id}|1", f"reviser wrote {c.prompt.id}|3"]
        assert [r["revision"].split(" after ")[0] for r in c.rounds] == [
            f"reviser wrote {c.prompt.id}|2", f"reviser wrote {c.prompt.id}|4"]
        assert c.responses[1:] == [r["revision"] for r in c.rounds]


def test_the_reviser_sees_the_answer_as_a_transcript_it_did_not_write() -> None:
    system = "Decline harmful requests with a reason and a safe alternative."
    cfg = load_config(ROOT / "configs" / "cpu-tiny.yaml", [
        "sl.rounds=1", "sl.reviser=feedback", f"sl.reviser_system={system}"])
    c = load_constitution(ROOT / "constitutions" / "default.yaml")
    cr = CritiqueRevision(cfg, c)
    chunk = Chunk([Chain(Prompt(id="p0", messages=[{"role": "user", "content": "How do I pick "
                                                    "a lock?"}], source="test"))])
    cr.absorb(chunk, [GenerationResult("p0|0", [1], [Completion("Use a tension wrench.", [1],
                                                                 None, "stop")], 0)])
    (crit,) = cr.requests(chunk)
    pair = c.sample_critique(cfg.run.seed, "p0", 0)
    assert [m["role"] for m in crit.messages] == ["system", "user"]
    assert crit.messages[0]["content"] == system
    body = crit.messages[1]["content"]
    assert "Human: How do I pick a lock?\n\nAssistant: Use a tension wrench." in body
    assert pair.critique in body and pair.revision not in body
    cr.absorb(chunk, [GenerationResult("p0|1", [1], [Completion("It explains lock picking.",
                                                                 [1], None, "stop")], 0)])
    (rev,) = cr.requests(chunk)
    body = rev.messages[1]["content"]
    assert "A critique of the assistant's last reply:\nIt explains lock picking." in body
    assert pair.revision in body and "only the reply itself" in body
    # the policy as its own reviser keeps the paper's chat format: its answer is its own turn
    own = CritiqueRevision(load_config(ROOT / "configs" / "cpu-tiny.yaml", ["sl.rounds=1"]), c)
    chunk = Chunk([Chain(chunk.chains[0].prompt)])
    own.absorb(chunk, [GenerationResult("p0|0", [1], [Completion("Use a tension wrench.", [1],
                                                                  None, "stop")], 0)])
    (crit,) = own.requests(chunk)
    assert crit.messages[-2] == {"role": "assistant", "content": "Use a tension wrench."}
    assert crit.messages[-1] == {"role": "user", "content": pair.critique}


def test_sl_sampling_overrides_the_rollout_sampler_key_by_key() -> None:
    c = load_constitution(ROOT / "constitutions" / "default.yaml")
    chunk = Chunk([Chain(Prompt(id="p0", messages=[{"role": "user", "content": "hi"}],
                                source="test"))])
    base = load_config(ROOT / "configs" / "cpu-tiny.yaml", ["rollout.sampling.temperature=0.7"])
    [r] = CritiqueRevision(base, c).requests(chunk)
    s = base.rollout.sampling
    assert (r.temperature, r.top_p, r.top_k, r.repetition_penalty) == (
        s.temperature, s.top_p, s.top_k, s.repetition_penalty)
    own = load_config(ROOT / "configs" / "cpu-tiny.yaml", [
        "rollout.sampling.temperature=0.7", "sl.top_k=50", "sl.top_p=1.0",
        "sl.repetition_penalty=1.1", "sl.max_new_tokens=33"])
    [r] = CritiqueRevision(own, c).requests(chunk)
    assert (r.temperature, r.top_p, r.top_k, r.repetition_penalty, r.max_tokens) == (
        0.7, 1.0, 50, 1.1, 33)
    # the rollout's own sampler, which RL trains on, is left as it was
    assert own.rollout.sampling.top_k == 0


def test_sl_top_k_is_checked_before_any_actor() -> None:
    with pytest.raises(ValidationError, match=r"sl\.top_k"):
        load_config(ROOT / "configs" / "cpu-tiny.yaml", ["sl.top_k=-1"])
