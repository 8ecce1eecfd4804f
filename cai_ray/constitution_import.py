"""Import published constitution formats into this project's YAML format, keeping every principle.

- `anthropic`: the JSON files of the CAI paper's repository. A critique/revision file is a mapping
  `{key: {"prompt": [critique, ...], "edit_request": revision}}`; a comparison file is a list of
  strings. Several files may be given and are merged (the format is detected per file).
- `hf`: the llm-swarm JSON, `{"constitutions": [{"critic", "revision"}], "system_chat": [...]}`,
  where `system_chat` holds few-shot chats of six turns each (request, answer, critique request,
  critique, revision request, revision), either as one flat list or as a list of chats.

Imported comparison principles get aspect `harmless` (both published sets are about harm); edit
the YAML to mark helpfulness ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from cai_ray.configschema import Problem, ValidationError
from cai_ray.constitution import Constitution, parse_constitution

Format = Literal["anthropic", "hf"]


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "principle"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValidationError("cannot import", [Problem("", "file not found", str(path))]) from None
    except json.JSONDecodeError as e:
        raise ValidationError("cannot import", [Problem(
            "", f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", str(path))]) from None


def _anthropic_pairs(data: dict[str, Any], src: str, problems: list[Problem]
                     ) -> list[dict[str, str]]:
    pairs = []
    for key, entry in data.items():
        if not isinstance(entry, dict) or "edit_request" not in entry or "prompt" not in entry:
            problems.append(Problem(str(key), "expected {\"prompt\": [critique, ...], "
                                    "\"edit_request\": revision}", src))
            continue
        critiques = entry["prompt"]
        critiques = [critiques] if isinstance(critiques, str) else critiques
        if not isinstance(critiques, list) or not critiques:
            problems.append(Problem(f"{key}.prompt", "expected a non-empty list of strings", src))
            continue
        for j, critique in enumerate(critiques):
            # One pair per critique: several critiques under one key share the revision.
            pid = _slug(str(key)) if len(critiques) == 1 else f"{_slug(str(key))}-{j}"
            pairs.append({"id": pid, "critique": critique, "revision": entry["edit_request"]})
    return pairs


def _anthropic(paths: list[Path]) -> dict[str, Any]:
    problems: list[Problem] = []
    pairs: list[dict[str, str]] = []
    comparison: list[dict[str, str]] = []
    for path in paths:
        data = _read_json(path)
        if isinstance(data, dict):
            pairs += _anthropic_pairs(data, str(path), problems)
        elif isinstance(data, list):
            for i, text in enumerate(data):
                if not isinstance(text, str):
                    problems.append(Problem(f"[{i}]", "expected a string", str(path)))
                    continue
                comparison.append({"id": f"comparison-{len(comparison):02d}",
                                   "aspect": "harmless", "text": text})
        else:
            problems.append(Problem("", "expected a critique/revision mapping or a list of "
                                    "comparison principles", str(path)))
    if problems:
        raise ValidationError("cannot import (anthropic format)", problems)
    names = ", ".join(p.stem for p in paths)
    return {"name": "imported-anthropic", "description": f"imported from {names}",
            "critique_revision": pairs, "comparison": comparison}


_CHAT_ROLES = ["user", "assistant"] * 3
_EXAMPLE_KEYS = ["prompt", "response", "critique_request", "critique", "revision_request",
                 "revision"]


def _hf_examples(chat: Any, src: str, problems: list[Problem]) -> list[dict[str, str]]:
    chats = chat if chat and all(isinstance(c, list) for c in chat) else [chat]
    out = []
    for ci, turns in enumerate(chats):
        if not isinstance(turns, list) or len(turns) % 6:
            problems.append(Problem(f"system_chat[{ci}]", "expected chats of 6 turns each "
                                    "(user/assistant × 3)", src))
            continue
        for start in range(0, len(turns), 6):
            block = turns[start:start + 6]
            roles = [t.get("role") if isinstance(t, dict) else None for t in block]
            if roles != _CHAT_ROLES:
                problems.append(Problem(f"system_chat[{ci}][{start}]", f"expected roles "
                                        f"{_CHAT_ROLES}, got {roles}", src))
                continue
            out.append({k: t.get("content", "") for k, t in zip(_EXAMPLE_KEYS, block, strict=True)})
    return out


def _hf(paths: list[Path]) -> dict[str, Any]:
    problems: list[Problem] = []
    pairs: list[dict[str, str]] = []
    examples: list[dict[str, str]] = []
    for path in paths:
        data = _read_json(path)
        src = str(path)
        if not isinstance(data, dict) or not isinstance(data.get("constitutions"), list):
            problems.append(Problem("constitutions", "expected {\"constitutions\": [{\"critic\", "
                                    "\"revision\"}, ...], \"system_chat\": [...]}", src))
            continue
        for i, item in enumerate(data["constitutions"]):
            if not isinstance(item, dict) or "critic" not in item or "revision" not in item:
                problems.append(Problem(f"constitutions[{i}]", "expected {\"critic\", "
                                        "\"revision\"}", src))
                continue
            pairs.append({"id": f"pair-{len(pairs):02d}", "critique": item["critic"],
                          "revision": item["revision"]})
        examples += _hf_examples(data.get("system_chat") or [], src, problems)
    if problems:
        raise ValidationError("cannot import (hf format)", problems)
    return {"name": "imported-hf", "description": "imported from " +
            ", ".join(p.stem for p in paths), "critique_revision": pairs,
            "few_shot": {"critique_revision": examples}}


def import_constitution(fmt: Format, paths: list[str | Path]) -> Constitution:
    """Read published-format files and return a validated Constitution."""
    files = [Path(p) for p in paths]
    data = _anthropic(files) if fmt == "anthropic" else _hf(files)
    return parse_constitution(data, f"import of {', '.join(map(str, files))}")
