"""The monokernel's parameter block, defined once: the C struct and the host packing both come
from ``FIELDS``.

Each field is ``(name, ctype, comment)``; the comment carries the shape, as in llama2.c.
Shapes: L layers, h hidden, f ffn, H q heads, KV kv heads, G = H // KV, hd head_dim, V vocab,
C context length (KV cache positions), B blocks in the grid, R rope table positions.
``w_t`` is the storage dtype of weights and KV cache (bf16 or fp16 bits, uint16).

The struct lives in device memory; the kernel gets a pointer to it. ``struct_source()`` is
prepended to the kernel source by ``kernels.py``; ``pack()`` fills a numpy structured array
with the same layout (numpy's ``align=True`` follows the C rules). CI compiles
``layout_static_asserts()`` (offsetof/sizeof against ``layout()``) with nvcc; on a GPU a
probe kernel reads them back.
"""
from __future__ import annotations

import numpy as np

_CTYPES = {
    # ctype -> (numpy dtype, C spelling)
    "ptr": (np.uint64, None),
    "f32": (np.float32, "float"),
    "i32": (np.int32, "int"),
    "u32": (np.uint32, "unsigned int"),
}

# (name, ctype, C pointer type or None, comment with shape)
FIELDS: list[tuple[str, str, str | None, str]] = [
    # ---- weights (read-only during a launch) ----
    ("wqkv", "ptr", "const kog_u16*", "(L, qkv_dim, h) [q; k; v] rows, attn_norm gamma folded"),
    ("bqkv", "ptr", "const float*", "(L, qkv_dim) qwen2 biases, else null"),
    ("q_norm", "ptr", "const float*", "(L, hd) qwen3 q RMSNorm gamma, else null"),
    ("k_norm", "ptr", "const float*", "(L, hd) qwen3 k RMSNorm gamma, else null"),
    ("wo", "ptr", "const kog_u16*", "(L, h, q_dim)"),
    ("w_gate_up", "ptr", "const kog_u16*", "(L, f, 2, h) gate/up rows interleaved, ffn_norm folded"),
    ("w_down", "ptr", "const kog_u16*", "one GPU (L, f, h): transposed; tensor parallel (L, h, f)"),
    ("lm_head", "ptr", "const kog_u16*", "(V, h) final_norm gamma folded"),
    ("embed", "ptr", "const kog_u16*", "(V, h) token embedding rows"),
    ("rope_cos", "ptr", "const float*", "(R, hd/2) cos(pos * inv_freq)"),
    ("rope_sin", "ptr", "const float*", "(R, hd/2)"),
    # ---- KV cache ----
    ("k_cache", "ptr", "kog_u16*", "(L, KV, C, hd) post qk-norm, post RoPE"),
    ("v_cache", "ptr", "kog_u16*", "(L, KV, C, hd)"),
    # ---- tagged activations: u64 words (fp32 bits | version tag << 32), see sync.cuh ----
    ("x", "ptr", "kog_u64*", "(h) tensor parallel: the embedding (one GPU: unused, x is xsum)"),
    ("qkv", "ptr", "kog_u64*", "(qkv_dim,) raw q/k/v rows (+bias) of the current token"),
    ("attn_out", "ptr", "kog_u64*", "(q_dim,) attention output (tensor parallel; one GPU: none)"),
    ("act", "ptr", "kog_u64*", "(f,) silu(gate) * up"),
    ("xsum", "ptr", "kog_u64*", "(2, 2L+1, KOG_IN_COPIES, h) one GPU: x entering each layer / after o_proj, as residual sums (sync.cuh)"),
    # ---- fp32 buffers ----
    ("logits", "ptr", "float*", "(V,) or (n_prompt, V) when all_logits"),
    ("attn_partial", "ptr", "float*", "(KV, max_chunks, G, hd + 2) per-chunk out, max, sum"),
    ("lm_part_val", "ptr", "float*", "(TP * B,) per-block max logit (entry rank * B + block)"),
    ("lm_part_idx", "ptr", "int*", "(TP * B,) per-block argmax (lowest index on ties); -1: none"),
    # ---- tensor parallel (TP ranks; null / 0 on one GPU) ----
    ("xpart", "ptr", "kog_u64*", "(2, TP, h) tagged partials of the o_proj / down rows, every rank's"),
    ("tp_peers", "ptr", "const kog_u64*", "(len(TP_PEER_FIELDS), 8) rank q's buffers, valid here"),
    # ---- sync ----
    ("counters", "ptr", "kog_u32*", "(n_counters,) indices: counter_layout(); meanings: schedule.COUNTERS"),
    ("partition", "ptr", "const int*", "(B, 10) per-block [begin, end) of qkv, o, gate_up, down, lm_head"),
    # ---- tokens, sampling ----
    ("tokens", "ptr", "int*", "(C,) token at each position: prompt, then generated"),
    ("sample_ws", "ptr", "kog_u64*", "(SAMPLE_WS_WORDS,) sampler workspace (sampling.cuh); host zeroes"),
    ("eos_ids", "ptr", "const int*", "(n_eos,)"),
    ("host_ctl", "ptr", "kog_u32*", "(4,) host-mapped: [n_generated, finish_code, cancel, done]"),
    ("host_tokens", "ptr", "int*", "(max_new,) host-mapped generated tokens"),
    ("debug", "ptr", "float*", "(debug_npos, debug_stride) per-stage dumps, or null"),
    ("profile", "ptr", "kog_u64*", "(B, KOG_PROF_SLOTS) %globaltimer stamps at profile_pos, or null"),
    ("prompt_len", "i32", None, "tokens[0:prompt_len] are the prompt"),
    ("start_pos", "i32", None, "first position run; K/V of [0, start_pos) are already cached"),
    ("max_new", "i32", None, "generated tokens at most"),
    ("context_length", "i32", None, "C: KV cache positions; prompt + generated <= C"),
    ("all_logits", "i32", None, "1: teacher-forced, logits of every prompt position, no sampling"),
    ("n_eos", "i32", None, ""),
    ("temperature", "f32", None, "0 -> greedy"),
    ("inv_temperature", "f32", None, "1 / temperature as the reference sampler rounds it (sampling.inv_temperature)"),
    ("top_k", "i32", None, "0 -> off"),
    ("top_p", "f32", None, "1 -> off"),
    ("min_p", "f32", None, "0 -> off"),
    ("repetition_penalty", "f32", None, "1 -> off"),
    ("seed_lo", "u32", None, "Philox key[0]"),
    ("seed_hi", "u32", None, "Philox key[1]"),
    ("n_lm_producers", "i32", None, "blocks owning lm_head rows (all ranks together)"),
    ("tp_rank", "i32", None, "this GPU's tensor-parallel rank (0 on one GPU)"),
    ("tp_gather_logits", "i32", None, "1: the LM head also writes its logits on every rank"),
    ("attn_max_chunks", "i32", None, "KV-position chunks per kv head at most (chunk rule)"),
    ("attn_chunks_alloc", "i32", None, "chunks per kv head attn_partial holds"),
    ("gate_up_dyn_begin", "i32", None, "gate/up units >= this are handed out dynamically"),
    ("lm_dyn_begin", "i32", None, "LM head rows >= this are handed out dynamically"),
    ("lm_dyn_end", "i32", None, "... and < this (V; tensor parallel: the rank's slice end)"),
    ("debug_npos", "i32", None, "positions dumped when debug != null"),
    ("debug_stride", "i32", None, "floats per dumped position"),
    ("profile_pos", "i32", None, "position whose stage timings are recorded"),
]

