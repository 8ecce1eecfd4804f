"""Moving the trainer's policy weights into the running rollout engines, with a version number.

Two transports, one contract: trainer rank 0 produces (name, tensor) pairs in the model's HF
naming; every rollout engine loads them with vLLM's in-place `reload_weights`, resets its prefix
cache and takes the new version.

* Object store (CPU, or any cluster without a shared GPU fabric). Rank 0 cuts the weights into
  buckets of about `bucket_mb` and puts each into Ray's object store; the driver hands the list
  of references to every rollout actor, which fetches one bucket at a time while vLLM loads. The
  driver never holds the weights and a reader holds at most one bucket beyond the engine. In
  local mode (no Ray) the buckets are passed as they are.
* NCCL (GPU). Trainer rank 0 and every rollout engine form a group with vLLM's
  `StatelessProcessGroup` + `PyNcclCommunicator` (it does not touch the trainer's own
  torch.distributed group). Rank 0 broadcasts tensor by tensor; each engine receives into a fresh
  CUDA tensor and loads it as it arrives, through `WeightReceiver`, a vLLM worker extension.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

Named = tuple[str, Any]  # (parameter name, tensor)


def cut_buckets(named: Iterable[Named], bucket_bytes: int) -> list[list[Named]]:
    """Consecutive groups of tensors of about `bucket_bytes` each (a larger tensor is a bucket
    of its own); order is kept."""
    out: list[list[Named]] = [[]]
    size = 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if out[-1] and size + n > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append((name, t))
        size += n
    return [b for b in out if b]


def publish(buckets: list[list[Named]]) -> list[Any]:
    """Each bucket into the object store (a reference per bucket) when running under Ray."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return list(buckets)
    if not ray.is_initialized():
        return list(buckets)
    return [ray.put(b) for b in buckets]


def iterate(buckets: list[Any], timeout_s: float = 600.0) -> Iterator[Named]:
    """The named tensors of `publish`ed buckets, fetching one bucket at a time (each fetch
    waits at most `timeout_s`: a bucket lost with its node fails the load, never hangs it)."""
    for i, b in enumerate(buckets):
        if not isinstance(b, list):
            import ray
            from ray.exceptions import GetTimeoutError

            try:
                b = ray.get(b, timeout=timeout_s)
            except GetTimeoutError as e:
                raise TimeoutError(f"weight bucket {i + 1}/{len(buckets)} was not fetched from "
                                   f"the object store within {timeout_s:.0f} s") from e
        yield from b


def payload_bytes(buckets: list[list[Named]]) -> int:
    return sum(t.numel() * t.element_size() for b in buckets for _, t in b)


# --- NCCL (GPU) -----------------------------------------------------------------------------------

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


def nccl_send(comm: Any, named: Iterable[Named]) -> int:
    """Broadcast every tensor from rank 0 (trainer); returns the bytes sent."""
    import torch

    sent = 0
    stream = torch.cuda.current_stream()
    for _, t in named:
        t = t.contiguous()
        comm.broadcast(t, src=0, stream=stream)
        sent += t.numel() * t.element_size()
    stream.synchronize()
    return sent


class WeightReceiver:
    """vLLM worker extension (`worker_extension_cls="cai_ray.actors.weight_sync.WeightReceiver"`):
    methods the rollout actor calls on its engine's workers through `collective_rpc`."""

    def cai_join_weight_group(self, host: str, port: int, rank: int, world_size: int) -> None:
        self._cai_comm = nccl_group(host, port, rank, world_size,
                                    self.device)  # type: ignore[attr-defined]

    def cai_receive_weights(self, metas: list[TensorMeta]) -> None:
        import torch

        comm = self._cai_comm
        device = self.device  # type: ignore[attr-defined]
        stream = torch.cuda.current_stream()

        def tensors() -> Iterator[Named]:
            for m in metas:
                t = torch.empty(m.shape, dtype=getattr(torch, m.dtype), device=device)
                comm.broadcast(t, src=0, stream=stream)
                stream.synchronize()
                yield m.name, t

        self.reload_weights(weights_iterator=tensors())  # type: ignore[attr-defined]
