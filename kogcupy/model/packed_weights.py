"""Packed weights read on demand: what ``Model.weights`` holds.

A ``PackedWeights`` is a read-only mapping name -> packed tensor (packing.py's layout) that
reads its tensors only when asked, piece by piece, so that no consumer needs the whole model
as float32 in host memory:

    w["wqkv"]                     the whole tensor as float32 (the NumPy reference's view)
    w.shape("wqkv")               its shape, nothing read
    w.pieces("wqkv")              keys covering it: layers (stacked tensors) or row slices
    w.get("wqkv", 3)              one piece as float32
    w.parts("wqkv", 3)            one piece as the source holds it (Part: rows, storage dtype,
                                  a host array or a file byte range, the norm gamma to fold in):
                                  the GPU upload copies these bytes and converts on the GPU
    w.file_range("wqkv")          the whole tensor's bytes in a file, stored as w.kind("wqkv")

Sources: ``ArrayWeights`` (float32 arrays in memory: random models, tests), ``PackedDirWeights``
(a packed directory: memory-mapped / read straight from the file in its storage dtype) and
``CheckpointWeights`` (a HF or GGUF checkpoint, packed layer by layer from its canonical
tensors, the RMSNorm gammas folded in float32 exactly as ``packing.pack_weights`` does).
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .packing import ROPE_TABLES, bf16_to_f32, packed_shapes, rope_tables

STACKED = ("wqkv", "bqkv", "q_norm", "k_norm", "wo", "w_gate_up", "w_down")
PIECE_BYTES = 64 << 20            # row blocks of the 2-D tensors (embed, lm_head) as float32


@dataclass(frozen=True)
class FileRange:
    """Bytes [offset, offset + nbytes) of `path`: a tensor (or a piece of one) as stored."""
    path: str
    offset: int
    nbytes: int


@dataclass
class Part:
    """Rows [r0, r1) of a packed piece: `src` (a host array or a FileRange) holding `shape`
    values stored as `kind` ("float32" | "bfloat16" | "float16"; 16-bit kinds as uint16 bits
    in arrays), times `gamma` (float32, per column) when not None. `check`: verify the values
    are finite after converting (sources not checked on the host)."""
    r0: int
    r1: int
    src: object
    shape: tuple[int, ...]
    kind: str
    gamma: np.ndarray | None = None
    check: bool = False
    where: str = ""


def to_f32(a: np.ndarray, kind: str) -> np.ndarray:
    """Host values stored as `kind` -> float32."""
    if kind == "bfloat16":
        return bf16_to_f32(np.asarray(a).view(np.uint16))
    if kind == "float16":
        return np.asarray(a).view(np.float16).astype(np.float32)
    return np.asarray(a, dtype=np.float32)


def read_range(r: FileRange, shape, kind: str) -> np.ndarray:
    """A FileRange as a host array (uint16 bits for 16-bit kinds), read, not mapped."""
    dt = np.float32 if kind == "float32" else np.uint16
    a = np.empty(shape, dt)
    with open(r.path, "rb", buffering=0) as f:
        f.seek(r.offset)
        mv = memoryview(a.reshape(-1).view(np.uint8))
        got = 0
        while got < r.nbytes:
            n = f.readinto(mv[got:])
            if not n:
                from ..errors import ModelLoadError
                raise ModelLoadError(f"{r.path}: file ends inside a tensor (truncated?)")
            got += n
    return a


class PackedWeights(Mapping):
    """Base: float32 views built from ``get``; subclasses say where the bytes are."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self._shapes = dict(shapes)
        self._rope_src, self._rope = None, None   # (config, rows): RoPE tables computed, not read

    def _computed(self, name) -> bool:
        """`name` is a RoPE table this source computes from the config (on first use)."""
        return self._rope_src is not None and name in ROPE_TABLES

    def _compute_rope(self, cfg: ModelConfig, rows: int) -> None:
        self._rope_src = (cfg, rows)
        for k in ROPE_TABLES:
            self._shapes[k] = (rows, cfg.head_dim // 2)

    def _tables(self) -> dict[str, np.ndarray]:
        if self._rope is None:
            self._rope = dict(zip(ROPE_TABLES, rope_tables(*self._rope_src)))
        return self._rope

    # -- Mapping --------------------------------------------------------------------------
    def __iter__(self):
        return iter(self._shapes)

    def __len__(self):
        return len(self._shapes)

    def __contains__(self, name):
        return name in self._shapes

    def __getitem__(self, name: str) -> np.ndarray:
        shape = self._shapes[name]                  # KeyError for unknown names
        out = np.empty(shape, np.float32)
        for key in self.pieces(name):
            out[key] = self.get(name, key)
        return out

    # -- pieces ---------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def kind(self, name: str) -> str:
        """How the source stores `name`: "float32" | "bfloat16" | "float16"."""
        return "float32"

    def pieces(self, name: str) -> list:
        shape = self._shapes[name]
        if name in STACKED:
            return list(range(shape[0]))
        rows = max(1, PIECE_BYTES // (4 * int(np.prod(shape[1:], dtype=np.int64)) or 1))
        return [slice(r, min(r + rows, shape[0])) for r in range(0, shape[0], rows)]

    def get(self, name: str, key) -> np.ndarray:
        raise NotImplementedError

    def parts(self, name: str, key) -> list[Part]:
        a = self.get(name, key)
        return [Part(0, a.shape[0], a, a.shape, "float32")]

    def file_range(self, name: str) -> FileRange | None:
        return None


class ArrayWeights(PackedWeights):
    """In-memory packed arrays (float32), e.g. ``random_model``'s or ``pack_weights``'."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        super().__init__({k: tuple(v.shape) for k, v in arrays.items()})
        self.arrays = arrays

    def __getitem__(self, name):
        return self.arrays[name]

    def get(self, name, key):
        return np.asarray(self.arrays[name][key], dtype=np.float32)


def as_packed_weights(weights) -> PackedWeights:
    return weights if isinstance(weights, PackedWeights) else ArrayWeights(dict(weights))


class PackedDirWeights(PackedWeights):
    """A kogcupy packed directory's model.safetensors: every tensor one contiguous byte range,
    matrices in the directory's dtype (bf16/fp16 bits), RoPE tables in float32."""

    _KINDS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

    def __init__(self, table: dict, rope: tuple[ModelConfig, int] | None = None):
        """table: name -> weights.StTensor; rope: (config, rows): RoPE tables of that many rows
        computed from the config (on first use) instead of the stored ones (a context longer
        than they cover: weights.read_packed_dir)."""
        super().__init__({k: tuple(t.shape) for k, t in table.items()})
        self.table = dict(table)
        if rope is not None:
            for k in ROPE_TABLES:
                del self.table[k]
            self._compute_rope(*rope)

    def kind(self, name):
        return "float32" if self._computed(name) else self._KINDS[self.table[name].dtype]

    def file_range(self, name):
        if self._computed(name):
            return None
        t = self.table[name]
        return FileRange(t.file, t.start, t.end - t.start)

    def _range(self, name, key) -> tuple[FileRange, tuple[int, ...]]:
        t, shape = self.table[name], self._shapes[name]
        row = int(np.prod(shape[1:], dtype=np.int64)) * (4 if self.kind(name) == "float32" else 2)
        if isinstance(key, slice):
            r0, r1 = key.start, key.stop
        else:
            r0, r1 = key, key + 1
        sub = ((r1 - r0),) + tuple(shape[1:]) if isinstance(key, slice) else tuple(shape[1:])
        return FileRange(t.file, t.start + r0 * row, (r1 - r0) * row), sub

    def raw(self, name, key) -> np.ndarray:
        """One piece as stored (uint16 bits for bf16/fp16), read from the file."""
        if self._computed(name):
            return self._tables()[name][key]
        r, sub = self._range(name, key)
        return read_range(r, sub, self.kind(name))

    def get(self, name, key):
        if self._computed(name):
            return self._tables()[name][key]
        return to_f32(self.raw(name, key), self.kind(name))

    def parts(self, name, key):
        if self._computed(name):
            return super().parts(name, key)
        r, sub = self._range(name, key)
        return [Part(0, sub[0] if sub else 1, r, sub, self.kind(name))]


def _layer_recipe(cfg: ModelConfig, name: str):
    """Packed rows of one layer of `name`: [(r0, r1, canonical tensor, gamma tensor | None)]."""
    q, kv, f, h = cfg.q_dim, cfg.kv_dim, cfg.intermediate_size, cfg.hidden_size
    return {
        "wqkv": [(0, q, "wq", "attn_norm"), (q, q + kv, "wk", "attn_norm"),
                 (q + kv, q + 2 * kv, "wv", "attn_norm")],
        "bqkv": [(0, q, "bq", None), (q, q + kv, "bk", None), (q + kv, q + 2 * kv, "bv", None)],
        "q_norm": [(0, cfg.head_dim, "q_norm", None)],
        "k_norm": [(0, cfg.head_dim, "k_norm", None)],
        "wo": [(0, h, "wo", None)],
        "w_gate_up": [(0, f, "w_gate", "ffn_norm"), (f, 2 * f, "w_up", "ffn_norm")],
        "w_down": [(0, h, "w_down", None)],
    }[name]


class CheckpointWeights(PackedWeights):
    """A HF / GGUF checkpoint packed on demand, one layer (or global tensor) at a time.

    ``get(name, layer)`` -> float32 canonical tensor (checked finite); ``get_raw(name, layer)``
    -> (array or FileRange, shape, kind, checked): the tensor as the file stores it, for the
    GPU upload (default: ``get``'s float32)."""

    def __init__(self, cfg: ModelConfig, get, rope_positions: int, get_raw=None):
        super().__init__(packed_shapes(cfg, rope_positions))
        self.cfg, self._get, self._get_raw = cfg, get, get_raw
        self._compute_rope(cfg, rope_positions)
        self._last_global = {}

    def pieces(self, name):
        if name in STACKED:
            return list(range(self._shapes[name][0]))
        return [slice(0, self._shapes[name][0])]      # a global tensor is read whole

    def __getitem__(self, name):
        shape = self._shapes[name]                    # KeyError for unknown names
        if name not in STACKED:
            return self.get(name, slice(None))        # (no second copy of a global tensor)
        out = np.empty(shape, np.float32)
        for layer in range(shape[0]):
            self._fill(name, layer, out[layer])       # straight into the stacked array
        return out

    def _global_recipe(self, name):
        if name == "embed":
            return [(0, self.cfg.vocab_size, "embed", None)]
        head = "embed" if self.cfg.tie_word_embeddings else "lm_head"
        return [(0, self.cfg.vocab_size, head, "final_norm")]

    def _canonical(self, canon, layer):
        """A canonical tensor (float32); a global one still held by a caller is reused (the
        tied LM head reads the embedding the reference already holds)."""
        if layer is None:
            hit = self._last_global.get(canon)
            a = hit() if hit is not None else None
            if a is not None:
                return a
        a = self._get(canon, layer)
        if layer is None:
            self._last_global[canon] = weakref.ref(a)
        return a

    def _fill(self, name, layer, out):
        """Write one layer (layer None: the global tensor) of `name` into `out` (float32)."""
        recipe = _layer_recipe(self.cfg, name) if layer is not None else self._global_recipe(name)
        gammas = {}
        for r0, r1, canon, gname in recipe:
            a = self._canonical(canon, layer)
            if gname is not None:
                if gname not in gammas:
                    gammas[gname] = self._get(gname, layer)
                np.multiply(a, gammas[gname], out=out[r0:r1])
            else:
                out[r0:r1] = a
            del a

    def get(self, name, key):
        if self._computed(name):
            return self._tables()[name][key]
        layer = key if name in STACKED else None
        recipe = _layer_recipe(self.cfg, name) if layer is not None else self._global_recipe(name)
        if len(recipe) == 1 and recipe[0][3] is None and (layer is not None
                                                           or key == slice(None)):
            return self._canonical(recipe[0][2], layer)      # (embed, wo, w_down: no copy)
        shape = self._shapes[name][1:] if layer is not None else self._shapes[name]
        out = np.empty(shape, np.float32)
        self._fill(name, layer, out)
        return out if layer is not None or key == slice(None) else out[key]

    def parts(self, name, key):
        if self._computed(name) or name not in STACKED and name not in (
                "embed", "lm_head"):
            return super().parts(name, key)
        layer = key if name in STACKED else None
        recipe = _layer_recipe(self.cfg, name) if layer is not None else self._global_recipe(name)
        out = []
        for r0, r1, canon, gname in recipe:
            if self._get_raw is not None:
                src, shape, kind, checked = self._get_raw(canon, layer)
            else:
                src = self._get(canon, layer)
                shape, kind, checked = src.shape, "float32", True
            gamma = self._get(gname, layer) if gname is not None else None
            where = f"tensor {canon!r}" + (f" of layer {layer}" if layer is not None else "")
            out.append(Part(r0, r1, src, tuple(shape), kind, gamma, not checked, where))
        return out
