"""Tiny checkpoints for tests: HF directories (transformers, random weights) and GGUF files.

Torch and transformers are test dependencies, imported only inside the builders. The GGUF
builder writes what llama.cpp's converter would: Q/K rows permuted for llama, ne-order
shapes, quantized matrices, a byte-level BPE tokenizer in the metadata.
"""
from __future__ import annotations

import json
import os

import numpy as np

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=256,
            rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)

_HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def byte_tokens(n: int) -> list[str]:
    """GPT-2 byte-level alphabet (256 single-byte tokens) padded with <|extra_i|>, cut to n."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    k = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    toks = [chr(c) for c in cs]
    return (toks + [f"<|extra_{i}|>" for i in range(n - len(toks))])[:n]


def write_tiny_tokenizer(directory: str, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json (no merges) + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    toks = byte_tokens(vocab_size - 3)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{t: i + 3 for i, t in enumerate(toks)}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<unk>", "<s>", "</s>"])
    tk.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False,
                   "chat_template": "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"}, f)


def hf_model(arch: str = "llama", seed: int = 0, tie: bool = False, **overrides):
    """A random-weight transformers model of the tiny shape (torch float32)."""
    import torch
    import transformers
    cfg_cls, model_cls = (getattr(transformers, n) for n in _HF_CLASSES[arch])
    kw = {**TINY, "tie_word_embeddings": tie, **overrides}
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).eval()
    with torch.no_grad():            # norms away from 1 so gamma folding is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def write_hf_dir(directory: str, arch: str = "llama", dtype: str = "float32", seed: int = 0,
                 tie: bool = False, max_shard_size: str | None = None, tokenizer: bool = True,
                 **overrides):
    """save_pretrained(safe_serialization=True) of a tiny random model; returns the model."""
    import torch
    model = hf_model(arch, seed, tie, **overrides)
    model = model.to(getattr(torch, dtype))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kw)
    if tokenizer:
        write_tiny_tokenizer(directory, model.config.vocab_size)
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute (HF rows -> GGUF rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_HF_TO_GGUF_LAYER[rest]}"


def write_gguf(path: str, arch: str, hf_config: dict, tensors: dict[str, np.ndarray],
               qtype: str = "Q8_0", tokenizer: bool = True, extra_kv=None,
               split_max_tensors: int = 0, small_first_shard: bool = False) -> dict:
    """GGUF from HF-named float32 tensors, as llama.cpp converts them.

    2-D matrices whose rows fit the block size are stored as `qtype` (F32/F16/BF16/Q8_0/Q4_0/
    Q4_1/...), 1-D tensors as F32. Returns {gguf name: the float32 values stored}, i.e. the
    dequantized GGUF tensor in GGUF row order (what a reader should reproduce).
    `split_max_tensors`: a split GGUF of that many tensors a file, as llama.cpp's gguf-split
    writes it (PATH's stem + -00001-of-0000N.gguf, ...); `small_first_shard`: its first file
    holds the metadata only (gguf-split --no-tensor-first-split)."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
    c = hf_config
    w = gguf.GGUFWriter(path, arch=arch, split_max_tensors=split_max_tensors,
                        small_first_shard=small_first_shard)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    if tokenizer:
        toks = ["<unk>", "<s>", "</s>"] + byte_tokens(c["vocab_size"] - 3)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(toks)
        w.add_token_types([3, 3, 3] + [1] * (len(toks) - 3))
        w.add_token_merges([])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)
        w.add_chat_template("{% for m in messages %}{{ m['content'] }}</s>{% endfor %}")
    for k, v in (extra_kv or {}).items():
        w.add_key_value(k, *v)
    stored = {}
    qt = getattr(T, qtype)
    for hf, a in tensors.items():
        name = gguf_name(hf)
        a = np.ascontiguousarray(a, dtype=np.float32)
        if arch == "llama" and hf.endswith("q_proj.weight"):
            a = permute_qk(a, c["num_attention_heads"])
        elif arch == "llama" and hf.endswith("k_proj.weight"):
            a = permute_qk(a, c["num_key_value_heads"])
        t = qt if a.ndim == 2 and a.shape[1] % GGML_QUANT_SIZES[qt][0] == 0 else T.F32
        if t == T.F32:
            w.add_tensor(name, a)
        elif t == T.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, t), raw_dtype=t)
        stored[name] = np.asarray(gguf.quants.dequantize(gguf.quants.quantize(a, t), t)
                                  if t not in (T.F32, T.F16) else a.astype(
                                      np.float16 if t == T.F16 else np.float32),
                                  dtype=np.float32).reshape(a.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def write_tiny_gguf(path: str, arch: str = "llama", qtype: str = "Q8_0", seed: int = 0,
                    tie: bool = True, split_max_tensors: int = 0,
                    small_first_shard: bool = False, **overrides):
    """A tiny random transformers model converted to GGUF; returns (model, stored tensors)."""
    model = hf_model(arch, seed, tie, **overrides)
    sd = state_dict_numpy(model)
    if tie:
        sd.pop("lm_head.weight", None)
    cfg = {**TINY, **overrides}
    stored = write_gguf(path, arch, cfg, sd, qtype, split_max_tensors=split_max_tensors,
                        small_first_shard=small_first_shard)
    return model, stored


# --------------------------------------------------------------------------------------------
# A NumPy stand-in for the parts of CuPy the weight upload uses (CPU tests and load timing)
# --------------------------------------------------------------------------------------------

class _DevArray(np.ndarray):
    """A host array posing as a cupy array: ``.data.ptr`` is its address."""

    @property
    def data(self):
        from types import SimpleNamespace
        return SimpleNamespace(ptr=self.ctypes.data)


class _Pinned(bytearray):
    @property
    def ptr(self):
        import ctypes
        return ctypes.addressof((ctypes.c_char * len(self)).from_buffer(self))


class FakeCupy:
    """``kernels._cupy()`` replaced by NumPy: "device" arrays are host arrays, copies are
    memmoves. Enough for DeviceModel.from_packed and its pinned-buffer file uploader."""

    def __init__(self):
        import ctypes
        from types import SimpleNamespace
        self.uint16, self.uint32, self.float16, self.float32 = (
            np.uint16, np.uint32, np.float16, np.float32)
        self.isfinite = np.isfinite

        class _Pool:
            def free_bytes(self):
                return 0
        self._pool = _Pool()
        runtime = SimpleNamespace(
            memGetInfo=lambda: (1 << 50, 1 << 50), is_hip=False, memcpyHostToDevice=1,
            memcpyAsync=lambda dst, src, n, kind, stream: ctypes.memmove(dst, src, n))

        class _Device:
            id = 0

            def __init__(self, *a):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *a):
                return False

        class _Event:
            def __init__(self, **kw):
                pass

            def record(self, stream=None):
                pass

            def synchronize(self):
                pass
        self.cuda = SimpleNamespace(
            runtime=runtime, Device=_Device, Event=_Event,
            alloc_pinned_memory=lambda n: _Pinned(n),
            get_current_stream=lambda: SimpleNamespace(ptr=0))

    def empty(self, shape, dtype=np.float32):
        return np.empty(shape, dtype).view(_DevArray)

    def asarray(self, a, dtype=None):
        return np.array(a, dtype=dtype, copy=True).view(_DevArray)

    def ascontiguousarray(self, a):
        return np.ascontiguousarray(a).view(_DevArray)

    def get_default_memory_pool(self):
        return self._pool


