"""Rollout role: one vLLM engine per actor, sampling chat continuations as typed results.

The engine runs in the actor's own process (vLLM's in-process executor): on CPU that starts in
seconds with half the memory of the multiprocess engine, and vLLM's Ray executor is not supported
on the CPU platform anyway. On GPU the same code runs with CUDA graphs and tensor parallelism from
the config.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import logging.config
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from cai_ray.actors.group import ActorGroup, Worker, WorkerContext
from cai_ray.actors.weight_sync import SyncReport
from cai_ray.config import Config, EngineConfig, ModelSpec
from cai_ray.hardware import dtype_name, release_freed_memory
from cai_ray.messages import Completion, GenerationRequest, GenerationResult
from cai_ray.models import resolve
from cai_ray.runtime import device_of, role_group

log = logging.getLogger(__name__)


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def vllm_env(engine: EngineConfig, device: str, threads: int | None = None) -> dict[str, str]:
    """Environment a vLLM engine needs, set before vLLM is imported in the actor."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if engine.in_process else "1",
           # the engine's config dumps and per-load INFO lines stay out of the console;
           # export VLLM_LOGGING_LEVEL=INFO (or DEBUG) to see them
           "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if threads:  # else vLLM drops torch to one thread "for serving" when OMP is unset
        env["OMP_NUM_THREADS"] = str(threads)
    if device == "cpu":
        env.update({
            # the CPU worker's NUMA binding warns from C++ at every engine start ("Using MEMBIND
            # policy"), past Python's logging; torch's C++ errors still show. Read when torch
            # loads, so it goes in the actor's environment; an exported value wins.
            "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"
                                                  if env["VLLM_LOGGING_LEVEL"].upper()
                                                  == "WARNING" else "WARNING"),
            "VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib),  # else it asks for ~92% of RAM
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        })
    return env


