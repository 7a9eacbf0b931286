"""CPU CI: every kernel source compiles for NVIDIA sm_90 (nvcc) and AMD gfx90a (Debian hipcc);
the monokernel, the prefill kernel and the topology probe also for the MI300X, gfx942 (Debian's
clang-19 with the HIP headers, device code to ISA assembly: the device libraries of Debian's
HIP 5.2 do not know gfx942, so math calls stay unlinked).

The compiled text is exactly what kernels.py hands to NVRTC/hiprtc: local includes inlined,
the generated KogParams struct, and the -D model constants of representative shapes.
A missing compiler skips its test, unless KOGCUPY_REQUIRE_COMPILERS=1 (CI) makes it fail.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import struct
import subprocess
import tempfile
import types
import uuid

import numpy as np
import pytest

from kogcupy.gpu import abi, kernels, prefill
from kogcupy.model.config import ModelConfig
from kogcupy.gpu.build_plan import build_plan, smem_floats
from kogcupy.model.random_weights import shape_config
from kogcupy.gpu.tensor_parallel import local_config

REQUIRE = os.environ.get("KOGCUPY_REQUIRE_COMPILERS", "") not in ("", "0")

CONFIGS = {
    "llama-3.2-1b": (shape_config("llama-3.2-1b"), "bfloat16"),
    "qwen3-1.7b": (shape_config("qwen3-1.7b"), "bfloat16"),
    "smollm2-135m-fp16": (shape_config("smollm2-135m"), "float16"),
    "qwen2-bias-gqa7": (ModelConfig(arch="qwen2", vocab_size=1500, hidden_size=896,
                                    intermediate_size=1024, n_layers=2, n_heads=14,
                                    n_kv_heads=2, head_dim=64, rms_norm_eps=1e-6,
                                    rope_theta=1e6, max_position_embeddings=4096,
                                    tie_word_embeddings=False), "bfloat16"),
    # one q head a kv head with the qk-norm: the norm reads its gammas from global memory
    "qwen3-qknorm-gqa1": (ModelConfig(arch="qwen3", vocab_size=1500, hidden_size=512,
                                      intermediate_size=1024, n_layers=2, n_heads=4,
                                      n_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
                                      rope_theta=1e6, max_position_embeddings=4096,
                                      tie_word_embeddings=True), "bfloat16"),
}
# tensor-parallel builds: one rank's share of the model, KOG_TP ranks
TP_CONFIGS = {
    "qwen3-1.7b-tp4": (shape_config("qwen3-1.7b"), "bfloat16", 4),
    "llama-3.2-1b-tp2": (shape_config("llama-3.2-1b"), "bfloat16", 2),
}


# Bytes of spill stores ptxas may emit in kog_monokernel (sm_90): the values of the build
# measured on an H100 (2026-12-05, the attention chunk computed once a position: 44 / 52 / 612 /
# 180 / 228 / 40 / 0 bytes, in the order below) plus ~15%. The
# monokernel runs at the 128-register ceiling; code that raises the pressure makes ptxas spill,
# and its spills can land in the GEMV dot loop (the attention's tile loop inlined: Llama-3.2-1B
# 96 -> 408 bytes, -13% decode; a not-inlined attention whose state took 88 registers: 1,468
# bytes; down_residual's loads held in registers: 400 bytes, loads spilled as they landed;
# the sampler's slice rounds compiled in: greedy -4 to -5%, now a build of its own).
SPILL_STORE_BUDGET = {"llama-3.2-1b": 52, "qwen3-1.7b": 60, "smollm2-135m-fp16": 700,
                      "qwen2-bias-gqa7": 200, "qwen3-1.7b-tp4": 262, "llama-3.2-1b-tp2": 46,
                      "smollm2-135m-plan": 8, "qwen3-1.7b-plan": 60}


def _compiler(name):
    path = shutil.which(name)
    if path is None:
        if REQUIRE:
            pytest.fail(f"{name} not on PATH (KOGCUPY_REQUIRE_COMPILERS=1)")
        pytest.skip(f"{name} not on PATH")
    return path


def _sources(tmp_path):
    out = {}
    for key, (cfg, dtype) in CONFIGS.items():
        d = kernels.model_defines(cfg, dtype, 512, smem_floats(cfg), len(abi.PARTITION_COLUMNS))
        out[key] = (kernels.monokernel_source(), kernels.define_options(d))
    for key, (cfg, dtype, n) in TP_CONFIGS.items():
        loc = local_config(cfg, n)
        d = kernels.model_defines(loc, dtype, 512, smem_floats(loc), len(abi.PARTITION_COLUMNS),
                                  tp=n)
        out[key] = (kernels.monokernel_source(), kernels.define_options(d))
    cfg = shape_config("llama-3.2-1b")      # the build with profiling / debug hooks
    d = kernels.model_defines(cfg, "bfloat16", 512, smem_floats(cfg), len(abi.PARTITION_COLUMNS),
                              {"KOG_HOOKS": 1})
    out["llama-3.2-1b-hooks"] = (kernels.monokernel_source(), kernels.define_options(d))
    # (kernels.py's defaults have a 50-permille tail, tensor parallel's; one GPU's build_plan
    # places every unit statically: this build)
    d = kernels.model_defines(cfg, "bfloat16", 512, smem_floats(cfg), len(abi.PARTITION_COLUMNS),
                              {"KOG_DYN_PERMILLE": 0})
    out["llama-3.2-1b-static"] = (kernels.monokernel_source(), kernels.define_options(d))
    d = kernels.model_defines(cfg, "bfloat16", 512, smem_floats(cfg), len(abi.PARTITION_COLUMNS),
                              {"KOG_SAMPLE_SLICES": 1})     # the sampler's rounds (filters, penalty)
    out["llama-3.2-1b-slices"] = (kernels.monokernel_source(), kernels.define_options(d))
    loc = local_config(shape_config("qwen3-1.7b"), 2)
    d = kernels.model_defines(loc, "bfloat16", 512, smem_floats(loc), len(abi.PARTITION_COLUMNS),
                              {"KOG_SAMPLE_SLICES": 1}, tp=2)
    out["qwen3-1.7b-tp2-slices"] = (kernels.monokernel_source(), kernels.define_options(d))
    for key, name, dtype in (("prefill-llama-3.2-1b", "llama-3.2-1b", "bfloat16"),
                             ("prefill-qwen3-1.7b-fp16", "qwen3-1.7b", "float16")):
        d = prefill.prefill_defines(shape_config(name), dtype)
        out[key] = (prefill.prefill_source(), kernels.define_options(d))
    # builds as a plan makes them: SmolLM2 on one H200 (3 GEMV loads, 2 copies of the in sums),
    # Qwen3 on one (pairs, gate_up's and qkv's one tile before their waits); an MI300X's (64 KB)
    mi300x = {"arch": "gfx942", "smem_limit": 64 * 1024}
    h200 = {"memory_gib": 139.8}
    for key, name, n_sms, kw in (("smollm2-135m-plan", "smollm2-135m", 132, h200),
                                 ("qwen3-1.7b-plan", "qwen3-1.7b", 132, h200),
                                 ("gfx942-plan-llama-3.1-8b", "llama-3.1-8b", 304, mi300x),
                                 ("gfx942-plan-qwen2.5-0.5b", "qwen2.5-0.5b", 304, mi300x)):
        cfg = shape_config(name)
        plan = build_plan(cfg, n_sms, 4096, **kw)
        d = kernels.model_defines(cfg, "bfloat16", 512, plan.smem_floats, len(abi.PARTITION_COLUMNS),
                                  plan.tuning)
        out[key] = (kernels.monokernel_source(), kernels.define_options(d))
    out["stream_read"] = (kernels.stream_read_source(), ())
    out["kccl_test"] = (kernels.inline_source("kccl_test.cu"), ())     # kccl.cuh + its test kernel
    out["burst_probe"] = (kernels.inline_source("burst_probe.cu"), ("-DTILES=2",))   # scripts/burst_probe.py
    out["topology_probe"] = (kernels.topology_probe_source(), ())
    return out


def _write(tmp_path, name, text, ext):
    p = tmp_path / f"{name}{ext}"
    p.write_text(text)
    return p


def test_inlined_source_is_self_contained():
    src = kernels.monokernel_source()
    assert "struct KogParams {" in src
    assert '#include "' not in src
    for name, _, _, _ in abi.FIELDS:
        assert f" {name};" in src


@pytest.mark.parametrize("key", list(CONFIGS) + list(TP_CONFIGS) +
                         ["llama-3.2-1b-hooks", "smollm2-135m-plan", "qwen3-1.7b-plan",
                          "llama-3.2-1b-static", "llama-3.2-1b-slices", "qwen3-1.7b-tp2-slices", "stream_read",
                          "kccl_test", "burst_probe", "topology_probe", "prefill-llama-3.2-1b",
                          "prefill-qwen3-1.7b-fp16"])
def test_nvcc_sm90(tmp_path, key):
    nvcc = _compiler("nvcc")
    src, opts = _sources(tmp_path)[key]
    f = _write(tmp_path, key, src, ".cu")
    r = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-c", "-o", str(tmp_path / "k.o"),
                        "-Xptxas", "-v", str(f), *opts], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-6000:]
    m = re.search(r"Function properties for kog_monokernel\s+\d+ bytes stack frame, (\d+) bytes "
                  r"spill stores", r.stdout + r.stderr)
    if key in SPILL_STORE_BUDGET:
        assert m and int(m.group(1)) <= SPILL_STORE_BUDGET[key], (key, m and m.group(0))


@pytest.mark.parametrize("name,dtype", [("llama-3.2-1b", "bfloat16"), ("qwen3-1.7b", "float16")])
def test_nvcc_sm90a_prefill_warpgroups(tmp_path, name, dtype):
    """The prefill's warpgroup build (KOG_WGMMA: head_dim 64 / 128) compiles for sm_90a without
    spills in kog_pf_attention_ws (its accumulators are 64-128 registers a thread), and refuses
    plain sm_90 with its own message."""
    nvcc = _compiler("nvcc")
    d = prefill.prefill_defines(shape_config(name), dtype, wgmma=True)
    f = _write(tmp_path, name, prefill.prefill_source(), ".cu")
    r = subprocess.run([nvcc, "-gencode", "arch=compute_90a,code=sm_90a", "-std=c++17", "-c",
                        "-o", str(tmp_path / "k.o"), "-Xptxas", "-v", str(f),
                        *kernels.define_options(d)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-6000:]
    m = re.search(r"Function properties for kog_pf_attention_ws\s+\d+ bytes stack frame, (\d+) "
                  r"bytes spill stores", r.stdout + r.stderr)
    assert m and int(m.group(1)) == 0, m and m.group(0)
    # ptxas's "wgmma.mma_async instructions are serialized" (C75xx): correct but slow
    assert "serialized" not in r.stdout + r.stderr, r.stderr[-3000:]
    r = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-c", "-o", str(tmp_path / "k.o"),
                        str(f), *kernels.define_options(d)], capture_output=True, text=True)
    assert r.returncode != 0 and "KOG_WGMMA needs the sm_90a target" in r.stderr


def test_wgmma_build_needs_hopper_and_nvrtc_12_9(monkeypatch):
    """The sm_90a build is asked for only on compute capability 9.0 with an NVRTC that takes
    it beside CuPy's own -arch=sm_90 (12.9+; older ones refuse two -arch options)."""
    class Dev:
        compute_capability = "90"
    fake = type("cupy", (), {"cuda": type("cuda", (), {"Device": Dev})})
    monkeypatch.setattr(kernels, "_cupy", lambda: fake)
    monkeypatch.setattr(kernels, "is_hip", lambda: False)
    for version, want in (((12, 8), False), ((12, 9), True), ((13, 0), True), ((0, 0), False)):
        monkeypatch.setattr(kernels, "nvrtc_version", lambda v=version: v)
        assert kernels.has_wgmma() is want, version
    Dev.compute_capability = "100"
    assert kernels.has_wgmma() is False
    d = prefill.prefill_defines(shape_config("llama-3.2-1b"), "bfloat16", wgmma=True)
    assert "-arch=sm_90a" in kernels.compile_options(d)
    assert not any(o.startswith("-arch") for o in
                   kernels.compile_options(prefill.prefill_defines(shape_config("llama-3.2-1b"), "bfloat16")))


