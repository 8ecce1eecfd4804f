"""Secrets never leave the process in clear: log lines, error messages, the saved config and
the W&B config pass through `redact`, which replaces the value of every secret environment
variable set in this process with `[redacted]`.

A variable is a secret when it is one of `KNOWN` (W&B key, Hugging Face token, Ray's auth
token, the services' bearer token) or its name ends in TOKEN, API_KEY, SECRET, PASSWORD or
ACCESS_KEY. Values shorter than `MIN_LENGTH` characters are left alone (masking "1" or "true"
everywhere would garble the logs and protect nothing). The environment is read at every call,
so a secret set after logging started is covered too.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

KNOWN = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RAY_AUTH_TOKEN",
         "CAI_RAY_SERVE_TOKEN")
_NAME = re.compile(r"(^|_)(TOKEN|API_KEY|SECRET|PASSWORD|ACCESS_KEY)$")
MIN_LENGTH = 8
MASK = "[redacted]"


def is_secret_name(name: str) -> bool:
    return name in KNOWN or bool(_NAME.search(name.upper()))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The secret values set in `environ` (default: this process), longest first so that a
    secret containing another is masked whole."""
    env = os.environ if environ is None else environ
    vals = {v.strip() for k, v in env.items() if is_secret_name(k) and len(v.strip()) >= MIN_LENGTH}
    return sorted(vals, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    for value in secret_values(environ):
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact_tree(obj: Any) -> Any:
    """`obj` (dicts, lists, strings, scalars) with every string redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_tree(v) for v in obj)
    return obj


class RedactingFormatter(logging.Formatter):
    """A formatter whose output (message, arguments and traceback alike) is redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