def engine_kwargs(model: ModelSpec, engine: EngineConfig, device: str, seed: int,
                  **extra: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {**extra,
        "model": resolve(model),
        "tokenizer": model.tokenizer,
        "revision": model.revision,
        "trust_remote_code": model.trust_remote_code,
        "dtype": dtype_name(engine.dtype, device),
        "max_model_len": engine.max_model_len,
        "enable_prefix_caching": engine.enable_prefix_caching,
        "max_num_seqs": engine.max_num_seqs,
        "seed": seed,
        "enforce_eager": engine.enforce_eager if engine.enforce_eager is not None
        else device == "cpu",
        # the checkpoint-loading progress bar is engine chatter too: shown when vLLM's own
        # INFO/DEBUG logs are asked for (VLLM_LOGGING_LEVEL), like the warnings it filters
        "use_tqdm_on_load": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING").upper()
        in ("INFO", "DEBUG"),
    }
    if engine.block_size is not None:
        kw["block_size"] = engine.block_size
    if device == "cpu":
        # vLLM's CPU runner cannot split a seeded request's prefill over engine steps: when a
        # batch's prompts exceed the step's token budget, rewinding the request's generator
        # fails ("CPU Generator does not use offset"). Whole prompts per step avoid it (the
        # budget then covers max_model_len); every sampling request here is seeded.
        kw["enable_chunked_prefill"] = False
    if device == "cuda":
        kw["tensor_parallel_size"] = engine.tensor_parallel_size
        kw["gpu_memory_utilization"] = engine.gpu_memory_utilization
    return {k: v for k, v in kw.items() if v is not None}


# vLLM warnings about choices this project makes on purpose, each explained where it is made:
# eager mode and no Triton/Inductor on CPU, the thread count it sets, chunked prefill off on
# CPU (see `engine_kwargs`), the per-request seeds it always passes. They are dropped from the
# console unless VLLM_LOGGING_LEVEL asks for INFO or DEBUG; every other warning passes.
_DELIBERATE = (
    "OMP_NUM_THREADS=%s is set; leaving Torch threads",
    "CPU backend doesn't allow to use `torch.set_num_threads`",
    "This model does not officially support disabling chunked prefill",
    "Enforce eager set, disabling torch.compile",
    "Inductor compilation was disabled by user settings",
    "Model Runner V2 requires Triton",
    "The global random seed is set to",
    # the CPU build as installed: no triton-cpu (said at `import vllm`), no tcmalloc/iomp
    # preload (measured without them), and the SSM cache note that every non-Mamba model gets
    "Triton is not installed. triton-cpu is expected",
    "Triton is installed, but doesn't include CPU backend",
    "%s is not found in LD_PRELOAD",  # libtcmalloc, libiomp
    "Reset SSM cache type to float32",
)


class _EngineNoiseFilter(logging.Filter):
    """Drops two kinds of vLLM records: the per-tensor warning when float32 checkpoints load
    into a bf16/fp16 engine (a deliberate cast under `dtype: auto` on a bf16 CPU; hundreds of
    lines per start, counted and said once instead), and the `_DELIBERATE` warnings."""

    casts = 0  # dropped cast warnings in this process, over every instance (see engine_logging)

    def __init__(self, deliberate: bool) -> None:
        super().__init__()
        self.dropped = 0
        self.deliberate = deliberate

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("Attempted to load weight %s with dtype %s into"):
            self.dropped += 1
            _EngineNoiseFilter.casts += 1
            return False
        if msg == "%s: Failed to load weights" and record.args and \
                str(record.args[0]).endswith("RotaryEmbedding"):
            # each reload: a rotary layer's cos/sin cache is a buffer no checkpoint holds (it
            # is put back as it was); any other layer that loads nothing still warns, and the
            # weight audit checks what every module received
            return not self.deliberate
        return not (self.deliberate and msg.startswith(_DELIBERATE))


def _quiet_engine() -> _EngineNoiseFilter:
    asked = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING").upper() in ("INFO", "DEBUG")
    f = _EngineNoiseFilter(deliberate=not asked)
    for h in logging.getLogger("vllm").handlers + logging.getLogger().handlers:
        h.addFilter(f)
    return f


def engine_logging(level: str) -> dict[str, Any]:
    """vLLM's logging as a `dictConfig`, with `_EngineNoiseFilter` on its handler.

    vLLM applies its logging config again when an engine starts (`LLM()`), which replaces the
    handlers `_quiet_engine` filtered: its start-up warnings would reach the console. Given as
    VLLM_LOGGING_CONFIG_PATH, this config is the one vLLM applies each time."""
    level = level.upper()
    return {
        "version": 1, "disable_existing_loggers": False,
        "filters": {"cai_ray_engine_noise": {
            "()": f"{__name__}._EngineNoiseFilter",
            "deliberate": level not in ("INFO", "DEBUG")}},
        "formatters": {"cai_ray_engine": {
            "format": "vLLM %(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s",
            "datefmt": "%H:%M:%S"}},
        "handlers": {"vllm": {"class": "logging.StreamHandler", "formatter": "cai_ray_engine",
                              "level": level, "stream": "ext://sys.stdout",
                              "filters": ["cai_ray_engine_noise"]}},
        "loggers": {"vllm": {"handlers": ["vllm"], "level": level, "propagate": False}},
    }


def use_engine_logging() -> None:
    """Point vLLM at `engine_logging` in this process, unless the user gave their own
    VLLM_LOGGING_CONFIG_PATH (or turned vLLM's logging config off). Written on the node that
    runs the engine, so the path exists wherever vLLM reads it."""
    if os.environ.get("VLLM_LOGGING_CONFIG_PATH") or \
            os.environ.get("VLLM_CONFIGURE_LOGGING", "1") == "0":
        return
    level = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING").upper()
    config = engine_logging(level)
    path = Path(tempfile.gettempdir()) / f"cai-ray-vllm-logging-{os.getuid()}-{level}.json"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(config, f)
    os.replace(tmp, path)  # one file per user and level, replaced whole: never read half-written
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path)
    # Also now: `import vllm` warns (e.g. about Triton) before vLLM has configured its logger,
    # and such a record would reach the console through logging's last-resort handler.
    logging.config.dictConfig(config)


