"""Stage output on disk: completed shards, merged datasets, and the SL training view.

    DIR/sl/shards/red-00000/      one HF dataset per finished shard (written aside, then renamed)
    DIR/sl/data/                  all shards in plan order: prompt, initial_response, rounds, ...
    DIR/sl/train/                 SFT view: messages, response, source (revisions + helpful)
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from cai_ray.configschema import Problem, ValidationError
from cai_ray.messages import Prompt
from cai_ray.revisions import clean_revision, is_bare_refusal, is_unrevised

log = logging.getLogger(__name__)

_MSG = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "prompt_id": datasets.Value("string"),
    "prompt": datasets.Value("string"),
    "messages": _MSG,
    "initial_response": datasets.Value("string"),
    "initial_truncated": datasets.Value("bool"),  # cut off at max_new_tokens (no EOS)
    "rounds": [{"principle_id": datasets.Value("string"), "critique": datasets.Value("string"),
                "revision": datasets.Value("string"), "truncated": datasets.Value("bool")}],
    "final_response": datasets.Value("string"),
    "final_truncated": datasets.Value("bool"),
    "source": datasets.Value("string"),
})
TRAIN_FEATURES = datasets.Features({
    "id": datasets.Value("string"), "messages": _MSG, "response": datasets.Value("string"),
    "finished": datasets.Value("bool"),  # the response stopped by itself: it ends in EOS
    "source": datasets.Value("string"),
})


def save_atomic(ds: datasets.Dataset, final: Path) -> None:
    """save_to_disk beside the target, then rename: readers never see half a dataset."""
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    ds.save_to_disk(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def unknown_principles(ds: datasets.Dataset, src: str, known: set[str]) -> list[Problem]:
    """Rows of an SL shard naming a principle the constitution does not have."""
    return [Problem(f"row {i}", f"principle id {r['principle_id']!r} is not in the constitution",
                    src) for i, rounds in enumerate(ds["rounds"]) for r in rounds
            if r["principle_id"] not in known]


class ShardStore:
    """Finished shards of a stage's output, one HF dataset each, keyed by prompt ids."""

    def __init__(self, root: Path, features: datasets.Features = FEATURES):
        self.root = root
        self.features = features
        root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def write(self, name: str, rows: list[dict[str, Any]]) -> None:
        save_atomic(datasets.Dataset.from_list(rows, features=self.features), self.path(name))

    def read(self, name: str) -> datasets.Dataset:
        return datasets.load_from_disk(str(self.path(name)))

    def verify(self, plan: list[tuple[str, list[Prompt]]],
               check: Callable[[datasets.Dataset, str], list[Problem]]) -> set[str]:
        """Names of finished shards, after checking each holds exactly the prompts the plan puts
        there and passes `check` (e.g. only principles the constitution knows); any mismatch
        stops the run before an actor starts, since continuing would repeat or lose prompts."""
        problems: list[Problem] = []
        done = set()
        for name, prompts in plan:
            if not self.path(name).exists():
                continue
            ds = self.read(name)
            src = str(self.path(name))
            if set(ds["prompt_id"]) != {p.id for p in prompts}:
                problems.append(Problem(name, "holds other prompts than this config plans for "
                                        "the shard (data, limit, shard_size or shuffle_seed "
                                        "changed?); use a new --output directory", src))
                continue
            problems += check(ds, src)
            done.add(name)
        if problems:
            raise ValidationError("cannot resume", problems)
        return done


def train_view(data: datasets.Dataset, train_rounds: int | None, drop_truncated: bool = True,
               clean: bool = False, drop_refusals: bool = False,
               drop_unrevised: bool = False) -> tuple[datasets.Dataset, int]:
    """Revisions from every round up to `train_rounds` (SL-CAI-n) plus helpfulness samples,
    and how many truncated ones were left out. A response cut off at max_new_tokens is left
    out (`drop_truncated`) or kept without an EOS: never taught as if it had ended there.
    With `clean`, each revision goes through `clean_revision`; the ones with no reply left in
    them are left out (and logged). With `drop_refusals`, revisions that only decline
    (`is_bare_refusal`) are left out too, and with `drop_unrevised` revisions that repeat the
    initial answer (`is_unrevised`); both are logged."""
    rows, dropped, meta, refusals, unrevised = [], 0, 0, 0, 0

    def add(row_id: str, messages: Any, response: str, truncated: bool, source: str) -> None:
        nonlocal dropped
        if truncated and drop_truncated:
            dropped += 1
            return
        rows.append({"id": row_id, "messages": messages, "response": response,
                     "finished": not truncated, "source": source})

    for row in data:
        if not row["rounds"]:  # a helpfulness sample
            add(row["id"], row["messages"], row["final_response"], bool(row["final_truncated"]),
                "helpful")
            continue
        for r, rnd in enumerate(row["rounds"][:train_rounds], start=1):
            text = rnd["revision"]
            if clean:
                text = clean_revision(text, row["prompt"])
                if text is None:
                    meta += 1
                    continue
            if drop_refusals and is_bare_refusal(text):
                refusals += 1
                continue
            if drop_unrevised and is_unrevised(text, row["initial_response"]):
                unrevised += 1
                continue
            add(f"{row['id']}@{r}", row["messages"], text, bool(rnd["truncated"]),
                f"revision@{r}")
    if meta:
        log.info("SL training view: left out %d revisions that speak about the revision "
                 "instead of replying (sl.clean_revisions)", meta)
    if refusals:
        log.info("SL training view: left out %d revisions that only decline "
                 "(sl.drop_bare_refusals)", refusals)
    if unrevised:
        log.info("SL training view: left out %d revisions that repeat the initial answer "
                 "(sl.drop_unrevised)", unrevised)
    if not rows:
        return datasets.Dataset.from_dict({k: [] for k in TRAIN_FEATURES},
                                          features=TRAIN_FEATURES), dropped
    return datasets.Dataset.from_list(rows, features=TRAIN_FEATURES), dropped


def merge_shards(store: ShardStore, plan: list[tuple[str, list[Prompt]]], final: Path
                 ) -> datasets.Dataset:
    """All shards in plan order into one dataset at `final` (written aside, then renamed)."""
    parts = [store.read(name) for name, _ in plan]
    data = datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_list(
        [], features=store.features)
    ids = data["id"]
    if len(ids) != len(set(ids)):
        raise RuntimeError("duplicate rows across shards")  # the plan makes this impossible
    save_atomic(data, final)
    return data


def build_views(store: ShardStore, plan: list[tuple[str, list[Prompt]]], sl_dir: Path,
                train_rounds: int | None, drop_truncated: bool = True, clean: bool = False,
                drop_refusals: bool = False, drop_unrevised: bool = False) -> Path:
    data = merge_shards(store, plan, sl_dir / "data")
    train, dropped = train_view(data, train_rounds, drop_truncated, clean, drop_refusals,
                                drop_unrevised)
    if not len(train):
        raise ValueError(f"every one of the {dropped} SL training targets was cut off at "
                         "sl.max_new_tokens: raise it, or set sl.drop_truncated=false to train "
                         "on them without an EOS")
    save_atomic(train, sl_dir / "train")
    cut = dropped if drop_truncated else sum(not f for f in train["finished"])
    log.info("SL data: %d rows -> %s; training view: %d samples -> %s (%d truncated %s)",
             len(data), sl_dir / "data", len(train), sl_dir / "train", cut,
             "left out" if drop_truncated else "kept without EOS")
    return sl_dir / "data"
