"""The collective weight-sync transport (`ppo.weight_sync: collective`): one stateless group of
trainer rank 0 and every rollout engine, NCCL on GPU and gloo on CPU.

* `WeightChannel` is the group, on either side: rank 0 broadcasts tensor by tensor, ranks 1..
  receive each into a fresh tensor as it arrives. A sender whose push failed `abort`s it, and
  the surviving gloo receivers stop waiting within about a second (`WeightPushAborted`).
* `WeightReceiver` is the vLLM worker extension the rollout engines are built with: it joins the
  group and loads what arrives through the same `WeightAudit` as the object-store path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cai_ray.actors.weight_sync import (
    Named,
    SyncReport,
    WeightAudit,
    checksum,
    checksum_mismatches,
)


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "bfloat16"


def nccl_group(host: str, port: int, rank: int, world_size: int, device: Any) -> Any:
    """A PyNccl communicator over a stateless group: rank 0 = trainer, 1.. = rollout engines."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(pg, device=device)


ABORT_KEY = "cai_ray/push_aborted"
POLL_S = 1.0  # a gloo receiver checks this often whether the sender gave the push up
# Channels left with an operation in flight by an aborted push: gloo's destructor waits for
# that operation (up to the group's timeout), so they are kept until it has ended by itself.
_abandoned: list[Any] = []


class WeightPushAborted(RuntimeError):
    """The sender gave this push up (another member of the group failed): the receiver stops
    waiting for the rest, and the group is formed again."""


class WeightChannel:
    """One weight-sync group, rank 0 = trainer rank 0, 1.. = the rollout engines, whose backend
    follows the device: PyNccl on CUDA, gloo on the CPU. Either is a stateless group (vLLM's
    helpers): it never touches the trainer's own torch.distributed group, and a new one can be
    formed at any time (a restarted engine is re-admitted by forming the group again).

    An engine that dies mid-push fails the sender's broadcast at once, but not the other
    engines, which wait for tensors that will never come. On gloo the sender then `abort`s:
    it sets a key in the group's store, which a receiver checks every `POLL_S` while it
    waits, so the survivors are free for the new group in about a second instead of after the
    group's timeout. (On NCCL a survivor waits out the timeout.)"""

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: Any,
                 timeout_s: float = 1800.0):
        import torch

        self.device = torch.device(device)
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self._store: Any = None
        _abandoned[:] = [c for c in _abandoned if not c.idle()]
        if self.device.type == "cuda":
            self.backend = "nccl"
            self._comm = nccl_group(host, port, rank, world_size, self.device)
        else:
            from datetime import timedelta

            from vllm.distributed.utils import stateless_init_torch_distributed_process_group

            self.backend = "gloo"
            # with return_store=True it returns (group, store); its annotation names the group
            self._comm, self._store = stateless_init_torch_distributed_process_group(  # type: ignore[misc]
                host, port, rank, world_size, "gloo", timeout=timedelta(seconds=timeout_s),
                return_store=True)
        self._work: Any = None  # the gloo operation in flight

    def idle(self) -> bool:
        return self._work is None or bool(self._work.is_completed())

    def abort(self) -> None:
        """Sender: give the push up; every receiver still waiting raises WeightPushAborted."""
        if self._store is not None:
            try:
                self._store.set(ABORT_KEY, "1")
            except Exception:  # the store went down with the group: nothing waits on it
                pass

    def _aborted(self) -> bool:
        try:
            return bool(self._store.check([ABORT_KEY]))
        except Exception:  # the sender (the store's host) is gone: the operation fails alone
            return False

    def _wait(self, work: Any) -> None:
        """Wait for a gloo operation in slices of POLL_S, giving up when the sender aborts."""
        import time
        from datetime import timedelta

        self._work = work
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                work.wait(timedelta(seconds=POLL_S))
                self._work = None
                return
            except RuntimeError:
                if work.is_completed() or time.monotonic() > deadline:
                    self._work = None
                    raise  # the operation failed (a peer is gone) or ran out of time
                if self.rank != 0 and self._aborted():
                    _abandoned.append(self)
                    raise WeightPushAborted(
                        "the trainer gave up this weight push (another member of the "
                        "weight-sync group failed); the group is formed again") from None

    def broadcast(self, t: Any) -> None:
        """`t` from rank 0 into every rank's `t`, in place; returns once it has arrived."""
        import torch

        if self.backend == "nccl":
            stream = torch.cuda.current_stream()
            self._comm.broadcast(t, src=0, stream=stream)
            stream.synchronize()
        else:
            import torch.distributed as dist

            opts = dist.BroadcastOptions()
            opts.rootRank = 0  # the group's own rank: a stateless group has no global one
            self._wait(self._comm.broadcast([t], opts))

    def send(self, named: Iterable[Named]) -> tuple[int, dict[str, tuple[float, float]]]:
        """Rank 0: broadcast each tensor as it comes (from device memory on GPU: nothing is
        staged on the host); returns the bytes sent and the sender's checksum of each."""
        sent, sums = 0, {}
        for name, t in named:
            t = t.detach().contiguous()
            if t.device != self.device:
                t = t.to(self.device)
            self.broadcast(t)
            sums[name] = checksum(t)
            sent += t.numel() * t.element_size()
        return sent, sums

    def receive(self, metas: list[TensorMeta]) -> Iterator[Named]:
        """Ranks 1..: each announced tensor, received into a fresh one as it arrives."""
        import torch

        for m in metas:
            t = torch.empty(m.shape, dtype=getattr(torch, m.dtype), device=self.device)
            self.broadcast(t)
            yield m.name, t


class WeightReceiver:
    """vLLM worker extension (`worker_extension_cls="cai_ray.actors.weight_channel.WeightReceiver"`):
    methods the rollout actor calls on its engine's workers through `collective_rpc`."""

    def cai_join_weight_group(self, host: str, port: int, rank: int, world_size: int,
                              timeout_s: float = 1800.0) -> str:
        self._cai_channel = WeightChannel(host, port, rank, world_size,
                                          self.device, timeout_s)  # type: ignore[attr-defined]
        return self._cai_channel.backend

    def cai_receive_weights(self, metas: list[TensorMeta],
                            checksums: dict[str, tuple[float, float]] | None = None,
                            version: int = 0) -> SyncReport:
        if not hasattr(self, "_cai_audit"):
            self._cai_audit = WeightAudit(self.model_runner.model)  # type: ignore[attr-defined]
        self.reload_weights(  # type: ignore[attr-defined]
            weights_iterator=self._cai_audit.watch(self._cai_channel.receive(metas)))
        return self._cai_audit.verify(version, checksums)

    def cai_check_sender(self, checksums: dict[str, tuple[float, float]]) -> list[str]:
        """Names of the last push whose received checksum differs from the sender's (known
        only once the sender has sent everything)."""
        return checksum_mismatches(checksums, self._cai_audit.last_received)
