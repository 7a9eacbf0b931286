"""NumPy fp32 reference engine: the oracle the monokernel is diffed against, and the no-GPU backend.

It runs on the PACKED weights (``packing.py``) as the same ordered list of named stages the
CUDA kernel runs (``STAGES``). With a ``trace`` every stage output is recorded under
``(stage, pos, layer)`` so a GPU debug dump can be compared buffer by buffer:

    pos    absolute sequence position of the token the stage worked on (prefill and decode alike;
           ``sample``/``stop_check`` use the position whose logits were sampled)
    layer  layer index for per-layer stages, None for embed / final_norm_lm_head / sample /
           stop_check

Shapes below: L layers, h hidden, f ffn (intermediate), H q heads, KV kv heads, G = H // KV,
hd head_dim, V vocab, n tokens in the block being run, T attended positions.
"""
from __future__ import annotations

import numbers
import time
from typing import Callable, Optional, Union

import numpy as np

from ..model.config import ModelConfig
from ..gpu.device_weights import streamed_weight_bytes
from ..errors import InputError
from ..prefix_cache import PrefixCache
from .sampling import sample as sample_token
from ..sampling_params import SamplingParams

STAGES = ("embed", "attn_norm_qkv", "attention", "o_proj_residual", "ffn_norm_gate_up_silu",
          "down_residual", "final_norm_lm_head", "sample", "stop_check")
LAYER_STAGES = STAGES[1:6]
PREFILL_CHUNK = 512          # prompt positions per batched forward
DEFAULT_PREFIX_CACHE_GB = 1.0   # host memory for the KV of earlier requests (prefix reuse)

# Trace sink: a dict filled with {(stage, pos, layer): array copy}, or a callable
# hook(stage, pos, layer, array) (the array is a view: copy what you keep), or None (off).
Trace = Union[dict, Callable[[str, int, Optional[int], np.ndarray], None], None]


def rmsnorm(x: np.ndarray, eps: float) -> np.ndarray:
    """x (..., d) / sqrt(mean(x^2) + eps), fp32; the gamma is folded into the next matrix."""
    ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True, dtype=np.float32)
    return x * (np.float32(1.0) / np.sqrt(ms + np.float32(eps)))