def random_hf_checkpoint(directory: str, shape: str = "llama-3.2-1b", dtype: str = "bfloat16",
                         seed: int = 0, **overrides) -> str:
    """A HF safetensors directory of a public checkpoint's shape with random weights, written
    tensor by tensor (no whole-model array; bf16 written as raw bits): load-time benchmarks."""
    import struct

    from kogcupy.model.config import ModelConfig
    from kogcupy.model.packing import bf16_bits, canonical_shape, layer_tensor_names
    from kogcupy.model.random_weights import SHAPES
    from kogcupy.model.weights import HF_GLOBAL_NAMES, HF_LAYER_NAMES
    cfg = ModelConfig(**{**SHAPES[shape], **overrides})
    by_canon = {v: k for k, v in {**HF_LAYER_NAMES, **HF_GLOBAL_NAMES}.items()}
    names = [(by_canon[n].format(layer), n) for layer in range(cfg.n_layers)
             for n in layer_tensor_names(cfg)]
    names += [(by_canon[n], n) for n in ["embed", "final_norm"]
              + ([] if cfg.tie_word_embeddings else ["lm_head"])]
    st = {"bfloat16": "BF16", "float16": "F16"}[dtype]
    header, off = {}, 0
    for hf, n in names:
        nb = int(np.prod(canonical_shape(cfg, n))) * 2
        header[hf] = {"dtype": st, "shape": list(canonical_shape(cfg, n)),
                      "data_offsets": [off, off + nb]}
        off += nb
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for hf, n in names:
            s = canonical_shape(cfg, n)
            if len(s) == 1:
                a = 1.0 + 0.1 * rng.standard_normal(s, dtype=np.float32)
            else:
                a = rng.standard_normal(s, dtype=np.float32) * np.float32(1 / np.sqrt(s[-1]))
            f.write((bf16_bits(a) if dtype == "bfloat16" else a.astype(np.float16)).tobytes())
            del a
    model_type = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[cfg.arch]
    hf_cfg = dict(model_type=model_type, hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                  head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
                  max_position_embeddings=cfg.max_position_embeddings,
                  rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                  tie_word_embeddings=cfg.tie_word_embeddings, torch_dtype=dtype,
                  bos_token_id=1, eos_token_id=2)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_cfg, f)
    write_tiny_tokenizer(directory, 300)
    return directory