FINISH_CODES = {0: None, 1: "eos", 2: "length", 3: "context", 4: "cancelled", 5: "done",
                6: "overflow"}


def numpy_dtype() -> np.dtype:
    return np.dtype([(n, _CTYPES[t][0]) for n, t, _, _ in FIELDS], align=True)


def layout() -> dict[str, int]:
    """Field name -> byte offset, plus "__size__"."""
    dt = numpy_dtype()
    out = {n: dt.fields[n][1] for n, _, _, _ in FIELDS}
    out["__size__"] = dt.itemsize
    return out


def struct_source() -> str:
    """C text of ``struct KogParams`` (generated; do not edit by hand)."""
    lines = ["// generated by kogcupy/gpu/abi.py -- the parameter block, one definition",
             "struct KogParams {"]
    for name, t, cptr, comment in FIELDS:
        ctype = cptr if t == "ptr" else _CTYPES[t][1]
        lines.append(f"    {ctype} {name};".ljust(48) + (f"  // {comment}" if comment else ""))
    lines.append("};")
    return "\n".join(lines) + "\n"


def pack(values: dict) -> np.ndarray:
    """A one-element structured array holding ``values`` (pointers as ints); missing -> 0."""
    unknown = set(values) - {n for n, _, _, _ in FIELDS}
    if unknown:
        raise KeyError(f"unknown KogParams fields: {sorted(unknown)}")
    a = np.zeros(1, dtype=numpy_dtype())
    for k, v in values.items():
        a[k] = v
    return a


