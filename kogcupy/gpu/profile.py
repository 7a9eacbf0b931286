"""The in-kernel timeline profiler's host side (`kogcupy profile`): pure functions from the
%globaltimer stamps of MonokernelBackend(profile_pos=N).stage_profile() to a Chrome/Perfetto
trace (Trace Event Format JSON, opens in ui.perfetto.dev) and to summary rows. NumPy only.

A stamp array is (blocks, n_layers * 16 + 8) uint64 nanoseconds, 0 = not recorded. The slot
map (kernels_src/sync.cuh, kog_prof): layer * 16 + stage * 3 + {0 start, 1 inputs ready,
2 end} for the stages qkv, attention, o_proj, gate_up, down, and layer * 16 + 15 when an
attention unit's chunk starts (its q normed and roped, thread 0's share of the k, v append
issued); the LM head at L * 16 + {0, 1, 2}, the sampler at L * 16 + {3, 4, 5}. A block that
runs several units (or o_proj items) in a layer keeps its last one's stamps. A block takes
part in a stage when its inputs-ready stamp is recorded (blocks without rows stamp start and
end only). Traces with the chunk slice are not read by kogcupy before it (2026-12-07).

Several GPUs: one array per rank; the trace puts them on one time base with rank 0's earliest
stamp as zero. %globaltimer is per GPU, so the cross-GPU alignment is approximate.
"""
from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence

import numpy as np

STAGES = ("qkv", "attention", "o_proj", "gate_up", "down")
SLOTS_PER_LAYER = 16
TAIL_SLOTS = 8
CHUNK_SLOT = 15            # layer * 16 + 15: an attention unit's chunk starts
CHUNK = "attention chunk"  # its slice: the chunk's start .. the attention's end


def n_layers_of(stamps: np.ndarray) -> int:
    """The layer count a (blocks, L * 16 + 8) stamp array was recorded for."""
    if stamps.ndim != 2 or stamps.shape[1] < TAIL_SLOTS \
            or (stamps.shape[1] - TAIL_SLOTS) % SLOTS_PER_LAYER:
        raise ValueError(f"stamps must be (blocks, n_layers * 16 + 8), got {stamps.shape}")
    return (stamps.shape[1] - TAIL_SLOTS) // SLOTS_PER_LAYER


def stage_slots(n_layers: int) -> list[tuple[str, int | None, int]]:
    """(stage, layer or None, first slot) in execution order: every layer's five stages, then
    the LM head and the sampler."""
    out = [(name, layer, layer * SLOTS_PER_LAYER + 3 * k)
           for layer in range(n_layers) for k, name in enumerate(STAGES)]
    tail = n_layers * SLOTS_PER_LAYER
    return out + [("lm_head", None, tail), ("sampler", None, tail + 3)]


def _us(ns: int) -> float:
    return int(ns) / 1000.0


def _as_list(profiles) -> list[np.ndarray]:
    if isinstance(profiles, np.ndarray):
        profiles = [profiles]
    out = [np.asarray(p).astype(np.int64) for p in profiles]
    if not out:
        raise ValueError("no stamp arrays")
    return out


def time_zero(profiles) -> int:
    """Rank 0's earliest recorded stamp (ns): the trace's zero for every GPU."""
    p0 = _as_list(profiles)[0]
    rec = p0[p0 > 0]
    if rec.size == 0:
        raise ValueError("rank 0 recorded no stamp")
    return int(rec.min())


def trace_events(profiles, t0: int | None = None) -> list[dict]:
    """Trace Event Format events: per GPU (pid = rank) a process_name, per block (tid = block)
    a thread_name, and "X" complete events (ts, dur in µs from t0): one per recorded stage
    (start..end, args layer), one per wait (start..inputs ready, named "<stage> wait") and, in
    an attention unit, one from its chunk's start to the stage's end ("attention chunk")."""
    profiles = _as_list(profiles)
    t0 = time_zero(profiles) if t0 is None else int(t0)
    meta, slices = [], []
    for pid, P in enumerate(profiles):
        n_layers = n_layers_of(P)
        meta.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                     "args": {"name": f"GPU {pid}"}})
        meta.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                     "args": {"sort_index": pid}})
        for b in range(P.shape[0]):
            meta.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": b,
                         "args": {"name": f"block {b}"}})
            meta.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": b,
                         "args": {"sort_index": b}})
        for name, layer, slot in stage_slots(n_layers):
            args = {} if layer is None else {"layer": layer}
            for b in range(P.shape[0]):
                s, i, e = (int(v) for v in P[b, slot:slot + 3])
                if s and e and e >= s:
                    slices.append({"ph": "X", "name": name, "cat": "stage", "pid": pid, "tid": b,
                                   "ts": _us(s - t0), "dur": _us(e - s), "args": args})
                if s and i and i >= s:
                    end = min(i, e) if e >= s else i   # nested inside the stage's slice
                    slices.append({"ph": "X", "name": f"{name} wait", "cat": "wait",
                                   "pid": pid, "tid": b, "ts": _us(s - t0),
                                   "dur": _us(end - s), "args": args})
                c = int(P[b, layer * SLOTS_PER_LAYER + CHUNK_SLOT]) if name == "attention" else 0
                if c and i and i <= c <= e:
                    slices.append({"ph": "X", "name": CHUNK, "cat": "part", "pid": pid,
                                   "tid": b, "ts": _us(c - t0), "dur": _us(e - c),
                                   "args": args})
    # per track by time, the longer (enclosing) slice first where two start together
    slices.sort(key=lambda ev: (ev["pid"], ev["tid"], ev["ts"], -ev["dur"]))
    return meta + slices