def test_warp_specialised_launch_fits_hopper():
    """kog_pf_attention_ws's launch (prefill.attention_launch) for every head_dim in WS_TILES:
    shared memory within an H100 / H200 block's 227 KB, a copying warpgroup plus the computing
    ones, the queries of those, and the kernel's tile defines from the same table."""
    for hd, (cwg, bn, stages) in prefill.WS_TILES.items():
        name, bm, threads, smem = prefill.attention_launch("ws", hd)
        assert name == "kog_pf_attention_ws" and bm == 64 * cwg and threads == 128 * (cwg + 1)
        assert smem == 1024 + (bm + 2 * stages * bn) * hd * 2 <= 232448, (hd, smem)
        cfg = dataclasses.replace(shape_config("llama-3.2-1b"), head_dim=hd)
        d = prefill.prefill_defines(cfg, "bfloat16", wgmma=True)
        assert (d["KOG_PFS_CWG"], d["KOG_PFS_BN"], d["KOG_PFS_STAGES"]) == (cwg, bn, stages)


def test_graph_rows():
    """A prefill chunk's graph size: n rounded up to GRAPH_STEP rows up to GRAPH_MAX tokens,
    None (kernel by kernel) past that or where the padding would pass the cache's positions."""
    step, top = prefill.GRAPH_STEP, prefill.GRAPH_MAX
    assert prefill.graph_rows(1, 0, 10_000) == step
    assert prefill.graph_rows(step, 0, 10_000) == step
    assert prefill.graph_rows(step + 1, 500, 10_000) == 2 * step
    assert prefill.graph_rows(top, 0, 10_000) == top
    assert prefill.graph_rows(top + 1, 0, 10_000) is None
    assert prefill.graph_rows(10, 1000 - step, 1000) == step          # ends at the limit
    assert prefill.graph_rows(10, 1001 - step, 1000) is None          # would pass it


