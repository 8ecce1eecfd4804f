"""Process-wide set-up shared by the stage commands: logging, Ray, device, run directory."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cai_ray.actors.group import ActorGroup, Colocation, W
from cai_ray.config import Config, save_config

log = logging.getLogger("cai_ray")


def setup_logging(level: str = "INFO") -> None:
    """Log lines to stderr, every one redacted (no secret from the environment is printed)."""
    from cai_ray.redaction import RedactingFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                            datefmt="%H:%M:%S"))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler], force=True)
    for noisy in ("urllib3", "filelock", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import datasets

    datasets.disable_progress_bars()  # our own bars say what is being done


def device_of(cfg: Config) -> str:
    if cfg.run.device != "auto":
        return cfg.run.device
    from cai_ray.actors.rollout import cuda_available

    return "cuda" if cuda_available() else "cpu"


def colocation_of(cfg: Config, role: str) -> Colocation | None:
    """The shared placement of `role` when `placement.colocate` lists it with other roles.
    The bundles hold every listed role, also in a stage that starts only some of them, so
    a colocated set is placed the same way by every stage."""
    for roles in cfg.placement.colocate:
        if role in roles and len(roles) > 1:
            return Colocation.of(list(roles), [getattr(cfg.placement, r) for r in roles])
    return None


def role_group(cfg: Config, role: str, worker_cls: type[W], init_args: tuple,
               env_vars: dict[str, str] | None = None,
               start: Callable[[ActorGroup[W]], object] | None = None) -> ActorGroup[W]:
    """The actor group of `role` with its placement and the run's timeouts; `start` runs once
    the actors are up (e.g. joining a process group), and a failure there releases the group."""
    if device_of(cfg) == "cpu":
        # Idle OpenMP threads sleep instead of spinning: the roles share two cores, and GNU
        # OpenMP's default busy-wait made each phase of a PPO step ~1.5x slower there (4-step
        # SmolLM2 PPO, AVX2: 61-71 s -> 40 s per step). An exported OMP_WAIT_POLICY wins.
        env_vars = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                    **(env_vars or {})}
    group = ActorGroup(role, worker_cls, getattr(cfg.placement, role), init_args=init_args,
                       local=cfg.run.local_mode, call_timeout_s=cfg.run.call_timeout_s,
                       startup_timeout_s=cfg.run.startup_timeout_s, env_vars=env_vars,
                       strategy=cfg.placement.strategy, colocation=colocation_of(cfg, role))
    if start is not None:
        try:
            start(group)
        except BaseException:
            group.shutdown()
            raise
    return group


def prepare_run_dir(cfg: Config, output: str | Path) -> Path:
    """Create the run directory and write the resolved config into it."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    return out


class _AuthDefaultFilter(logging.Filter):
    """Drops Ray's warning that a new local cluster turned token authentication on by itself
    (the default; RAY_AUTH_MODE=disabled opts out): a notice at every start, not a problem.
    Ray's other authentication warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray")


def quiet_auth_default() -> None:
    lg = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _AuthDefaultFilter) for f in lg.filters):
        lg.addFilter(_AuthDefaultFilter())
        log.debug("Ray's token-authentication default notice is filtered out")


@contextmanager
def ray_session(cfg: Config) -> Iterator[None]:
    """Start (or join) Ray unless the run is in local mode; shut it down afterwards."""
    if cfg.run.local_mode:
        yield
        return
    import ray

    started = not ray.is_initialized()
    if started:
        # Actors must find this package even when the driver runs from a source checkout.
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [pkg_root,
                                                           os.environ.get("PYTHONPATH")]))}
        quiet_auth_default()
        ray.init(address=cfg.run.ray_address, num_cpus=cfg.run.ray_num_cpus
                 if cfg.run.ray_address is None else None,
                 include_dashboard=False, runtime_env={"env_vars": env},
                 logging_level=logging.WARNING, ignore_reinit_error=True)
        log.info("Ray: %s", ray.cluster_resources())
    try:
        yield
    finally:
        if started:
            ray.shutdown()


class SharedStorageError(RuntimeError):
    """The run directory is not the same directory on every node of the cluster."""


def _write_probe(path: str, name: str, nonce: str) -> str:
    import socket

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(nonce, encoding="utf-8")
    return socket.gethostname()


def unseen_probes(probe_dir: Path, written: dict[str, tuple[str, str]]) -> list[str]:
    """Hosts whose probe (file name → (host, nonce)) the driver cannot read back as written."""
    out = []
    for name, (host, nonce) in written.items():
        f = probe_dir / name
        if not f.is_file() or f.read_text(encoding="utf-8") != nonce:
            out.append(host)
    return out


def check_shared_output(out_dir: Path, timeout_s: float = 120.0,
                        writer: Callable[[str, str, str], str] = _write_probe) -> int:
    """On a cluster of several nodes, one zero-CPU task per alive node writes a probe file under
    `out_dir` and the driver reads them all back: a run directory that is not shared storage
    (checkpoints written on one node, read by `--resume` or the eval on another) stops the run
    here, before any actor starts. Returns the number of nodes checked (0: local or one node)."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        return 0
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return 0
    probe_dir = out_dir / ".node-probe"
    nonce = uuid.uuid4().hex
    write = ray.remote(num_cpus=0)(writer)
    refs = {n["NodeID"]: write.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(str(probe_dir), n["NodeID"], nonce) for n in nodes}
    hosts = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s), strict=True))
    try:
        missing = unseen_probes(probe_dir, {k: (hosts[k], nonce) for k in refs})
    finally:
        for k in refs:
            (probe_dir / k).unlink(missing_ok=True)
    if missing:
        raise SharedStorageError(
            f"{out_dir} is not shared storage: files written there on {', '.join(missing)} "
            "are not visible to the driver. Put --output on a filesystem every node mounts at "
            "the same path (NFS, EFS, a ReadWriteMany volume): the trainer's checkpoints, "
            "--resume and the eval read each other's files.")
    log.info("run directory %s is shared by all %d nodes", out_dir, len(nodes))
    return len(nodes)


def request_seed(seed: int, key: str, phase: str) -> int:
    """A sampling seed for one request, from the run seed, a stable key (a prompt id, a query
    id) and the phase: the same in every run and on every actor, whatever the batching."""
    import hashlib

    digest = hashlib.sha256(f"{seed}|{key}|{phase}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
