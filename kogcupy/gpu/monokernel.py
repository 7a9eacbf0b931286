"""The monokernel backend: weights on the GPU once, one kernel launch per generate().

    backend = MonokernelBackend(model, context_length=4096)
    for tok in backend.start(prompt_ids, SamplingParams(), max_new_tokens=64, eos_ids={2}):
        ...

The kernel (kernels_src/monokernel.cu) writes each generated token into pinned, host-mapped
memory followed by a counter (system-scope release); the TokenStream polls that counter.
``cancel()`` writes a host-mapped flag the kernel reads once per step. A watchdog turns a
counter that stops moving for ``watchdog_s`` into a DeviceError.

Buffers (shapes as in abi.FIELDS): weights and KV cache in bf16/fp16, activations fp32.
"""
from __future__ import annotations

import ctypes
import functools
import numbers
import time

import numpy as np

from . import abi, kernels, schedule
from ..errors import DeviceError, InputError
from .device_weights import DeviceModel, _check_memory, kv_bytes, streamed_weight_bytes
from .build_plan import THREADS, build_plan
from ..prefix_cache import PrefixCache, common_prefix_len
from ..reference.sampling import inv_temperature
from ..sampling_params import SamplingParams

# FINISH_OVERFLOW (schedule.py): a value the one-GPU residual sums cannot hold (sync.cuh)
OVERFLOW_MESSAGE = ("the residual stream left the range the GPU's residual sums hold (a value "
                    "was not finite, or |x| >= 2^27): the weights or the prompt drive the "
                    "model's activations to inf / NaN; the output is invalid")

MATRICES = ("wqkv", "wo", "w_gate_up", "w_down", "lm_head", "embed")
STAGE_DUMPS = ("attn_norm_qkv", "attention", "o_proj_residual", "ffn_norm_gate_up_silu",
               "down_residual")


def _cupy():
    return kernels._cupy()


