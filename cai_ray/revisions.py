"""Cleaning a written revision before SFT trains on it (`sl.clean_revisions`).

A small reviser often wraps the new reply in talk about the revision ("Sure, here's the revised
response:"), repeats the human's question above it, or answers the instruction instead of the
human ("I will now revise my answer to ..."). Finetuned on, that text teaches the policy to talk
about revisions. `clean_revision` strips a leading preamble line, an echoed question and
wrapping quotes, and returns None for a reply that still speaks about the revision itself: the
training view leaves those out. The stored SL data keeps the raw text.
"""

from __future__ import annotations

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