def test_chunk_rows_and_the_warm_up_sizes():
    """After a warm-up a prefill chunk runs padded to GRAPH_STEP rows unless the padding would
    pass the cache's positions; the warm-up runs each padded size past GRAPH_MAX once."""
    step, top = prefill.GRAPH_STEP, prefill.GRAPH_MAX
    assert prefill.chunk_rows(top + 1, 0, 10_000) == top + step
    assert prefill.chunk_rows(prefill.CHUNK, 0, 10_000) == prefill.CHUNK
    assert prefill.chunk_rows(top + 1, 10_000 - top - step, 10_000) == top + step
    assert prefill.chunk_rows(top + 1, 10_001 - top - step, 10_000) == top + 1
    assert prefill.eager_sizes(10_000) == list(range(top + step, prefill.CHUNK + 1, step))
    assert prefill.eager_sizes(top + 300) == [top + step, top + 2 * step]
    assert prefill.eager_sizes(top) == []
    owner = types.SimpleNamespace(graphs={}, limit=10_000, warmed_long=False)
    assert prefill._chunk_sizes(owner, 300, 0) == (384, 384)                 # a graph size
    assert prefill._chunk_sizes(owner, 300, 0, eager=True) == (None, 300)    # (logits)
    assert prefill._chunk_sizes(owner, top + 1, 0) == (None, top + 1)       # not warmed up
    owner.warmed_long = True
    assert prefill._chunk_sizes(owner, top + 1, 0) == (None, top + step)
    owner.graphs, owner.warmed_long = None, False                           # no capture here
    assert prefill._chunk_sizes(owner, 300, 0) == (None, 300)