def _on_device(method):
    """Run a MonokernelBackend method with the backend's GPU current (tensor parallel: one
    backend per GPU in one process)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kw):
        with _cupy().cuda.Device(self.device_id):
            return method(self, *args, **kw)
    return wrapper


def gpu_available() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001
        return False


def prefix_cache_budget(gb: float | None) -> float:
    """Bytes for earlier requests' K/V: `gb` GB (1e9 bytes), or by default a fifth of the
    GPU memory left free after the weights and the live KV cache (0 turns reuse off)."""
    if gb is not None:
        if not (isinstance(gb, numbers.Real) and not isinstance(gb, bool)
                and 0 <= gb < float("inf")):
            raise InputError(f"prefix_cache_gb must be a number >= 0, got {gb!r}")
        return gb * 1e9
    free, _ = _cupy().cuda.runtime.memGetInfo()
    return 0.2 * free


class HostMapped:
    """Pinned host memory the GPU reads and writes directly (UVA: same pointer)."""

    def __init__(self, nbytes: int):
        cp = _cupy()
        rt = cp.cuda.runtime
        self.nbytes = nbytes
        self.ptr = rt.hostAlloc(nbytes, rt.hostAllocMapped | rt.hostAllocPortable)
        self._free = rt.freeHost
        buf = (ctypes.c_char * nbytes).from_address(self.ptr)
        self.u32 = np.frombuffer(buf, dtype=np.uint32)
        self.i32 = np.frombuffer(buf, dtype=np.int32)
        self.u32[:] = 0

    def __del__(self):
        try:
            self._free(self.ptr)
        except Exception:  # noqa: BLE001 -- interpreter shutdown
            pass


class MonokernelTokenStream:
    """Iterator of generated token ids as the kernel emits them."""

    def __init__(self, backend: "MonokernelBackend", n_prompt: int, t_launch: float | None,
                 begin=None):
        self._b = backend
        self._n_prompt = n_prompt
        self._t_launch = t_launch
        self._begin = begin             # deferred prefill + launch, run by the first __next__
        self._yielded = 0
        self._cancelled = False
        self.finish_reason: str | None = None
        self.prefill_s: float = 0.0
        self.cached_tokens: int = 0                 # prompt positions reused from earlier requests
        self.token_times: list[float] = []          # perf_counter() when each token was seen

    def __iter__(self):
        return self

    def cancel(self):
        if self.finish_reason is None:
            self._cancelled = True
            if self._b._active is self:           # (a replaced stream's flag would stop the
                self._b._ctl.u32[2] = 1           #  launch of the request that replaced it)

    def _finish(self, reason: str):
        self.finish_reason = reason
        self._b._wait_idle()
        # the launch has ended: an overflow the sampler did not report (it ended on EOS, length
        # or a cancel first, or the overflow came in the last step) is still an error
        if reason == "overflow" or self._b._overflowed():
            self.finish_reason = "overflow"
            self._b._forget_kv()
            raise DeviceError(OVERFLOW_MESSAGE + f" after {self._yielded} generated tokens")
        raise StopIteration

    def __next__(self) -> int:
        if self.finish_reason is not None:
            raise StopIteration
        if self._b._active is not self:          # a later start() took the GPU buffers
            self.finish_reason = "cancelled"
            raise StopIteration
        if self._begin is not None and self._cancelled:
            self._begin = None
            self.finish_reason = "cancelled"
            raise StopIteration
        if self._begin is not None:
            begin, self._begin = self._begin, None
            self._t_launch = time.perf_counter()
            try:
                launched = begin()
            except BaseException:                 # (a failed prefill: the request ends with
                self.finish_reason = "cancelled"  #  its error, the cache keeps what _begin
                self._b._active = None            #  recorded, no old launch's tokens are read)
                raise
            if not launched:                      # cancelled during the prefill
                self.finish_reason = "cancelled"
                raise StopIteration
        if self._cancelled:
            self._finish("cancelled")
        ctl = self._b._ctl.u32
        last_change = time.perf_counter()
        seen = self._yielded
        while True:
            code = int(ctl[1])                  # the kernel writes the count before the code
            n = int(ctl[0])
            if code == schedule.FINISH_OVERFLOW:   # no token made from an overflowed residual
                self._finish("overflow")
            if n > self._yielded:
                break
            if code:
                self._finish(abi.FINISH_CODES.get(code) or "length")
            now = time.perf_counter()
            if n != seen:
                seen, last_change = n, now
            if self._b._stream.done and int(ctl[0]) == self._yielded:
                code = int(ctl[1])
                self._finish(abi.FINISH_CODES.get(code) or "length")
            if now - last_change > self._b.watchdog_s:
                ctl[2] = 1
                self._b._active = None
                self._b._forget_kv()
                raise DeviceError(
                    f"monokernel made no progress for {self._b.watchdog_s:.0f} s after "
                    f"{self._yielded} generated tokens; the GPU kernel is stalled or the GPU "
                    f"is busy with another process")
            time.sleep(20e-6)
        tok = int(self._b._host_tokens.i32[self._yielded])
        now = time.perf_counter()
        if self._yielded == 0:
            self.prefill_s = now - self._t_launch
        self.token_times.append(now)
        self._yielded += 1
        return tok


class _OneLaunchBackend:
    """What the one-GPU and the tensor-parallel backends share: a request is one launch
    (``_launch``, per backend) whose tokens a MonokernelTokenStream reads from ``_ctl`` /
    ``_host_tokens``; ``_stream`` is the launch's stream (or all of them). ``_kv_ids``: the
    token ids whose K/V the cache (every rank's) holds from position 0, once ``_settle`` has
    added what the last launch (``_last_launch``: its prompt and start) ran."""

    def start(self, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int,
              eos_ids: set[int]) -> MonokernelTokenStream:
        """With batched prefill (``prefill``), the stream's first __next__ runs ``_begin``
        (prefill, then the launch); without (a tensor-parallel rank, a stage-dump or profiling
        build) the whole prompt is launched now."""
        self.cfg.check_request(prompt_ids, self.context_length, max_new_tokens)
        if self.prefill is None:
            t0 = self._launch(list(prompt_ids), params, max_new_tokens, eos_ids, all_logits=False)
            stream = MonokernelTokenStream(self, len(prompt_ids), t0)
            self._active = stream
            return stream
        if self._active is not None:
            self._active.cancel()
        self._wait_idle()
        ids = list(prompt_ids)
        stream = MonokernelTokenStream(self, len(ids), None)
        stream._begin = lambda: self._begin(stream, ids, params, max_new_tokens, eos_ids)
        self._active = stream
        return stream

    def _begin(self, stream: MonokernelTokenStream, ids: list[int], params: SamplingParams,
               max_new: int, eos_ids) -> bool:
        """Keep the longest cached prefix of `ids` (``_reuse``), prefill the rest but the last
        prompt token, then launch at that token (``_fire_at``; the GPUs are idle). False:
        cancelled before the launch."""
        n = len(ids)
        start = min(self._reuse(ids), n - 1)
        stream.cached_tokens = start
        self._kv_ids = ids[:start]                # (positions from start on are overwritten now)
        if start < n - 1:
            done = self.prefill.run(ids, start, n - 1, should_stop=lambda: stream._cancelled)
            self._kv_ids = ids[:done]
            if done < n - 1:
                return False
            start = done
        if stream._cancelled:
            return False
        self._last_launch = (ids, start)
        self._fire_at(ids, params, max_new, eos_ids, start)
        if stream._cancelled:                     # a cancel() racing _prepare's reset of the flag
            self._ctl.u32[2] = 1
        return True

    def warm_up(self) -> int:
        """What a server's first requests would otherwise wait for, done at its start: the
        sampler's filter/penalty build (every GPU's) compiled, prefill's graphs for every
        prompt size up to prefill.GRAPH_MAX tokens captured rather than at a size's second use,
        and one run of each longer chunk size (cuBLAS's first call on a shape); returns how
        many graphs prefill holds. A running generation is cancelled; the live sequence goes
        to the prefix cache (where there is one and it fits), since the warm-up's chunks
        overwrite the live KV cache."""
        for r in self._kv_holders():
            r.build_filter_sampler()
        if self.prefill is None:
            return 0
        self._release_live()
        return self.prefill.warm_up()

    def _release_live(self):
        """Before a launch that is not a request's (the warm-up's chunks, teacher-forced
        logits) overwrites the live KV cache: a running generation stops, the live sequence
        goes to the prefix cache (where there is one and it fits), and the live cache holds
        nothing reusable until the caller says what it wrote."""
        if self._active is not None:
            self._active.cancel()
            self._active = None
        self._wait_idle()
        self._settle()
        if self.prefix_cache is not None:
            self._save_live()
        self._forget_kv()

    def _overflowed(self) -> bool:
        """The ended launch's residual sums lost a value (one GPU; tensor parallel: never)."""
        return False

    def _forget_kv(self):
        """The live KV cache holds nothing reusable (a stalled or failed launch)."""
        self._kv_ids = []
        self._last_launch = None

    def clear_prefix_cache(self):
        """Forget every cached prefix (the next request prefills from position 0)."""
        self._settle()
        self._forget_kv()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    # ---- prefix reuse: the live cache, then the store of earlier sequences' K/V -----------
    def _kv_holders(self) -> list:
        """The one-GPU backends whose caches hold the sequence (each with _kv_views, _stream,
        lcfg): this one, or every rank."""
        raise NotImplementedError

    def _copy_ctx(self, h):
        """Where copies of holder h's cache run: its stream (one GPU: its GPU is current)."""
        return h._stream

    def _reuse(self, ids: list[int]) -> int:
        """Make the live caches hold the longest cached prefix of `ids` (kept from the last
        request, or copied back from the store); its length."""
        self._settle()
        live = self._kv_ids
        m_live = common_prefix_len(np.asarray(ids, np.int64), np.asarray(live, np.int64))
        if self.prefix_cache is None:
            return m_live
        m_hit, entry = self.prefix_cache.match(ids)
        if entry is not None and m_hit > m_live:
            self._save_live()
            for h, (k, v) in zip(self._kv_holders(), entry.payload):
                kc, vc = h._kv_views()
                with self._copy_ctx(h):
                    kc[:, :m_hit] = k[:, :m_hit]
                    vc[:, :m_hit] = v[:, :m_hit]
            self._kv_ids = list(entry.ids[:m_hit])
            return m_hit
        if m_live < len(live):
            self._save_live()                     # the rest of it is about to be overwritten
        return m_live

    def _save_live(self):
        """Copy the live sequence's K/V (every holder's) into the store, if it fits the budget."""
        n = len(self._kv_ids)
        holders = self._kv_holders()
        nbytes = int(sum(kv_bytes(h.lcfg, n) for h in holders))
        if n == 0 or not 0 < nbytes <= self.prefix_cache.budget_bytes:
            return
        payload = []
        for h in holders:
            kc, vc = h._kv_views()
            with self._copy_ctx(h):
                payload.append((kc[:, :n].copy(), vc[:, :n].copy()))
        self.prefix_cache.put(list(self._kv_ids), payload, nbytes)

    def _settle(self):
        """After a launch ended: the cache holds the prompt and every generated token but the
        last (a position runs all its layers before the next token is sampled)."""
        if self._last_launch is None:
            return
        self._wait_idle()
        ids, start = self._last_launch
        self._last_launch = None
        if self._overflowed():                    # computed from lost values: keep nothing new
            self._kv_ids = ids[:start]
            return
        n_gen = int(self._ctl.u32[0])
        self._kv_ids = ids + [int(t) for t in self._host_tokens.i32[:max(n_gen - 1, 0)]] \
            if n_gen >= 1 else ids[:start]

    def _check_logits_request(self, token_ids: list[int]):
        self.cfg.check_token_ids(token_ids, "token_ids")
        if len(token_ids) > self.context_length:
            raise InputError(f"{len(token_ids)} tokens exceed the context length "
                             f"{self.context_length}")

    def _sync_with_watchdog(self, stalled: str | None = None):
        """Wait for the launch to end, at most watchdog_s; then a DeviceError (`stalled`)."""
        t0 = time.perf_counter()
        while not self._stream.done:
            if time.perf_counter() - t0 > self.watchdog_s:
                raise DeviceError(stalled or f"monokernel did not finish within "
                                  f"{self.watchdog_s:.0f} s; the GPU kernel is stalled")
            time.sleep(50e-6)
        self._stream.synchronize()

    def _wait_idle(self):
        """The GPU is free for the next launch: the last one ended (a cancelled or stalled one
        gets watchdog_s to stop; never an endless wait on a stalled kernel)."""
        self._sync_with_watchdog(
            f"the GPU is still running the previous monokernel launch {self.watchdog_s:.0f} s "
            f"after it was stopped (the kernel is stalled or the GPU is busy with another "
            f"process); this engine cannot use the GPU until it ends: restart the process")


