"""Peak resident memory of a run: the driver and every process under it.

Ray workers are grandchildren of the driver (under the raylet it started), which `ru_maxrss`
does not count; a sampling thread adds up the RSS of the whole process tree instead.
"""

from __future__ import annotations

import os
import threading
from types import TracebackType

import psutil


def _run_processes() -> list[psutil.Process]:
    """The driver and all its descendants: a local Ray started by the driver (raylet, GCS and
    every worker under them) is among them; other sessions' processes are not."""
    me = psutil.Process(os.getpid())
    return [me] + me.children(recursive=True)


def current_rss_bytes(name_prefix: str | None = None) -> int:
    """RSS of the run's processes; with `name_prefix`, only those whose command line starts
    with it (e.g. "ray::FeedbackWorker" for the processes of one role's actors)."""
    total = 0
    for p in _run_processes():
        try:
            if name_prefix is not None and not " ".join(p.cmdline()).startswith(name_prefix):
                continue
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class PeakRSS:
    """`with PeakRSS() as m: ...` then `m.peak_gib`: sampled every `interval_s`."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30
