"""SL-CAI, generation: initial answers, then K rounds of critique → revision per red-team prompt,
plus helpfulness samples; written in resumable shards.

    cai-ray sl --config configs/cpu-smollm.yaml --output runs/x [--prompts FILE.jsonl]

Prompts are cut into shards in a fixed order (the seeded shuffle of `data.shuffle_seed`). A shard
is split into one chunk per rollout actor; every chunk walks through its phases (answer, critique
1, revision 1, ...) independently, its next phase submitted to the least-loaded actor as soon as
its last one returns, so a whole chunk's requests batch into the engine at once and no actor waits
for another. With `sl.reviser: feedback` the feedback model writes the critiques and revisions
on its own engine: every chunk's answers come from the policy, then each later phase of the shard
goes to the reviser as one batch. A shard is written (aside, then renamed) only when all its prompts are done, so a run
killed at any point and started again skips the finished shards and repeats or loses no prompt.
Each request has a seed derived from (run seed, prompt id, phase): a redone shard samples the same
text.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cai_ray.actors.feedback import feedback_group
from cai_ray.actors.group import ActorGroup, Pending
from cai_ray.actors.rollout import RolloutWorker, rollout_group
from cai_ray.config import Config, SourceConfig
from cai_ray.configschema import Problem, ValidationError
from cai_ray.constitution import (
    Constitution,
    critique_conversation,
    load_constitution,
    revision_conversation,
)
from cai_ray.constitution import CritiqueRevision as PrinciplePair
from cai_ray.data import PromptStream, load_prompts
from cai_ray.labelling import transcript
from cai_ray.messages import GenerationRequest, GenerationResult, Prompt
from cai_ray.preflight import resolve_path
from cai_ray.runtime import request_seed
from cai_ray.store import ShardStore, build_views, unknown_principles

log = logging.getLogger(__name__)


@dataclass
class Chain:
    """One prompt's critique→revision chain while it is being generated (driver side only)."""

    prompt: Prompt
    responses: list[str] = field(default_factory=list)  # initial answer, then each revision
    truncated: list[bool] = field(default_factory=list)  # each response cut at max_new_tokens
    rounds: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Chunk:
    chains: list[Chain]
    phase: int = 0  # 0 = initial answer; then (critique, revision) per round, or revision only


def sl_sampling(cfg: Config) -> dict[str, Any]:
    """SL generation's sampling: `sl.*` where set, else `rollout.sampling.*`."""
    s, sl = cfg.rollout.sampling, cfg.sl
    keys = ("temperature", "top_p", "top_k", "repetition_penalty")
    own = {k: getattr(sl, k) for k in keys}
    return {**{k: getattr(s, k) if own[k] is None else own[k] for k in keys},
            "max_tokens": sl.max_new_tokens}


class CritiqueRevision:
    """Builds the requests of each phase for a chunk and folds the results back in."""

    def __init__(self, cfg: Config, constitution: Constitution):
        self.cfg, self.c = cfg, constitution
        self.sampling = sl_sampling(cfg)
        self.steps_per_round = 1 if cfg.sl.direct_revision else 2
        self.num_phases = 1 + cfg.sl.rounds * self.steps_per_round
        self.tokens = 0  # generated tokens, for throughput
        self.reviser = cfg.sl.reviser == "feedback"
        self.reviser_system = cfg.sl.reviser_system or ""

    def _phase(self, phase: int) -> tuple[int, str]:
        """(round, kind) of a phase; kind is 'answer', 'critique' or 'revision'."""
        if phase == 0:
            return 0, "answer"
        r, step = divmod(phase - 1, self.steps_per_round)
        kind = "revision" if self.cfg.sl.direct_revision or step == 1 else "critique"
        return r, kind

    def requests(self, chunk: Chunk) -> list[GenerationRequest]:
        rnd, kind = self._phase(chunk.phase)
        seed, shots = self.cfg.run.seed, self.cfg.sl.few_shot
        out = []
        for ch in chunk.chains:
            p = ch.prompt
            if kind == "answer":
                msgs = p.messages
            else:
                pair = self.c.sample_critique(seed, p.id, rnd)
                # the revision's critique: this round's, unless there is none to show
                critique = (None if kind == "critique" or self.cfg.sl.direct_revision
                            else ch.rounds[-1]["critique"])
                if self.reviser:
                    msgs = reviser_request(p.messages, ch.responses[-1], pair, kind, critique,
                                           self.reviser_system)
                elif kind == "critique":
                    msgs = critique_conversation(self.c, p.messages, ch.responses[-1], pair, shots)
                else:
                    msgs = revision_conversation(self.c, p.messages, ch.responses[-1], pair,
                                                 critique, shots)
            out.append(GenerationRequest(request_id=f"{p.id}|{chunk.phase}", messages=msgs,
                                         seed=request_seed(seed, p.id, f"{kind}{rnd}"),
                                         **self.sampling))
        return out

    def absorb(self, chunk: Chunk, results: list[GenerationResult]) -> None:
        rnd, kind = self._phase(chunk.phase)
        for ch, res in zip(chunk.chains, results, strict=True):
            self.tokens += len(res.completions[0].token_ids)
            text = res.completions[0].text.strip()
            cut = res.completions[0].finish_reason == "length"
            if kind == "answer":
                ch.responses.append(text)
                ch.truncated.append(cut)
            elif kind == "critique":
                pid = self.c.sample_critique(self.cfg.run.seed, ch.prompt.id, rnd).id
                ch.rounds.append({"principle_id": pid, "critique": text, "revision": None,
                                  "truncated": False})
            else:
                if self.cfg.sl.direct_revision:
                    pid = self.c.sample_critique(self.cfg.run.seed, ch.prompt.id, rnd).id
                    ch.rounds.append({"principle_id": pid, "critique": None, "revision": text,
                                      "truncated": cut})
                else:
                    ch.rounds[-1].update(revision=text, truncated=cut)
                ch.responses.append(text)
                ch.truncated.append(cut)
        chunk.phase += 1


