"""Moving the trainer's policy weights into the running rollout engines, with a version number.

Two transports, one contract: trainer rank 0 produces (name, tensor) pairs in the model's HF
naming; every rollout engine loads them with vLLM's in-place `reload_weights`, resets its prefix
cache and takes the new version.

* Object store (CPU, or any cluster without a shared GPU fabric). Rank 0 cuts the weights into
  buckets of about `bucket_mb` and puts each into Ray's object store; the driver hands the list
  of references to every rollout actor, which fetches one bucket at a time while vLLM loads. The
  driver never holds the weights and a reader holds at most one bucket beyond the engine. In
  local mode (no Ray) the buckets are passed as they are.
* Collective (`ppo.weight_sync: collective`; NCCL on GPU, gloo on CPU). Trainer rank 0 and every
  rollout engine form a stateless group (`WeightChannel`: vLLM's `StatelessProcessGroup` +
  `PyNcclCommunicator`, or a stateless gloo group; neither touches the trainer's own
  torch.distributed group). Rank 0 broadcasts tensor by tensor from inside the ZeRO gather,
  so at most one gathered tensor is held beyond the model; each engine receives into a fresh
  tensor and loads it as it arrives, through `WeightReceiver`, a vLLM worker extension. The
  sender's checksums are checked once everything has arrived. That transport lives in
  `weight_channel.py`; this module holds what both share: the export plan, the checksums and
  the engine-side `WeightAudit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

Named = tuple[str, Any]  # (parameter name, tensor)


def iter_buckets(named: Iterable[Named], bucket_bytes: int) -> Iterator[list[Named]]:
    """Consecutive groups of tensors of about `bucket_bytes` each (a larger tensor is a bucket
    of its own), each yielded as soon as it is full; order is kept."""
    bucket: list[Named] = []
    size = 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


def cut_buckets(named: Iterable[Named], bucket_bytes: int) -> list[list[Named]]:
    return list(iter_buckets(named, bucket_bytes))


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


# --- what to send, and proof that it arrived --------------------------------------------------

def export_names(module: Any) -> list[str]:
    """Every tensor name the engine's loader expects for `module` (an HF model): its
    `state_dict()` keys, so a tied output head (`lm_head.weight`, the same tensor as the input
    embedding) is sent under both names. `named_parameters()` lists a shared tensor once, and
    vLLM then never re-derives the head's packed kernel weights: it keeps sampling from the
    initial head however the policy trains. A LoRA model's names are its base model's
    (`export_plan`)."""
    return [x.name for x in export_plan(module)]


def hf_module(module: Any) -> Any:
    """The HF model inside a peft model (its LoRA layers active), else `module` itself."""
    if hasattr(module, "peft_config") and hasattr(module, "get_base_model"):
        return module.get_base_model()
    return module


@dataclass(frozen=True)
class ExportItem:
    """One tensor the engine loads: its HF name, the live tensors its value is computed from
    (gathered together under ZeRO-3) and how to compute it while they are gathered."""

    name: str
    params: tuple[Any, ...]  # params[0]: the tensor of that name (its shape and dtype)
    make: Callable[[], Any]


def _detached(t: Any) -> Any:
    return t.detach()


def _merged(weight: Any, layer: Any, adapters: list[str]) -> Any:
    """W + Σ ΔW of the active adapters (ΔW = B·A·α/r, peft's `get_delta_weight`), in W's
    dtype: a new tensor, the live weights untouched."""
    import torch

    with torch.no_grad():
        out = weight.detach().clone()
        for a in adapters:
            out += layer.get_delta_weight(a).to(out.dtype)
    return out


def export_plan(module: Any) -> list[ExportItem]:
    """What the engine loads for `module`, in `state_dict` order. A plain HF model: each
    tensor as it is. A peft LoRA model: the base model's names, each LoRA-wrapped layer's
    weight merged with its adapters into a copy (`.base_layer.` dropped from the name), the
    adapter tensors themselves not sent: the engine runs the merged weights."""
    base = hf_module(module)
    live = named_tensors(base)
    lora = {n: m for n, m in base.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    items = []
    for key in base.state_dict(keep_vars=True):
        if ".lora_" in key:
            continue
        p = live[key]
        if ".base_layer." not in key:
            items.append(ExportItem(key, (p,), partial(_detached, p)))
            continue
        path, leaf = key.split(".base_layer.", 1)
        layer = lora[path]
        adapters = [a for a in layer.active_adapters if a in layer.lora_A] \
            if leaf == "weight" and not getattr(layer, "disable_adapters", False) else []
        params = (p, *[t for a in adapters for t in (layer.lora_A[a].weight,
                                                      layer.lora_B[a].weight)])
        items.append(ExportItem(f"{path}.{leaf}", params,
                                partial(_merged, p, layer, adapters) if adapters else
                                partial(_detached, p)))
    return items


# the input embedding's name in the HF layouts with a tied output head (Llama/Qwen/Mistral/
# SmolLM, GPT-2, BLOOM/Falcon-style)
_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def directory_weights(path: str | Path) -> Iterator[Named] | None:
    """The tensors of a `save_pretrained` directory (its safetensors files, in name order), as
    a weight push would send them: a tied output head, which HF leaves out of the file, is
    added as `lm_head.weight`. vLLM's own load from a directory skips the head on a reload and
    keeps the head's earlier kernel weights (it warns "ParallelLMHead: Failed to load
    weights"), so a tied model loaded that way samples from its old head. None when the
    directory has no safetensors files."""
    from transformers import AutoConfig

    root = Path(path)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        return None
    config = AutoConfig.from_pretrained(root)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = bool(getattr(text, "tie_word_embeddings", False))
    return _read_directory(files, tied)


def _read_directory(files: list[Path], tied: bool) -> Iterator[Named]:
    from safetensors import safe_open

    seen: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                seen[name] = f
                yield name, st.get_tensor(name)
    if tied and "lm_head.weight" not in seen:
        embed = next((n for n in seen if n.endswith(_EMBED_SUFFIXES)), None)
        if embed is not None:
            with safe_open(str(seen[embed]), framework="pt") as st:
                yield "lm_head.weight", st.get_tensor(embed)


def named_tensors(module: Any) -> dict[str, Any]:
    """name -> live parameter or persistent buffer, tied names included (same object)."""
    out = dict(module.named_parameters(remove_duplicate=False))
    for name, b in module.named_buffers(remove_duplicate=False):
        out.setdefault(name, b)
    return out


CHECKSUM_CHUNK = 1 << 22  # elements per float64 chunk: 32 MiB of temporary at most


def checksum(t: Any) -> tuple[float, float]:
    """(Σx, Σx²) accumulated in float64: equal for a copy whatever the dtype (up to summation
    order, ~1e-15 relative), and a stale tensor misses it. Each chunk is widened to float64
    first and then reduced (a reduction that widens as it goes, `sum(dtype=float64)`, is ~6x
    slower on CPU for bfloat16), so a push of SmolLM2 spends ~0.2 s here, not ~1.2 s."""
    import torch

    flat = t.detach().reshape(-1)
    s = torch.zeros((), dtype=torch.float64, device=flat.device)
    s2 = torch.zeros((), dtype=torch.float64, device=flat.device)
    for c in flat.split(CHECKSUM_CHUNK):
        d = c.to(torch.float64)
        s += d.sum()
        s2 += torch.dot(d, d)
    return float(s), float(s2)


def checksum_mismatches(sender: dict[str, tuple[float, float]],
                        received: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose received `checksum` differs from the sender's (a name the receiver never
    got is left to the engine-side audit, which reports what its modules miss)."""
    out = []
    for name, (s, s2) in sender.items():
        got = received.get(name)
        if got is None:
            continue
        # equal up to float64 summation order; |Σx| <= sqrt(n·Σx²) sets the scale
        scale = max(1.0, abs(s2))
        if abs(got[0] - s) > 1e-8 * scale ** 0.5 or abs(got[1] - s2) > 1e-9 * scale:
            out.append(name)
    return out


@dataclass(frozen=True)
class WeightExport:
    """A published weight push: object-store bucket references (or the buckets themselves in
    local mode) and the sender's `checksum` of every tensor."""

    buckets: list[Any]
    checksums: dict[str, tuple[float, float]]


@dataclass(frozen=True)
class SyncReport:
    """What an engine found after loading a weight push (`WeightAudit.verify`)."""

    version: int
    tensors: int  # tensors received
    modules: int  # engine modules checked
    missing: tuple[str, ...]  # engine modules/parameters that received nothing in this push
    mismatched: tuple[str, ...]  # received tensors whose checksum differs from the sender's
    worst_module: str  # the module whose kernel output is furthest from the received weights
    worst_rel_err: float  # ||kernel(x) − x·Wᵀ|| / ||x·Wᵀ|| there (float32 reference)
    tolerance: float  # largest rel. error the engine's dtype explains

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched and self.worst_rel_err <= self.tolerance

    def problem(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} engine tensor(s) received no weights: "
                         + ", ".join(self.missing[:5]) + (" …" if len(self.missing) > 5 else ""))
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} tensor(s) differ from the trainer's: "
                         + ", ".join(self.mismatched[:5]))
        if self.worst_rel_err > self.tolerance:
            parts.append(f"{self.worst_module} computes with weights other than those pushed "
                         f"(relative error {self.worst_rel_err:.3g} > {self.tolerance:.3g})")
        return "; ".join(parts) or "ok"


