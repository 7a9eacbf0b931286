"""GPU measurements outside the runtime's hot path: the stream-read bandwidth probe (the
denominator of every "% of read bandwidth") and ``bench_decode`` (decode speed on random
weights, used by scripts/bench.py and the tuning scripts).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from . import kernels
from ..model.config import ModelConfig
from .device_weights import DeviceModel
from ..sampling_params import SamplingParams


def _cupy():
    return kernels._cupy()


def stream_read_bandwidth(nbytes: int = 4 << 30, repeats: int = 10) -> dict:
    """Best stream-read bandwidth of 16-byte non-temporal loads over `nbytes` of hashed
    (non-constant) data, tried at several launch shapes; the benchmark's limit uses this too.
    Returns {"Bps": best, "per_launch_config": {"<blocks/SM>x<threads>": TB/s}, "bytes": n}."""
    cp = _cupy()
    free = cp.cuda.runtime.memGetInfo()[0]
    n_vec = min(nbytes, free // 4) // 16
    buf = cp.arange(n_vec * 4, dtype=cp.uint32)
    buf *= cp.uint32(2654435761)               # never time on zeros or a constant
    sink = cp.zeros(1, cp.float32)
    fn = kernels.get_function(kernels.load_module(kernels.stream_read_source(), {}),
                              "kog_stream_read")
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    args = (buf, np.uint64(n_vec), sink)
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    best, per_cfg = 0.0, {}
    for blocks_per_sm, threads in ((2, 1024), (4, 512), (8, 256), (16, 256)):
        grid = (sms * blocks_per_sm,)
        fn(grid, (threads,), args)             # warm-up
        times = []
        for _ in range(repeats):
            e0.record()
            fn(grid, (threads,), args)
            e1.record()
            e1.synchronize()
            times.append(cp.cuda.get_elapsed_time(e0, e1) / 1e3)
        bw = n_vec * 16 / min(times)
        per_cfg[f"{blocks_per_sm}x{threads}"] = round(bw / 1e12, 4)
        best = max(best, bw)
    del buf
    cp.get_default_memory_pool().free_all_blocks()
    return {"Bps": best, "per_launch_config": per_cfg, "bytes": n_vec * 16}


def measure_read_bandwidth(gpu_name: str | None = None, refresh: bool = False) -> float:
    """stream_read_bandwidth()'s best, cached per GPU name in ~/.cache/kogcupy."""
    cp = _cupy()
    if gpu_name is None:
        gpu_name = kernels.device_strings(cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id))[0]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", gpu_name)
    path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kogcupy" / f"bw2-{safe}.json"
    if not refresh and path.is_file():
        try:
            return float(json.loads(path.read_text())["read_Bps"])
        except (OSError, ValueError, KeyError):
            pass
    res = stream_read_bandwidth()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"gpu": gpu_name, "read_Bps": res["Bps"], "bytes": res["bytes"]}))
    except OSError:
        pass
    return res["Bps"]


def bench_decode(cfg: ModelConfig, prompt_len: int = 32, new_tokens: int = 512,
                 position: int = 0, dtype: str = "bfloat16", context_length: int | None = None,
                 seed: int = 0, backend=None,
                 tuning: dict | None = None, device_model: DeviceModel | None = None,
                 n_gpus: int = 1, blocks: int | None = None, threads: int | None = None,
                 sampling: SamplingParams | None = None) -> dict:
    """Decode speed on random GPU weights for `cfg` (greedy unless `sampling`, no EOS), on
    `n_gpus` GPUs (tensor parallel when > 1; the bandwidth limit is then the GPUs' aggregate).

    Generation starts after max(prompt_len, position) prompt tokens; tokens/s counts the
    decode steps after the first generated token (host arrival times of tokens 2..n)."""
    from .monokernel import THREADS, MonokernelBackend
    threads = threads or THREADS
    n_prompt = max(prompt_len, position, 1)
    ctx = context_length or min(cfg.max_position_embeddings, n_prompt + new_tokens + 8)
    if backend is None:
        with _cupy().cuda.Device(0):
            dev = device_model or DeviceModel.random(cfg, dtype, seed, rope_positions=max(ctx, 16))
        if n_gpus > 1:
            from .multigpu import TensorParallelBackend
            backend = TensorParallelBackend(device_model=dev, gpus=n_gpus, context_length=ctx,
                                            tuning=tuning, blocks=blocks, threads=threads)
            del dev
        else:
            backend = MonokernelBackend(device_model=dev, context_length=ctx, tuning=tuning,
                                        blocks=blocks, threads=threads)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, n_prompt).tolist()
    sp = sampling or SamplingParams()
    list(backend.start(ids, sp, min(64, new_tokens), set()))   # warm-up (and a first compile)
    stream = backend.start(ids, sp, new_tokens, set())
    toks = list(stream)
    tt = stream.token_times
    decode_s = tt[-1] - tt[0] if len(tt) > 1 else float("nan")
    tps = (len(tt) - 1) / decode_s if len(tt) > 1 else float("nan")
    mean_pos = n_prompt + (len(toks) - 1) / 2
    bpt = backend.bytes_per_step(mean_pos)
    bw = backend.read_bandwidth_Bps
    return dict(gpu=backend.gpu_name, n_prompt=n_prompt, new_tokens=len(toks),
                tokens_per_s=tps, step_us=1e6 / tps, prefill_s=stream.prefill_s,
                bytes_per_token=bpt, achieved_Bps=bpt * tps, read_bandwidth_Bps=bw,
                pct_of_read_bw=100.0 * bpt * tps / bw, finish_reason=stream.finish_reason,
                blocks=backend.n_blocks, threads=backend.threads,
                n_gpus=getattr(backend, "n_gpus", 1))
