#!/usr/bin/env python3
"""Batch-1 decode benchmark: kogcupy's monokernel next to its peers and the bandwidth limit.

Random bf16 weights at the shapes in ``kogcupy.model.random_weights.SHAPES``; every engine decodes
``--new-tokens`` tokens greedily after a ``--prompt-len`` token prompt, and only the decode is
timed. Engines, in one run on one GPU:

    hf-eager         transformers' LlamaForCausalLM / Qwen3ForCausalLM, eager PyTorch, generate()
    torch-sdpa-graph  a compact PyTorch decoder (static KV cache, SDPA, greedy argmax inside)
                     whose whole decode step is one CUDA graph, replayed once per token
    limit            weight bytes (LM head counted, embedding lookup not) / stream-read
                     bandwidth measured in this run
    kogcupy          kogcupy.gpu.measure.bench_decode(): the monokernel, at context positions
                     --positions, plus time to first token for a --ttft-prompt token prompt,
                     and sampled decode (--sampling modes: T 1; T 0.7 + top_p 0.9) next to
                     its greedy speed; torch-sdpa-graph samples the same modes inside its graph

Every speed carries GB/s (weight bytes x tok/s) and % of the limit. Writes
``<out>/<gpu-slug>-<YYYY-MM-DD>.json``; plot it here (matplotlib is dev-only) with
``python scripts/bench.py --plot bench/results/X.json``. ``--dry-run`` checks the logic on
CPU with tiny shapes (no numbers worth keeping). See bench/NOTES.md.
"""
from __future__ import annotations

import os

# NVLink multicast can take shared GPUs down; keep it off in everything this process starts.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

