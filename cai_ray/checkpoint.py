"""Atomic run state on disk: a checkpoint is written aside and renamed into place, never edited.

    ckpts = Checkpoints(run_dir / "ppo" / "checkpoints", keep=2)
    tmp = ckpts.begin(step)            # DIR/.step-00000012.tmp, empty
    ...every trainer rank saves its engines into tmp...
    ckpts.commit(tmp, step, state)     # state.json written and fsynced, then the rename
    path, state = ckpts.latest()       # newest complete checkpoint, or (None, None)

A directory named `step-N` is complete by construction (the rename is the last act of a save);
a `.step-N.tmp` left by a killed save is torn and is removed, never read. Only the newest `keep`
complete checkpoints are kept.

Append-only logs that must agree with a checkpoint (prompts consumed, metrics) are cut back to
the checkpoint's step on resume with `rewind_jsonl`, so a resumed run neither repeats nor loses
an entry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

_NAME = re.compile(r"step-(\d{8})")


def _fsync_write(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class Checkpoints:
    def __init__(self, root: Path, keep: int):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root, self.keep = Path(root), keep

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.root.exists():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := _NAME.fullmatch(p.name)) and (p / "state.json").exists()]
        return sorted(found)

    def torn(self) -> list[Path]:
        """Leftovers of saves that were interrupted."""
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.iterdir() if p.name.endswith(".tmp"))

    def latest(self) -> tuple[Path | None, dict[str, Any] | None]:
        done = self.complete()
        if not done:
            return None, None
        path = done[-1][1]
        return path, json.loads((path / "state.json").read_text())

    def begin(self, step: int) -> Path:
        tmp = self.root / f".step-{step:08d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, step: int, state: dict[str, Any]) -> Path:
        _fsync_write(tmp / "state.json", json.dumps({"step": step, **state}, indent=1))
        final = self.root / f"step-{step:08d}"
        if final.exists():  # the same step saved again after a resume: replace it whole
            old = final.with_name(final.name + ".old.tmp")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename durable
        finally:
            os.close(fd)
        for _, path in self.complete()[:-self.keep]:
            shutil.rmtree(path)
        return final

    def clean_torn(self) -> list[Path]:
        torn = self.torn()
        for p in torn:
            shutil.rmtree(p)
        return torn


def rewind_jsonl(path: Path, max_step: int) -> int:
    """Keep only the lines of a jsonl log whose "step" is <= max_step (and drop a torn last
    line); rewritten aside and renamed. Returns the number of lines dropped."""
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if int(rec.get("step", 0)) <= max_step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        _fsync_write(tmp, "".join(x + "\n" for x in keep))
        tmp.rename(path)
    return dropped