def trace(profiles, metadata: dict | None = None) -> dict:
    """The whole trace as a JSON-ready dict ("traceEvents", "displayTimeUnit", "otherData")."""
    return {"traceEvents": trace_events(profiles), "displayTimeUnit": "ns",
            "otherData": dict(metadata or {})}


def write_trace(path, profiles, metadata: dict | None = None) -> int:
    """Write the trace JSON to `path` (gzip-compressed when it ends in .gz, as Perfetto and
    chrome://tracing read it), whole or not at all (a temporary file renamed over it); the
    number of events written."""
    t = trace(profiles, metadata)
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.part"
    try:
        with (gzip.open if path.endswith(".gz") else open)(tmp, "wt", encoding="utf-8") as f:
            json.dump(t, f, separators=(",", ":"))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(t["traceEvents"])


def read_trace(path) -> dict:
    """A trace file's JSON, gzip-compressed or not (told by its first bytes, not its name)."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    with (gzip.open if gz else open)(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def _median(xs) -> float:
    return float(np.median(xs)) / 1000.0 if len(xs) else float("nan")


def _participants(P: np.ndarray, slot: int):
    """A stage's inputs-ready and end stamps over blocks, and which blocks took part (start,
    inputs ready and end recorded)."""
    s, i, e = P[:, slot], P[:, slot + 1], P[:, slot + 2]
    return i, e, (s > 0) & (i > 0) & (e > 0)


def summary_rows(stamps: np.ndarray) -> list[dict]:
    """One GPU's stages (µs): per stage name, medians over the participating blocks of every
    layer of time (end - start), wait (inputs ready - start) and work (end - inputs ready);
    medians over layers of hop (the stage's first inputs-ready stamp after the previous
    stage's last block end: the latency of the dependent hop), span (last end - the previous
    stage's last end: the stage's share of the critical path) and blocks (participants).
    The first stage of layer 0 has no previous stage (no hop, no span)."""
    P = np.asarray(stamps).astype(np.int64)
    order = stage_slots(n_layers_of(P))
    acc = {name: {"time": [], "wait": [], "work": [], "hop": [], "span": [], "blocks": []}
           for name, _, _ in order}
    prev_end = None
    for name, _, slot in order:
        s = P[:, slot]
        i, e, part = _participants(P, slot)
        a = acc[name]
        a["blocks"].append(int(part.sum()))
        if not part.any():
            continue
        a["time"] += list(e[part] - s[part])
        a["wait"] += list(i[part] - s[part])
        a["work"] += list(e[part] - i[part])
        last_end = int(e[part].max())
        if prev_end is not None:
            a["hop"].append(int(i[part].min()) - prev_end)
            a["span"].append(last_end - prev_end)
        prev_end = last_end
    rows = []
    for name in dict.fromkeys(n for n, _, _ in order):
        a = acc[name]
        rows.append({"stage": name, "blocks": int(np.median(a["blocks"])),
                     "time_us": _median(a["time"]), "wait_us": _median(a["wait"]),
                     "work_us": _median(a["work"]), "hop_us": _median(a["hop"]),
                     "span_us": _median(a["span"])})
    return rows


def attention_parts(stamps: np.ndarray) -> dict | None:
    """The attention units' work split at the chunk's start (µs, medians over the blocks that
    stamped it in every layer): "prep" (inputs ready .. chunk start: q's norm and RoPE, the k, v
    append) and "chunk" (chunk start .. end: the chunk over the cached positions, the partial's
    stores; tensor parallel, also the wait for the other chunks' partials); "units" the count
    of (block, layer) stamps. None when no unit stamped a chunk start."""
    P = np.asarray(stamps).astype(np.int64)
    prep, chunk = [], []
    for layer in range(n_layers_of(P)):
        slot = layer * SLOTS_PER_LAYER + 3 * STAGES.index("attention")
        i, e, part = _participants(P, slot)
        c = P[:, layer * SLOTS_PER_LAYER + CHUNK_SLOT]
        ok = part & (c >= i) & (c <= e) & (c > 0)
        prep += list(c[ok] - i[ok])
        chunk += list(e[ok] - c[ok])
    if not prep:
        return None
    return {"prep_us": _median(prep), "chunk_us": _median(chunk), "units": len(prep)}


def block_idle(stamps: np.ndarray) -> dict:
    """Per block (arrays over blocks, µs) within the GPU's step window (its earliest stamp to
    its latest): work (sum of end - inputs ready), wait (sum of inputs ready - start), gap
    (the window minus the block's stage slices) and idle = window - work; "window_us" the
    window. Stages a block does not take part in count as gap or wait, never as work."""
    P = np.asarray(stamps).astype(np.int64)
    rec = P[P > 0]
    if rec.size == 0:
        raise ValueError("no stamp recorded")
    window = int(rec.max() - rec.min())
    B = P.shape[0]
    work, wait, inside = np.zeros(B, np.int64), np.zeros(B, np.int64), np.zeros(B, np.int64)
    for _, _, slot in stage_slots(n_layers_of(P)):
        s, i, e = P[:, slot], P[:, slot + 1], P[:, slot + 2]
        both = (s > 0) & (e >= s) & (e > 0)
        inside += np.where(both, e - s, 0)
        part = both & (i >= s) & (i > 0) & (i <= e)
        work += np.where(part, e - i, 0)
        wait += np.where(part, i - s, 0)
    return {"window_us": window / 1000.0, "work_us": work / 1000.0, "wait_us": wait / 1000.0,
            "gap_us": (window - inside) / 1000.0, "idle_us": (window - work) / 1000.0}


GEMV_STAGES = ("qkv", "o_proj", "gate_up", "down")     # the layer stages that stream weights


def stage_mb(cfg, dtype_bytes: int = 2) -> dict:
    """MB of weights each GEMV stage of a layer streams on one GPU (`cfg`: that GPU's share),
    keyed by GEMV_STAGES."""
    h = cfg.hidden_size
    return {"qkv": cfg.qkv_dim * h * dtype_bytes / 1e6, "o_proj": h * cfg.q_dim * dtype_bytes / 1e6,
            "gate_up": 2 * cfg.intermediate_size * h * dtype_bytes / 1e6,
            "down": h * cfg.intermediate_size * dtype_bytes / 1e6}


def chain_rows(stamps: np.ndarray, mb: dict | None = None) -> list[dict]:
    """The layer's critical path, one GPU (µs): per layer stage, medians over layers 1.. of the
    first, median and last participating block's inputs-ready stamp and the last block's end,
    each measured from the previous layer's last down end (the layer's start as its qkv sees
    it). Where the chain waits shows as the gap from one stage's last end to the next one's
    readiness; where a stage's blocks spread, as first vs last. With `mb` (stage_mb), a GEMV
    stage's row also gets "tbs": its MB over the time from its median block's inputs to its
    last block's end, in TB/s -- the rate the stage streamed at once its input was there (weight
    tiles issued before the wait count too, so qkv and o_proj read high; gate_up's time also
    streams down's first rows, which its tail issues)."""
    P = np.asarray(stamps).astype(np.int64)
    cols = ("first", "median", "last", "last_end")
    acc = {name: {c: [] for c in cols} for name in STAGES}
    base = None                       # the previous layer's last down end (None: no down block)
    for layer in range(n_layers_of(P)):
        for k, name in enumerate(STAGES):
            i, e, part = _participants(P, layer * SLOTS_PER_LAYER + 3 * k)
            if base is not None and part.any():
                ready = np.sort(i[part]) - base
                for c, v in zip(cols, (ready[0], np.median(ready), ready[-1], e[part].max() - base)):
                    acc[name][c].append(v)
        _, e, part = _participants(P, layer * SLOTS_PER_LAYER + 3 * STAGES.index("down"))
        base = int(e[part].max()) if part.any() else None
    rows = [{"stage": name, **{c + "_us": _median(acc[name][c]) for c in cols}} for name in STAGES]
    for r in rows:
        if mb and r["stage"] in mb:
            span = r["last_end_us"] - r["median_us"]
            r["tbs"] = mb[r["stage"]] / span if span > 0 else float("nan")
    return rows


def stamps_from_trace(trace_json: dict) -> list[np.ndarray]:
    """A trace written by write_trace back to its stamp arrays (one per GPU, ns from the
    trace's earliest slice + 1 µs, so that no recorded stamp reads 0): the summaries of a saved
    trace. A stamp that never made a slice (a start without its end) stays unrecorded, and an
    inputs-ready stamp after its stage's end reads as the end. ValueError for anything else."""
    if not isinstance(trace_json, dict) or not isinstance(trace_json.get("traceEvents"), list):
        raise ValueError("no traceEvents list")
    events = [e for e in trace_json["traceEvents"] if isinstance(e, dict) and e.get("ph") == "X"]
    if not events:
        raise ValueError("the trace has no stage slices")
    names = set(STAGES) | {"lm_head", "sampler", CHUNK}
    blocks, n_layers, slices = {}, 0, []      # slices: (pid, tid, (stage, layer), wait, ts, dur)
    try:
        for e in events:
            wait = e["cat"] == "wait"
            name = e["name"][:-len(" wait")] if wait else e["name"]
            layer = e["args"].get("layer")
            pid, tid, ts, dur = e["pid"], e["tid"], float(e["ts"]), float(e["dur"])
            ints = all(type(v) is int for v in (pid, tid, 0 if layer is None else layer))
            if not ints or name not in names or (layer is None) != (name in ("lm_head", "sampler")) \
                    or not (layer is None or 0 <= layer < 4096) or not 0 <= pid < 64 \
                    or not 0 <= tid < 65536 or not dur >= 0:
                raise ValueError(f"not a kogcupy profile slice: {e!r:.120}")
            blocks[pid] = max(blocks.get(pid, 0), tid + 1)
            n_layers = max(n_layers, 1 + (layer if layer is not None else -1))
            slices.append((pid, tid, (name, layer), wait, ts, dur))
        t_min = min(sl[4] for sl in slices)
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"a slice without its fields ({err!r})") from None
    for e in trace_json["traceEvents"]:          # tracks with no slice keep their row
        if isinstance(e, dict) and e.get("name") == "thread_name" and e.get("pid") in blocks \
                and isinstance(e.get("tid"), int) and 0 <= e["tid"] < 65536:
            blocks[e["pid"]] = max(blocks[e["pid"]], e["tid"] + 1)
    slot_of = {(name, layer): slot for name, layer, slot in stage_slots(n_layers)}
    out = [np.zeros((blocks.get(pid, 0), n_layers * SLOTS_PER_LAYER + TAIL_SLOTS), np.int64)
           for pid in range(1 + max(blocks))]
    for pid, tid, key, wait, ts, dur in slices:
        s = 1000 + round((ts - t_min) * 1000)
        if key[0] == CHUNK:                    # its end is the attention slice's
            out[pid][tid, key[1] * SLOTS_PER_LAYER + CHUNK_SLOT] = s
            continue
        slot = slot_of[key]
        out[pid][tid, slot] = s
        out[pid][tid, slot + (1 if wait else 2)] = s + round(dur * 1000)
    return out


