"""Typed-dataclass validation: turn nested dicts (YAML + overrides) into config objects.

Every problem is collected, not raised at the first one, so a user fixes a broken config in one
pass. Each problem carries its dotted path and where the value came from (file or command line).
Fields declare help text and an optional check with `option(...)`; the CLI prints both in --help.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: where (file and dotted path) and what is allowed."""

    path: str
    message: str
    source: str | None = None

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.path or '<root>'}: {self.message}"


class ValidationError(Exception):
    """Raised with every problem found; str() lists them one per line."""

    def __init__(self, what: str, problems: list[Problem]):
        self.what = what
        self.problems = problems
        lines = [f"{what}: {len(problems)} problem(s)"] + [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


def option(default: Any = dataclasses.MISSING, help: str = "", check: Check | None = None,
           factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with help text and an optional value check."""
    meta = {"help": help, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --- value checks -------------------------------------------------------------------------------

def positive(v: Any) -> str | None:
    return None if v is None or v > 0 else f"must be > 0, got {v!r}"


def non_negative(v: Any) -> str | None:
    return None if v is None or v >= 0 else f"must be >= 0, got {v!r}"


def in_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None:
            return None
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = v < hi if hi_open else v <= hi
        if ok_lo and ok_hi:
            return None
        return f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {v!r}"
    return check


def non_empty(v: Any) -> str | None:
    if v is None:
        return None
    empty = not v.strip() if isinstance(v, str) else len(v) == 0
    return "must not be empty" if empty else None


# --- type checking ------------------------------------------------------------------------------

def describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {describe_type(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of str to {describe_type(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, path: str, problems: list[Problem],
             source_of: Callable[[str], str | None]) -> Any:
    """Check `value` against type `tp`; return the converted value (problems appended)."""
    origin = get_origin(tp)
    bad = Problem(path, f"expected {describe_type(tp)}, got {type(value).__name__} {value!r}",
                  source_of(path))
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return build(tp, value, path, problems, source_of)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            trial: list[Problem] = []
            out = _convert(value, arg, path, trial, source_of)
            if not trial:
                return out
            if len(args) == 2:  # Optional[X]: X's own problems are the most precise message
                problems.extend(trial)
                return None
        problems.append(bad)
        return None
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(Problem(path, f"must be {describe_type(tp)}; got {value!r}{hint}",
                                source_of(path)))
        return None
    if origin is list:
        if not isinstance(value, list):
            problems.append(bad)
            return None
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{path}[{i}]", problems, source_of)
                for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(bad)
            return None
        _, val_tp = get_args(tp)
        return {str(k): _convert(v, val_tp, f"{path}.{k}", problems, source_of)
                for k, v in value.items()}
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "5e-4" (no dot in the mantissa) as a string; it means a number.
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
            return float(value)
        problems.append(bad)
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(bad)
        return None
    if tp in (bool, str):
        if isinstance(value, tp):
            return value
        problems.append(bad)
        return None
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def build(cls: type, data: Any, path: str, problems: list[Problem],
          source_of: Callable[[str], str | None] = lambda _p: None) -> Any:
    """Build dataclass `cls` from a mapping, appending every problem found to `problems`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(Problem(path, f"expected a mapping, got {type(data).__name__} {data!r}",
                                source_of(path)))
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            sub = f"{path}.{key}" if path else str(key)
            problems.append(Problem(sub, f"unknown key{hint} (allowed: {', '.join(fields)})",
                                    source_of(sub)))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required:
            kwargs[name] = None  # placeholder when invalid, so the remaining checks still run
        if name not in data:
            if required:
                problems.append(Problem(sub, "missing required field "
                                        f"({describe_type(hints[name])})", source_of(sub)))
            continue
        before = len(problems)
        value = _convert(data[name], hints[name], sub, problems, source_of)
        if len(problems) > before:
            if value is not None:  # a container with bad parts: keep it for the cross-checks
                kwargs[name] = value
            continue  # otherwise keep the default; the problem is recorded
        check = f.metadata.get("check")
        msg = check(value) if check else None
        if msg:
            problems.append(Problem(sub, msg, source_of(sub)))
            continue
        kwargs[name] = value
    obj = cls(**kwargs)
    cross = getattr(obj, "problems", None)
    if callable(cross):
        for sub, msg in cross():
            full = f"{path}.{sub}" if path else sub
            problems.append(Problem(full, msg, source_of(full)))
    return obj


def to_dict(obj: Any) -> Any:
    """Plain nested dict of a config object (for YAML output)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) for every leaf field, for --help output."""
    rows: list[tuple[str, str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            rows.extend(describe_fields(tp, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(to_dict(f.default_factory()))
        else:
            default = "(required)"
        rows.append((key, describe_type(tp), default, f.metadata.get("help", "")))
    return rows
