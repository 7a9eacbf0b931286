"""Tensor-parallel generation: one monokernel per GPU, all launched together by one process.

    backend = TensorParallelBackend(model, gpus=4, context_length=4096)
    for tok in backend.start(prompt_ids, SamplingParams(), 64, eos_ids={2}):
        ...

Each GPU holds its rank's share of the weights (tensor_parallel.py) and runs the same
monokernel compiled for that share; the ranks exchange partial sums and the LM head's
results inside the kernels (kernels_src/kccl.cuh), so a generate() is still one launch per
GPU. All ranks compute the same token at every step (same logits bits, same random draws);
rank 0 streams it to the host and is the one that reads the cancel flag. A prompt's tokens but
the last are prefilled first, each rank its heads and FFN columns (prefill.TensorParallelPrefill),
from the end of the longest prefix the ranks' caches hold: the previous request's (its prompt and
generated tokens: the next turn of a conversation prefills only what is new), or an earlier
sequence's copied back from the store (``prefix_cache_gb``: every rank's K/V on its GPU).
"""
from __future__ import annotations

import contextlib

import numpy as np

from . import abi, kccl, tensor_parallel
from ..errors import InputError
from ..prefix_cache import PrefixCache
from .device_weights import DeviceModel
from .monokernel import (MonokernelBackend, MonokernelTokenStream, _cupy, _OneLaunchBackend,
                         prefix_cache_budget)
from .prefill import TensorParallelPrefill
from ..sampling_params import SamplingParams


class _AllStreams:
    """The ranks' streams seen as one (what MonokernelTokenStream polls)."""

    def __init__(self, ranks):
        self._ranks = ranks

    @property
    def done(self) -> bool:
        return all(r._stream.done for r in self._ranks)

    def synchronize(self):
        for r in self._ranks:
            r._stream.synchronize()


