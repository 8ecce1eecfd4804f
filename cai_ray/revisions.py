"""Cleaning a written revision before SFT trains on it (`sl.clean_revisions`).

A small reviser often wraps the new reply in talk about the revision ("Sure, here's the revised
response:"), repeats the human's question above it, or answers the instruction instead of the
human ("I will now revise my answer to ..."). Finetuned on, that text teaches the policy to talk
about revisions. `clean_revision` strips a leading preamble line, an echoed question and
wrapping quotes, and returns None for a reply that still speaks about the revision itself: the
training view leaves those out. The stored SL data keeps the raw text.

`is_bare_refusal` tells a reply that only declines ("I'm sorry, but I can't help with that.")
from one that declines and then engages (the reason, the risks, where to find help).
Finetuned on, bare refusals make the policy evasive; `sl.drop_bare_refusals` leaves them out.

`is_unrevised` tells a revision that repeats the initial answer (a reviser that copied it):
on a red-team prompt that is the harmful answer again, taught as if revised.
`sl.drop_unrevised` leaves those out.
"""

from __future__ import annotations

import difflib
import re

# A first line that announces the reply instead of being it: short, ends with a colon, and
# speaks of a revision or a new version ("Here's what you can do:" is part of a reply).
_PREAMBLE = re.compile(
    r"^[^\n]{0,160}\b(revis\w*|rewr[io]t\w*|(new|updated|improved|better|safer) "
    r"(reply|response|answer|version))\b[^\n]{0,160}:\s*(\n|$)", re.IGNORECASE)
# Text that is about the revision task, not a reply to the human.
_META = re.compile(
    r"\b(revis(e|ed|ing|ion)|rewrit(e|ten|ing)|critique[ds]?)\b"
    r"|\b(my|the|your|this|assistant's) (previous|last|earlier|original|first|above) "
    r"(response|reply|answer)s?\b"
    r"|\bthis (response|reply) (adheres|follows|avoids|is)\b"
    r"|\bonly the reply itself\b"
    r"|^\s*\(.*\)\s*$",
    re.IGNORECASE)
_QUOTES = [('"', '"'), ("“", "”"), ("'", "'")]


def clean_revision(text: str, prompt: str = "") -> str | None:
    """The reply inside a revision, or None when there is no usable reply in it."""
    out = text.strip()
    m = _PREAMBLE.match(out)
    if m:
        out = out[m.end():].strip()
    q = prompt.strip()
    if q and out.startswith(q):  # the human's question echoed above the reply
        out = out[len(q):].strip()
    for a, b in _QUOTES:
        if len(out) > 1 and out.startswith(a) and out.endswith(b) and out.count(a) <= 2:
            out = out[1:-1].strip()
    if not out or _META.search(out):
        return None
    return out


# A refusal phrase, first person: "I can't help", "I'm unable to provide", "I won't assist".
_REFUSAL = re.compile(
    r"\bI(?:['’]m| am)? ?(?:can(?:['’]|no)t|won['’]?t|will not|must decline|unable|"
    r"(?:am )?not able)\b(?:\s+[\w'’]+){0,4}?\s+"
    r"\b(help|assist|provide|support|comply|fulfil+|answer|do that|create|generate|write|give|"
    r"share|engage|offer)", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z'’]+")
_SENTENCE_END = re.compile(r"[.!?]+(\s|$)")


def is_bare_refusal(text: str, max_words: int = 20) -> bool:
    """A short reply that declines and offers nothing else: at most two sentences and
    `max_words` words, with a first-person refusal in it. A refusal followed by a reason,
    facts or a pointer to help runs longer and is not bare."""
    out = text.strip()
    if not out or not _REFUSAL.search(out):
        return False
    sentences = [s for s in _SENTENCE_END.split(out) if s and s.strip()]
    return len(_WORD.findall(out)) <= max_words and len(sentences) <= 2


def is_unrevised(revision: str, initial: str, threshold: float = 0.8) -> bool:
    """The revision is (nearly) the initial answer: their difflib similarity ratio, over
    whole texts, is at least `threshold` (1 = identical)."""
    a, b = revision.strip(), initial.strip()
    if not a or not b:
        return False
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= threshold
