"""Checkpoint readers: HF safetensors dirs, GGUF files and kogcupy packed dirs -> packed weights.

Each reader is a *checkpoint* with a ``config`` and a canonical getter ``get(name, layer)``
(``packing.Getter``) that reads one tensor at a time as float32, so ``pack_weights`` holds at
most one extra tensor beyond its result. Before anything large is allocated, ``check()``
verifies that every tensor the config needs is present with its canonical shape and fits
inside its file: a corrupted header or config cannot cause a giant allocation.

Every failure to read a file (truncation, corruption, a library exception) becomes a
``ModelLoadError`` naming the file (and the tensor, when there is one).
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass

import numpy as np

from .config import SUPPORTED_TEXT, ModelConfig, RopeScaling, load_hf_config
from ..errors import ModelLoadError, UnsupportedModelError
from .packing import (PACK_FORMAT, PACK_FORMAT_VERSION, ROPE_TABLES, bf16_to_f32,
                      canonical_shape, layer_tensor_names, pack_weights, packed_shapes,
                      rope_inv_freq)

# --------------------------------------------------------------------------------------------
# Name tables: checkpoint name -> canonical name (packing.CANONICAL_*_TENSORS)
# --------------------------------------------------------------------------------------------

HF_LAYER_NAMES = {
    "model.layers.{}.input_layernorm.weight": "attn_norm",
    "model.layers.{}.self_attn.q_proj.weight": "wq",
    "model.layers.{}.self_attn.k_proj.weight": "wk",
    "model.layers.{}.self_attn.v_proj.weight": "wv",
    "model.layers.{}.self_attn.q_proj.bias": "bq",            # qwen2
    "model.layers.{}.self_attn.k_proj.bias": "bk",
    "model.layers.{}.self_attn.v_proj.bias": "bv",
    "model.layers.{}.self_attn.q_norm.weight": "q_norm",      # qwen3
    "model.layers.{}.self_attn.k_norm.weight": "k_norm",
    "model.layers.{}.self_attn.o_proj.weight": "wo",
    "model.layers.{}.post_attention_layernorm.weight": "ffn_norm",
    "model.layers.{}.mlp.gate_proj.weight": "w_gate",
    "model.layers.{}.mlp.up_proj.weight": "w_up",
    "model.layers.{}.mlp.down_proj.weight": "w_down",
}
HF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "final_norm",
    "lm_head.weight": "lm_head",                              # absent when tied
}
# Checkpoint tensors that carry no weights kogcupy needs.
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

GGUF_LAYER_NAMES = {
    "blk.{}.attn_norm.weight": "attn_norm",
    "blk.{}.attn_q.weight": "wq",                             # llama: rows permuted, see below
    "blk.{}.attn_k.weight": "wk",
    "blk.{}.attn_v.weight": "wv",
    "blk.{}.attn_q.bias": "bq",
    "blk.{}.attn_k.bias": "bk",
    "blk.{}.attn_v.bias": "bv",
    "blk.{}.attn_q_norm.weight": "q_norm",
    "blk.{}.attn_k_norm.weight": "k_norm",
    "blk.{}.attn_output.weight": "wo",
    "blk.{}.ffn_norm.weight": "ffn_norm",
    "blk.{}.ffn_gate.weight": "w_gate",
    "blk.{}.ffn_up.weight": "w_up",
    "blk.{}.ffn_down.weight": "w_down",
}
GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "embed",
    "output_norm.weight": "final_norm",
    "output.weight": "lm_head",                               # absent when tied
}
GGUF_IGNORED = ("rope_freqs.weight",)                         # checked against the config

_HF_BY_CANONICAL = {v: k for k, v in {**HF_LAYER_NAMES, **HF_GLOBAL_NAMES}.items()}
_GGUF_BY_CANONICAL = {v: k for k, v in {**GGUF_LAYER_NAMES, **GGUF_GLOBAL_NAMES}.items()}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PACK_MARKER = "kogcupy_pack.json"
PACKED_WEIGHTS_FILE = "model.safetensors"


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


def required_tensors(cfg: ModelConfig):
    """(canonical name, layer) of every tensor pack_weights will ask this config's getter for,
    layer by layer: a check that stops at the first missing one never runs through a corrupted
    layer count (2**40 layers)."""
    names = layer_tensor_names(cfg)
    for layer in range(cfg.n_layers):
        for n in names:
            yield n, layer
    yield "embed", None
    yield "final_norm", None
    if not cfg.tie_word_embeddings:
        yield "lm_head", None


def _finite(a: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(a).all():
        raise ModelLoadError(f"{where}: tensor holds NaN or infinite values (corrupted file?)")
    return a


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------

_ST_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
_ST_DTYPE_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class StTensor:
    file: str
    name: str
    dtype: str                 # safetensors dtype string: "BF16" | "F16" | "F32" | ...
    shape: tuple[int, ...]
    start: int                 # absolute byte offsets in the file
    end: int


def read_safetensors_header(path: str) -> dict[str, StTensor]:
    """Tensor table of one .safetensors file, validated (the library's check, then ours)."""
    from safetensors import safe_open
    try:
        open(path, "rb").close()
    except PermissionError:
        raise                    # (the machine's error, named, not "not a valid file")
    except OSError:
        pass                     # (said below, e.g. a dangling link into the HF cache)
    try:
        with safe_open(path, framework="numpy") as f:   # validates header, offsets, sizes
            f.keys()
    except Exception as e:                                # SafetensorError, OSError, ...
        raise ModelLoadError(f"{path}: not a valid safetensors file ({_one_line(e)})") from None
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        base = 8 + n
        table = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
            if not 0 <= b <= e or base + e > size:
                raise ValueError(f"tensor {name!r}: data offsets {b}..{e} outside the file")
            if dtype in _ST_ITEMSIZE and e - b != math.prod(shape) * _ST_ITEMSIZE[dtype]:
                raise ValueError(f"tensor {name!r}: {e - b} bytes do not hold {dtype} {shape}")
            table[name] = StTensor(path, name, dtype, shape, base + b, base + e)
        return table
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: corrupted safetensors header ({_one_line(e)})") from None


def read_safetensors_tensor(t: StTensor) -> np.ndarray:
    """One tensor as float32 (BF16/F16/F32 only)."""
    where = f"{t.file}: tensor {t.name!r}"
    if t.dtype not in _ST_DTYPE_NAME:
        raise ModelLoadError(f"{where} has dtype {t.dtype}; kogcupy reads BF16, F16 and F32")
    try:
        if t.dtype == "BF16":
            # numpy has no bfloat16: map the raw bits and widen them ourselves.
            n = math.prod(t.shape)
            bits = np.memmap(t.file, dtype=np.uint16, mode="r", offset=t.start, shape=(n,))
            a = bf16_to_f32(bits).reshape(t.shape)
            del bits
        else:
            from safetensors import safe_open
            with safe_open(t.file, framework="numpy") as f:
                a = f.get_tensor(t.name).astype(np.float32, copy=False)
    except Exception as e:
        raise ModelLoadError(f"{where}: cannot read ({_one_line(e)})") from None
    if a.shape != t.shape:
        raise ModelLoadError(f"{where}: read shape {a.shape}, header says {t.shape}")
    return _finite(np.ascontiguousarray(a), where)


def _storage_dtype(dtypes: list[str]) -> str:
    """GPU storage dtype for a checkpoint whose matrices are stored as `dtypes`."""
    if dtypes and all(d == "F16" for d in dtypes):
        return "float16"
    return "bfloat16"           # BF16, and FP32 checkpoints (bf16 keeps fp32's range)


class HFCheckpoint:
    """A HuggingFace model directory: config.json + model.safetensors or sharded + index."""

    format = "hf"

    def __init__(self, directory: str):
        self.path = directory
        self.config = load_hf_config(directory)
        self.tensors = self._tensor_table(directory)

    @staticmethod
    def _tensor_table(directory: str) -> dict[str, StTensor]:
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
                files = sorted({str(v) for v in weight_map.values()})
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise ModelLoadError(f"{index}: cannot parse the shard index ({_one_line(e)})"
                                     ) from None
            for fn in files:
                if os.path.basename(fn) != fn:
                    raise ModelLoadError(f"{index}: shard name {fn!r} is not a plain file name")
                if not os.path.isfile(os.path.join(directory, fn)):
                    raise ModelLoadError(f"{index}: shard {fn} is missing from {directory}")
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                pickles = [f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES)]
                if pickles:
                    raise _pickle_error(os.path.join(directory, pickles[0]))
                raise ModelLoadError(f"{directory}: no *.safetensors weights in this directory")
            if len(files) > 1 and "model.safetensors" in files:
                files = ["model.safetensors"]      # (transformers' choice; e.g. beside a
                #                                     consolidated.safetensors of another tool)
            if len(files) > 1:
                raise ModelLoadError(f"{directory}: several .safetensors files but no "
                                     f"model.safetensors.index.json to say which holds what")
            weight_map = None
        table: dict[str, StTensor] = {}
        for fn in files:
            for name, t in read_safetensors_header(os.path.join(directory, fn)).items():
                if weight_map is not None and weight_map.get(name) != fn:
                    continue        # the index is authoritative for which shard holds what
                table[name] = t
        if weight_map is not None:
            missing = [n for n in weight_map if n not in table]
            if missing:
                raise ModelLoadError(f"{index}: tensor {missing[0]!r} is not in its shard "
                                     f"{weight_map[missing[0]]}")
        return table

    def _hf_name(self, name: str, layer: int | None) -> str:
        tmpl = _HF_BY_CANONICAL[name]
        return tmpl.format(layer) if layer is not None else tmpl

    def check(self) -> None:
        cfg = self.config
        used = set()
        for name, layer in required_tensors(cfg):
            hf = self._hf_name(name, layer)
            t = self.tensors.get(hf)
            if t is None:
                raise ModelLoadError(f"{self.path}: checkpoint lacks tensor {hf!r} "
                                     f"({cfg.arch}, {cfg.n_layers} layers)")
            want = canonical_shape(cfg, name)
            if t.shape != want:
                raise ModelLoadError(f"{t.file}: tensor {hf!r} has shape {list(t.shape)}, "
                                     f"config.json implies {list(want)}")
            if t.dtype not in _ST_DTYPE_NAME:
                raise ModelLoadError(f"{t.file}: tensor {hf!r} has dtype {t.dtype}; kogcupy "
                                     f"reads BF16, F16 and F32")
            used.add(hf)
        for hf in self.tensors:
            if hf in used or hf.endswith(HF_IGNORED_SUFFIXES):
                continue
            if hf == "lm_head.weight" and cfg.tie_word_embeddings:
                continue            # saved anyway by some exporters; tied means embed is used
            raise UnsupportedModelError(
                f"{self.tensors[hf].file}: tensor {hf!r} has no place in a {cfg.arch} model "
                f"as kogcupy runs it (unexpected weights would be silently dropped)")

    def storage_dtype(self) -> str:
        return _storage_dtype([t.dtype for t in self.tensors.values() if len(t.shape) == 2])

    def get(self, name: str, layer: int | None) -> np.ndarray:
        t = self.tensors[self._hf_name(name, layer)]
        return read_safetensors_tensor(t)

    def get_raw(self, name: str, layer: int | None):
        """(FileRange, shape, kind, checked=False): the tensor's bytes as stored, for the GPU
        upload (converted and checked there)."""
        from .packed_weights import FileRange
        t = self.tensors[self._hf_name(name, layer)]
        return (FileRange(t.file, t.start, t.end - t.start), t.shape, _ST_DTYPE_NAME[t.dtype],
                False)


