"""Ctrl-C in the `cai-ray` driver: the SIGINT handler and the one line that says how to resume.

The first SIGINT stops the running stage within seconds, also in the middle of a long remote
call: its actors are shut down, finished work stays on disk, and one line says how to resume
(the same command; `--resume` for ppo and pipeline). Should the clean-up hang, the process exits
anyway INTERRUPT_EXIT_S after the signal. A second SIGINT exits at once.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
import time

from cai_ray.redaction import redact

EXIT_INTERRUPTED = 130
INTERRUPT_EXIT_S = 12.0  # after the first Ctrl-C, exit by then even if clean-up hangs


# How each command picks up after an interrupt: PPO continues only with --resume (without it a
# rerun refuses to overwrite the checkpoints); the other stages skip their finished outputs and
# shards on any rerun.
_RESUME_WITH_FLAG = ("ppo", "pipeline")
_RESUME_NOTE = {
    "pipeline": "finished stages and shards are skipped, PPO continues from its newest "
                "checkpoint",
    "ppo": "PPO continues from its newest checkpoint",
    "sl": "finished shards and steps are skipped",
    "label": "finished shards are skipped",
    "rm": "preference-model training starts over",
    "eval": "the evaluation starts over",
    "judge-check": "the check starts over",
    "sample": "sampling starts over",
}


def resume_command(command: str, argv: list[str]) -> str | None:
    """The command line that picks up an interrupted `command` (None: nothing to resume)."""
    if command not in _RESUME_NOTE:
        return None
    words = list(argv)
    if command in _RESUME_WITH_FLAG and "--resume" not in words:
        words.append("--resume")
    return shlex.join(["cai-ray", *words])


def interrupted_message(command: str, argv: list[str]) -> str:
    """The one line printed after Ctrl-C."""
    again = resume_command(command, argv)
    if again is None:
        return "interrupted"
    return (f"interrupted: actors stopped, finished work kept; to resume run: {again} "
            f"({_RESUME_NOTE[command]})")


class InterruptHandler:
    """SIGINT in the driver. The first raises KeyboardInterrupt, as Python's default handler
    does (the stages' `finally` blocks shut their actor groups down, `ray_session` stops Ray),
    notes the interrupt so those shutdowns do not wait for busy actors, and starts a watchdog
    that exits with 130 `exit_after_s` later should clean-up hang. The second exits at once."""

    def __init__(self, message: str, exit_after_s: float = INTERRUPT_EXIT_S):
        self.message, self.exit_after_s = redact(message), exit_after_s
        self.count = 0
        self._said = False
        self._lock = threading.Lock()

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False  # signal handlers can only be set there; Python's default stays
        signal.signal(signal.SIGINT, self._on_sigint)
        return True

    def say(self, suffix: str = "") -> None:
        """Print the message once (os.write: safe inside a signal handler)."""
        with self._lock:
            if self._said:
                return
            self._said = True
        try:
            os.write(2, (self.message + suffix + "\n").encode())
        except OSError:
            pass

    def _on_sigint(self, signum: int, frame: object) -> None:
        self.count += 1
        if self.count > 1:
            self.say(" [second Ctrl-C: exited at once]")
            os._exit(EXIT_INTERRUPTED)
        from cai_ray.actors.group import note_interrupt

        note_interrupt()
        threading.Thread(target=self._watchdog, name="cai-ray-interrupt", daemon=True).start()
        raise KeyboardInterrupt

    def _watchdog(self) -> None:
        time.sleep(self.exit_after_s)
        self.say(f" [clean-up took over {self.exit_after_s:g} s: exited without it]")
        os._exit(EXIT_INTERRUPTED)
