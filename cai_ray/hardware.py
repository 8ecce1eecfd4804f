"""`dtype: auto`: bfloat16 where the hardware computes it natively, float32 elsewhere.

One pure rule (`choose_dtype`), one reader of the real hardware (`detect`), and two ways to
apply it: `resolve_dtypes(cfg)` replaces every `auto` dtype of a config in the driver before any
actor starts (and logs the choice and its reason once), and `torch_dtype` / `dtype_name` let a
worker that still meets `auto` (a config that did not come through the CLI) make the same choice
instead of silently falling back to float32 or bfloat16.

Why: on a CPU without native bfloat16 (AVX2 only, e.g. AMD Zen 3) torch emulates bf16 matmul,
~75x slower than float32 there, and vLLM's bf16 is ~3.6x slower than its float32; on a CPU with
AVX512_BF16 or AMX bf16 is ~3x faster than float32. A config written on one kind must not decide
for the other. `CAI_RAY_AUTO_DTYPE=float32` (or bfloat16, float16) pins what `auto` means, for
tests and CI that need the same numerics on every machine.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

AUTO = "auto"
PIN_ENV = "CAI_RAY_AUTO_DTYPE"
CONCRETE = ("float32", "bfloat16", "float16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bf16 support


def choose_dtype(device: str, cpu_capability: str, cuda_bf16: bool = True,
                 cpu_flags: Iterable[str] = ()) -> tuple[str, str]:
    """(dtype, reason) for `auto`. Pure: `device` is "cuda" or "cpu"; `cpu_capability` is
    torch.backends.cpu.get_cpu_capability() (e.g. "AVX512_BF16", "AMX_BF16", "AVX512",
    "AVX2", "DEFAULT", "NO AVX", "VSX", "ZVECTOR"); `cuda_bf16` whether the GPU supports
    bfloat16; `cpu_flags` the /proc/cpuinfo flags, consulted when the capability is plain
    AVX512 (torch reports that also on CPUs that have avx512_bf16)."""
    if device == "cuda":
        if cuda_bf16:
            return "bfloat16", "CUDA GPU with bfloat16 support"
        return "float32", "CUDA GPU without bfloat16 support (pre-Ampere)"
    cap = (cpu_capability or "unknown").strip()
    up = cap.upper()
    if "AMX" in up or "BF16" in up:
        return "bfloat16", f"CPU capability {cap}: native bfloat16"
    if up.startswith("AVX512"):
        found = sorted(set(BF16_CPU_FLAGS) & {f.lower() for f in cpu_flags})
        if found:
            return "bfloat16", (f"CPU capability {cap} with {'/'.join(found)} in /proc/cpuinfo: "
                                "native bfloat16")
    return "float32", f"CPU capability {cap}: no native bfloat16; bf16 matmul is emulated"


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor listed (empty where there is no such file)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def current_device() -> str:
    """"cuda" when this process sees a GPU, else "cpu"."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _pinned() -> str | None:
    value = os.environ.get(PIN_ENV, "").strip()
    if not value or value == AUTO:
        return None
    if value not in CONCRETE:
        raise ValueError(f"{PIN_ENV}={value!r}: choose from {', '.join(CONCRETE)} (or unset it)")
    return value


@functools.cache
def _detect(device: str) -> tuple[str, str]:
    if device == "cuda":
        try:
            import torch

            if torch.cuda.is_available():
                return choose_dtype("cuda", "", bool(torch.cuda.is_bf16_supported()))
        except ImportError:
            pass
        dtype, reason = choose_dtype("cuda", "", True)
        return dtype, reason + "; assumed: this process sees no GPU"
    try:
        import torch

        cap = str(torch.backends.cpu.get_cpu_capability())
    except (ImportError, AttributeError):
        cap = "unknown"
    flags = cpu_flags() if cap.upper().startswith("AVX512") else frozenset()
    return choose_dtype("cpu", cap, cpu_flags=flags)


def detect(device: str | None = None) -> tuple[str, str]:
    """(dtype, reason) for `auto` on this machine: the device (default: what this process
    sees), torch's CPU capability and the /proc/cpuinfo flags; `CAI_RAY_AUTO_DTYPE` wins."""
    pinned = _pinned()
    if pinned is not None:
        return pinned, f"pinned by {PIN_ENV}={pinned}"
    return _detect((device or current_device()).split(":")[0])


_logged: set[tuple[str, str]] = set()


def _log_choice(dtype: str, reason: str, where: str = "") -> None:
    if (dtype, reason) in _logged:
        return
    _logged.add((dtype, reason))
    log.info("dtype auto -> %s (%s)%s", dtype, reason, f" for {where}" if where else "")


def dtype_name(name: str, device: str | None = None) -> str:
    """`name` itself, or the hardware's choice when it is "auto" (logged once per process)."""
    if name != AUTO:
        return name
    dtype, reason = detect(device)
    _log_choice(dtype, reason)
    return dtype


def torch_dtype(name: str, device: str | None = None) -> Any:
    """The torch dtype for a config dtype name, "auto" included (see `dtype_name`)."""
    import torch

    return getattr(torch, dtype_name(name, device))


def auto_fields(obj: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every `dtype` field set to "auto" in a (nested) config dataclass."""
    out: list[str] = []
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return out
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if f.name == "dtype" and value == AUTO:
            out.append(path)
        elif dataclasses.is_dataclass(value):
            out += auto_fields(value, path + ".")
    return out


def resolve_dtypes(cfg: Any, device: str | None = None) -> list[str]:
    """Replace every "auto" dtype in `cfg` (policy, rollout and feedback engines, feedback and
    reward models, trainer) with the hardware's choice, in place; log the choice and its
    reason once. `device` defaults to `run.device` ("auto": what this process sees). Returns
    the dotted paths that were resolved."""
    paths = auto_fields(cfg)
    if not paths:
        return []
    if device is None:
        run_device = getattr(getattr(cfg, "run", None), "device", AUTO)
        device = current_device() if run_device == AUTO else run_device
    dtype, reason = detect(device)
    for path in paths:
        *parents, leaf = path.split(".")
        node = cfg
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, dtype)
    _log_choice(dtype, reason, ", ".join(paths))
    return paths


def rss_bytes() -> int:
    """This process's resident set size (0 where /proc is not there)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_freed_memory() -> tuple[int, int]:
    """Collect garbage, then hand glibc's freed heap pages back to the OS (`malloc_trim`), as
    after a checkpoint save, whose staging buffers are freed but stay resident otherwise.
    Returns (RSS before, RSS after); a libc without malloc_trim only collects."""
    import ctypes
    import ctypes.util
    import gc

    before = rss_bytes()
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = getattr(libc, "malloc_trim", None)
        if trim is not None:
            trim(0)
    except OSError:
        pass
    return before, rss_bytes()
