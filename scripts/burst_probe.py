"""Device probe (kernels_src/burst_probe.cu): how fast a one-shot burst of weight loads drains
on this GPU, and when a block's read of a 2,048-word residual sum issued behind its loads comes
back -- the measurement behind KOG_QKV_EARLY (kernels_src/PERF.md). 132 blocks of 512 threads
(the monokernel's grid on an H100 / H200), a tile 4 KB a warp (two GEMV tiles); each launch
reads weights not in L2; medians over 55 launches of the per-block stamps, us from the first
block's start. A build that spills (its loads would no longer be one burst) is not run.

    python scripts/burst_probe.py          # bursts of 1 / 2 tiles a warp, with the sum's
                                           # adds and reads beside them, and streams
    python scripts/burst_probe.py idle     # half the blocks burst, the other half only read
"""
import sys
if {"-h", "--help"} & set(sys.argv[1:]):      # usage: the docstring above
    print(__doc__.strip())
    sys.exit(0)

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402

from kogcupy.gpu import kernels  # noqa: E402

BLOCKS, WARPS, TILE_BYTES = 132, 16, 4096
BUFFER = 4 << 30                               # weights: 4 GiB, so that no launch hits L2


def probe(tiles: int, mode: int, stream_tiles: int = 0, reps: int = 60) -> dict:
    fn = _functions[tiles]
    per = BLOCKS * WARPS * (stream_tiles or tiles) * TILE_BYTES
    n_regions = BUFFER // per
    scale = 10.0 if kernels.is_hip() else 1.0   # globaltimer: 10-ns ticks on AMD
    rows = []
    for r in range(reps):
        off = ((r * 7919) % n_regions) * per
        s = _sum[(r % 64) * 2048:]
        s[:2048].fill(3)
        _stamps.fill(0)
        fn((BLOCKS,), (WARPS * 32,), (_w.data + off, s.data, _stamps, _sink, np.int32(mode),
                                      np.int32(stream_tiles)))
        cp.cuda.Device().synchronize()
        st = _stamps.get().reshape(BLOCKS, 3).astype(np.int64)
        t0 = st[:, 0].min()
        end, read = (st[:, 2] - t0) * scale, (st[:, 1] - t0) * scale
        if mode & 4:       # the bursting (odd) blocks' end; the idle (even) blocks' read, theirs
            rows.append((np.median(end[1::2]), end[1::2].max(), np.median(read[0::2]), np.median(read[1::2])))
        else:
            rows.append((np.median(end), end.max(), np.median(read) if mode & 2 else np.nan, np.nan))
    m = np.median(np.array(rows[5:]), axis=0) / 1e3
    return dict(tiles=tiles, stream=stream_tiles, mode=mode, MB=per / 1e6, end=m[0], end_max=m[1],
                read=m[2], read_other=m[3])


def main(idle: bool) -> None:
    print(f"{kernels.device_strings(cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id))[0]}, "
          f"{BLOCKS} blocks x {WARPS} warps, a tile {TILE_BYTES // 1024} KB a warp (two GEMV tiles); us")
    if idle:
        for tiles in sorted(_functions):
            r = probe(tiles, 6)
            print(f"tiles {tiles}: half the blocks burst ({r['MB'] / 2:.1f} MB): read back on the idle "
                  f"blocks {r['read']:.2f}, on the bursting blocks {r['read_other']:.2f}, burst end "
                  f"{r['end']:.2f} / {r['end_max']:.2f} (median / last bursting block)")
        return
    print("tiles  stream  mode       MB  end50  endmax  read50  TB/s (MB / endmax)")
    print("  (mode: 1 = the even blocks red.add into the sum, 2 = every block reads it, 3 = both;")
    print("   stream: tiles a warp streamed two in flight, instead of a burst)")
    rows = [probe(t, m) for t in sorted(_functions) for m in (0, 1, 2, 3)]
    rows += [probe(2, 0, n) for n in (8, 32, 64)]
    for r in rows:
        tiles = "-" if r["stream"] else str(r["tiles"])
        print(f"{tiles:>5} {r['stream']:7d} {r['mode']:5d} {r['MB']:8.2f} {r['end']:6.2f} "
              f"{r['end_max']:7.2f} {r['read']:7.2f} {r['MB'] / r['end_max']:5.2f}")


if __name__ == "__main__":
    _w = cp.random.randint(0, 2**31, size=BUFFER // 4, dtype=cp.uint32)
    _sum = cp.zeros(2048 * 64, dtype=cp.uint64)
    _stamps = cp.zeros(BLOCKS * 3, dtype=cp.uint64)
    _sink = cp.zeros(4, dtype=cp.uint32)
    if sys.argv[1:] not in ([], ["idle"]):
        raise SystemExit(f"burst_probe.py: unknown arguments {sys.argv[1:]} (none, or 'idle'; --help)")
    src = kernels.inline_source("burst_probe.cu")
    _functions = {}
    for t in (1, 2):               # (4 tiles need 128 registers of loads a thread: it spills)
        fn = kernels.get_function(kernels.load_module(src, {"TILES": t}), "kog_burst_probe")
        spill = int(getattr(fn, "attributes", {}).get("local_size_bytes", 0))
        if spill > 0:                                             # no longer one burst
            print(f"tiles {t}: the kernel spills ({spill} bytes a thread): not run")
            continue
        _functions[t] = fn
    main(len(sys.argv) > 1)