def _pickle_error(path: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path}: PyTorch pickle checkpoints are not loaded (unpickling runs arbitrary code); "
        f"convert to safetensors first, e.g. `model.save_pretrained(dir, safe_serialization=True)`"
        f" in transformers")


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------

# Types gguf.quants dequantizes in NumPy that kogcupy accepts (block size, bytes per block).
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
              "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
GGUF_ARCHS = ("llama", "qwen2", "qwen3")
_GGUF_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_DIMS = 4


_GGUF_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                    11: "q", 12: "d"}
_GGUF_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
            6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


class GGUFField:
    """One metadata value: ``contents()`` as Python values (as gguf.ReaderField's); ``data``
    has the array's length."""

    def __init__(self, name: str, value):
        self.name, self._value = name, value
        self.data = value if isinstance(value, (list, np.ndarray)) else [value]

    def contents(self):
        v = self._value
        return v.tolist() if isinstance(v, np.ndarray) else v


class GGUFTensor:
    """name, tensor_type (GGMLQuantizationType), shape (ne order, as gguf lists it), data (the
    file's bytes of the tensor, shaped as gguf.GGUFReader shapes them)."""

    def __init__(self, name, tensor_type, shape, data):
        self.name, self.tensor_type, self.shape, self.data = name, tensor_type, shape, data