def test_graph_captured_at_second_use(monkeypatch):
    """A padded size runs kernel by kernel at its first chunk (None), is captured at its
    second and replayed from then on; each (rows, kernel) key counts its own uses."""
    captured = []
    monkeypatch.setattr(prefill, "_capture", lambda stream, issue: captured.append(issue) or object())
    owner = types.SimpleNamespace(graphs={}, uses={}, capture_at_use=prefill.CAPTURE_AT_USE)
    assert prefill.CAPTURE_AT_USE == 2
    a, b = (256, "ws"), (384, "ws")
    assert prefill._graph_for(owner, a, None, "issue a") is None
    assert prefill._graph_for(owner, b, None, "issue b") is None
    g = prefill._graph_for(owner, a, None, "issue a")
    assert g is not None and captured == ["issue a"] and owner.graphs == {a: g}
    assert prefill._graph_for(owner, a, None, "issue a") is g and captured == ["issue a"]
    owner.graphs.clear()                         # buffers grew: the size's next chunk recaptures
    assert prefill._graph_for(owner, a, None, "issue a") is not None and len(captured) == 2


def test_warm_up_runs_each_size_until_captured(monkeypatch):
    """prefill._warm_up: the buffers grow first to the largest chunk (CHUNK tokens, or the
    limit), then each padded size, largest first, runs as a request until its graph exists
    (kernel by kernel, then captured), then each longer padded size once through the first
    layer only (kernel by kernel: cuBLAS's first call on its shapes, the same in every layer);
    a refused capture stops it with 0 graphs."""
    monkeypatch.setattr(prefill, "_capture", lambda stream, issue: ("graph", issue))
    grown, ran = [], []

    def owner_of(limit):
        o = types.SimpleNamespace(graphs={}, uses={}, capture_at_use=prefill.CAPTURE_AT_USE,
                                  limit=limit, cfg=types.SimpleNamespace(vocab_size=1000),
                                  warmed_long=False)
        o._buffers = grown.append
        return o

    def run_chunk_of(o):
        def run_chunk(ids, pos0, n_layers=None):
            assert pos0 == 0 and ids.dtype == np.int32 and 0 <= ids.min() and ids.max() < 1000
            ran.append(len(ids))
            assert n_layers == (None if len(ids) <= prefill.GRAPH_MAX else 1), (len(ids), n_layers)
            if prefill.graph_rows(len(ids), pos0, o.limit):
                prefill._graph_for(o, (len(ids), "ws"), None, "issue")
        return run_chunk

    o = owner_of(10_000)
    assert prefill._warm_up(o, run_chunk_of(o), "ws") == 16
    assert grown == [prefill.CHUNK]
    assert ran == [r for r in range(prefill.GRAPH_MAX, 0, -prefill.GRAPH_STEP) for _ in (1, 2)] + \
        list(range(prefill.GRAPH_MAX + prefill.GRAPH_STEP, prefill.CHUNK + 1, prefill.GRAPH_STEP))
    assert sorted(o.graphs) == [(r, "ws") for r in range(128, prefill.GRAPH_MAX + 1, 128)]
    assert o.warmed_long                               # longer chunks are padded from now on
    grown.clear(), ran.clear()
    o = owner_of(300)                                  # a short context: 256 and 128 only
    assert prefill._warm_up(o, run_chunk_of(o), "ws") == 2 and grown == [300] and ran == [256, 256, 128, 128]

    def refuse(stream, issue):
        raise RuntimeError("no capture here")
    monkeypatch.setattr(prefill, "_capture", refuse)
    o = owner_of(10_000)
    ran.clear()
    with pytest.warns(RuntimeWarning, match="no graph capture"):
        assert prefill._warm_up(o, run_chunk_of(o), "ws") == 0
    assert o.graphs is None and ran == [prefill.GRAPH_MAX] * 2      # (the refused capture: 2nd)
    assert not o.warmed_long


