"""Refresh `tests/file_seconds.json`, the measured seconds of each test file, from a run's
`--durations=0` report:

    .venv/bin/pytest -q -p xdist -n 2 --dist loadfile --durations=0 tests | tee /tmp/t.log
    .venv/bin/python tests/file_seconds.py /tmp/t.log

Under xdist, `conftest.py` hands the files out heaviest first, so a long file never starts last
and runs alone at the end (the order only: nothing is skipped or weighted in a result).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*([0-9.]+)s (?:call|setup|teardown)\s+(tests/\S+?\.py)::")
OUT = Path(__file__).resolve().parent / "file_seconds.json"


def per_file(report: str) -> dict[str, float]:
    seconds: dict[str, float] = defaultdict(float)
    for line in report.splitlines():
        m = LINE.match(line)
        if m:
            seconds[m.group(2)] += float(m.group(1))
    return {k: round(v, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    seconds = per_file(Path(sys.argv[1]).read_text())
    if not seconds:
        sys.exit(f"{sys.argv[1]}: no `--durations=0` lines (e.g. '12.3s call tests/x.py::t')")
    OUT.write_text(json.dumps(seconds, indent=1) + "\n")
    print(f"{OUT}: {len(seconds)} files, {sum(seconds.values()):.0f} s in all")


if __name__ == "__main__":
    main()