try:
    import kogcupy  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .` (the device machine)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kogcupy.model.config import ModelConfig  # noqa: E402
from kogcupy.gpu.device_weights import kv_bytes as device_kv_bytes  # noqa: E402
from kogcupy.gpu.device_weights import streamed_weight_bytes  # noqa: E402
from kogcupy.model.random_weights import SHAPES  # noqa: E402

ENGINES = ("hf-eager", "torch-sdpa-graph", "kogcupy")
PEERS = ("hf-eager", "torch-sdpa-graph", "kogcupy")    # the "x vs" columns
BYTES_PER_PARAM = 2                                    # bf16
HF_EAGER_MAX_PROMPT = 8000         # eager attention's score matrices beyond this do not fit
AGENT_SYSTEM = 2000                # agent workload: system prompt tokens

# Dry-run shapes: the two architecture families at toy size, for CPU logic checks.
TINY_SHAPES = {
    "tiny-llama": dict(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                       n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=2048,
                       tie_word_embeddings=True),
    "tiny-qwen3": dict(arch="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128,
                       n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, max_position_embeddings=2048,
                       tie_word_embeddings=True),
}


def weight_bytes(cfg: ModelConfig) -> int:
    """Bytes a decode step must stream: every matrix and the LM head, not the embedding."""
    return streamed_weight_bytes(cfg, BYTES_PER_PARAM)


def kv_bytes(cfg: ModelConfig, context: float) -> float:
    """Bytes of K and V a decode step reads at a given context length."""
    return device_kv_bytes(cfg, context, BYTES_PER_PARAM)


def gpu_slug(name: str) -> str:
    s = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "gpu"


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_gpu():
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# --------------------------------------------------------------------------------------------
# Stream-read bandwidth
# --------------------------------------------------------------------------------------------

def stream_read_cupy(nbytes: int, repeats: int) -> dict:
    """kogcupy's own stream-read measurement (16-byte non-temporal loads, best launch shape)."""
    from kogcupy.gpu.measure import stream_read_bandwidth
    res = stream_read_bandwidth(nbytes, repeats)
    return {"TBps": res["Bps"] / 1e12, "per_launch_config": res["per_launch_config"],
            "bytes": res["bytes"]}


def stream_read_torch(nbytes: int, repeats: int, device) -> dict:
    """Best-of-`repeats` read bandwidth of torch.sum over a bf16 tensor."""
    import torch
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_(-1, 1)
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            x.sum(dtype=torch.float32)
            e.record()
            e.synchronize()
            dt = s.elapsed_time(e) / 1e3
        else:
            x.sum(dtype=torch.float32)
            dt = time.perf_counter() - t0
        if i:                                        # the first one warms up
            times.append(dt)
    n = x.numel() * 2
    del x
    _free_gpu()
    return {"TBps": n / min(times) / 1e12, "bytes": n}


def measure_bandwidth(args, device) -> dict:
    res = {}
    if device.type == "cuda":
        try:
            res["cupy_16B_nc"] = stream_read_cupy(args.bw_bytes, args.bw_repeats)
        except Exception as e:                       # noqa: BLE001 (report, keep going)
            res["cupy_16B_nc"] = {"error": f"{type(e).__name__}: {e}"}
    res["torch_sum"] = stream_read_torch(args.bw_bytes, args.bw_repeats, device)
    res["best_TBps"] = max(v["TBps"] for v in res.values() if isinstance(v, dict) and "TBps" in v)
    return res


# --------------------------------------------------------------------------------------------
# Peer (a): transformers eager
# --------------------------------------------------------------------------------------------

def hf_config(cfg: ModelConfig):
    from transformers import LlamaConfig, Qwen3Config
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                  head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                  rope_theta=cfg.rope_theta,
                  max_position_embeddings=cfg.max_position_embeddings,
                  tie_word_embeddings=cfg.tie_word_embeddings,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if cfg.arch == "llama":
        return LlamaConfig(**common)
    if cfg.arch == "qwen3":
        return Qwen3Config(**common)
    raise ValueError(f"bench has no transformers peer for arch {cfg.arch!r}")


def build_hf_model(cfg: ModelConfig, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device(device):                      # init on the GPU: CPU init is slow
        model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=dtype)
    return model.eval()


class _TokenClock:
    """generate() streamer: a timestamp per put (the prompt, then each new token)."""

    def __init__(self, device):
        self.device, self.times, self.counts = device, [], []

    def put(self, value):
        _sync(self.device)
        self.times.append(time.perf_counter())
        self.counts.append(int(value.numel()))

    def end(self):
        pass


def bench_hf(model, cfg, prompt_len, new_tokens, device) -> dict:
    import torch
    from transformers import GenerationConfig

    def generate(ids, n):
        gen_cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
        clock = _TokenClock(device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 generation_config=gen_cfg, streamer=clock)
        return out, clock

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=g).to(device)
    generate(ids, min(8, new_tokens))                              # warm-up
    out, clock = generate(ids, new_tokens)
    generated = out.shape[1] - prompt_len
    if generated != new_tokens or len(clock.times) != new_tokens + 1:
        raise RuntimeError(f"transformers generated {generated} tokens, asked {new_tokens}")
    # times[0]: prompt handed over; times[1]: first token out; times[-1]: last token out.
    decode_s = clock.times[-1] - clock.times[1]
    steps = sorted(b - a for a, b in zip(clock.times[1:], clock.times[2:]))
    return {"tokens_per_s": (new_tokens - 1) / decode_s, "decode_s": decode_s,
            "ttft_s": clock.times[1] - clock.times[0],
            "step_ms": {"median": 1e3 * steps[len(steps) // 2],
                        "p90": 1e3 * steps[int(len(steps) * 0.9)], "max": 1e3 * steps[-1]},
            "token_ids": out[0, prompt_len:].tolist()}


def bench_hf_forward_loop(model, cfg, prompt_len, steps, device, profile=False) -> dict:
    """Decode with bare model(token, past_key_values) calls and no per-step sync: how much of
    the generate() time is generate()'s own per-step work rather than the forward pass."""
    import torch
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=g).to(device)

    def loop(n):
        with torch.inference_mode():
            out = model(ids, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                out = model(tok, past_key_values=cache, use_cache=True)
                cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            return n / (time.perf_counter() - t0)

    loop(4)                                                            # warm-up
    res = {"forward_loop_tokens_per_s": loop(steps), "forward_loop_steps": steps}
    if profile:
        from torch.profiler import ProfilerActivity, profile as tprofile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with tprofile(activities=acts) as prof:
            loop(3)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15),
              file=sys.stderr)
    return res


def bench_hf_ttft(model, cfg, prompt_len, device, repeats=3) -> dict:
    import torch
    from transformers import GenerationConfig
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=g).to(device)
    gen_cfg = GenerationConfig(max_new_tokens=1, min_new_tokens=1, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return {"ttft_s": min(times), "runs_s": times}


# --------------------------------------------------------------------------------------------
# Peer (b): compact PyTorch decoder, one decode step = one CUDA graph
# --------------------------------------------------------------------------------------------

def compact_weights_from_hf(model, cfg: ModelConfig) -> dict:
    """The compact decoder's weights (fused qkv, fused gate_up) copied from a transformers model."""
    import torch
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    w = {"embed": sd["model.embed_tokens.weight"], "final_norm": sd["model.norm.weight"],
         "lm_head": sd.get("lm_head.weight", sd["model.embed_tokens.weight"]), "layers": []}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        layer = {
            "attn_norm": sd[p + "input_layernorm.weight"],
            "wqkv": torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]),
            "wo": sd[p + "self_attn.o_proj.weight"],
            "ffn_norm": sd[p + "post_attention_layernorm.weight"],
            "w_gate_up": torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]),
            "w_down": sd[p + "mlp.down_proj.weight"],
        }
        if cfg.qk_norm:
            layer["q_norm"] = sd[p + "self_attn.q_norm.weight"]
            layer["k_norm"] = sd[p + "self_attn.k_norm.weight"]
        w["layers"].append(layer)
    return w


def compact_weights_random(cfg: ModelConfig, device, dtype, seed=0) -> dict:
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    h, f = cfg.hidden_size, cfg.intermediate_size

    def mat(rows, cols):
        return (torch.randn(rows, cols, generator=g, device=device, dtype=torch.float32)
                / math.sqrt(cols)).to(dtype)

    def gamma(n):
        return (1 + 0.1 * torch.randn(n, generator=g, device=device)).to(dtype)

    embed = torch.randn(cfg.vocab_size, h, generator=g, device=device).to(dtype)
    w = {"embed": embed, "final_norm": gamma(h),
         "lm_head": embed if cfg.tie_word_embeddings else mat(cfg.vocab_size, h), "layers": []}
    for _ in range(cfg.n_layers):
        layer = {"attn_norm": gamma(h), "wqkv": mat(cfg.qkv_dim, h), "wo": mat(h, cfg.q_dim),
                 "ffn_norm": gamma(h), "w_gate_up": mat(2 * f, h), "w_down": mat(h, f)}
        if cfg.qk_norm:
            layer["q_norm"], layer["k_norm"] = gamma(cfg.head_dim), gamma(cfg.head_dim)
        w["layers"].append(layer)
    return w


class CompactDecoder:
    """Batch-1 decode step in plain PyTorch with static buffers, so it can be graph-captured.

    State lives in tensors the step updates in place: ``token`` (1,) the input token, ``pos``
    (1,) its position; the step writes K/V at ``pos``, puts argmax(logits) into ``token`` and
    ``out_tokens[pos]`` and advances ``pos``, so replaying the graph decodes greedily.
    """

    def __init__(self, cfg: ModelConfig, weights: dict, max_len: int, device, dtype,
                 sampling: dict | None = None):
        import torch
        self.cfg, self.w, self.max_len, self.device = cfg, weights, max_len, device
        self.sampling = sampling or {}          # SAMPLING_MODES entry: temperature, top_p
        hd = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
        ang = torch.cat([ang, ang], dim=-1)                          # (max_len, head_dim)
        self.rope_cos = ang.cos().to(device=device, dtype=dtype)
        self.rope_sin = ang.sin().to(device=device, dtype=dtype)
        kv_shape = (cfg.n_layers, cfg.n_kv_heads, max_len, hd)      # (L, kv_head, pos, hd)
        self.k_cache = torch.zeros(kv_shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(kv_shape, device=device, dtype=dtype)
        self.positions = torch.arange(max_len, device=device)
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.out_tokens = torch.zeros(max_len, dtype=torch.long, device=device)
        self.graph = None

    def _rmsnorm(self, x, gamma):
        import torch
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return gamma * xf.to(x.dtype)

    def _rope(self, x, cos, sin):
        import torch
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def step(self):
        import torch
        import torch.nn.functional as F
        cfg, w = self.cfg, self.w
        nkv, group, hd = cfg.n_kv_heads, cfg.gqa_group, cfg.head_dim
        x = w["embed"].index_select(0, self.token)                    # (1, hidden)
        cos = self.rope_cos.index_select(0, self.pos)                 # (1, head_dim)
        sin = self.rope_sin.index_select(0, self.pos)
        mask = (self.positions <= self.pos).view(1, 1, 1, self.max_len)
        for i, lw in enumerate(w["layers"]):
            n = self._rmsnorm(x, lw["attn_norm"])
            q, k, v = F.linear(n, lw["wqkv"]).split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], -1)
            q, k, v = q.view(cfg.n_heads, hd), k.view(nkv, hd), v.view(nkv, hd)
            if cfg.qk_norm:
                q, k = self._rmsnorm(q, lw["q_norm"]), self._rmsnorm(k, lw["k_norm"])
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            self.k_cache[i].index_copy_(1, self.pos, k.unsqueeze(1))
            self.v_cache[i].index_copy_(1, self.pos, v.unsqueeze(1))
            # GQA at batch 1: the q heads of one kv head are that head's "query rows".
            o = F.scaled_dot_product_attention(q.view(1, nkv, group, hd),
                                               self.k_cache[i].unsqueeze(0),
                                               self.v_cache[i].unsqueeze(0), attn_mask=mask)
            x = x + F.linear(o.reshape(1, cfg.q_dim), lw["wo"])
            gate, up = F.linear(self._rmsnorm(x, lw["ffn_norm"]), lw["w_gate_up"]).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, lw["w_down"])
        logits = F.linear(self._rmsnorm(x, w["final_norm"]), w["lm_head"])
        self.logits = logits                                          # (1, vocab)
        nxt = self._draw(logits.float()) if self.sampling else logits.argmax(-1)   # (1,)
        self.token.copy_(nxt)
        self.out_tokens.index_copy_(0, self.pos, nxt)
        self.pos.add_(1)

    def _draw(self, logits):
        """The draw as a sampling server does it, in graph-capturable torch ops: logits / T, the
        top-p prefix of the sorted softmax, then the Gumbel-max over what is kept (the default
        CUDA generator's noise, which graph replays advance)."""
        import torch
        scores = logits / self.sampling["temperature"]                # (1, vocab)
        top_p = self.sampling.get("top_p", 1.0)
        if top_p < 1.0:
            srt, idx = scores.sort(-1, descending=True)
            cum = srt.softmax(-1).cumsum(-1)
            drop = (cum - srt.softmax(-1)) >= top_p                   # mass before it already >= p
            scores = scores.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
        gumbel = -torch.log(-torch.log(torch.rand_like(scores).clamp_(1e-20, 1.0 - 1e-7)))
        return (scores + gumbel).argmax(-1)

    def capture(self):
        import torch
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(3):
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.step()
        self.reset()

    def reset(self):
        self.pos.zero_()
        self.token.zero_()
        self.k_cache.zero_()
        self.v_cache.zero_()

    def run(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            import torch
            with torch.inference_mode():
                self.step()


def logits_rel_err_vs_hf(model, cfg, weights, device, dtype, prompt_len=8) -> float:
    """||compact - hf|| / ||hf|| of the last prompt position's logits: same weights, same math."""
    import torch
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=g).to(device)
    dec = CompactDecoder(cfg, weights, prompt_len, device, dtype)
    with torch.inference_mode():
        for t in range(prompt_len):
            dec.token.copy_(ids[t:t + 1])
            dec.step()
        mine = dec.logits[0].double()
        ref = model(ids[None]).logits[0, -1].double()
    return float((mine - ref).norm() / ref.norm())


def bench_graph(cfg, weights, prompt_len, new_tokens, device, dtype, repeats, sampling=None) -> dict:
    import torch
    dec = CompactDecoder(cfg, weights, prompt_len + new_tokens + 1, device, dtype,
                         SAMPLING_MODES[sampling] if sampling else None)
    if device.type == "cuda":
        dec.capture()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=g).to(device)
    runs = []
    for _ in range(repeats):
        dec.reset()
        for t in range(prompt_len):                  # prefill: one step per prompt token
            dec.token.copy_(prompt[t:t + 1])
            dec.run()
        # the last prefill step sampled the first generated token; time the other new-1 steps
        _sync(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(new_tokens - 1):
                dec.run()
            stop.record()
            stop.synchronize()
            dt = start.elapsed_time(stop) / 1e3
        else:
            for _ in range(new_tokens - 1):
                dec.run()
            dt = time.perf_counter() - t0
        runs.append((new_tokens - 1) / dt)
    toks = dec.out_tokens[prompt_len - 1:prompt_len - 1 + new_tokens].tolist()
    del dec
    return {"tokens_per_s": max(runs), "runs_tokens_per_s": runs, "token_ids": toks,
            "graph": device.type == "cuda"}


# --------------------------------------------------------------------------------------------
# Prompts: cold time to first token, and the multi-turn agent workload
# --------------------------------------------------------------------------------------------

def agent_workload(cfg: ModelConfig, system_len=AGENT_SYSTEM, turn_len=400, turns=10, seed=7):
    """The token ids every engine gets: a system prompt and one tool result per turn."""
    import numpy as np
    rng = np.random.default_rng(seed)
    system = rng.integers(0, cfg.vocab_size, system_len).tolist()
    return system, [rng.integers(0, cfg.vocab_size, turn_len).tolist() for _ in range(turns)]


def cold_prompt(cfg: ModelConfig, n: int) -> list[int]:
    return [(i * 7919 + 13) % cfg.vocab_size for i in range(n)]


def cold_ttft(start_turn, forget, ids, runs=3) -> float:
    """Best time to first token of `ids` with nothing cached (the first run warms up)."""
    times = []
    for _ in range(runs):
        forget()
        times.append(start_turn(ids, 1)[1])
    return min(times[1:])


def run_agent(start_turn, system, tools, gen) -> dict:
    """10 turns: prompt = history + tool result; `start_turn(prompt, gen)` returns the turn's
    generated ids and its time to first token; the generated ids join the history."""
    hist, ttfts = list(system), []
    t0 = time.perf_counter()
    for tool in tools:
        hist += tool
        toks, ttft = start_turn(hist, gen)
        if len(toks) != gen:
            raise RuntimeError(f"a turn generated {len(toks)} tokens, expected {gen}")
        ttfts.append(ttft)
        hist += toks
    return {"total_s": time.perf_counter() - t0, "turns": len(tools), "ttft_s": sum(ttfts) / len(ttfts),
            "ttft_per_turn_s": ttfts, "final_context": len(hist)}


class SdpaPrefillDecoder(CompactDecoder):
    """The compact decoder as a fair end-to-end peer: the prompt (or the part of it past its
    own static KV cache) in one batched pass with SDPA (flash for a cold causal prompt), the
    first token by argmax, then the CUDA-graph decode step; the cache is kept across turns."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.cached = 0                                          # positions with K/V

    def prefill(self, ids, start):
        import torch
        import torch.nn.functional as F
        cfg, w = self.cfg, self.w
        H, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        end, n = ids.shape[0], ids.shape[0] - start
        with torch.inference_mode():
            x = w["embed"].index_select(0, ids[start:])                  # (n, h)
            cos = self.rope_cos[start:end][:, None]                       # (n, 1, hd)
            sin = self.rope_sin[start:end][:, None]
            mask = None
            if start:            # cached + new keys: causal aligned to the last key (flash too)
                from torch.nn.attention.bias import causal_lower_right
                mask = causal_lower_right(n, end)
            for i, lw in enumerate(w["layers"]):
                q, k, v = F.linear(self._rmsnorm(x, lw["attn_norm"]), lw["wqkv"]).split(
                    [cfg.q_dim, cfg.kv_dim, cfg.kv_dim], -1)
                q, k, v = q.view(n, H, hd), k.view(n, nkv, hd), v.view(n, nkv, hd)
                if cfg.qk_norm:
                    q, k = self._rmsnorm(q, lw["q_norm"]), self._rmsnorm(k, lw["k_norm"])
                q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
                self.k_cache[i][:, start:end] = k.transpose(0, 1)
                self.v_cache[i][:, start:end] = v.transpose(0, 1)
                kk = self.k_cache[i][:, :end].repeat_interleave(cfg.gqa_group, 0)[None]
                vv = self.v_cache[i][:, :end].repeat_interleave(cfg.gqa_group, 0)[None]
                o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk, vv,
                                                   attn_mask=mask, is_causal=mask is None)
                x = x + F.linear(o[0].transpose(0, 1).reshape(n, cfg.q_dim), lw["wo"])
                gate, up = F.linear(self._rmsnorm(x, lw["ffn_norm"]), lw["w_gate_up"]).chunk(2, -1)
                x = x + F.linear(F.silu(gate) * up, lw["w_down"])
            logits = F.linear(self._rmsnorm(x[-1:], w["final_norm"]), w["lm_head"])
            nxt = logits.argmax(-1)
            self.token.copy_(nxt)
            self.pos.fill_(end)
        self.cached = end

    def turn(self, prompt, gen):
        """Prefill what the cache lacks, decode `gen` tokens; (ids, time to first token)."""
        import torch
        ids = torch.tensor(prompt, device=self.device)
        start = min(self.cached, len(prompt) - 1)
        _sync(self.device)
        t0 = time.perf_counter()
        self.prefill(ids, start)
        first = int(self.token.item())
        ttft = time.perf_counter() - t0
        end = len(prompt)
        for _ in range(gen - 1):
            self.run()
        toks = [first] + self.out_tokens[end:end + gen - 1].tolist()
        self.cached = end + gen - 1
        return toks, ttft


def bench_peer_prompts(cfg, device, dtype, lens, agent, gen) -> dict:
    """torch-sdpa-graph: cold TTFT per prompt length, then the agent workload."""
    w = compact_weights_random(cfg, device, dtype)
    out = {"ttft": {}}
    if lens:
        dec = SdpaPrefillDecoder(cfg, w, max(lens) + 1, device, dtype)
        for n in lens:
            out["ttft"][n] = cold_ttft(dec.turn, lambda: setattr(dec, "cached", 0),
                                       cold_prompt(cfg, n))
        del dec
        _free_gpu()
    if agent:
        system, tools = agent
        ctx = len(system) + sum(len(t) + gen for t in tools) + 8
        dec = SdpaPrefillDecoder(cfg, w, ctx, device, dtype)
        if device.type == "cuda":
            dec.capture()
        run_agent(dec.turn, system, tools[:1], gen)                   # warm-up
        dec.reset()
        dec.cached = 0
        out["agent"] = run_agent(dec.turn, system, tools, gen)
        del dec
    return out


def bench_kogcupy_prompts(cfg, lens, agent, gen, n_gpus=1) -> dict:
    """kogcupy (one GPU, or tensor parallel over n_gpus), warmed up as `kogcupy serve` starts
    (prefill graphs for every prompt size up to 2,048 tokens, one run of each longer chunk
    size): cold TTFT per prompt length (prefix cache cleared), then the agent workload through
    the prefix cache (several GPUs: the ranks' caches kept from the last turn)."""
    from kogcupy.gpu.device_weights import DeviceModel
    from kogcupy.gpu.monokernel import MonokernelBackend
    from kogcupy.gpu.multigpu import TensorParallelBackend
    from kogcupy.sampling_params import SamplingParams
    ctx = max(list(lens) + [len(agent[0]) + sum(len(t) + gen for t in agent[1]) if agent else 0]) + 16
    dev = DeviceModel.random(cfg, "bfloat16", 0, rope_positions=ctx)
    if n_gpus > 1:
        be = TensorParallelBackend(device_model=dev, gpus=n_gpus, context_length=ctx)
    else:
        be = MonokernelBackend(device_model=dev, context_length=ctx)

    def turn(prompt, n_new):
        s = be.start(prompt, SamplingParams(), n_new, set())
        t0 = time.perf_counter()
        toks = [next(s)]
        ttft = time.perf_counter() - t0
        toks += list(s)
        return toks, ttft

    t0 = time.perf_counter()
    out = {"ttft": {}, "warm_up_graphs": be.warm_up(), "warm_up_s": time.perf_counter() - t0}
    for n in lens:
        out["ttft"][n] = cold_ttft(turn, be.clear_prefix_cache, cold_prompt(cfg, n))
    if agent:
        system, tools = agent
        be.clear_prefix_cache()
        run_agent(turn, system, tools[:1], gen)                       # warm-up
        be.clear_prefix_cache()
        out["agent"] = run_agent(turn, system, tools, gen)
    del be, dev
    return out


# --------------------------------------------------------------------------------------------
# kogcupy
# --------------------------------------------------------------------------------------------

def kogcupy_bench_decode():
    from kogcupy.gpu.measure import bench_decode
    return bench_decode


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = repr(v)
    return out


# Sampled decode (kogcupy and torch-sdpa-graph; hf-eager greedy only): what chat and agent
# requests send.
# "t1" is the OpenAI default (the LM head draws); "t0.7-top_p0.9" takes the filtered build.
SAMPLING_MODES = {"t1": dict(temperature=1.0, seed=1),
                  "t0.7-top_p0.9": dict(temperature=0.7, top_p=0.9, seed=1)}


def _tokens_per_s(res, err):
    """(tok/s, error) of a bench_decode result: a speed that is not finite and > 0 is an error."""
    tps = res.get("tokens_per_s") if res else None
    if res and not (isinstance(tps, (int, float)) and math.isfinite(tps) and tps > 0):
        return None, f"bench_decode returned tokens_per_s={tps!r}"
    return tps, err


def bench_kogcupy(cfg, prompt_len, new_tokens, position, n_gpus=1, sampling=None) -> dict:
    kw = {"n_gpus": n_gpus} if n_gpus != 1 else {}
    if sampling is not None:
        from kogcupy.sampling_params import SamplingParams
        kw["sampling"] = SamplingParams(**SAMPLING_MODES[sampling])
    res = kogcupy_bench_decode()(cfg, prompt_len=prompt_len, new_tokens=new_tokens,
                                 position=position, **kw)
    if not isinstance(res, dict):
        raise RuntimeError(f"bench_decode returned {type(res).__name__}, expected a dict")
    return _jsonable(res)


# --------------------------------------------------------------------------------------------
# Rows, table, JSON
# --------------------------------------------------------------------------------------------

def make_row(engine, shape, cfg, args, env, *, tokens_per_s=None, position=0, metric="decode",
             prompt_len=None, new_tokens=None, error=None, n_gpus=1, **extra) -> dict:
    wb = weight_bytes(cfg)
    bw = env["read_bw_TBps"] * n_gpus             # tensor parallel: the GPUs' aggregate
    prompt_len = args.prompt_len if prompt_len is None else prompt_len
    new_tokens = args.new_tokens if new_tokens is None else new_tokens
    limit = bw * 1e12 / wb
    # mean context over the timed steps: what attention reads on top of the weights
    ctx = max(position, prompt_len) + new_tokens / 2    # kogcupy: position = prompt length
    limit_kv = bw * 1e12 / (wb + kv_bytes(cfg, ctx))
    row = {"engine": engine, "shape": shape, "metric": metric, "gpu": env["gpu"],
           "n_gpus": n_gpus, "prompt_len": prompt_len, "new_tokens": new_tokens,
           "position": position, "status": "error" if error else "ok",
           "tokens_per_s": None, "read_bw_TBps": None, "pct_of_limit": None,
           "bytes_per_token": wb, "limit_tokens_per_s": limit,
           "kv_bytes_per_token": kv_bytes(cfg, ctx), "pct_of_limit_with_kv": None}
    if tokens_per_s is not None and metric == "decode":
        row["tokens_per_s"] = tokens_per_s
        row["read_bw_TBps"] = tokens_per_s * wb / 1e12
        row["pct_of_limit"] = 100.0 * tokens_per_s / limit
        row["pct_of_limit_with_kv"] = 100.0 * tokens_per_s / limit_kv
    if error:
        row["error"] = error
    row.update(extra)
    return row


def fits(cfg, args) -> list[int]:
    """The TTFT prompt lengths the model's positions allow."""
    return [n for n in args.ttft_prompts if n < cfg.max_position_embeddings]


def prompt_rows(engine, shape, cfg, args, env, rows, res, err, n_gpus=1):
    """ttft rows (one per prompt length) and the agent row of one engine (on n_gpus)."""
    on = _on_gpus(n_gpus)
    for n in args.ttft_prompts:
        t = (res or {}).get("ttft", {}).get(n)
        why = err if t is None else None
        if n >= cfg.max_position_embeddings:
            why = f"skipped: the model has {cfg.max_position_embeddings} positions"
        rows.append(make_row(engine, shape, cfg, args, env, metric="ttft", prompt_len=n,
                             new_tokens=1, ttft_s=t, error=why, n_gpus=n_gpus))
        print(f"  {engine + on:<16} ttft @{n:<6} {_fmt(t and t * 1e3, '.1f', 9)} ms", flush=True)
    if args.agent_turns:
        a = (res or {}).get("agent")
        warm = {k: res[k] for k in ("warm_up_graphs", "warm_up_s") if res and k in res}
        rows.append(make_row(engine, shape, cfg, args, env, metric="agent",
                             prompt_len=AGENT_SYSTEM, new_tokens=args.agent_gen,
                             error=err if a is None else None, n_gpus=n_gpus, **(a or {}), **warm))
        print(f"  {engine + on:<16} agent {_fmt(a and a['total_s'], '.2f', 9)} s "
              f"(mean ttft {_fmt(a and a['ttft_s'] * 1e3, '.1f', 7)} ms)", flush=True)


def add_speedups(rows):
    """x vs each peer, same shape, decode at position 0 only (peers run only there)."""
    base = {(r["shape"], r["engine"]): r["tokens_per_s"] for r in rows
            if r["metric"] == "decode" and r["position"] == 0 and r["status"] == "ok"
            and r.get("n_gpus", 1) == 1}
    for r in rows:
        if r["metric"] != "decode" or r["position"] != 0 or r["tokens_per_s"] is None:
            continue
        r["speedup_vs"] = {p: r["tokens_per_s"] / base[(r["shape"], p)]
                           for p in PEERS if (r["shape"], p) in base and p != r["engine"]}


def _note(row) -> str:
    return ("error: " + row["error"].splitlines()[0][:70]) if row["status"] == "error" else ""


def _fmt(v, spec, width):
    return f"{v:{spec}}".rjust(width) if v is not None else "-".rjust(width)


def print_table(doc):
    rows = doc["rows"]
    print()
    print(f"{doc['gpu']}  {doc['date']}  stream-read {doc['read_bw_TBps']:.3f} TB/s  "
          f"prompt {doc['args']['prompt_len']}  new {doc['args']['new_tokens']}")
    head = (f"{'engine':<16}{'shape':<14}{'gpus':>5}{'pos':>6}{'tok/s':>10}{'GB/s':>9}{'%limit':>8}"
            f"{'%lim+kv':>8}{'x hf':>8}{'x graph':>8}{'x kog':>8}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["metric"] != "decode":
            continue
        sp = r.get("speedup_vs", {})
        gbs = r["read_bw_TBps"] * 1e3 if r["read_bw_TBps"] is not None else None
        note = _note(r)
        print(f"{r['engine']:<16}{r['shape']:<14}{r.get('n_gpus', 1):>5}{r['position']:>6}"
              f"{_fmt(r['tokens_per_s'], '.1f', 10)}{_fmt(gbs, '.0f', 9)}"
              f"{_fmt(r['pct_of_limit'], '.1f', 8)}{_fmt(r['pct_of_limit_with_kv'], '.1f', 8)}"
              f"{_fmt(sp.get('hf-eager'), '.2f', 8)}{_fmt(sp.get('torch-sdpa-graph'), '.2f', 8)}"
              f"{_fmt(sp.get('kogcupy'), '.2f', 8)}  {note}")
    sampled = [r for r in rows if r["metric"] == "decode-sampled"]
    if sampled:
        greedy = {(r["engine"], r["shape"]): r["tokens_per_s"] for r in rows if r["metric"] == "decode"
                  and r["position"] == 0 and r.get("n_gpus", 1) == 1}
        peer = {(r["shape"], r["sampling"]): r.get("sampled_tokens_per_s") for r in sampled
                if r["engine"] == "torch-sdpa-graph"}
        print()
        print(f"{'sampled decode':<30}{'shape':<14}{'sampling':>15}{'tok/s':>10}{'x greedy':>9}"
              f"{'x graph':>8}  note")
        for r in sampled:
            t, g = r.get("sampled_tokens_per_s"), greedy.get((r["engine"], r["shape"]))
            q = peer.get((r["shape"], r["sampling"])) if r["engine"] != "torch-sdpa-graph" else None
            print(f"{r['engine']:<30}{r['shape']:<14}{r['sampling']:>15}{_fmt(t, '.1f', 10)}"
                  f"{_fmt(t / g if t and g else None, '.2f', 9)}{_fmt(t / q if t and q else None, '.2f', 8)}"
                  f"  {_note(r)}")
    ttft = [r for r in rows if r["metric"] == "ttft"]
    if ttft:
        print()
        print(f"{'time to first token':<30}{'shape':<14}{'prompt':>7}{'ttft ms':>10}"
              f"{'prefill tok/s':>15}  note")
        for r in ttft:
            t = r.get("ttft_s")
            note = _note(r)
            print(f"{_engine_on(r):<30}{r['shape']:<14}{r['prompt_len']:>7}"
                  f"{_fmt(t * 1e3 if t else None, '.2f', 10)}"
                  f"{_fmt(r['prompt_len'] / t if t else None, '.0f', 15)}  {note}")
    agent = [r for r in rows if r["metric"] == "agent"]
    if agent:
        print()
        print(f"{'agent workload':<30}{'shape':<14}{'turns':>6}{'total s':>9}{'mean ttft ms':>14}"
              f"{'context':>9}  note")
        for r in agent:
            note = _note(r)
            t = r.get("ttft_s")
            print(f"{_engine_on(r):<30}{r['shape']:<14}{_fmt(r.get('turns'), 'd', 6)}"
                  f"{_fmt(r.get('total_s'), '.2f', 9)}{_fmt(t * 1e3 if t else None, '.1f', 14)}"
                  f"{_fmt(r.get('final_context'), 'd', 9)}  {note}")


def _on_gpus(n_gpus: int) -> str:
    """" xN" after an engine's name when it ran tensor parallel over N GPUs, else nothing."""
    return f" x{n_gpus}" if n_gpus > 1 else ""


def _engine_on(r) -> str:
    """A row's engine, with its GPU count when it ran tensor parallel."""
    return r["engine"] + _on_gpus(r.get("n_gpus", 1))


def output_path(out_dir, gpu, date) -> str:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{gpu_slug(gpu)}-{date}")
    path = base + ".json"
    if os.path.exists(path):                          # never overwrite an earlier run
        path = f"{base}-{datetime.datetime.now(datetime.timezone.utc):%H%M%S}.json"
    return path


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _guard(fn, what, log):
    """Run fn(); on failure return (None, message) and keep the traceback in the log."""
    try:
        return fn(), None
    except Exception as e:                            # noqa: BLE001 (a row, never a crash)
        tb = traceback.format_exc()
        log.append({"what": what, "traceback": tb})
        print(f"  {what}: {_err(e)}", file=sys.stderr)
        return None, _err(e)


SOURCE: dict = {}


def run(args, save=lambda doc: None) -> dict:
    import torch
    SOURCE.update(source_version())
    shapes_db = TINY_SHAPES if args.dry_run else SHAPES
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench: no CUDA GPU visible to torch (use --dry-run for a CPU logic check)")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    log = []

    print(f"bench: {gpu}; measuring stream-read bandwidth over {args.bw_bytes / 1e9:.1f} GB",
          flush=True)
    bw = measure_bandwidth(args, device)
    env = {"gpu": gpu, "read_bw_TBps": bw["best_TBps"]}
    print(f"  read bandwidth {bw['best_TBps']:.3f} TB/s  "
          f"({json.dumps({k: v.get('TBps', v.get('error')) for k, v in bw.items() if isinstance(v, dict)})})",
          flush=True)

    rows = []
    for shape in args.shapes:
        # a partial file after every shape: a hung engine still leaves the rows before it
        save(document(args, shapes_db, gpu, date, env, bw, rows, log, complete=False))
        cfg = ModelConfig(**shapes_db[shape])
        print(f"[{shape}] {weight_bytes(cfg) / 1e9:.3f} GB/token, "
              f"limit {env['read_bw_TBps'] * 1e12 / weight_bytes(cfg):.0f} tok/s", flush=True)
        rows.append(make_row("limit", shape, cfg, args, env,
                             tokens_per_s=env["read_bw_TBps"] * 1e12 / weight_bytes(cfg)))
        hf_tokens = None
        model = None
        if cfg.arch == "qwen2" and "torch-sdpa-graph" in args.engines:
            # (no transformers peer for it: the compact decoder has no q/k/v biases either)
            print("  (qwen2: no transformers model; the CUDA-graph peer runs on its own random "
                  "weights, without the q/k/v biases)", flush=True)
        if "hf-eager" in args.engines or ("torch-sdpa-graph" in args.engines and cfg.arch != "qwen2"):
            model, err = _guard(lambda: build_hf_model(cfg, device, dtype),
                                f"{shape} hf build", log)
            if "hf-eager" in args.engines:
                if model is None:
                    rows.append(make_row("hf-eager", shape, cfg, args, env, error=err))
                else:
                    t0 = time.perf_counter()
                    res, err = _guard(lambda: bench_hf(model, cfg, args.prompt_len,
                                                       args.hf_new_tokens, device),
                                      f"{shape} hf-eager", log)
                    extra = {}
                    if res:
                        hf_tokens = res.pop("token_ids")
                        extra = {"decode_s": res["decode_s"], "step_ms": res["step_ms"]}
                        fl, _ = _guard(lambda: bench_hf_forward_loop(
                            model, cfg, args.prompt_len, min(128, args.new_tokens), device,
                            args.hf_profile), f"{shape} hf forward loop", log)
                        extra.update(fl or {})
                    rows.append(make_row("hf-eager", shape, cfg, args, env, error=err,
                                         new_tokens=args.hf_new_tokens,
                                         tokens_per_s=res and res["tokens_per_s"],
                                         wall_s=time.perf_counter() - t0, **extra))
                    print(f"  hf-eager        {_fmt(rows[-1]['tokens_per_s'], '.1f', 9)} tok/s"
                          + (f"  (step ms {json.dumps({k: round(v, 2) for k, v in extra['step_ms'].items()})};"
                             f" bare forward loop {extra['forward_loop_tokens_per_s']:.1f} tok/s)"
                             if "forward_loop_tokens_per_s" in extra else ""), flush=True)
                    for n in args.ttft_prompts:
                        if n > HF_EAGER_MAX_PROMPT:
                            rows.append(make_row("hf-eager", shape, cfg, args, env, metric="ttft",
                                                 prompt_len=n, new_tokens=1, error=(
                                                     f"skipped: eager attention materializes "
                                                     f"{n}x{n} scores per head")))
                            continue
                        res, err = _guard(lambda: bench_hf_ttft(model, cfg, n, device),
                                          f"{shape} hf-eager ttft {n}", log)
                        rows.append(make_row("hf-eager", shape, cfg, args, env, error=err,
                                             metric="ttft", prompt_len=n,
                                             new_tokens=1, **(res or {})))

        if "torch-sdpa-graph" in args.engines:
            peer = {}                  # its weights, made once for the greedy and sampled runs

            def peer_weights():
                # Same weights as the transformers model when there is one: token ids then
                # show whether the two implementations agree (bf16 near-ties may split them).
                if "w" not in peer:
                    peer["w"] = (compact_weights_random(cfg, device, dtype) if model is None
                                 else compact_weights_from_hf(model, cfg))
                return peer["w"]

            def graph():
                w = peer_weights()
                if model is None:
                    return bench_graph(cfg, w, args.prompt_len, args.new_tokens, device, dtype,
                                       args.graph_repeats)
                err = logits_rel_err_vs_hf(model, cfg, w, device, dtype)
                res = bench_graph(cfg, w, args.prompt_len, args.new_tokens, device, dtype,
                                  args.graph_repeats)
                return {**res, "logits_rel_err_vs_hf": err}
            t0 = time.perf_counter()
            res, err = _guard(graph, f"{shape} torch-sdpa-graph", log)
            extra = {}
            if res:
                extra["runs_tokens_per_s"] = res["runs_tokens_per_s"]
                extra["cuda_graph"] = res["graph"]
                if "logits_rel_err_vs_hf" in res:
                    extra["logits_rel_err_vs_hf"] = res["logits_rel_err_vs_hf"]
                if hf_tokens is not None:
                    same = 0
                    for a, b in zip(hf_tokens, res["token_ids"]):
                        if a != b:
                            break
                        same += 1
                    extra["greedy_prefix_agrees_with_hf"] = same
            rows.append(make_row("torch-sdpa-graph", shape, cfg, args, env, error=err,
                                 tokens_per_s=res and res["tokens_per_s"],
                                 wall_s=time.perf_counter() - t0, **extra))
            print(f"  torch-sdpa-graph {_fmt(rows[-1]['tokens_per_s'], '.1f', 9)} tok/s"
                  + (f"  (logits rel err vs hf {extra['logits_rel_err_vs_hf']:.1e}; greedy"
                     f" agrees with hf for {extra['greedy_prefix_agrees_with_hf']} tokens)"
                     if "greedy_prefix_agrees_with_hf" in extra else ""), flush=True)
            for mode in args.sampling:
                t0 = time.perf_counter()
                res, err = _guard(lambda: bench_graph(cfg, peer_weights(), args.prompt_len,
                                                      args.new_tokens, device, dtype,
                                                      args.graph_repeats, sampling=mode),
                                  f"{shape} torch-sdpa-graph sampled {mode}", log)
                tps = res["tokens_per_s"] if res else None
                rows.append(make_row("torch-sdpa-graph", shape, cfg, args, env, error=err,
                                     metric="decode-sampled", sampling=mode,
                                     sampled_tokens_per_s=tps, wall_s=time.perf_counter() - t0))
                print(f"  torch-sdpa-graph {mode:<14} {_fmt(tps, '.1f', 9)} tok/s", flush=True)
            peer.clear()
        del model
        _free_gpu()
        agent = (agent_workload(cfg, turns=args.agent_turns) if args.agent_turns else None)
        if "torch-sdpa-graph" in args.engines and (args.ttft_prompts or agent):
            res, err = _guard(lambda: bench_peer_prompts(cfg, device, dtype, fits(cfg, args),
                                                         agent, args.agent_gen),
                              f"{shape} torch-sdpa-graph prompts", log)
            prompt_rows("torch-sdpa-graph", shape, cfg, args, env, rows, res, err)
            _free_gpu()

        if "kogcupy" in args.engines:
            def decode(pos, n, what, label):
                t0 = time.perf_counter()
                res, err = _guard(lambda: bench_kogcupy(cfg, args.prompt_len, args.new_tokens,
                                                        pos, n), f"{shape} kogcupy {what}", log)
                tps, err = _tokens_per_s(res, err)
                rows.append(make_row("kogcupy", shape, cfg, args, env, error=err, position=pos,
                                     n_gpus=n, tokens_per_s=tps, wall_s=time.perf_counter() - t0,
                                     engine_info=res or {}))
                print(f"  kogcupy {label} {_fmt(tps, '.1f', 9)} tok/s", flush=True)
                _free_gpu()

            for n in [g for g in args.gpus if g > 1]:       # tensor parallel, position 0
                decode(0, n, f"{n} GPUs", f"x{n} GPUs")
            for mode in (args.sampling if 1 in args.gpus else []):
                t0 = time.perf_counter()
                res, err = _guard(lambda: bench_kogcupy(cfg, args.prompt_len, args.new_tokens, 0,
                                                        sampling=mode),
                                  f"{shape} kogcupy sampled {mode}", log)
                tps, err = _tokens_per_s(res, err)
                rows.append(make_row("kogcupy", shape, cfg, args, env, error=err,
                                     metric="decode-sampled", sampling=mode, sampled_tokens_per_s=tps,
                                     wall_s=time.perf_counter() - t0, engine_info=res or {}))
                print(f"  kogcupy {mode:<14} {_fmt(tps, '.1f', 9)} tok/s", flush=True)
                _free_gpu()
            for pos in (args.positions if 1 in args.gpus else []):
                decode(pos, 1, f"pos {pos}", f"@{pos:<6} ")
            for n in (args.gpus if args.ttft_prompts or agent else []):
                res, err = _guard(lambda: bench_kogcupy_prompts(cfg, fits(cfg, args), agent,
                                                                args.agent_gen, n),
                                  f"{shape} kogcupy prompts" + (f" {n} GPUs" if n > 1 else ""), log)
                prompt_rows("kogcupy", shape, cfg, args, env, rows, res, err, n_gpus=n)
                _free_gpu()

    doc = document(args, shapes_db, gpu, date, env, bw, rows, log, complete=True)
    save(doc)
    return doc


def source_version() -> dict:
    """Which kogcupy ran: git HEAD and dirtiness here, else KOGCUPY_BENCH_COMMIT (set when a
    `git archive` of a commit is what travels to the device machine)."""
    import subprocess
    if os.environ.get("KOGCUPY_BENCH_COMMIT"):          # set by whoever copied the tree here
        return {"commit": os.environ["KOGCUPY_BENCH_COMMIT"], "dirty": None}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": os.environ.get("KOGCUPY_BENCH_COMMIT"), "dirty": None}


def document(args, shapes_db, gpu, date, env, bw, rows, log, complete) -> dict:
    import torch
    add_speedups(rows)
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "cupy"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    if torch.cuda.is_available():
        versions["cuda_runtime"] = torch.version.cuda
    return {
        "gpu": gpu, "date": date, "read_bw_TBps": env["read_bw_TBps"], "n_gpus": args.gpus,
        "dry_run": args.dry_run, "complete": complete,
        "notes": ("row read_bw_TBps = tokens_per_s x bytes_per_token (weights incl. LM head, "
                  "no embedding, bf16); pct_of_limit against the top-level read_bw_TBps "
                  "(best stream-read of this run); pct_of_limit_with_kv also counts the K/V "
                  "read at the mean context of the timed steps"),
        "bandwidth": bw, "versions": versions, "source": SOURCE,
        "args": {k: v for k, v in vars(args).items() if k != "plot"},
        "shapes": {s: {**shapes_db[s],
                       "bytes_per_token": weight_bytes(ModelConfig(**shapes_db[s])),
                       "limit_tokens_per_s": env["read_bw_TBps"] * 1e12
                       / weight_bytes(ModelConfig(**shapes_db[s]))} for s in args.shapes},
        "rows": rows, "errors": log,
    }


def _csv(typ):
    return lambda s: [typ(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip() + "\n\nNeeds a CUDA GPU, CuPy "
                                "and PyTorch (--dry-run: the CPU).",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=_csv(str), default=None,
                   help=f"comma list of {', '.join(SHAPES)} (default all)")
    p.add_argument("--engines", type=_csv(str), default=list(ENGINES),
                   help=f"comma list of {', '.join(ENGINES)} (the limit row is always there)")
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--positions", type=_csv(int), default=[0, 8000, 32000],
                   help="kogcupy context positions (position 0 is the row compared with peers)")
    p.add_argument("--ttft-prompts", type=_csv(int), default=[1000, 8000, 32000],
                   help="cold prompt lengths for time to first token (empty: skip)")
    p.add_argument("--hf-new-tokens", type=int, default=64,
                   help="tokens hf-eager decodes (it is ~100x slower than the others)")
    p.add_argument("--agent-turns", type=int, default=10,
                   help="turns of the agent workload (0: skip)")
    p.add_argument("--agent-gen", type=int, default=256, help="tokens generated per agent turn")
    p.add_argument("--sampling", type=_csv(str), default=list(SAMPLING_MODES),
                   help=f"kogcupy sampled-decode modes at position 0, one GPU ({', '.join(SAMPLING_MODES)}; "
                        "'' for none)")
    p.add_argument("--graph-repeats", type=int, default=3)
    p.add_argument("--hf-profile", action="store_true",
                   help="print a torch.profiler table of 3 bare transformers decode steps")
    p.add_argument("--bw-bytes", type=float, default=None,
                   help="stream-read buffer size in bytes (default 4e9; 6.4e7 with --dry-run)")
    p.add_argument("--bw-repeats", type=int, default=10)
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    p.add_argument("--gpus", type=_csv(int), default=[1],
                   help="GPU counts kogcupy runs on, e.g. 1,2,4 (tensor parallel above 1: decode "
                        "at position 0, TTFT and the agent workload; peers and other context "
                        "positions run on one GPU)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU logic check on tiny shapes; writes to /tmp unless --out is given")
    p.add_argument("--plot", metavar="JSON", help="only plot an earlier result (needs matplotlib)")
    args = p.parse_args(argv)
    if args.plot:
        return args
    if any(not 1 <= g <= 8 for g in args.gpus):
        p.error(f"--gpus {args.gpus}: each GPU count must be 1 to 8")
    shapes_db = TINY_SHAPES if args.dry_run else SHAPES
    args.shapes = args.shapes or list(shapes_db)
    for s in args.shapes:
        if s not in shapes_db:
            p.error(f"unknown shape {s!r}; choose from {', '.join(shapes_db)}")
    for e in args.engines:
        if e not in ENGINES:
            p.error(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    if args.new_tokens < 2 or args.prompt_len < 1:
        p.error("--new-tokens must be >= 2 and --prompt-len >= 1")
    if any(x < 0 for x in args.positions):
        p.error("--positions must be >= 0")
    bad = [m for m in args.sampling if m not in SAMPLING_MODES]
    if bad:
        p.error(f"--sampling {','.join(bad)}: not one of {', '.join(SAMPLING_MODES)}")
    args.bw_bytes = int(args.bw_bytes or (6.4e7 if args.dry_run else 4e9))
    if args.out is None:
        args.out = "/tmp/kogcupy-bench-dry-run" if args.dry_run else os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from plot_bench import plot
        print(plot(args.plot))
        return
    path = None

    def save(doc):
        nonlocal path
        gpu = doc["gpu"] + (f" x{max(args.gpus)}" if max(args.gpus) > 1 else "")
        path = path or output_path(args.out, gpu, doc["date"])
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        os.replace(path + ".tmp", path)

    doc = run(args, save)
    print_table(doc)
    print(f"\nwrote {path}")
    failed = [r for r in doc["rows"] if r.get("engine") == "kogcupy" and r.get("status") != "ok"]
    if failed and len(failed) == sum(r.get("engine") == "kogcupy" for r in doc["rows"]):
        first = (failed[0].get("error") or "error").splitlines()[0][:120]
        sys.exit(f"every kogcupy row failed (first: {first}); see {path}")


if __name__ == "__main__":
    main()