def test_backend_warm_up_keeps_the_live_sequence(monkeypatch):
    """A backend's warm_up compiles every GPU's filter/penalty sampler build, cancels a
    running generation, waits for the GPU, puts the live sequence into the prefix cache (the
    warm-up overwrites the live KV cache), forgets it, then warms the prefill up."""
    from kogcupy.gpu.monokernel import _OneLaunchBackend
    calls = []
    active = types.SimpleNamespace(cancel=lambda: calls.append("cancel"))
    b = types.SimpleNamespace(
        _active=active, prefix_cache=object(),
        prefill=types.SimpleNamespace(warm_up=lambda: calls.append("prefill") or 7),
        _wait_idle=lambda: calls.append("idle"), _settle=lambda: calls.append("settle"),
        _save_live=lambda: calls.append("save"), _forget_kv=lambda: calls.append("forget"))
    b._kv_holders = lambda: [types.SimpleNamespace(
        build_filter_sampler=lambda i=i: calls.append(f"build{i}")) for i in range(2)]
    b._release_live = lambda: _OneLaunchBackend._release_live(b)   # (logits runs it too)
    assert _OneLaunchBackend.warm_up(b) == 7 and b._active is None
    assert calls == ["build0", "build1", "cancel", "idle", "settle", "save", "forget", "prefill"]
    calls.clear()
    b.prefix_cache = None                               # no prefix cache: nothing saved
    assert _OneLaunchBackend.warm_up(b) == 7 and calls == ["build0", "build1", "idle", "settle",
                                                          "forget", "prefill"]
    calls.clear()
    b.prefill = None                                    # no batched prefill: the build only
    assert _OneLaunchBackend.warm_up(b) == 0 and calls == ["build0", "build1"]