def rope_half_split(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x (n, heads, hd); cos, sin (n, hd/2). out = [x1*c - x2*s, x2*c + x1*s]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]                       # (n, heads, hd/2)
    c, s = cos[:, None, :], sin[:, None, :]                     # (n, 1, hd/2)
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) written as torch does; exp(-x) may overflow to inf, giving -0."""
    with np.errstate(over="ignore"):
        return x / (np.float32(1.0) + np.exp(-x))


class ReferenceModel:
    """Forward passes with a preallocated fp32 KV cache; one sequence at a time."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, np.ndarray], context_length: int,
                 trace: Trace = None):
        self.cfg = cfg
        # packed float32 arrays (packing.py):
        #   embed (V, h)              wqkv (L, qkv_dim, h)     bqkv (L, qkv_dim)      [qwen2]
        #   q_norm, k_norm (L, hd)    [qwen3]                  wo (L, h, q_dim)
        #   w_gate_up (L, 2f, h)      w_down (L, h, f)         lm_head (V, h)
        #   rope_cos, rope_sin (rope_positions, hd/2)
        self.w = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
        rope_positions = self.w["rope_cos"].shape[0]
        self.context_length = int(min(context_length, rope_positions))
        L, C, KV, hd = cfg.n_layers, self.context_length, cfg.n_kv_heads, cfg.head_dim
        self.k_cache = np.zeros((L, C, KV, hd), dtype=np.float32)   # (L, context, KV, hd)
        self.v_cache = np.zeros((L, C, KV, hd), dtype=np.float32)   # (L, context, KV, hd)
        self.pos = 0            # tokens in the KV cache; positions < pos are always complete
        self.trace = trace

    # -- trace ----------------------------------------------------------------------------
    def _record(self, stage: str, pos0: int, layer: int | None, a: np.ndarray):
        """a has a leading axis of n positions starting at pos0 (one entry per position)."""
        if self.trace is None:
            return
        for i in range(a.shape[0]):
            if isinstance(self.trace, dict):
                self.trace[(stage, pos0 + i, layer)] = np.array(a[i], copy=True)
            else:
                self.trace(stage, pos0 + i, layer, a[i])

    def record(self, stage: str, pos: int, value):
        """Record a host-side stage (sample, stop_check) for one position."""
        self._record(stage, pos, None, np.asarray(value)[None])

    def reset(self):
        self.pos = 0

    def kv_bytes(self, n: int) -> int:
        """Bytes of the K and V of n positions."""
        L, _, KV, hd = self.k_cache.shape
        return 2 * L * n * KV * hd * self.k_cache.itemsize

    def save_kv(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of K, V of positions [0, n): two (L, n, KV, hd) arrays."""
        assert n <= self.pos
        return self.k_cache[:, :n].copy(), self.v_cache[:, :n].copy()

    def load_kv(self, kv: tuple[np.ndarray, np.ndarray], n: int):
        """Start a sequence from saved K, V (L, >= n, KV, hd): positions [0, n) restored."""
        self.pos = 0
        self.k_cache[:, :n] = kv[0][:, :n]
        self.v_cache[:, :n] = kv[1][:, :n]
        self.pos = n

    # -- stages ---------------------------------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        x = self.w["embed"][ids]                                # (n, h)
        self._record("embed", self.pos, None, x)
        return x.copy()

    def attn_norm_qkv(self, x: np.ndarray, layer: int) -> np.ndarray:
        cfg, n, p0 = self.cfg, x.shape[0], self.pos
        H, KV, hd, q_dim, kv_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.q_dim, cfg.kv_dim
        xn = rmsnorm(x, cfg.rms_norm_eps)                       # (n, h)
        qkv = xn @ self.w["wqkv"][layer].T                      # (n, qkv_dim)
        if cfg.qkv_bias:
            qkv += self.w["bqkv"][layer]                        # (qkv_dim,)
        q = qkv[:, :q_dim].reshape(n, H, hd)                    # (n, H, hd)
        k = qkv[:, q_dim:q_dim + kv_dim].reshape(n, KV, hd)     # (n, KV, hd)
        v = qkv[:, q_dim + kv_dim:].reshape(n, KV, hd)          # (n, KV, hd)
        if cfg.qk_norm:
            q = rmsnorm(q, cfg.rms_norm_eps) * self.w["q_norm"][layer]   # q_norm (hd,)
            k = rmsnorm(k, cfg.rms_norm_eps) * self.w["k_norm"][layer]
        cos = self.w["rope_cos"][p0:p0 + n]                     # (n, hd/2)
        sin = self.w["rope_sin"][p0:p0 + n]
        q = rope_half_split(q, cos, sin)
        k = rope_half_split(k, cos, sin)
        self.k_cache[layer, p0:p0 + n] = k
        self.v_cache[layer, p0:p0 + n] = v
        out = np.concatenate([q.reshape(n, q_dim), k.reshape(n, kv_dim), v.reshape(n, kv_dim)],
                             axis=1)                            # (n, qkv_dim)
        self._record("attn_norm_qkv", p0, layer, out)
        return out

    def attention(self, qkv: np.ndarray, layer: int) -> np.ndarray:
        cfg, n, p0 = self.cfg, qkv.shape[0], self.pos
        KV, G, hd = cfg.n_kv_heads, cfg.gqa_group, cfg.head_dim
        T = p0 + n
        q = qkv[:, :cfg.q_dim].reshape(n, KV, G, hd)            # q head h uses kv head h // G
        k = self.k_cache[layer, :T]                             # (T, KV, hd)
        v = self.v_cache[layer, :T]                             # (T, KV, hd)
        scale = np.float32(1.0 / np.sqrt(hd))
        causal = None
        if n > 1:                                               # pos p0+i sees t <= p0+i
            causal = np.arange(T)[None, :] > (p0 + np.arange(n))[:, None]   # (n, T)
        out = np.empty((n, KV, G, hd), dtype=np.float32)
        # One GEMM per kv head on the strided (T, hd) cache slice: numpy's batched matmul
        # over (KV, ...) stacks is several times slower than these plain BLAS calls.
        for h in range(KV):
            s = q[:, h].reshape(n * G, hd) @ k[:, h].T          # (n*G, T)
            s = s.reshape(n, G, T)
            s *= scale
            if causal is not None:
                s[np.broadcast_to(causal[:, None, :], s.shape)] = -np.inf
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)                  # fp32 softmax
            out[:, h] = (s.reshape(n * G, T) @ v[:, h]).reshape(n, G, hd)
        out = out.reshape(n, cfg.q_dim)                         # (n, q_dim)
        self._record("attention", p0, layer, out)
        return out

    def o_proj_residual(self, x: np.ndarray, attn: np.ndarray, layer: int) -> np.ndarray:
        x += attn @ self.w["wo"][layer].T                       # wo (h, q_dim); x (n, h)
        self._record("o_proj_residual", self.pos, layer, x)
        return x

    def ffn_norm_gate_up_silu(self, x: np.ndarray, layer: int) -> np.ndarray:
        f = self.cfg.intermediate_size
        gu = rmsnorm(x, self.cfg.rms_norm_eps) @ self.w["w_gate_up"][layer].T   # (n, 2f)
        a = silu(gu[:, :f]) * gu[:, f:]                         # (n, f)
        self._record("ffn_norm_gate_up_silu", self.pos, layer, a)
        return a

    def down_residual(self, x: np.ndarray, a: np.ndarray, layer: int) -> np.ndarray:
        x += a @ self.w["w_down"][layer].T                      # w_down (h, f); x (n, h)
        self._record("down_residual", self.pos, layer, x)
        return x

    def final_norm_lm_head(self, x: np.ndarray) -> np.ndarray:
        logits = rmsnorm(x, self.cfg.rms_norm_eps) @ self.w["lm_head"].T        # (n, V)
        self._record("final_norm_lm_head", self.pos, None, logits)
        return logits

    # -- forward --------------------------------------------------------------------------
    def forward(self, ids, all_logits: bool = False) -> np.ndarray:
        """Run tokens `ids` (n,) at positions pos..pos+n-1 in one block (causal mask), append
        them to the KV cache. Returns logits (n, V) if all_logits else (V,) of the last one."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)       # (n,)
        n = ids.shape[0]
        if self.pos + n > self.context_length:
            raise InputError(f"sequence of {self.pos + n} tokens exceeds the context length "
                             f"{self.context_length}")
        x = self.embed(ids)                                     # (n, h) residual stream
        for layer in range(self.cfg.n_layers):
            qkv = self.attn_norm_qkv(x, layer)
            attn = self.attention(qkv, layer)
            x = self.o_proj_residual(x, attn, layer)
            a = self.ffn_norm_gate_up_silu(x, layer)
            x = self.down_residual(x, a, layer)
        if not all_logits:
            x = x[-1:]
            self.pos += n - 1
        logits = self.final_norm_lm_head(x)                     # (n or 1, V)
        self.pos += n if all_logits else 1
        return logits if all_logits else logits[0]

    def prefill(self, ids, batch: bool = True, all_logits: bool = False,
                chunk: int = PREFILL_CHUNK, should_stop=None) -> np.ndarray | None:
        """Prompt forward in blocks of `chunk` positions (batch) or token by token; the same
        results within fp32 rounding. Chunks bound the (n*G, T) score matrices.
        should_stop(): asked before every block but the first; True stops the prefill there
        (None is returned; the KV cache holds positions < pos)."""
        ids = list(ids)
        step = chunk if batch else 1
        rows = []
        for i in range(0, len(ids), step):
            if i and should_stop is not None and should_stop():
                return None
            rows.append(self.forward(ids[i:i + step], all_logits=all_logits))
        if not all_logits:
            return rows[-1]
        return np.concatenate(rows) if batch else np.stack([r[0] for r in rows])


class ReferenceTokenStream:
    """Iterator of generated token ids; the forward runs lazily inside __next__.

    The prefill starts from the longest prefix of the prompt found in the backend's prefix
    cache (``cached_tokens`` positions restored, at least the last prompt token run); when the
    stream ends, the KV it wrote goes back into the cache.
    """

    def __init__(self, backend: "ReferenceBackend", prompt_ids: list[int], params: SamplingParams,
                 max_new_tokens: int, eos_ids: set[int], batch_prefill: bool):
        self._b = backend
        self._rm = backend.rm
        self._prompt = list(prompt_ids)
        self._params = params
        self._max_new = max_new_tokens
        self._eos = set(eos_ids)
        self._batch_prefill = batch_prefill
        self._generated: list[int] = []
        self._cancel = False
        self._started = False            # the backend's KV cache holds this stream's sequence
        self._saved = False              # its KV went to the prefix cache (once)
        self._t0 = time.perf_counter()
        self._pending: str | None = None                 # finish reason after the last yield
        self.finish_reason: str | None = None
        self.prefill_s: float = 0.0
        self.cached_tokens: int = 0      # prompt positions restored from the prefix cache

    def __iter__(self):
        return self

    def cancel(self):
        self._cancel = True

    def _stop_check(self, tok: int) -> str | None:
        """Why the stream ends after yielding `tok`, or None (the kernel's stop_check stage)."""
        n_gen = len(self._generated)
        if tok in self._eos:
            return "eos"
        if n_gen >= self._max_new:
            return "length"
        if len(self._prompt) + n_gen >= self._rm.context_length:
            return "context"
        return None

    def __next__(self) -> int:
        if self.finish_reason is not None:
            raise StopIteration
        if self._b._active is not self:                         # another start() took the cache
            self._cancel = True
        if self._cancel:
            self.finish_reason = "cancelled"
        elif self._pending is not None:
            self.finish_reason = self._pending
        if self.finish_reason is not None:
            self._b.save(self)
            raise StopIteration
        g = self._generated
        if g:
            logits = self._rm.forward([g[-1]])                  # (V,)
        else:
            self._t0 = time.perf_counter()
            self._rm.reset()
            self._started = True
            n = self.cached_tokens = self._b.restore(self._prompt)
            logits = self._rm.prefill(self._prompt[n:], batch=self._batch_prefill,
                                      should_stop=lambda: self._cancel)
            if logits is None:                      # cancelled between prefill chunks: the
                self.finish_reason = "cancelled"    # positions run so far are kept for reuse
                self._b.save(self)
                raise StopIteration
        pos = self._rm.pos - 1                                  # position whose logits we sample
        tok = sample_token(logits, self._params, len(g), self._prompt + g)
        self._rm.record("sample", pos, tok)
        if not g:
            self.prefill_s = time.perf_counter() - self._t0
        g.append(tok)
        self._pending = self._stop_check(tok)
        self._rm.record("stop_check", pos, int(self._pending is not None))
        if self._pending is not None:
            self._b.save(self)                                  # its KV is complete now
        return tok


class ReferenceBackend:
    """Backend protocol on the NumPy reference (the no-GPU backend)."""

    name = "reference"
    read_bandwidth_Bps = None        # host memory bandwidth is not measured

    def __init__(self, model, context_length: int = 4096, batch_prefill: bool = True,
                 trace: Trace = None, prefix_cache_gb: float = DEFAULT_PREFIX_CACHE_GB, **kw):
        """prefix_cache_gb: host memory (1e9 bytes) for the KV of earlier requests, 0 = off;
        a traced backend records every position, so it never reuses a prefix."""
        if isinstance(prefix_cache_gb, bool) or not isinstance(prefix_cache_gb, numbers.Real) \
                or not 0 <= prefix_cache_gb < float("inf"):
            raise InputError(f"prefix_cache_gb must be a number >= 0, got {prefix_cache_gb!r}")
        if not isinstance(batch_prefill, bool):
            raise InputError(f"batch_prefill must be True or False, got {batch_prefill!r}")
        if trace is not None and not (isinstance(trace, dict) or callable(trace)):
            raise InputError(f"trace must be a dict, a callable or None, got {trace!r}")
        self.model = model
        self.cfg: ModelConfig = model.config
        self.rm = ReferenceModel(self.cfg, model.weights, context_length, trace=trace)
        self.context_length = self.rm.context_length
        self.batch_prefill = batch_prefill
        self.bytes_per_token = float(streamed_weight_bytes(self.cfg, 4))   # fp32 arrays
        self.prefix_cache = PrefixCache(0 if trace is not None else int(prefix_cache_gb * 1e9))
        self._active: ReferenceTokenStream | None = None

    # -- prefix reuse ---------------------------------------------------------------------
    def restore(self, prompt_ids: list[int]) -> int:
        """Load the longest cached prefix of the prompt into the KV cache (the last prompt token
        is left to run: its logits are sampled); returns the positions restored."""
        n, entry = self.prefix_cache.match(prompt_ids)
        n = min(n, len(prompt_ids) - 1)
        if n <= 0:
            return 0
        self.rm.load_kv(entry.payload, n)                   # payload: (k, v) (L, >= n, KV, hd)
        return n

    def save(self, stream: ReferenceTokenStream):
        """Put the KV the stream wrote, positions [0, rm.pos), into the prefix cache, once and
        only while the KV cache still holds its sequence."""
        if stream._saved or not stream._started or self._active is not stream:
            return
        stream._saved = True
        n = self.rm.pos                                     # positions < pos are complete
        nbytes = self.rm.kv_bytes(n)
        if n == 0 or nbytes > self.prefix_cache.budget_bytes:
            return
        ids = (stream._prompt + stream._generated)[:n]      # all but the unwritten last token
        self.prefix_cache.put(ids, self.rm.save_kv(n), nbytes)

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """[n, V] float32 logits of a full prompt forward (a fresh KV cache)."""
        self.cfg.check_token_ids(token_ids, "token_ids")
        if len(token_ids) > self.context_length:
            raise InputError(f"{len(token_ids)} tokens exceed the context length "
                             f"{self.context_length}")
        if self._active is not None:
            self.save(self._active)                         # it loses the KV cache now
        self._active = None
        self.rm.reset()
        return self.rm.prefill(token_ids, batch=self.batch_prefill, all_logits=True)

    def start(self, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int,
              eos_ids: set[int]) -> ReferenceTokenStream:
        self.cfg.check_request(prompt_ids, self.context_length, max_new_tokens)
        stream = ReferenceTokenStream(self, prompt_ids, params, max_new_tokens, eos_ids,
                                      self.batch_prefill)
        if self._active is not None:
            self.save(self._active)                         # it loses the KV cache now
        self._active = stream
        return stream