class GGUFFile:
    """A parsed GGUF file: ``fields`` (key -> GGUFField), ``tensors`` (list of GGUFTensor),
    ``data`` (the file, memory-mapped)."""

    def __init__(self, data, fields, tensors):
        self.data, self.fields, self.tensors = data, fields, tensors


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file with bounds checks (gguf.GGUFReader trusts the counts and lengths it
    reads: a corrupted array length makes it loop over, and allocate for, billions of elements;
    it is also slow, ~3 s for SmolLM2's 100k-token vocabulary). Every count that cannot fit in
    the rest of the file is refused (ValueError)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = os.path.getsize(path)
    buf = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    mv = memoryview(buf)
    off = 0

    def need(n: int, what: str) -> None:
        if n < 0 or off + n > size:
            raise ValueError(f"truncated at byte {off} while reading {what}")

    def u32(what):
        nonlocal off
        need(4, what)
        v = struct.unpack_from("<I", mv, off)[0]
        off += 4
        return v

    def u64(what):
        nonlocal off
        need(8, what)
        v = struct.unpack_from("<Q", mv, off)[0]
        off += 8
        return v

    def string(what) -> bytes:
        nonlocal off
        n = u64(what)
        need(n, what)
        s = bytes(mv[off:off + n])
        off += n
        return s

    def value(vtype: int, what: str, depth: int = 0):
        nonlocal off
        if vtype in _GGUF_SCALAR_SIZE:
            n = _GGUF_SCALAR_SIZE[vtype]
            need(n, what)
            v = struct.unpack_from("<" + _GGUF_SCALAR_FMT[vtype], mv, off)[0]
            off += n
            return v
        if vtype == _GGUF_STRING:
            return string(what).decode("utf-8")      # the GGUF spec says UTF-8
        if vtype == _GGUF_ARRAY:
            if depth > 2:
                raise ValueError(f"{what}: arrays nested too deep")
            itype, count = u32(what), u64(what)
            if itype in _GGUF_SCALAR_SIZE:
                nbytes = count * _GGUF_SCALAR_SIZE[itype]
                need(nbytes, what)
                a = np.frombuffer(buf, _GGUF_NP[itype], count, off).copy() if count else \
                    np.zeros(0, _GGUF_NP[itype])
                off += nbytes
                return a
            if itype not in (_GGUF_STRING, _GGUF_ARRAY):
                raise ValueError(f"{what}: unknown array element type {itype}")
            need(count * (8 if itype == _GGUF_STRING else 12), what)   # minimum element sizes
            return [value(itype, what, depth + 1) for _ in range(count)]
        raise ValueError(f"{what}: unknown value type {vtype}")

    if size < 24 or bytes(mv[:4]) != b"GGUF":
        raise ValueError("no GGUF magic at its start")
    off = 4
    version = u32("version")
    if version & 0xFFFF == 0:
        raise ValueError("big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} not supported (2 and 3 are)")
    n_tensors, n_kv = u64("tensor count"), u64("metadata count")
    if n_kv * 13 > size or n_tensors * 24 > size:
        raise ValueError(f"header claims {n_kv} metadata keys and {n_tensors} tensors, more "
                         f"than a {size}-byte file can hold")
    alignment = 32
    fields = {}
    for _ in range(n_kv):
        key = string("metadata key").decode("utf-8")
        vtype = u32(f"metadata {key!r}")
        v = value(vtype, f"metadata {key!r}")
        if key == "general.alignment":
            if vtype != 4:
                raise ValueError("general.alignment is not a uint32")
            alignment = v
            if alignment == 0 or alignment & (alignment - 1):
                raise ValueError(f"alignment {alignment} is not a power of two")
        fields[key] = GGUFField(key, v)
    infos = []
    for _ in range(n_tensors):
        name = string("tensor name").decode("utf-8")
        n_dims = u32(f"tensor {name!r}")
        if not 1 <= n_dims <= _GGUF_MAX_DIMS:
            raise ValueError(f"tensor {name!r}: {n_dims} dimensions")
        dims = [u64(f"tensor {name!r}") for _ in range(n_dims)]
        raw_type = u32(f"tensor {name!r}")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name!r}: unknown ggml type {raw_type}") from None
        data_off = u64(f"tensor {name!r}")
        if dims[0] % block:
            raise ValueError(f"tensor {name!r}: row of {dims[0]} is not a whole number of "
                             f"{qtype.name} blocks")
        infos.append((name, qtype, dims, math.prod(dims) // block * type_size, data_off))
    start = off + (-off % alignment)
    tensors, seen = [], set()
    for name, qtype, dims, nbytes, data_off in infos:
        if data_off % alignment or start + data_off + nbytes > size:
            raise ValueError(f"tensor {name!r}: data at {data_off} (+{nbytes} bytes) lies "
                             f"outside the {size}-byte file")
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice")
        seen.add(name)
        np_dims = tuple(reversed(dims))
        item = {"F32": np.float32, "F16": np.float16}.get(qtype.name)
        if item is None:                              # quantized / BF16: bytes per row
            item = np.uint8
            np_dims = (*np_dims[:-1], np_dims[-1] // GGML_QUANT_SIZES[qtype][0]
                       * GGML_QUANT_SIZES[qtype][1])
        data = buf[start + data_off:start + data_off + nbytes].view(item).reshape(np_dims)
        tensors.append(GGUFTensor(name, qtype, np.asarray(dims, dtype=np.uint64), data))
    return GGUFFile(buf, fields, tensors)


def check_gguf_structure(path: str) -> None:
    """read_gguf's bounds-checked walk, for callers that only validate."""
    read_gguf(path)


def open_gguf(path: str):
    """The parsed GGUF file (GGUFFile) at `path`, or ModelLoadError if it is not readable GGUF."""
    try:
        return read_gguf(path)
    except (ModelLoadError, PermissionError):
        raise                    # (no permission: the machine's error, named)
    except Exception as e:          # ValueError, KeyError, UnicodeDecodeError, OSError, ...
        raise ModelLoadError(f"{path}: not a readable GGUF file ({_one_line(e)})") from None


class _Meta:
    """Typed access to GGUF metadata with one-line errors."""

    def __init__(self, reader, path: str):
        self.reader, self.path = reader, path

    def get(self, key: str, kind=int, default=None, required: bool = False):
        field = self.reader.fields.get(key)
        if field is None:
            if required:
                raise ModelLoadError(f"{self.path}: GGUF metadata lacks {key!r}")
            return default
        try:
            v = field.contents()
            if kind is str:
                if not isinstance(v, str):
                    raise TypeError(f"expected a string, got {type(v).__name__}")
                return v
            if isinstance(v, (list, str)) or v is None:
                raise TypeError(f"expected a number, got {type(v).__name__}")
            if kind is float:     # GGUF floats are float32: keep their shortest decimal form
                return float(str(np.float32(v)))
            return kind(v)
        except Exception as e:
            raise ModelLoadError(f"{self.path}: GGUF metadata {key!r} is malformed "
                                 f"({_one_line(e)})") from None

    def array_len(self, key: str) -> int | None:
        field = self.reader.fields.get(key)
        return None if field is None else len(field.data)


def gguf_config(reader, path: str, tensors=None) -> ModelConfig:
    """ModelConfig from a GGUF file's metadata and `tensors` (default: the file's own; a split
    GGUF: every shard's, since which tensors exist says tying, dtype and RoPE scaling)."""
    tensors = reader.tensors if tensors is None else tensors
    m = _Meta(reader, path)
    arch = m.get("general.architecture", str, required=True)
    if arch not in GGUF_ARCHS:
        raise UnsupportedModelError(f"{path}: unsupported GGUF architecture {arch!r}; "
                                    f"kogcupy runs {SUPPORTED_TEXT}")
    hidden = m.get(f"{arch}.embedding_length", required=True)
    n_heads = m.get(f"{arch}.attention.head_count", required=True)
    if n_heads <= 0:
        raise ModelLoadError(f"{path}: GGUF metadata {arch}.attention.head_count is {n_heads}")
    head_dim = m.get(f"{arch}.attention.key_length", default=hidden // n_heads)
    rot = m.get(f"{arch}.rope.dimension_count", default=head_dim)
    if rot != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embedding ({rot} of {head_dim} "
                                    f"dims) is not supported")
    stype = m.get(f"{arch}.rope.scaling.type", str, default="none")
    if stype not in ("none", ""):
        raise UnsupportedModelError(f"{path}: rope scaling {stype!r} is not supported "
                                    f"(kogcupy supports none and llama3)")
    vocab = m.array_len("tokenizer.ggml.tokens") or m.get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = next((int(t.shape[1]) for t in tensors if t.name == "token_embd.weight"
                      and len(t.shape) == 2), 0)
    names = {t.name for t in tensors}
    eos = [m.get("tokenizer.ggml.eos_token_id")]
    eot = m.get("tokenizer.ggml.eot_token_id")
    if eot is not None and eot not in eos:
        eos.append(eot)
    matrix_types = {t.tensor_type.name for t in tensors if len(t.shape) == 2}
    try:
        cfg = ModelConfig(
            arch=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=m.get(f"{arch}.feed_forward_length", required=True),
            n_layers=m.get(f"{arch}.block_count", required=True),
            n_heads=n_heads,
            n_kv_heads=m.get(f"{arch}.attention.head_count_kv", default=n_heads),
            head_dim=head_dim,
            rms_norm_eps=m.get(f"{arch}.attention.layer_norm_rms_epsilon", float, 1e-6),
            rope_theta=m.get(f"{arch}.rope.freq_base", float, 10000.0),
            max_position_embeddings=m.get(f"{arch}.context_length", default=4096),
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=m.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(e for e in eos if e is not None),
            torch_dtype="bfloat16" if matrix_types == {"BF16"} else "float16",
        )
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: malformed GGUF metadata ({_one_line(e)})") from None
    if "rope_freqs.weight" in names:
        cfg = _llama3_scaling_from_gguf(tensors, cfg, m, path)
    return cfg


def _llama3_scaling_from_gguf(tensors, cfg: ModelConfig, m: _Meta, path: str) -> ModelConfig:
    """llama.cpp stores Llama-3.x RoPE scaling as per-frequency factors (rope_freqs.weight,
    the divisor of each inverse frequency), not as parameters. Rebuild the RopeScaling (factor:
    metadata or the largest stored factor; low/high_freq_factor: Meta's 1 and 4; original
    context: metadata or 8192) and accept it only if it reproduces the stored factors."""
    import dataclasses
    t = next(t for t in tensors if t.name == "rope_freqs.weight")
    try:
        factors = _dequant(t).reshape(-1).astype(np.float64)
    except Exception as e:
        raise ModelLoadError(f"{path}: tensor 'rope_freqs.weight' unreadable ({_one_line(e)})"
                             ) from None
    if factors.shape != (cfg.head_dim // 2,) or not np.isfinite(factors).all() or (
            factors <= 0).any():
        raise ModelLoadError(f"{path}: rope_freqs.weight has shape {list(factors.shape)} or "
                             f"values unusable as RoPE factors")
    if np.allclose(factors, 1.0):
        return cfg
    arch = cfg.arch
    rs = RopeScaling(
        rope_type="llama3",
        factor=m.get(f"{arch}.rope.scaling.factor", float, float(factors.max())),
        low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=m.get(f"{arch}.rope.scaling.original_context_length",
                                               default=8192))
    scaled = dataclasses.replace(cfg, rope_scaling=rs)
    base = dataclasses.replace(cfg, rope_scaling=None)
    if not np.allclose(rope_inv_freq(base) / factors, rope_inv_freq(scaled), rtol=1e-4):
        raise UnsupportedModelError(f"{path}: rope_freqs.weight does not match llama3 RoPE "
                                    f"scaling; other per-frequency scalings are not supported")
    return scaled


def _dequant(t) -> np.ndarray:
    from gguf.quants import dequantize
    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head Q/K row permutation (interleaved RoPE pairs -> half-split).

    llama.cpp's converter maps row (h, j, i) of HF layout [head, half, dim/2] to (h, i, j);
    this is the inverse. Works on weights (out, in) and on biases (out,)."""
    out = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


_SPLIT_NAME = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


def _shard_name(prefix: str, k: int, count: int) -> str:
    """A split GGUF's k-th file name (1-based), as llama.cpp's gguf-split writes it."""
    return f"{prefix}-{k:05d}-of-{count:05d}.gguf"


def _gguf_later_shards(reader, path: str) -> list[str]:
    """The paths of a split GGUF's shards after the first (llama.cpp's gguf-split: metadata in
    the first, ``PREFIX-0000k-of-0000n.gguf``), [] for a whole file; ModelLoadError for a later
    shard given, or a shard missing."""
    m = _Meta(reader, path)
    count, no = m.get("split.count", default=0), m.get("split.no", default=0)
    if count <= 1:
        return []
    name = _SPLIT_NAME.match(os.path.basename(path))
    if name is None or int(name.group(3)) != count:
        raise ModelLoadError(f"{path}: a split GGUF (shard {no + 1} of {count}) whose file name "
                             f"is not PREFIX-{no + 1:05d}-of-{count:05d}.gguf, so its other "
                             f"shards cannot be found; merge them with llama-gguf-split --merge")
    if no != 0:
        raise ModelLoadError(f"{path}: shard {no + 1} of a split GGUF; pass the first, "
                             f"{_shard_name(name.group(1), 1, count)}")
    shards = [os.path.join(os.path.dirname(path), _shard_name(name.group(1), k, count))
              for k in range(2, count + 1)]
    missing = [p for p in shards if not os.path.isfile(p)]
    if missing:
        raise ModelLoadError(f"{path}: a split GGUF of {count} files; {missing[0]} is missing")
    return shards


class GGUFCheckpoint:
    """A .gguf file (llama.cpp): metadata -> ModelConfig, tensors dequantized one at a time."""

    format = "gguf"

    def __init__(self, path: str):
        self.path = path
        self.reader = open_gguf(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        for shard in _gguf_later_shards(self.reader, path):   # a split GGUF: its other files
            for t in open_gguf(shard).tensors:
                if t.name in self.tensors:
                    raise ModelLoadError(f"{shard}: tensor {t.name!r} is in an earlier shard too")
                self.tensors[t.name] = t
        self.config = gguf_config(self.reader, path, list(self.tensors.values()))

    def _name(self, name: str, layer: int | None) -> str:
        tmpl = _GGUF_BY_CANONICAL[name]
        return tmpl.format(layer) if layer is not None else tmpl

    def check(self) -> None:
        cfg = self.config
        used = set()
        for name, layer in required_tensors(cfg):
            gname = self._name(name, layer)
            t = self.tensors.get(gname)
            if t is None:
                raise ModelLoadError(f"{self.path}: GGUF lacks tensor {gname!r} "
                                     f"({cfg.arch}, {cfg.n_layers} layers)")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))   # GGUF lists ne0 first
            want = canonical_shape(cfg, name)
            if shape != want:
                raise ModelLoadError(f"{self.path}: tensor {gname!r} has shape {list(shape)}, "
                                     f"the GGUF metadata implies {list(want)}")
            if t.tensor_type.name not in GGUF_TYPES:
                raise UnsupportedModelError(
                    f"{self.path}: tensor {gname!r} is {t.tensor_type.name}; kogcupy reads "
                    f"{', '.join(GGUF_TYPES)}")
            used.add(gname)
        for gname in self.tensors:
            if gname not in used and gname not in GGUF_IGNORED:
                raise UnsupportedModelError(
                    f"{self.path}: tensor {gname!r} has no place in a {cfg.arch} model as "
                    f"kogcupy runs it (unexpected weights would be silently dropped)")

    def storage_dtype(self) -> str:
        return self.config.torch_dtype

    def get(self, name: str, layer: int | None) -> np.ndarray:
        gname = self._name(name, layer)
        t = self.tensors[gname]
        where = f"{self.path}: tensor {gname!r}"
        try:
            a = _dequant(t).reshape(canonical_shape(self.config, name))
        except Exception as e:
            raise ModelLoadError(f"{where}: cannot dequantize {t.tensor_type.name} "
                                 f"({_one_line(e)})") from None
        # llama.cpp permutes Q/K rows only for its interleaved-RoPE ("LLAMA" rope type)
        # archs; qwen2/qwen3 use half-split RoPE there and keep HF row order.
        if self.config.arch == "llama" and name in ("wq", "bq"):
            a = unpermute_qk(a, self.config.n_heads)
        elif self.config.arch == "llama" and name in ("wk", "bk"):
            a = unpermute_qk(a, self.config.n_kv_heads)
        return _finite(np.ascontiguousarray(a, dtype=np.float32), where)


# --------------------------------------------------------------------------------------------
# kogcupy packed directories (written by weights_tools.repack)
# --------------------------------------------------------------------------------------------

def read_pack_marker(directory: str) -> dict:
    path = os.path.join(directory, PACK_MARKER)
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
        if not isinstance(marker, dict):
            raise TypeError("not a JSON object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise ModelLoadError(f"{path}: cannot parse ({_one_line(e)})") from None
    if marker.get("format") != PACK_FORMAT:
        raise ModelLoadError(f"{path}: format {marker.get('format')!r} is not "
                             f"{PACK_FORMAT!r}; re-run kogcupy-repack")
    if marker.get("version") != PACK_FORMAT_VERSION:
        raise ModelLoadError(f"{directory}: packed format version {marker.get('version')} not "
                             f"supported (this kogcupy reads {PACK_FORMAT_VERSION}); "
                             f"re-run kogcupy-repack")
    if marker.get("dtype") not in ("bfloat16", "float16"):
        raise ModelLoadError(f"{path}: dtype {marker.get('dtype')!r} is not bfloat16/float16")
    return marker


def read_packed_dir(directory: str, on_config=None, lazy: bool = False,
                    context_length: int | None = None
                    ) -> tuple[ModelConfig, dict[str, np.ndarray], str]:
    """(config, packed weights, stored dtype) of a kogcupy packed directory: float32 arrays,
    or with `lazy` a PackedDirWeights reading the file on demand in its storage dtype;
    ``on_config(config, rope_positions)`` runs before any weight is read. A `context_length`
    beyond the stored RoPE table's rows (and within the model's positions) gets a longer
    table computed from config.json (the stored one is the same function's first rows)."""
    marker = read_pack_marker(directory)
    cfg_path = os.path.join(directory, "config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = ModelConfig.from_dict(json.load(f))
    except (ModelLoadError, PermissionError):
        raise                    # (no permission: the machine's error, named)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError,
            AttributeError) as e:
        raise ModelLoadError(f"{cfg_path}: not a kogcupy packed config ({_one_line(e)})"
                             ) from None
    weights_file = os.path.join(directory, PACKED_WEIGHTS_FILE)
    if not os.path.lexists(weights_file):
        raise ModelLoadError(f"{directory}: packed directory has no {PACKED_WEIGHTS_FILE}; "
                             f"re-run kogcupy-repack")
    table = read_safetensors_header(weights_file)
    rope = table.get("rope_cos")
    if rope is None or len(rope.shape) != 2:
        raise ModelLoadError(f"{directory}: packed weights lack a 2-D 'rope_cos' table")
    want = packed_shapes(cfg, rope.shape[0])
    for name, shape in want.items():
        t = table.get(name)
        if t is None:
            raise ModelLoadError(f"{directory}: packed weights lack {name!r}")
        if t.shape != shape:
            raise ModelLoadError(f"{t.file}: tensor {name!r} has shape {list(t.shape)}, "
                                 f"config.json implies {list(shape)}")
    extra = set(table) - set(want)
    if extra:
        raise ModelLoadError(f"{directory}: unexpected packed tensor {sorted(extra)[0]!r}")
    from .packing import default_rope_positions, rope_tables
    n_rope = max(rope.shape[0], default_rope_positions(cfg, context_length))
    longer = n_rope > rope.shape[0]
    if on_config is not None:
        on_config(cfg, n_rope)
    if lazy:
        from .packed_weights import PackedDirWeights
        return (cfg, PackedDirWeights({name: table[name] for name in want},
                                      rope=(cfg, n_rope) if longer else None), marker["dtype"])
    weights = {name: read_safetensors_tensor(table[name]) for name in want
               if not (longer and name in ROPE_TABLES)}
    if longer:
        weights["rope_cos"], weights["rope_sin"] = rope_tables(cfg, n_rope)
    return cfg, weights, marker["dtype"]


# --------------------------------------------------------------------------------------------
# Format detection and the one entry point
# --------------------------------------------------------------------------------------------

def looks_like_hub_id(path: str) -> bool:
    """'Org/Name' that is not an existing path nor a file name."""
    return bool(re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", path)) and not path.endswith(
        (".gguf", ".safetensors", ".json", ".bin")) and not os.path.exists(path)


def detect_format(path: str) -> str:
    """"hf" | "gguf" | "packed" for a usable path; ModelLoadError otherwise."""
    if not os.path.exists(path):
        hint = ""
        if looks_like_hub_id(path):     # (loader.resolve_model_path did not find it cached)
            hint = (f"; it is not in the local Hugging Face cache either, and kogcupy "
                    f"downloads nothing: fetch it first (`hf download {path}`), then pass the "
                    f"same id")
        raise ModelLoadError(f"{path!r}: no such file or directory{hint}")
    if os.path.isdir(path):
        entries = os.listdir(path)
        if PACK_MARKER in entries:
            return "packed"
        ggufs = [e for e in entries if e.endswith(".gguf")]
        safetensors = any(e.endswith(".safetensors") for e in entries)
        if "config.json" in entries and (safetensors or not ggufs):   # (else a GGUF repo
            if safetensors:                                             # with a config.json)
                return "hf"
            pickles = sorted(e for e in entries if e.endswith(PICKLE_SUFFIXES))
            if pickles:
                raise _pickle_error(os.path.join(path, pickles[0]))
            raise ModelLoadError(f"{path}: config.json but no *.safetensors weights")
        if len(ggufs) == 1 or _one_split(ggufs):
            return "gguf"
        if len(ggufs) > 1:
            raise ModelLoadError(f"{path}: holds {len(ggufs)} .gguf files "
                                 f"({', '.join(sorted(ggufs)[:3])}{', ...' if len(ggufs) > 3 else ''}); "
                                 f"pass the one to load")
        raise ModelLoadError(f"{path}: not a model directory (expected config.json + "
                             f"*.safetensors, a kogcupy packed dir, or one .gguf file)")
    if path.endswith(PICKLE_SUFFIXES):
        raise _pickle_error(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(9)
    except PermissionError:
        raise                    # (the machine's error, named)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({_one_line(e)})") from None
    if magic[:4] == b"GGUF" or path.endswith(".gguf"):
        return "gguf"
    is_safetensors = magic[8:9] == b"{"                  # 8-byte header length, then JSON
    if not is_safetensors and (magic[:2] == b"PK" or magic[:1] == b"\x80"):
        raise _pickle_error(path)                        # torch.save zip / raw pickle
    if path.endswith(".safetensors") or is_safetensors:
        raise ModelLoadError(f"{path}: a .safetensors file alone has no config; pass the "
                             f"HuggingFace model directory that holds it and config.json")
    raise ModelLoadError(f"{path}: unknown model format (expected a HuggingFace directory, "
                         f"a kogcupy packed directory or a .gguf file)")


def _one_split(names: list[str]) -> str | None:
    """The first file of `names` when they are shards of one split GGUF (the loader says
    which is missing, if any)."""
    found = [_SPLIT_NAME.match(e) for e in names]
    keys = {(m.group(1), m.group(3)) for m in found if m is not None}
    if None in found or len(keys) != 1:
        return None
    prefix, count = keys.pop()
    first = _shard_name(prefix, 1, int(count))
    return first if first in names else None


def resolve_gguf(path: str) -> str:
    """The .gguf file to open for `path`: itself, a directory's one file, or the first shard
    of the split GGUF a directory holds."""
    if os.path.isdir(path):
        ggufs = [e for e in os.listdir(path) if e.endswith(".gguf")]
        return os.path.join(path, _one_split(ggufs) or ggufs[0])
    return path


def open_checkpoint(path: str):
    """HFCheckpoint or GGUFCheckpoint for `path` (packed dirs are read by read_packed_dir)."""
    kind = detect_format(path)
    if kind == "hf":
        return HFCheckpoint(path)
    if kind == "gguf":
        return GGUFCheckpoint(resolve_gguf(path))
    raise ModelLoadError(f"{path}: a kogcupy packed directory has no canonical tensors")


@dataclass
class LoadedWeights:
    config: ModelConfig
    weights: dict[str, np.ndarray]        # packed layout, float32 (lazy: a PackedWeights)
    dtype: str                            # storage dtype the checkpoint implies
    format: str                           # "hf" | "gguf" | "packed"
    path: str                             # the file or directory the weights came from
    gguf_reader: object = None            # kept so the tokenizer can reuse the parsed file


def read_weights(path: str, rope_positions: int | None = None, on_config=None,
                 lazy: bool = False, context_length: int | None = None) -> LoadedWeights:
    """Any supported checkpoint -> packed float32 weights (one source tensor held at a time).

    With `lazy`, the weights are a packed_weights.PackedWeights that reads them on demand
    (headers, shapes and the config are checked now; values when read): what load_model
    returns, so that the GPU upload never holds the model as float32 on the host.
    ``on_config(config, rope_positions)`` runs once the config is known, before any weight is
    read (the CLI's checks that need the model's shape but not its weights). `rope_positions`:
    the RoPE table's rows; by default packing.default_rope_positions(config, context_length)."""
    kind = detect_format(path)
    if kind == "packed":
        cfg, weights, dtype = read_packed_dir(path, on_config, lazy, context_length)
        return LoadedWeights(cfg, weights, dtype, "packed", path)
    ckpt = open_checkpoint(path)
    ckpt.check()
    from .packing import default_rope_positions
    rope_positions = rope_positions or default_rope_positions(ckpt.config, context_length)
    if on_config is not None:
        on_config(ckpt.config, rope_positions)
    if lazy:
        from .packed_weights import CheckpointWeights
        weights = CheckpointWeights(ckpt.config, ckpt.get, rope_positions,
                                    getattr(ckpt, "get_raw", None))
    else:
        weights = pack_weights(ckpt.config, ckpt.get, rope_positions)
    return LoadedWeights(ckpt.config, weights, ckpt.storage_dtype(), ckpt.format, ckpt.path,
                         getattr(ckpt, "reader", None))