class RolloutWorker(Worker):
    """Hosts a vLLM `LLM`; `generate` maps typed requests to typed results."""

    def __init__(self, ctx: WorkerContext, model: ModelSpec, engine: EngineConfig,
                 device: str = "auto", seed: int = 0):
        super().__init__(ctx)
        self.device = ("cuda" if cuda_available() else "cpu") if device == "auto" else device
        for k, v in vllm_env(engine, self.device, ctx.threads).items():
            os.environ.setdefault(k, v)
        use_engine_logging()
        # vLLM's kernel dispatcher reads every attribute of torch.distributed, which warns
        # for each renamed one (a FutureWarning per engine start and weight load)
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r"`torch\.distributed\.\w+` is deprecated")
        from vllm import LLM

        casts_before = _EngineNoiseFilter.casts
        _quiet_engine()
        t0 = time.monotonic()
        # A distinct seed per rank: identical engines would otherwise sample identical text.
        self.llm = LLM(**engine_kwargs(model, engine, self.device, seed + ctx.rank,
                                       **self.extra_engine_args()))
        cast = _EngineNoiseFilter.casts - casts_before  # every instance counts into it
        if cast:
            log.info("%s[%d]: %d checkpoint tensors cast to the engine's %s on load", ctx.role,
                     ctx.rank, cast, engine.dtype)
        self.tokenizer = self.llm.get_tokenizer()
        self.weight_version = 0
        warm_s = self._warm_up()
        log.info("%s[%d]: vLLM engine (%s, %s) ready in %.1f s (warm-up %.1f s)", ctx.role,
                 ctx.rank, self.device, engine.dtype, time.monotonic() - t0, warm_s)

    def _warm_up(self) -> float:
        """One tiny sampled and one prompt-log-prob request, so that the engine's one-time
        first-call costs (seconds on CPU: ~6 s against 0.07 s for the next call on the tiny
        model) are paid at start-up, under `run.startup_timeout_s`, and never count against a
        real call's `run.call_timeout_s`. Nothing of it stays cached."""
        from vllm import SamplingParams, TokensPrompt

        t0 = time.monotonic()
        ids = list(self.tokenizer.encode("Hello there", add_special_tokens=False))[:8] or [0]
        self.llm.generate([TokensPrompt(prompt_token_ids=ids)] * 2,
                          [SamplingParams(max_tokens=2, temperature=1.0, seed=0, logprobs=0),
                           SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)],
                          use_tqdm=False)
        self.llm.reset_prefix_cache()
        return time.monotonic() - t0

    def extra_engine_args(self) -> dict[str, Any]:
        """Engine arguments of this role. Sampled tokens' log-probs are those of the
        distribution that sampled them (`processed_logprobs`: after temperature), not of the
        raw logits: they are PPO's behaviour log-probs. The engine's workers can join a
        collective weight-sync group (`WeightReceiver`: NCCL on GPU, gloo on CPU)."""
        return {"logprobs_mode": "processed_logprobs",
                "worker_extension_cls": "cai_ray.actors.weight_channel.WeightReceiver"}

    def _prompt_ids(self, req: GenerationRequest) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            req.messages, tokenize=False,
            add_generation_prompt=not req.continue_final_message,
            continue_final_message=req.continue_final_message)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Sample every request in one engine call (vLLM batches them continuously)."""
        from vllm import SamplingParams, TokensPrompt

        if not requests:
            return []
        t0 = time.monotonic()
        ids = [self._prompt_ids(r) for r in requests]
        limit = self.llm.llm_engine.model_config.max_model_len
        for r, x in zip(requests, ids, strict=True):
            if len(x) >= limit:
                raise ValueError(f"request {r.request_id}: the prompt has {len(x)} tokens, at "
                                 f"or over max_model_len={limit}; raise the engine's "
                                 "max_model_len or shorten the prompt/few-shot examples")
        prompts = [TokensPrompt(prompt_token_ids=x) for x in ids]
        # Long prompts get fewer new tokens rather than failing the whole batch.
        params = [SamplingParams(
            n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
            repetition_penalty=r.repetition_penalty,
            max_tokens=min(r.max_tokens, limit - len(x)),
            stop=list(r.stop) or None, seed=r.seed, ignore_eos=r.ignore_eos,
            logprobs=0 if r.logprobs else None) for r, x in zip(requests, ids, strict=True)]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.monotonic() - t0
        results = []
        for req, out in zip(requests, outs, strict=True):
            comps = []
            for c in out.outputs:
                lps = None
                if req.logprobs and c.logprobs is not None:
                    lps = [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs, strict=True)]
                comps.append(Completion(text=c.text, token_ids=list(c.token_ids), logprobs=lps,
                                        finish_reason=c.finish_reason))
            results.append(GenerationResult(request_id=req.request_id,
                                            prompt_token_ids=list(out.prompt_token_ids or []),
                                            completions=comps,
                                            weight_version=self.weight_version,
                                            worker_rank=self.ctx.rank, elapsed_s=elapsed))
        return results

    def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """log p(token t | tokens < t) for t >= 1 of each sequence, as the engine computes them
        (prefill only). Used to check that pushed weights are the trainer's."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=x) for x in token_ids], params,
                                 use_tqdm=False)
        return [[step[tok].logprob for tok, step in zip(x[1:], out.prompt_logprobs[1:],
                                                        strict=True)]
                for x, out in zip(token_ids, outs, strict=True)]

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes (after new weights; and so benchmarks start cold)."""
        self.llm.reset_prefix_cache()

    def release_memory(self) -> tuple[int, int]:
        """Hand the heap pages freed since the last call back to the OS (`malloc_trim`); the
        actor's RSS in bytes before and after, for the run's memory metrics."""
        return release_freed_memory()

    def _audit(self) -> Any:
        """The engine's `WeightAudit`, when its model lives in this process (the in-process
        engine); None for the multiprocess engine, whose model cannot be reached from here."""
        if not hasattr(self, "_weight_audit"):
            from cai_ray.actors.weight_sync import WeightAudit

            self._weight_audit = None
            if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
                try:
                    model = self.llm.apply_model(lambda m: m)[0]
                    self._weight_audit = WeightAudit(model)
                except Exception as e:  # noqa: BLE001 - the probe still checks the sync
                    log.warning("%s[%d]: weight audit unavailable (%s); the log-prob probe "
                                "alone checks weight syncs", self.ctx.role, self.ctx.rank, e)
        return self._weight_audit

    def update_weights(self, version: int, weights: list[tuple[str, Any]] | None = None,
                       path: str | None = None, buckets: list[Any] | None = None,
                       fetch_timeout_s: float = 600.0,
                       checksums: dict[str, tuple[float, float]] | None = None) -> int:
        """Load new policy weights into the running engine: named tensors, `weight_sync`
        buckets (object-store references, fetched one at a time), or a save_pretrained
        directory (read here, its tied head added: `directory_weights`); then drop cached
        prefixes computed with the old weights. Pushed tensors are audited on their way in
        (`WeightAudit`); `sync_report` then says whether every engine module received weights,
        computes with them, and (given the sender's `checksums`) holds the trainer's values.
        A directory load that fails the audit raises."""
        from cai_ray.actors.weight_sync import directory_weights, iterate

        if sum(x is not None for x in (weights, path, buckets)) != 1:
            raise ValueError("pass exactly one of `weights`, `path` or `buckets`")
        # a directory is read here and loaded like a push (its tied head included), audited
        named = directory_weights(path) if path is not None else (
            weights if weights is not None else iterate(buckets or [], fetch_timeout_s))
        audit = self._audit() if named is not None else None
        if named is None:  # no safetensors: vLLM's own loader reads the directory
            kwargs: dict[str, Any] = {"weights_path": path}
        else:
            kwargs = {"weights_iterator": audit.watch(named) if audit is not None else named}
        self.llm.collective_rpc("reload_weights", kwargs=kwargs)
        self.last_report = audit.verify(version, checksums) if audit is not None else None
        if path is not None and self.last_report is not None and not self.last_report.ok:
            # nobody else checks a directory load: a snapshot must not be rated on other weights
            raise RuntimeError(f"loading {path} into the engine: {self.last_report.problem()}")
        return self._new_version(version)

    def sync_report(self) -> SyncReport | None:
        """The audit of the last weight push (None: a directory load, or no audit here)."""
        return getattr(self, "last_report", None)

    def _new_version(self, version: int) -> int:
        self.reset_prefix_cache()
        self.weight_version = version
        return version

    # Collective weight sync: the engine's workers join a group with trainer rank 0 (formed
    # again, by every member, whenever an engine is replaced).
    def join_weight_group(self, host: str, port: int, rank: int, world_size: int,
                          timeout_s: float = 1800.0) -> str:
        return str(self.llm.collective_rpc("cai_join_weight_group",
                                           args=(host, port, rank, world_size, timeout_s))[0])

    def check_sender(self, checksums: dict[str, tuple[float, float]]) -> SyncReport | None:
        """Compare the last collective push with the sender's checksums (sent after the
        tensors); the mismatches join the push's audit report, which is returned."""
        bad = sorted({n for got in self.llm.collective_rpc("cai_check_sender", args=(checksums,))
                      for n in got})
        if bad and self.last_report is not None:
            self.last_report = dataclasses.replace(
                self.last_report, mismatched=tuple(sorted(set(self.last_report.mismatched) |
                                                          set(bad))))
        return self.last_report

    def receive_weights(self, version: int, metas: list[Any],
                        checksums: dict[str, tuple[float, float]] | None = None) -> int:
        reports = self.llm.collective_rpc("cai_receive_weights",
                                          args=(metas, checksums, version))
        # With tensor parallelism each worker holds a shard: its own audit covers its shard.
        self.last_report = next((r for r in reports if not r.ok), reports[0]) \
            if reports else None
        return self._new_version(version)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None)
            if callable(shutdown):
                shutdown()
            self.llm = None
            gc.collect()


def rollout_group(cfg: Config, model: ModelSpec | None = None) -> ActorGroup[RolloutWorker]:
    """The rollout group serving `model` (default: the configured policy)."""
    device = device_of(cfg)
    return role_group(cfg, "rollout", RolloutWorker,
                      (model or cfg.model, cfg.rollout.engine, device, cfg.run.seed),
                      vllm_env(cfg.rollout.engine, device, cfg.placement.rollout.threads))