def layout_static_asserts(lay: dict[str, int] | None = None) -> str:
    """C++ static_asserts that the compiler's offsetof/sizeof of ``KogParams`` equal the host
    layout (``layout()``, or `lay`): a host/device mismatch fails the compile."""
    lay = layout() if lay is None else lay
    lines = [f'static_assert(__builtin_offsetof(KogParams, {n}) == {lay[n]}, '
             f'"KogParams::{n}: the device offset differs from the host offset {lay[n]}");'
             for n, _, _, _ in FIELDS]
    lines.append(f'static_assert(sizeof(KogParams) == {lay["__size__"]}, '
                 f'"sizeof(KogParams) differs from the host size {lay["__size__"]}");')
    return "\n".join(lines) + "\n"


def layout_probe_source(static_asserts: bool = False, lay: dict[str, int] | None = None) -> str:
    """A kernel writing offsetof/sizeof of each field, for the host/device layout test on a
    GPU; with `static_asserts`, the compile itself checks them against the host layout (the
    compile-only CI test)."""
    body = ["    KogParams s;", "    const char* base = reinterpret_cast<const char*>(&s);"]
    body += [f"    out[{i}] = (unsigned long long)(reinterpret_cast<const char*>(&s.{n}) - base);"
             for i, (n, _, _, _) in enumerate(FIELDS)]
    body.append(f"    out[{len(FIELDS)}] = (unsigned long long)sizeof(KogParams);")
    return ("typedef unsigned int kog_u32;\ntypedef unsigned short kog_u16;\n"
            "typedef unsigned long long kog_u64;\n"
            + struct_source()
            + (layout_static_asserts(lay) if static_asserts else "")
            + 'extern "C" __global__ void kog_abi_probe(unsigned long long* out) {\n'
            + "\n".join(body) + "\n}\n")


def counter_layout(n_layers: int, n_kv_heads: int) -> dict[str, int]:
    """Indices into ``counters`` (emitted as -D defines; the kernel uses these names).

    KOG_CNT_TOK: positions whose input embedding is in x (or whose stop flag is set);
    KOG_CNT_LM: LM-head block completions; KOG_CNT_STOP: 1 once the generation ends;
    KOG_CNT_KV + layer * KV + g: positions of kv head g appended to the layer's KV cache;
    KOG_CNT_DYN + layer (gate_up), KOG_CNT_DYN + L (LM head): dynamic-tail cursors;
    KOG_CNT_CANCEL: tensor parallel, 1 once rank 0 forwarded the host's cancel flag;
    KOG_CNT_OVERFLOW: 1 once a part of a residual sum was not finite or |part| >= 2^27
    (one GPU; sync.cuh kog_sum_word), which the sums cannot hold;
    KOG_CNT_SAMPLE: the sampler's rounds over the vocabulary slices, +1 a block a round.
    """
    n = n_layers * n_kv_heads
    d = {"KOG_CNT_TOK": 0, "KOG_CNT_LM": 1, "KOG_CNT_STOP": 2,
         "KOG_CNT_KV": 3, "KOG_CNT_DYN": 3 + n, "KOG_CNT_CANCEL": 3 + n + n_layers + 1,
         "KOG_CNT_OVERFLOW": 3 + n + n_layers + 2, "KOG_CNT_SAMPLE": 3 + n + n_layers + 3}
    d["KOG_N_COUNTERS"] = 3 + n + n_layers + 4
    return d


# The sampler's workspace (sampling.cuh, KogParams::sample_ws): two halves (step parity) of six
# radix rounds' 2,048 counts + 2,048 masses, 8 scalars and two tie counts a block.
SAMPLE_WS_MAX_BLOCKS = 1024
SAMPLE_WS_WORDS = 2 * (6 * 2 * 2048 + 8 + 2 * SAMPLE_WS_MAX_BLOCKS)


# Rows of the tensor-parallel peer table (KogParams::tp_peers): row f, column q = rank q's
# buffer of that kind. Emitted as KOG_PEER_<NAME> defines; the stride is KCCL_MAX_RANKS (8).
TP_PEER_FIELDS = ("xpart", "logits", "lm_part_val", "lm_part_idx", "counters")
TP_MAX_RANKS = 8


def peer_defines() -> dict[str, int]:
    return {f"KOG_PEER_{name.upper()}": i for i, name in enumerate(TP_PEER_FIELDS)}


PARTITION_COLUMNS = ("qkv_begin", "qkv_end", "o_begin", "o_end", "gate_up_begin", "gate_up_end",
                     "down_begin", "down_end", "lm_begin", "lm_end")