def format_chain(rows: Sequence[dict]) -> str:
    """chain_rows as a text table."""
    cols = ("first_us", "median_us", "last_us", "last_end_us")
    lines = ["the layer's critical path: us after the previous layer's last down end, median "
             "over layers;", "inputs ready (first / median / last block), last block's end",
             f"{'stage':10s} " + " ".join(f"{c[:-3]:>8s}" for c in cols)]
    rate = any("tbs" in r for r in rows)
    if rate:
        lines[1] += ("; TB/s: the stage's weights (MB) over last_end - median (reads high where "
                     "tiles are issued before the wait)")
        lines[2] += f" {'TB/s':>8s}"
    for r in rows:
        lines.append(f"{r['stage']:10s} " + " ".join(f"{r[c]:8.2f}" for c in cols)
                     + (f" {r['tbs']:8.2f}" if "tbs" in r else ""))
    return "\n".join(lines)


def format_summary(rows: Sequence[dict], idle: dict | None = None,
                   parts: dict | None = None) -> str:
    """The summary rows (and block_idle's medians / extremes, attention_parts) as a text
    table."""
    cols = ("time_us", "wait_us", "work_us", "hop_us", "span_us")
    lines = [f"{'stage':10s} {'blocks':>6s} " + " ".join(f"{c:>8s}" for c in cols)]
    for r in rows:
        lines.append(f"{r['stage']:10s} {r['blocks']:6d} "
                     + " ".join(f"{r[c]:8.2f}" for c in cols))
    if parts is not None:
        lines.append(f"attention's work, median over {parts['units']} units x layers: "
                     f"q norm / RoPE / k, v append {parts['prep_us']:.2f} us, "
                     f"chunk + partial {parts['chunk_us']:.2f} us")
    if idle is not None:
        w = idle["window_us"]
        lines.append(f"per block over the {w:.1f} us step (median / min / max over blocks):")
        for k in ("work_us", "wait_us", "gap_us", "idle_us"):
            v = idle[k]
            lines.append(f"  {k[:-3]:5s} {np.median(v):8.1f} {v.min():8.1f} {v.max():8.1f} us"
                         + (f"  ({100 * np.median(v) / w:.0f}% of the step)"
                            if k == "idle_us" and w > 0 else ""))
    return "\n".join(lines)