class TensorParallelBackend(_OneLaunchBackend):
    """Backend protocol (see reference.ReferenceBackend) over `gpus` GPUs."""

    name = "monokernel"

    def __init__(self, model=None, gpus: int = 2, context_length: int = 4096,
                 dtype: str | None = None, device_model: DeviceModel | None = None,
                 devices: list[int] | None = None, prefix_cache_gb: float | None = None,
                 **backend_kw):
        """``devices``: the GPU of each rank (default 0 .. gpus-1). Ranks may share a GPU -- the
        multi-rank protocol on one GPU, for tests where fewer GPUs are present: each rank's grid
        then takes its share of the multiprocessors and all of them must run at once."""
        cp = _cupy()
        if not isinstance(gpus, int) or gpus < 2:
            raise InputError(f"TensorParallelBackend needs gpus >= 2, got {gpus!r}")
        cfg = device_model.cfg if device_model is not None else model.config
        tensor_parallel.check(cfg, gpus)
        self.peers = kccl.Peers(gpus, devices)      # clear errors: too few GPUs, no peer access
        devices = self.peers.devices
        if device_model is None:
            dtype = dtype or getattr(model, "dtype", None) or "bfloat16"
            with cp.cuda.Device(devices[0]):
                device_model = DeviceModel.from_packed(model.config, model.weights, dtype)
        self.ranks: list[MonokernelBackend] = []
        for r in range(gpus):
            with cp.cuda.Device(devices[r]):
                shard = device_model.shard(r, gpus)
                self.ranks.append(MonokernelBackend(device_model=shard,
                                                    context_length=context_length,
                                                    sm_share=devices.count(devices[r]), **backend_kw))
        del device_model
        r0 = self.ranks[0]
        self.model = model
        self.n_gpus = gpus
        self.cfg, self.dtype = r0.cfg, r0.dtype
        self.context_length = r0.context_length
        self.watchdog_s = r0.watchdog_s
        self.gpu_name = r0.gpu_name
        self.n_blocks, self.threads = r0.n_blocks, r0.threads
        self.bytes_per_token = r0.bytes_per_token          # the whole model's, over all GPUs
        self._ctl, self._host_tokens = r0._ctl, r0._host_tokens
        self._stream = _AllStreams(self.ranks)
        self._active: MonokernelTokenStream | None = None
        self._kv_ids: list[int] = []          # token ids whose K/V every rank's cache holds
        self._last_launch: tuple[list[int], int] | None = None   # (prompt, start) to settle
        self._read_bw = None
        # the prompt but its last token in chunks on tensor cores, sharded like the weights
        # (the stage dumps and timings need every position run by the monokernel)
        self.prefill = None
        self.prefix_cache = None
        if not (backend_kw.get("debug_positions") or backend_kw.get("profile_pos") is not None):
            self.prefill = TensorParallelPrefill(self)
            # earlier sequences' K/V: every rank's copy on its GPU (an equal share each), one
            # budget for all of them (prefix_cache_gb: the total); by default what the GPU with
            # the least room gives its ranks, times the ranks
            if prefix_cache_gb is not None:
                budget = prefix_cache_budget(prefix_cache_gb)
            else:
                per_rank = []
                for d in sorted(set(devices)):
                    with cp.cuda.Device(d):
                        per_rank.append(prefix_cache_budget(None) / devices.count(d))
                budget = min(per_rank) * gpus
            self.prefix_cache = PrefixCache(int(budget))

    # ---- requests: prefix reuse, batched prefill, one launch per GPU -----------------------
    def _kv_holders(self) -> list:
        return self.ranks

    @contextlib.contextmanager
    def _copy_ctx(self, h):
        with _cupy().cuda.Device(h.device_id), h._stream:   # (rank h's GPU, then its stream)
            yield

    def _fire_at(self, ids: list[int], params: SamplingParams, max_new: int, eos_ids, start: int):
        self._fire_all(ids, params, max_new, eos_ids, False, start_pos=start)

    # ---- launch ---------------------------------------------------------------------------
    def _launch(self, ids, params: SamplingParams, max_new: int, eos_ids, all_logits: bool,
                logits_outs=None) -> float:
        """A launch from position 0 (teacher-forced logits; a build without prefill): it
        overwrites the caches, so nothing of them is reused after it."""
        if self._active is not None:
            self._active.cancel()
        self._wait_idle()
        self._active = None
        self._forget_kv()
        return self._fire_all(ids, params, max_new, eos_ids, all_logits, logits_outs)

    def _fire_all(self, ids, params: SamplingParams, max_new: int, eos_ids, all_logits: bool,
                  logits_outs=None, start_pos: int = 0) -> float:
        """Reset every rank's buffers, exchange the peer tables, launch every rank's kernel
        (the GPUs idle); perf_counter() at rank 0's launch."""
        vals = [r._prepare(ids, params, max_new, eos_ids, all_logits,
                           logits_outs[i] if logits_outs is not None else None, start_pos=start_pos)
                for i, r in enumerate(self.ranks)]
        table = np.zeros((len(abi.TP_PEER_FIELDS), abi.TP_MAX_RANKS), np.uint64)
        for q, (r, v) in enumerate(zip(self.ranks, vals)):
            table[:, q] = r.peer_pointers(v)
        producers = sum(r.placement.producers["lm"] for r in self.ranks)
        for r, v in zip(self.ranks, vals):    # every rank's build (a first compile) before any
            r._function(v)                    # rank runs: rank 0 would spin on its peers
        cp = _cupy()
        for r, v in zip(self.ranks, vals):
            v["n_lm_producers"] = producers
            with cp.cuda.Device(r.device_id):
                r.tp_peers.set(table.reshape(-1), stream=r._stream)
        # every rank's buffers are reset before any kernel can store into a peer's
        self._wait_idle()
        t0 = [r._fire(v) for r, v in zip(self.ranks, vals)]
        return t0[0]

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """[n, V] float32: every position's logits, teacher-forced (rank 0's copy; every rank
        holds the same)."""
        cp = _cupy()
        self._check_logits_request(token_ids)
        outs = []
        for r in self.ranks:
            with cp.cuda.Device(r.device_id), r._stream:
                o = cp.empty((len(token_ids), self.cfg.vocab_size), cp.float32)
                o.fill(np.nan)
                outs.append(o)
        self._release_live()
        self._launch(list(token_ids), SamplingParams(), 1, (), True, outs)
        self._sync_with_watchdog()
        self._kv_ids = list(token_ids)            # teacher-forced: every position ran
        self.last_logits_all_ranks = [cp.asnumpy(o) for o in outs]
        return self.last_logits_all_ranks[0]

    # ---- bandwidth ------------------------------------------------------------------------
    @property
    def read_bandwidth_Bps(self) -> float:
        """The GPUs' aggregate read bandwidth (rank 0's measurement x the distinct GPUs)."""
        if self._read_bw is None:
            # (ranks sharing a GPU share its bandwidth)
            self._read_bw = self.ranks[0].read_bandwidth_Bps * len(set(self.peers.devices))
        return self._read_bw

    def bytes_per_step(self, position: float) -> float:
        return self.ranks[0].bytes_per_step(position)