class WeightAudit:
    """Proof, inside a vLLM engine, that a weight push reached the kernels that compute.

    On CPU vLLM repacks every linear layer's weight for its GEMM kernel (and drops the
    parameter), so the parameters alone prove nothing. While the pushed tensors stream into
    `reload_weights`, `watch` records, per engine module, x·Wᵀ for a fixed random x
    (fused modules such as qkv_proj collect their parts at their output offsets); `verify` then
    runs each module's own kernel on the same x and compares (the reference is computed in
    float32 from the received tensors cast to the engine's dtype: exact inputs, ~1e-6 error). Plain parameters (norms, biases,
    the input embedding) are compared directly. A module that received nothing (a tied head
    left out) or computes with other weights (a stale repack) fails whatever the dtype: the
    tolerance is a small multiple of the engine dtype's rounding, far below what a stale tensor
    shows once the weights have moved by more than that rounding. Sender checksums, when given,
    prove the received tensors are the trainer's current ones."""

    ROWS = 8

    def __init__(self, model: Any, seed: int = 1234):
        import torch

        self.model, self.seed = model, seed
        self.packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", {})
                                                 or {})
        self.mapper = getattr(model, "hf_to_vllm_mapper", None)
        self.modules = dict(model.named_modules())
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()),
                          torch.float32)
        self._x: dict[int, tuple[Any, Any]] = {}
        self.kdim: dict[str, int] = {}  # linear-like module -> input features
        self.reset()

    def reset(self) -> None:
        self.last_received: dict[str, tuple[float, float]] = getattr(self, "last_received", {})
        self.expected: dict[str, Any] = {}  # module -> [ROWS, N] float64 (linear-like)
        self.params: dict[str, dict[int, Any]] = {}  # parameter -> {part: received tensor}
        self.received: dict[str, tuple[float, float]] = {}
        self.covered: dict[str, set[int]] = {}  # fused module -> part indices received

    def _inputs(self, k: int, device: Any) -> tuple[Any, Any]:
        import torch

        if k not in self._x:
            g = torch.Generator().manual_seed(self.seed + k)
            x = torch.randn(self.ROWS, k, generator=g).to(self.dtype)
            self._x[k] = (x.to(device), x.float().to(device))
        return self._x[k]

    def _locate(self, name: str) -> tuple[str, str, int, int]:
        """HF tensor name -> (engine module, parameter, part index, part count)."""
        found = self._split(name)
        if found[0] not in self.modules and self.mapper is not None and \
                hasattr(self.mapper, "_map_name"):
            found = self._split(self.mapper._map_name(name) or name)
        return found

    def _split(self, name: str) -> tuple[str, str, int, int]:
        mod, _, param = name.rpartition(".")
        head, _, leaf = mod.rpartition(".")
        for fused, parts in self.packed.items():
            if leaf in parts:
                return (f"{head}.{fused}" if head else fused), param, parts.index(leaf), \
                    len(parts)
        return mod, param, 0, 1

    def _linear_like(self, module: Any) -> bool:
        from vllm.model_executor.layers.linear import LinearBase
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        return isinstance(module, (LinearBase, ParallelLMHead))

    def watch(self, named: Iterable[Named]) -> Iterator[Named]:
        import torch

        offsets: dict[str, dict[int, int]] = {}
        for name, t in named:
            self.received[name] = checksum(t)
            mod, param, part, nparts = self._locate(name)
            module = self.modules.get(mod)
            if module is not None and param == "weight" and t.dim() == 2 and \
                    self._linear_like(module):
                self.kdim[mod] = int(t.shape[1])
                x, x64 = self._inputs(t.shape[1], "cpu")
                # float32 reference: its accumulation error (~1e-6) is 100x below tolerance
                w = t.detach().to("cpu", self.dtype).float()
                y = (x64 @ w.T).double()  # [ROWS, N_part]
                sizes = getattr(module, "output_sizes", None)
                if nparts > 1 and sizes is not None and len(sizes) == nparts:
                    start = sum(sizes[:part])
                else:
                    start = offsets.setdefault(mod, {}).get(part, 0)
                full = self.expected.get(mod)
                width = max(start + y.shape[1], full.shape[1] if full is not None else 0)
                if full is None or full.shape[1] < width:
                    grown = torch.full((self.ROWS, width), float("nan"), dtype=torch.float64)
                    if full is not None:
                        grown[:, :full.shape[1]] = full
                    full = grown
                full[:, start:start + y.shape[1]] = y
                self.expected[mod] = full
                self.covered.setdefault(mod, set()).add(part)
            elif module is not None:
                self.params.setdefault(f"{mod}.{param}", {})[part] = \
                    t.detach().to("cpu", self.dtype).clone()
                self.covered.setdefault(f"{mod}.{param}", set()).add(part)
            yield name, t

    def verify(self, version: int, sender: dict[str, tuple[float, float]] | None = None
               ) -> SyncReport:
        import torch

        missing, worst, worst_mod = [], 0.0, ""
        checked = 0
        eps = torch.finfo(self.dtype).eps
        tol = 1e-4 if self.dtype == torch.float32 else 2 * eps
        with torch.no_grad():
            for mname, module in self.modules.items():
                own = [(n, p) for n, p in module.named_parameters(recurse=False)]
                if not own:
                    continue
                if self._linear_like(module) and any(n == "weight" for n, _ in own):
                    checked += 1
                    exp = self.expected.get(mname)
                    if exp is None or len(self.covered.get(mname, ())) < self._parts(mname):
                        missing.append(f"{mname}.weight")
                        continue
                    dev = next(iter(p for _, p in own)).device
                    x, _ = self._inputs(self.kdim[mname], dev)
                    got = module.quant_method.apply(module, x).double().cpu()
                    got = got[:, :exp.shape[1]]
                    cols = ~torch.isnan(exp[0])
                    e, g = exp[:, cols], got[:, cols]
                    rel = float(((g - e).norm(dim=1) / e.norm(dim=1).clamp(min=1e-30)).max())
                    if rel > worst or math.isnan(rel):
                        worst, worst_mod = (rel if not math.isnan(rel) else float("inf")), mname
                    own = [(n, p) for n, p in own if n != "weight"]  # a bias: a plain parameter
                for n, p in own:
                    if p.numel() <= 1 and p.dim() == 0:  # kv-cache scales and the like
                        continue
                    checked += 1
                    prel = self._compare_param(f"{mname}.{n}", p, missing)
                    if prel is not None and prel > worst:
                        worst, worst_mod = prel, f"{mname}.{n}"
        mismatched = checksum_mismatches(sender, self.received) if sender else []
        report = SyncReport(version, len(self.received), checked, tuple(missing),
                            tuple(mismatched), worst_mod, worst, tol)
        self.last_received = dict(self.received)
        self.reset()
        return report

    def _parts(self, module: str) -> int:
        """How many HF tensors an engine module is fused from (qkv_proj: 3; most: 1)."""
        return len(self.packed.get(module.rpartition(".")[2], [None]))

    def _compare_param(self, name: str, p: Any, missing: list[str]) -> float | None:
        parts = self.params.get(name)
        if not parts or len(parts) < self._parts(name.rpartition(".")[0]):
            missing.append(name)
            return None
        import torch

        sent = torch.cat([parts[i].reshape(-1) for i in sorted(parts)])
        if p.numel() == 0:
            return 0.0
        a = p.detach().float().cpu().reshape(-1)[: sent.numel()]
        b = sent.float().reshape(-1)[: a.numel()]
        return float((a - b).norm() / b.norm().clamp(min=1e-30))