class MonokernelBackend(_OneLaunchBackend):
    """Backend protocol (see reference.ReferenceBackend) on one persistent GPU kernel."""

    name = "monokernel"

    def __init__(self, model=None, context_length: int = 4096, dtype: str | None = None,
                 watchdog_s: float = 60.0, threads: int = THREADS, blocks: int | None = None,
                 device_model: DeviceModel | None = None, debug_positions: int = 0,
                 tuning: dict | None = None, profile_pos: int | None = None,
                 prefix_cache_gb: float | None = None,
                 sm_share: int = 1, **kw):
        cp = _cupy()
        if not gpu_available():
            raise DeviceError("no CUDA/HIP GPU visible to CuPy; use the reference backend")
        if device_model is None:
            if model is None:
                raise DeviceError("MonokernelBackend needs a model or a device_model")
            kernels.check_model_shape(model.config, threads)     # before the upload
            dtype = dtype or getattr(model, "dtype", None) or "bfloat16"
            device_model = DeviceModel.from_packed(model.config, model.weights, dtype)
        self.model = model
        self.dev = device_model
        cfg = self.cfg = device_model.cfg
        self.rank, self.world = device_model.tp
        lcfg = self.lcfg = device_model.local_cfg      # this GPU's share (all of cfg on one GPU)
        self.dtype = device_model.dtype
        rope_positions = int(device_model.arrays["rope_cos"].shape[0])
        self.context_length = int(min(context_length, rope_positions))
        self.watchdog_s = float(watchdog_s)
        self.threads = threads
        self.device_id = cp.cuda.Device().id
        props = cp.cuda.runtime.getDeviceProperties(self.device_id)
        self.gpu_name, arch = kernels.device_strings(props)
        # sm_share: kernels that run on this GPU at once (tensor-parallel ranks sharing it,
        # multigpu.py); the grid takes 1 / sm_share of the multiprocessors
        self.n_sms = int(props["multiProcessorCount"]) // max(1, int(sm_share))
        self._smem_optin = int(props.get("sharedMemPerBlockOptin", 0))   # (_compile checks it)
        plan = build_plan(lcfg, self.n_sms, self.context_length, threads, blocks, tuning,
                          rank=self.rank, world=self.world, arch=arch,
                          smem_limit=(self._smem_optin
                                      or int(props.get("sharedMemPerBlock", 0))) or None,
                          hooks=profile_pos is not None or bool(debug_positions),
                          clusters=not kernels.is_hip() and int(props.get("major", 0)) >= 9,
                          memory_gib=int(props["totalGlobalMem"]) / 2**30)
        self.tuning, self.n_blocks, self.placement = plan.tuning, plan.n_blocks, plan.placement
        self._smem_floats, self.smem_bytes = plan.smem_floats, plan.smem_bytes
        self.bytes_per_token = float(streamed_weight_bytes(cfg))
        self._read_bw = None
        self.debug_positions = int(debug_positions)
        self.profile_pos = profile_pos
        self._alloc()
        self._fn = self._compile()
        self._fn_slices = None                # compiled at the first request that needs it
                                              # (or by warm_up)
        self._active: MonokernelTokenStream | None = None
        self._kv_ids: list[int] = []          # token ids whose K/V are in the cache, from 0
        self._last_launch: tuple[list[int], int] | None = None   # (prompt, start) to settle
        self.prefill = None
        self.prefix_cache = None
        if self.world == 1 and not (self.debug_positions or profile_pos is not None):
            # (the stage dumps and timings need every position run by the monokernel)
            from .prefill import Prefill
            self.prefill = Prefill(self)
            self.prefix_cache = PrefixCache(int(prefix_cache_budget(prefix_cache_gb)))

    # ---- setup ----------------------------------------------------------------------------
    def _alloc(self):
        cp = _cupy()
        cfg, C, pl = self.lcfg, self.context_length, self.placement
        L, KV, hd, G = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.gqa_group
        kv_n = L * KV * C * hd
        _check_memory(2 * kv_n * 2 + cfg.vocab_size * 16, "KV cache")
        self.k_cache = cp.empty(kv_n, dtype=cp.uint16)
        self.v_cache = cp.empty(kv_n, dtype=cp.uint16)
        f32 = cp.float32
        u64 = cp.uint64                           # tagged: fp32 bits | version tag << 32
        self.x = cp.empty(cfg.hidden_size, u64)   # tensor parallel: the embedding (one GPU: xsum)
        self.qkv = cp.empty(cfg.qkv_dim, u64)
        self.attn_out = cp.empty(cfg.q_dim, u64) if self.world > 1 else None   # one GPU: unused
        self.act = cp.empty(cfg.intermediate_size, u64)
        # one GPU: the residual stream as integer sums (x entering each layer and after its
        # o_proj, and the LM head's input) that the host zeroes per launch
        self.xsum = (cp.empty(2 * (2 * L + 1) * self.tuning["KOG_IN_COPIES"] * cfg.hidden_size, u64)
                     # sync.cuh: in, mid sums (KOG_XSUM_STRIDE words each)
                     if self.world == 1 else None)
        self.logits_buf = cp.empty(cfg.vocab_size, f32)
        # 8-byte tagged words (attention.cuh kog_attn_combine: o_proj's items poll them);
        # the NaN fill (0x7FC00000 in both halves) is tag 0x7FC00000, never a real version
        self.attn_partial = cp.empty(2 * KV * pl.attn_chunks_alloc * G * (hd + 2), f32)
        self.lm_part_val = cp.empty(self.world * self.n_blocks, f32)
        self.lm_part_idx = cp.empty(self.world * self.n_blocks, cp.int32)
        # tensor parallel: every rank's partials of the o_proj / down rows, the peer table
        self.xpart = cp.empty(2 * self.world * cfg.hidden_size, u64) if self.world > 1 else None
        self.tp_peers = cp.zeros(len(abi.TP_PEER_FIELDS) * abi.TP_MAX_RANKS, cp.uint64)
        n_cnt = abi.counter_layout(L, KV)["KOG_N_COUNTERS"]
        self.counters = cp.zeros(n_cnt, cp.uint32)
        self.partition = cp.asarray(pl.partition)
        self.tokens = cp.zeros(C, cp.int32)
        self.sample_ws = cp.zeros(abi.SAMPLE_WS_WORDS, u64)
        self.eos = cp.zeros(64, cp.int32)
        self.params_dev = cp.zeros(abi.numpy_dtype().itemsize, cp.uint8)
        self._ctl = HostMapped(64)
        self._host_tokens = HostMapped(4 * C)
        self._stream = cp.cuda.Stream(non_blocking=True)
        dl = kernels.debug_layout(cfg)
        self.debug_stride = dl["KOG_DBG_STRIDE"]
        self.debug = (cp.empty(self.debug_positions * self.debug_stride, f32)
                      if self.debug_positions else None)
        self.prof_slots = cfg.n_layers * 16 + 8
        self.profile = (cp.zeros(self.n_blocks * self.prof_slots, cp.uint64)
                        if self.profile_pos is not None else None)

    def _compile(self, slices: bool = False):
        """The monokernel; `slices`: the build whose sampler also draws with a filter or a
        penalty over every block's slice of the vocabulary (sampling.cuh). Greedy and
        temperature-only requests run the build without that code: compiled into the one
        kernel, the call alone changed ptxas's register allocation of the layer loops and
        greedy decode lost 4-5% (bench/NOTES.md, "The sampler's rounds")."""
        defines = kernels.model_defines(self.lcfg, self.dtype, self.threads, self._smem_floats,
                                        len(abi.PARTITION_COLUMNS), self.tuning, tp=self.world)
        defines["KOG_SAMPLE_SLICES"] = int(slices)
        limit = self._smem_optin or self.smem_bytes
        if self.smem_bytes > limit:
            raise DeviceError(f"monokernel needs {self.smem_bytes} B of shared memory per block, "
                              f"this GPU allows {limit} (attention K/V tiles of "
                              f"{self.tuning['KOG_ATTN_TILE']} positions x "
                              f"{self.tuning['KOG_ATTN_BUFS']}: set a smaller KOG_ATTN_TILE in "
                              f"KOGCUPY_TUNING)")
        mod = kernels.load_module(kernels.monokernel_source(), defines, cooperative=True)
        fn = kernels.get_function(mod, "kog_monokernel")
        if self.smem_bytes > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = self.smem_bytes
        self._check_occupancy(fn)
        return fn

    def _check_occupancy(self, fn):
        cp = _cupy()
        try:
            per_sm = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                fn.kernel.ptr, self.threads, self.smem_bytes)
        except Exception:  # noqa: BLE001 -- not exposed on this platform; launch checks it
            return
        if per_sm * self.n_sms < self.n_blocks:
            raise DeviceError(
                f"monokernel needs {self.n_blocks} co-resident blocks of {self.threads} threads "
                f"but this GPU fits {per_sm} per multiprocessor x {self.n_sms}; "
                f"registers {fn.num_regs}/thread, {self.smem_bytes} B shared memory per block")

    def _overflowed(self) -> bool:
        counters = getattr(self, "counters", None)     # (none: nothing was ever launched)
        if counters is None or self.world != 1:
            return False
        i = abi.counter_layout(self.lcfg.n_layers, self.lcfg.n_kv_heads)["KOG_CNT_OVERFLOW"]
        with _cupy().cuda.Device(self.device_id):
            return bool(int(counters[i]))

    # ---- requests: prefix reuse, batched prefill, one launch -----------------------------
    _begin = _on_device(_OneLaunchBackend._begin)            # (with this GPU current)

    def _fire_at(self, ids: list[int], params: SamplingParams, max_new: int, eos_ids, start: int):
        self._fire(self._prepare(ids, params, max_new, eos_ids, False, start_pos=start))

    def _kv_views(self):
        """The K and V caches as (L * KV, C, hd) views: a sequence's positions are [:, :n]."""
        cfg = self.lcfg
        shape = (cfg.n_layers * cfg.n_kv_heads, self.context_length, cfg.head_dim)
        return self.k_cache.reshape(shape), self.v_cache.reshape(shape)

    def _kv_holders(self) -> list:
        return [self]

    # ---- launch ---------------------------------------------------------------------------
    def _launch(self, ids: list[int], params: SamplingParams, max_new: int, eos_ids,
                all_logits: bool, logits_out=None):
        if self._active is not None:
            self._active.cancel()
        self._wait_idle()
        self._active = None
        return self._fire(self._prepare(ids, params, max_new, eos_ids, all_logits, logits_out))

    @_on_device
    def _prepare(self, ids: list[int], params: SamplingParams, max_new: int, eos_ids,
                 all_logits: bool, logits_out=None, start_pos: int = 0) -> dict:
        """Reset and poison the buffers of one launch (on this GPU's stream); the parameter
        block's values. The GPU must be idle. With ``start_pos`` > 0 the K/V of positions
        [0, start_pos) are already in the cache: the counters are set as if this launch had
        run those positions (TOK and every head's KV count at start_pos)."""
        cp = _cupy()
        pl = self.placement
        n = len(ids)
        if not 0 <= start_pos < max(n, 1):
            raise DeviceError(f"start_pos {start_pos} outside the prompt of {n} tokens")
        with self._stream:
            self.counters.fill(0)
            if start_pos:
                cl = abi.counter_layout(self.lcfg.n_layers, self.lcfg.n_kv_heads)
                n_heads = self.lcfg.n_layers * self.lcfg.n_kv_heads
                self.counters[cl["KOG_CNT_TOK"]] = start_pos
                self.counters[cl["KOG_CNT_KV"]:cl["KOG_CNT_KV"] + n_heads] = start_pos
            self.sample_ws.fill(0)
            for a in (self.logits_buf, self.attn_partial, self.lm_part_val):
                a.fill(np.nan)                        # poisoned: every read must be written
            self.lm_part_idx.fill(-1)                 # -1: no LM rows (tensor parallel)
            for a in (self.x, self.qkv, self.attn_out, self.act, self.xpart):
                if a is not None:
                    a.fill(0x7FC00000)                # NaN with tag 0: no version matches
            if self.xsum is not None:
                self.xsum.fill(0)                     # sums start empty (the kernel re-zeroes)
            if self.profile is not None:
                self.profile.fill(0)                  # stage_profile: this launch's stamps only
            self.tokens.fill(-1)
            self.tokens[:n] = cp.asarray(np.asarray(ids, dtype=np.int32))
            eos = sorted(int(e) for e in eos_ids)[:64]
            if eos:
                self.eos[:len(eos)] = cp.asarray(np.asarray(eos, dtype=np.int32))
            if self.debug is not None:
                self.debug.fill(np.nan)
        self._ctl.u32[:] = 0
        a = self.dev.arrays
        seed = int(params.seed)
        logits = logits_out if logits_out is not None else self.logits_buf
        vals = dict(
            wqkv=a["wqkv"].data.ptr, bqkv=a["bqkv"].data.ptr if "bqkv" in a else 0,
            q_norm=a["q_norm"].data.ptr if "q_norm" in a else 0,
            k_norm=a["k_norm"].data.ptr if "k_norm" in a else 0,
            wo=a["wo"].data.ptr, w_gate_up=a["w_gate_up"].data.ptr, w_down=a["w_down"].data.ptr,
            # LM-head rows are numbered by vocabulary id; a rank holds rows [v0, v1) only
            lm_head=a["lm_head"].data.ptr - int(self.placement.partition[0, 8]) * self.cfg.hidden_size * 2,
            embed=a["embed"].data.ptr,
            rope_cos=a["rope_cos"].data.ptr, rope_sin=a["rope_sin"].data.ptr,
            k_cache=self.k_cache.data.ptr, v_cache=self.v_cache.data.ptr,
            x=self.x.data.ptr, qkv=self.qkv.data.ptr,
            attn_out=self.attn_out.data.ptr if self.attn_out is not None else 0,
            act=self.act.data.ptr, logits=logits.data.ptr,
            xsum=self.xsum.data.ptr if self.xsum is not None else 0,
            attn_partial=self.attn_partial.data.ptr, lm_part_val=self.lm_part_val.data.ptr,
            lm_part_idx=self.lm_part_idx.data.ptr, counters=self.counters.data.ptr,
            partition=self.partition.data.ptr, tokens=self.tokens.data.ptr,
            sample_ws=self.sample_ws.data.ptr, eos_ids=self.eos.data.ptr,
            host_ctl=self._ctl.ptr, host_tokens=self._host_tokens.ptr,
            debug=self.debug.data.ptr if self.debug is not None else 0,
            prompt_len=n, start_pos=start_pos, max_new=max_new, context_length=self.context_length,
            all_logits=int(all_logits), n_eos=len(eos),
            temperature=params.temperature, inv_temperature=inv_temperature(params),
            top_k=params.top_k, top_p=params.top_p,
            min_p=params.min_p, repetition_penalty=params.repetition_penalty,
            seed_lo=seed & 0xFFFFFFFF, seed_hi=(seed >> 32) & 0xFFFFFFFF,
            n_lm_producers=pl.producers["lm"], gate_up_dyn_begin=pl.gate_up_dyn_begin,
            lm_dyn_begin=pl.lm_dyn_begin, lm_dyn_end=pl.lm_dyn_end,
            attn_max_chunks=pl.attn_max_chunks, attn_chunks_alloc=pl.attn_chunks_alloc,
            debug_npos=self.debug_positions if self.debug is not None else 0,
            debug_stride=self.debug_stride,
            profile=self.profile.data.ptr if self.profile is not None else 0,
            profile_pos=self.profile_pos if self.profile_pos is not None else -1,
            xpart=self.xpart.data.ptr if self.xpart is not None else 0,
            tp_peers=self.tp_peers.data.ptr, tp_rank=self.rank,
            tp_gather_logits=int(all_logits or params.draws_over_slices),
        )
        return vals

    def peer_pointers(self, vals: dict) -> list[int]:
        """This rank's buffers in abi.TP_PEER_FIELDS order (for every rank's peer table)."""
        return [int(vals[f]) for f in abi.TP_PEER_FIELDS]

    @_on_device
    def build_filter_sampler(self):
        """Compile the KOG_SAMPLE_SLICES build (a filter or a penalty: params.draws_over_slices)
        now if it is not yet: otherwise the first request that samples with one waits for it."""
        if self._fn_slices is None:
            self._fn_slices = self._compile(slices=True)

    @_on_device
    def _function(self, vals: dict):
        """The build a launch with these values runs: with a filter or a penalty
        (params.draws_over_slices) the KOG_SAMPLE_SLICES build, compiled at first use."""
        if not (vals["tp_gather_logits"] and not vals["all_logits"]):
            return self._fn
        self.build_filter_sampler()
        return self._fn_slices

    @_on_device
    def _fire(self, vals: dict) -> float:
        """Write the parameter block and launch (asynchronously); perf_counter() at launch."""
        packed = abi.pack(vals)
        fn = self._function(vals)
        with self._stream:
            self.params_dev.set(packed.view(np.uint8), stream=self._stream)
            t0 = time.perf_counter()
            try:
                fn((self.n_blocks,), (self.threads,), (self.params_dev,),
                         shared_mem=self.smem_bytes)
            except Exception as e:  # noqa: BLE001
                hint = ""
                if self.tuning.get("KOG_CLUSTER", 1) > 1:
                    # (each pair of blocks must fit in one GPC of this GPU)
                    hint = (f"; it ran {self.n_blocks // 2} pairs of blocks (thread-block "
                            f"clusters): try KOGCUPY_TUNING='{{\"KOG_CLUSTER\": 1}}'")
                raise DeviceError(f"monokernel launch failed: {e}{hint}") from None
        return t0

    @_on_device
    def logits(self, token_ids: list[int]) -> np.ndarray:
        """[n, V] float32: every position's logits, teacher-forced in one launch."""
        cp = _cupy()
        self._check_logits_request(token_ids)
        out = cp.empty((len(token_ids), self.cfg.vocab_size), cp.float32)
        self._release_live()
        with self._stream:
            out.fill(np.nan)
        self._launch(list(token_ids), SamplingParams(), 1, (), all_logits=True, logits_out=out)
        self._sync_with_watchdog()
        if self._overflowed():
            self._forget_kv()
            raise DeviceError(OVERFLOW_MESSAGE)
        self._kv_ids = list(token_ids)            # teacher-forced: every position ran
        return cp.asnumpy(out)

    # ---- debug ----------------------------------------------------------------------------
    @_on_device
    def debug_dump(self) -> dict:
        """{(stage, pos, layer): array} of the last launch (debug_positions > 0), in the
        reference trace's naming."""
        if self.debug is None:
            raise DeviceError("construct MonokernelBackend(debug_positions=N) to dump stages")
        self._wait_idle()
        cfg = self.lcfg
        d = kernels.debug_layout(cfg)
        rows = _cupy().asnumpy(self.debug).reshape(self.debug_positions, self.debug_stride)
        out = {}
        sizes = {"attn_norm_qkv": (d["KOG_DBG_QKV"], cfg.qkv_dim),
                 "attention": (d["KOG_DBG_ATTENTION"], cfg.q_dim),
                 "o_proj_residual": (d["KOG_DBG_O_PROJ"], cfg.hidden_size),
                 "ffn_norm_gate_up_silu": (d["KOG_DBG_GATE_UP"], cfg.intermediate_size),
                 "down_residual": (d["KOG_DBG_DOWN"], cfg.hidden_size)}
        for pos in range(self.debug_positions):
            r = rows[pos]
            out[("embed", pos, None)] = r[:cfg.hidden_size]
            for layer in range(cfg.n_layers):
                for stage, (off, size) in sizes.items():
                    o = off + layer * d["KOG_DBG_LAYER"]
                    out[(stage, pos, layer)] = r[o:o + size]
            o = d["KOG_DBG_LOGITS"]
            out[("final_norm_lm_head", pos, None)] = r[o:o + cfg.vocab_size]
        return out

    @_on_device
    def stage_profile(self) -> np.ndarray:
        """(blocks, n_layers * 16 + 8) %globaltimer stamps (ns) of the last launch at
        profile_pos (0 = not recorded); slot map in kernels_src/sync.cuh (kog_prof)."""
        if self.profile is None:
            raise DeviceError("construct MonokernelBackend(profile_pos=N) to record stage times")
        self._wait_idle()
        return _cupy().asnumpy(self.profile).reshape(self.n_blocks, self.prof_slots)

    # ---- bandwidth ------------------------------------------------------------------------
    @property
    def read_bandwidth_Bps(self) -> float:
        if self._read_bw is None:
            from .measure import measure_read_bandwidth
            self._read_bw = measure_read_bandwidth(self.gpu_name)
        return self._read_bw

    def bytes_per_step(self, position: float) -> float:
        return self.bytes_per_token + kv_bytes(self.cfg, position)