def test_prefill_buffers_out_of_memory(monkeypatch):
    """A GPU out-of-memory error while the prefill buffers grow is a DeviceError that says
    what to change, and leaves no half-made buffers behind: the next chunk allocates again."""
    from kogcupy.errors import DeviceError
    from kogcupy.model.random_weights import shape_config

    class OOM(Exception):
        pass
    full = {"on": True}

    def empty(shape, dtype):
        last = shape[-1] if isinstance(shape, tuple) else shape
        if full["on"] and last == 2 * 8192:                   # the gate/up buffer
            raise OOM("Out of memory allocating 268,435,456 bytes")
        return np.empty(shape, dtype)
    cp = types.SimpleNamespace(empty=empty, int32=np.int32, uint16=np.uint16, float32=np.float32,
                               cuda=types.SimpleNamespace(memory=types.SimpleNamespace(
                                   OutOfMemoryError=OOM)))
    monkeypatch.setattr(kernels, "_cupy", lambda: cp)
    pf = object.__new__(prefill.Prefill)
    pf.cfg, pf.graphs, pf._bufs, pf._rows = shape_config("llama-3.2-1b"), {}, {}, 0
    with pytest.raises(DeviceError, match="not enough GPU memory.*1024-token.*--context-length"):
        pf._buffers(1000)
    assert pf._rows == 0 and pf._bufs == {}
    full["on"] = False
    bufs = pf._buffers(1000)
    assert pf._rows == 1024 and bufs["n"] == 1000 and bufs["gu"].shape == (1024, 2 * 8192)


def test_capture_runs_without_garbage_collection():
    """No garbage collection inside a capture (a dead backend's finalizers would invalidate
    it); collection is back on afterwards, also when the issue fails."""
    import gc

    class Stream:
        def begin_capture(self):
            self.capturing = True

        def end_capture(self):
            self.capturing = False
            return "graph"

    seen = []
    assert prefill._capture(Stream(), lambda: seen.append(gc.isenabled())) == "graph"
    with pytest.raises(ZeroDivisionError):
        prefill._capture(Stream(), lambda: seen.append(gc.isenabled()) or 1 / 0)
    assert seen == [False, False] and gc.isenabled()