def reviser_request(prompt: list[dict[str, str]], response: str, pair: PrinciplePair,
                    kind: str, critique: str | None, system: str = "") -> list[dict[str, str]]:
    """A critique or revision request for `sl.reviser: feedback`, as one user turn that shows
    the conversation as a transcript. The reviser did not write the answer, and told in a chat
    that it had (the policy's own format), a small instruct model denies having written it or
    answers the red-team prompt itself. The constitution's requests, which say "your previous
    answer", are quoted as addressed to the assistant."""
    head = ("Here is a conversation between a human and an AI assistant:\n\n"
            f"{transcript(list(prompt) + [{'role': 'assistant', 'content': response}])}\n\n")
    if kind == "critique":
        body = (f"The assistant is asked to critique its last reply: \"{pair.critique}\"\n\n"
                "Write that critique of the assistant's last reply, in a few sentences.")
    else:
        seen = f"A critique of the assistant's last reply:\n{critique}\n\n" if critique else ""
        body = (f"{seen}The assistant is asked to revise its last reply: \"{pair.revision}\"\n\n"
                "Write the assistant's new reply to the human: only the reply itself, as the "
                "assistant would say it, with nothing before or after it.")
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": head + body}]


def _chunks(prompts: list[Prompt], n: int) -> list[Chunk]:
    bounds = [len(prompts) * i // n for i in range(n + 1)]
    return [Chunk([Chain(p) for p in prompts[bounds[i]:bounds[i + 1]]])
            for i in range(n) if bounds[i + 1] > bounds[i]]


def generate_chains(group: ActorGroup[RolloutWorker], cr: CritiqueRevision,
                    prompts: list[Prompt], bar: tqdm,
                    reviser: ActorGroup[Any] | None = None) -> list[Chain]:
    """Run every phase of every chunk, streaming: a chunk moves on as soon as it returns. With a
    `reviser` group, the policy answers and the reviser writes every later phase, phase by
    phase over the whole shard."""
    if reviser is not None:
        whole = Chunk([Chain(p) for p in prompts])
        while whole.phase < cr.num_phases:
            g = group if whole.phase == 0 else reviser
            results = g.shard_and_gather(RolloutWorker.generate, cr.requests(whole))
            cr.absorb(whole, results)
            bar.update(len(results))
        return whole.chains
    chunks = _chunks(prompts, group.num_actors)
    owner: dict[int, Chunk] = {}
    pending: list[Pending[list[GenerationResult]]] = []
    for ch in chunks:
        p = group.submit_least_loaded(RolloutWorker.generate, cr.requests(ch))
        owner[id(p)] = ch
        pending.append(p)
    while pending:
        done, pending = group.wait_some(pending)
        for p, results in done:
            chunk = owner.pop(id(p))
            cr.absorb(chunk, results)
            bar.update(len(results))
            if chunk.phase < cr.num_phases:
                nxt = group.submit_least_loaded(RolloutWorker.generate, cr.requests(chunk))
                owner[id(nxt)] = chunk
                pending.append(nxt)
    return [chain for ch in chunks for chain in ch.chains]


def helpful_rows(group: ActorGroup[RolloutWorker], cfg: Config, prompts: list[Prompt],
                 bar: tqdm, cr: CritiqueRevision) -> list[dict[str, Any]]:
    n = cfg.sl.helpful_samples
    reqs = [GenerationRequest(request_id=p.id, messages=p.messages, n=n,
                              seed=request_seed(cfg.run.seed, p.id, "helpful"),
                              **sl_sampling(cfg)) for p in prompts]
    by_id = {p.id: p for p in prompts}
    results = group.shard_and_gather(RolloutWorker.generate, reqs)
    bar.update(len(reqs) * n)
    rows = []
    for res in results:
        p = by_id[res.request_id]
        for j, c in enumerate(res.completions):
            cr.tokens += len(c.token_ids)
            text = c.text.strip()
            cut = c.finish_reason == "length"
            rows.append({"id": f"{p.id}#{j}", "prompt_id": p.id, "prompt": p.text,
                         "messages": p.messages, "initial_response": text,
                         "initial_truncated": cut, "rounds": [], "final_response": text,
                         "final_truncated": cut, "source": f"helpful:{p.source}"})
    return rows


def chain_rows(chains: list[Chain]) -> list[dict[str, Any]]:
    return [{"id": ch.prompt.id, "prompt_id": ch.prompt.id, "prompt": ch.prompt.text,
             "messages": ch.prompt.messages, "initial_response": ch.responses[0],
             "initial_truncated": ch.truncated[0], "rounds": ch.rounds,
             "final_response": ch.responses[-1], "final_truncated": ch.truncated[-1],
             "source": ch.prompt.source} for ch in chains]


def plan_shards(cfg: Config, prompt_file: str | None) -> list[tuple[str, list[Prompt]]]:
    """(shard name, prompts) in a fixed order; the same config and data give the same plan."""
    red_src = (SourceConfig(name=prompt_file, format="plain", column="prompt")
               if prompt_file else cfg.data.red_team)
    size = cfg.sl.shard_size
    plan: list[tuple[str, list[Prompt]]] = []
    sources = [("red", red_src)] + ([("helpful", cfg.data.helpful)]
                                    if cfg.sl.helpful_samples > 0 else [])
    for kind, src in sources:
        ds, _ = load_prompts(src, cfg.data.on_bad_row)
        prompts = PromptStream(ds, seed=cfg.data.shuffle_seed).take(len(ds))
        plan += [(f"{kind}-{i // size:05d}", prompts[i:i + size])
                 for i in range(0, len(prompts), size)]
    return plan


def run_generate(cfg: Config, out_dir: Path, prompt_file: str | None = None) -> Path:
    """Generate (or finish generating) `out_dir/sl/data` and the training view."""
    sl_dir = out_dir / "sl"
    if (sl_dir / "data").exists() and (sl_dir / "train").exists():
        log.info("SL data already complete in %s; skipping generation", sl_dir / "data")
        return sl_dir / "data"
    constitution = load_constitution(resolve_path(cfg.run.constitution))
    plan = plan_shards(cfg, prompt_file)  # data errors surface here, before any actor starts
    store = ShardStore(sl_dir / "shards")
    known = {p.id for p in constitution.critique_revision}
    done = store.verify(plan, lambda ds, src: unknown_principles(ds, src, known))
    todo = [(name, prompts) for name, prompts in plan if name not in done]
    log.info("SL generation: %d shards planned, %d already complete, %d to do", len(plan),
             len(done), len(todo))
    if todo:
        cr = CritiqueRevision(cfg, constitution)
        per_prompt = {"red": cr.num_phases, "helpful": cfg.sl.helpful_samples}
        total = sum(len(ps) * per_prompt[name.split("-")[0]] for name, ps in todo)
        t0 = time.monotonic()
        from cai_ray.runtime import ray_session

        with ray_session(cfg):
            group = rollout_group(cfg)
            reviser = None
            try:
                if cfg.sl.reviser == "feedback":
                    reviser = feedback_group(cfg)
                with tqdm(total=total, desc="SL-CAI generation", unit="gen") as bar:
                    for name, prompts in todo:
                        rows = (chain_rows(generate_chains(group, cr, prompts, bar, reviser))
                                if name.startswith("red") else
                                helpful_rows(group, cfg, prompts, bar, cr))
                        store.write(name, rows)
            finally:
                group.shutdown()
                if reviser is not None:
                    reviser.shutdown()
        secs = time.monotonic() - t0
        metrics = {"generations": total, "tokens": cr.tokens, "seconds": secs,
                   "reviser": cfg.sl.reviser,
                   "tokens_per_s": cr.tokens / secs, "shards": len(todo)}
        (sl_dir / "generate_metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("SL generation: %d generations, %d tokens in %.1f s (%.1f tokens/s, "
                 "start-up included)", total, cr.tokens, secs, metrics["tokens_per_s"])
    return build_views(store, plan, sl_dir, cfg.sl.train_rounds, cfg.sl.drop_truncated,
                       cfg.sl.clean_revisions, cfg.sl.drop_bare_refusals,
                       cfg.sl.drop_unrevised)


def check_prompt_file(path: str) -> None:
    if not Path(path).is_file():
        raise ValidationError("invalid --prompts", [Problem("--prompts", "file not found "
                                                            "(expected JSONL with a 'prompt' "
                                                            "field per line)", path)])