def test_nvcc_abi_probe(tmp_path):
    # the host layout (abi.layout(), what pack() writes) against the compiler's offsetof /
    # sizeof, as static_asserts: a mismatch fails the compile
    nvcc = _compiler("nvcc")
    src = abi.layout_probe_source(static_asserts=True)
    assert src.count("static_assert(") == len(abi.FIELDS) + 1
    f = _write(tmp_path, "probe", src, ".cu")
    r = subprocess.run([nvcc, "-arch=sm_90", "-c", "-o", str(tmp_path / "p.o"), str(f)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    # ... and the check can fail: a host offset off by 4 bytes
    lay = dict(abi.layout(), prompt_len=abi.layout()["prompt_len"] + 4)
    f = _write(tmp_path, "probe_bad", abi.layout_probe_source(static_asserts=True, lay=lay), ".cu")
    r = subprocess.run([nvcc, "-arch=sm_90", "-c", "-o", str(tmp_path / "q.o"), str(f)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "KogParams::prompt_len" in r.stderr, r.stderr[-4000:]


def _hipcc(hipcc, args):
    """hipcc with a private TMPDIR, removed afterwards: Debian's hipcc leaves an empty
    <source name>-<hex> directory per compile step in the temp directory."""
    with tempfile.TemporaryDirectory(prefix="kogcupy-hipcc-") as tmp:
        env = dict(os.environ, HIP_PLATFORM="amd", TMPDIR=tmp, TMP=tmp, TEMP=tmp)
        return subprocess.run([hipcc, *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("key", ["llama-3.2-1b", "qwen2-bias-gqa7", "smollm2-135m-fp16",
                                 "llama-3.2-1b-tp2", "llama-3.2-1b-slices", "stream_read", "kccl_test",
                                 "burst_probe", "topology_probe", "prefill-llama-3.2-1b"])
def test_hipcc_gfx90a(tmp_path, key):
    hipcc = _compiler("hipcc")
    src, opts = _sources(tmp_path)[key]
    f = _write(tmp_path, key, src, ".hip")
    r = _hipcc(hipcc, ["--offload-arch=gfx90a", "-x", "hip", "-std=c++17", "-c",
                       "-o", str(tmp_path / "k.o"), str(f), *opts])
    assert r.returncode == 0, r.stderr[-6000:]


GFX942_CLANGS = ("clang++-19", "clang++-20", "clang++-18", "clang++-17")   # LLVM >= 17 knows gfx942


@pytest.mark.parametrize("key", ["llama-3.2-1b", "qwen2-bias-gqa7", "llama-3.2-1b-tp2",
                                 "gfx942-plan-llama-3.1-8b", "gfx942-plan-qwen2.5-0.5b",
                                 "topology_probe", "prefill-llama-3.2-1b"])
def test_clang_gfx942(tmp_path, key):
    clang = next((c for c in map(shutil.which, GFX942_CLANGS) if c), None) or _compiler(GFX942_CLANGS[0])
    src, opts = _sources(tmp_path)[key]
    f = _write(tmp_path, key, src, ".hip")
    out = tmp_path / "k.s"
    r = subprocess.run([clang, "-x", "hip", "--offload-arch=gfx942", "-nogpulib",
                        "--cuda-device-only", "-S", "-std=c++17", "-o", str(out), str(f), *opts],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-6000:]
    asm = out.read_text()
    assert "gfx942" in asm and ".end_amdhsa_kernel" in asm
    if key == "topology_probe":                          # the XCC id read (kog_xcc_id)
        assert "HW_REG_XCC_ID" in asm


def test_hipcc_leaves_nothing_in_the_temp_dir(tmp_path):
    hipcc = _compiler("hipcc")
    name = f"kogprobe{uuid.uuid4().hex[:12]}"         # what hipcc names its leftovers after
    f = _write(tmp_path, name, kernels.stream_read_source(), ".hip")
    r = _hipcc(hipcc, ["--offload-arch=gfx90a", "-x", "hip", "-std=c++17", "-c",
                       "-o", str(tmp_path / "k.o"), str(f)])
    assert r.returncode == 0, r.stderr[-6000:]
    left = [e for e in os.listdir(tempfile.gettempdir()) if e.startswith(name)]
    for e in left:                                     # (do not leave them either way)
        shutil.rmtree(os.path.join(tempfile.gettempdir(), e), ignore_errors=True)
    assert left == []


def test_abi_pack_writes_the_layout():
    # pack() puts each value at layout()'s offset (which test_nvcc_abi_probe checks against
    # the compiler's offsetof)
    lay = abi.layout()
    a = abi.pack({"prompt_len": 7, "wqkv": 0xdeadbeef000, "temperature": 0.5})
    raw = a.tobytes()
    assert len(raw) == lay["__size__"]
    assert int.from_bytes(raw[lay["prompt_len"]:lay["prompt_len"] + 4], "little") == 7
    assert int.from_bytes(raw[lay["wqkv"]:lay["wqkv"] + 8], "little") == 0xdeadbeef000
    assert raw[lay["temperature"]:lay["temperature"] + 4] == struct.pack("<f", 0.5)


def test_kernel_chunk_rule_is_placements(tmp_path):
    # attention.cuh's kog_attn_chunk_len, compiled for the host with each shape's -D constants,
    # gives placement.attention_chunk_len's chunk length at every position (the plan sizes the
    # partial buffer by the Python rule; the kernel's units and o_proj items follow its own)
    from kogcupy.gpu.placement import attention_chunk_len, attn_combine_width
    gxx = _compiler("g++")
    src = (kernels.source_dir() / "attention.cuh").read_text()
    fn = re.search(r"KOG_DEVICE int kog_attn_chunk_len\(int n_pos, int max_chunks\) \{.*?\n\}\n", src, re.S).group(0)
    prog = _write(tmp_path, "rule", "#include <math.h>\n#include <stdio.h>\n#include <stdlib.h>\n"
                  "#define KOG_DEVICE static inline\n" + fn +
                  "int main(int argc, char** argv) { int m = atoi(argv[1]), n = atoi(argv[2]);\n"
                  "  for (int i = 1; i <= n; ++i) printf(\"%d\\n\", kog_attn_chunk_len(i, m)); }\n", ".c")
    n = 40000
    for name, blocks, min_chunk, tp in (("qwen2.5-0.5b", 132, None, 1), ("smollm2-135m", 132, 16, 1),
                                        ("llama-3.2-1b", 132, None, 1), ("qwen2.5-0.5b", 20, 128, 1),
                                        ("qwen3-1.7b", 132, None, 2)):     # TP: one dim a thread
        cfg = local_config(shape_config(name), tp) if tp > 1 else shape_config(name)
        plan = build_plan(cfg, blocks, n, tuning={} if min_chunk is None else {"KOG_ATTN_MIN_CHUNK": min_chunk},
                          world=tp)
        d = kernels.model_defines(cfg, "bfloat16", 512, plan.smem_floats, len(abi.PARTITION_COLUMNS), plan.tuning,
                                  tp=tp)
        exe = tmp_path / "rule"
        r = subprocess.run([gxx, "-x", "c++", "-O1", "-o", str(exe), str(prog), *kernels.define_options(d), "-lm"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        mc = plan.placement.attn_max_chunks
        got = subprocess.run([str(exe), str(mc), str(n)], capture_output=True, text=True, check=True).stdout.split()
        w = attn_combine_width(cfg, 512, tp)
        want = [attention_chunk_len(i, mc, plan.attn_chunk, w, min_chunk or 32) for i in range(1, n + 1)]
        assert plan.placement.attn_chunks[:n].tolist() == [-(-i // c) for i, c in enumerate(want, 1)], name
        assert list(map(int, got)) == want, name
