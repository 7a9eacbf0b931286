"""The GPU's memory domains and which multiprocessors (SMs / CUs) belong to each.

* AMD MI300X (gfx942): 8 XCDs (accelerator dies) of 38 CUs over 4 I/O dies (2 XCDs each). The
  monokernel's grid there is 256 blocks of (64, 8) threads, 32 per XCD; workgroups are handed
  to the XCDs round-robin (block b runs on XCD b % 8), and the kernel can read its XCD from the
  hardware register XCC_ID (kernels_src/topology_probe.cu). ``mi300x()`` is that description.
* NVIDIA: the L2 is split in partitions; an SM reads a line homed in the far partition through
  the crossbar between them, slower. ``probe()`` measures it (kernels_src/topology_probe.cu:
  every SM's latency to a set of L2 lines) and ``split_domains`` groups the SMs by their
  latency profile; the result is cached per chip (name + UUID).

    topo = topology()          # this GPU (probed once, then cached)
    topo.domain_of(sm_id)      # which domain an SM / CU belongs to
    print(topo.describe())

The monokernel kept one copy of x per domain (per I/O die on the MI300X), read through an
SM -> domain table, until x became L2 residual sums (2026-12-04, kernels_src/PERF.md); nothing
is placed by domain now, so the table went too (`kogcupy env` still reports the domains).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

PROBE_LINES = 256          # L2 lines probed
PROBE_STRIDE = 4096 + 128  # bytes between probed lines (spread over the address hash)
PROBE_REPS = 64            # dependent loads per (SM, line)
MIN_GAP = 0.04             # far must exceed near by 4% for two domains to be reported


@dataclass
class Topology:
    gpu: str
    kind: str                          # "l2-partitions" | "mi300x" | "uniform"
    domains: list[list[int]]           # SM / CU ids of each domain
    near_cycles: float = 0.0           # mean L2 latency to a line of the SM's own domain
    far_cycles: float = 0.0            # ... to a line of another domain
    notes: str = ""
    parents: list[int] = field(default_factory=list)   # MI300X: the IOD of each domain (XCD)

    def domain_of(self, sm: int) -> int:
        for d, members in enumerate(self.domains):
            if sm in members:
                return d
        raise KeyError(f"SM/CU {sm} is in no domain of {self.gpu}")

    def describe(self) -> list[str]:
        lines = [f"{self.kind}: {len(self.domains)} domain(s) on {self.gpu}"]
        for d, m in enumerate(self.domains):
            parent = f" (IOD {self.parents[d]})" if self.parents else ""
            lines.append(f"  domain {d}{parent}: {len(m)} units, ids {_ranges(m)}")
        if self.near_cycles:
            lines.append(f"  L2 latency near {self.near_cycles:.0f} / far {self.far_cycles:.0f} "
                         f"cycles ({self.far_cycles / self.near_cycles - 1:+.0%})")
        if self.notes:
            lines.append(f"  {self.notes}")
        return lines


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, ids = [], sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


# ---- AMD MI300X --------------------------------------------------------------------------
MI300X_XCDS = 8
MI300X_CUS_PER_XCD = 38
MI300X_IODS = 4
MI300X_GRID = 256              # blocks: 32 of the 38 CUs of each XCD
MI300X_BLOCK = (64, 8)         # threads: one wave of 64 x 8


def mi300x() -> Topology:
    """The MI300X as the monokernel sees it: one domain per XCD, each XCD's I/O die in
    ``parents``. Unit ids are this model's own numbering, xcd * 38 + cu (the kernel looks up
    xcc * 38, from the XCC_ID register), not HIP's __smid() layout. Untested on the hardware
    (no MI300X lent)."""
    domains = [list(range(x * MI300X_CUS_PER_XCD, (x + 1) * MI300X_CUS_PER_XCD))
               for x in range(MI300X_XCDS)]
    parents = [x // (MI300X_XCDS // MI300X_IODS) for x in range(MI300X_XCDS)]
    return Topology("AMD Instinct MI300X", "mi300x", domains, parents=parents,
                    notes=f"grid {MI300X_GRID} blocks x {MI300X_BLOCK}, "
                          f"{MI300X_GRID // MI300X_XCDS} per XCD, block b on XCD b % {MI300X_XCDS}")


def mi300x_block_xcd(block: int) -> int:
    """The XCD a block of the MI300X grid runs on (round-robin dispatch)."""
    return block % MI300X_XCDS


def mi300x_block_iod(block: int) -> int:
    return mi300x_block_xcd(block) // (MI300X_XCDS // MI300X_IODS)


# ---- NVIDIA: measured --------------------------------------------------------------------
def split_domains(lat: np.ndarray, sm_ids: np.ndarray) -> tuple[list[list[int]], float, float]:
    """Group SMs by their L2 latency profile. `lat` (n_sm, n_lines) cycles, row i measured on
    SM sm_ids[i]. The first principal component of the per-line centred latencies splits the
    SMs in two; a line's home is the side that reads it faster. Returns (domains, near, far);
    one domain (near = far = the mean) when the two sides differ by less than MIN_GAP."""
    lat = np.asarray(lat, dtype=np.float64)
    sm_ids = np.asarray(sm_ids)
    one = ([sorted(int(s) for s in sm_ids)], float(lat.mean()), float(lat.mean()))
    if lat.shape[0] < 2:
        return one
    m = lat - lat.mean(axis=0, keepdims=True)
    u, _, _ = np.linalg.svd(m, full_matrices=False)
    side = u[:, 0] >= 0
    if side.all() or not side.any():
        return one
    a, b = lat[side].mean(axis=0), lat[~side].mean(axis=0)
    home_a = a < b                                     # lines the first side reads faster
    if home_a.all() or not home_a.any():
        return one
    near = np.concatenate([lat[side][:, home_a].ravel(), lat[~side][:, ~home_a].ravel()]).mean()
    far = np.concatenate([lat[side][:, ~home_a].ravel(), lat[~side][:, home_a].ravel()]).mean()
    if far < near * (1 + MIN_GAP):
        return one
    groups = [sorted(int(s) for s in sm_ids[side]), sorted(int(s) for s in sm_ids[~side])]
    groups.sort(key=lambda g: g[0])
    return groups, float(near), float(far)


def probe(lines: int = PROBE_LINES, reps: int = PROBE_REPS) -> dict:
    """Run the latency probe on the current GPU: {"sm_ids", "xcc_ids", "lat" (n_sm, lines)}."""
    from . import kernels
    cp = kernels._cupy()
    dev = cp.cuda.Device()
    n_sm = int(dev.attributes["MultiProcessorCount"])
    smem = int(dev.attributes["MaxSharedMemoryPerMultiprocessor"]) // 2 + 1024
    stride_words = PROBE_STRIDE // 4
    buf = cp.zeros(lines * stride_words + 32, cp.uint32)      # zeros: the chain stays in place
    turn = cp.zeros(2, cp.uint32)                             # ticket, serving
    ids = cp.zeros(2 * n_sm, cp.uint32)
    lat = cp.full(n_sm * lines, np.nan, cp.float32)
    mod = kernels.load_module(kernels.topology_probe_source(), {})
    fn = kernels.get_function(mod, "kog_topology_probe")
    if smem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = smem
    fn((n_sm,), (32,), (buf, np.int32(lines), np.int32(stride_words), np.int32(reps), turn,
                        ids, lat), shared_mem=smem)
    cp.cuda.runtime.deviceSynchronize()
    ids = cp.asnumpy(ids).reshape(n_sm, 2)
    return {"sm_ids": ids[:, 0], "xcc_ids": ids[:, 1],
            "lat": cp.asnumpy(lat).reshape(n_sm, lines)}


def _cache_path(gpu: str, uuid: str) -> Path:
    """Per chip (its UUID), not per model: which SMs are fused off differs chip to chip."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{gpu}-{uuid}" if uuid else gpu)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kogcupy" / f"topo2-{safe}.json"


def _uuid(props: dict) -> str:
    u = props.get("uuid", b"")
    if isinstance(u, (bytes, bytearray)):
        return u.hex()
    return str(u or f"pci{props.get('pciDomainID', 0)}-{props.get('pciBusID', 0)}-"
                       f"{props.get('pciDeviceID', 0)}")


def topology(refresh: bool = False) -> Topology:
    """This GPU's topology: the MI300X description on gfx942, else measured (cached per chip
    -- GPU name and UUID -- under $XDG_CACHE_HOME/kogcupy)."""
    from . import kernels
    cp = kernels._cupy()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name, arch = kernels.device_strings(props)
    if arch.startswith("gfx942"):
        return mi300x()
    path = _cache_path(name, _uuid(props))
    if not refresh and path.is_file():
        try:
            return Topology(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            pass
    res = probe()
    domains, near, far = split_domains(res["lat"], res["sm_ids"])
    topo = Topology(name, "l2-partitions" if len(domains) > 1 else "uniform", domains, near, far,
                    notes=f"probe: {PROBE_LINES} L2 lines x {PROBE_REPS} dependent loads per SM")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(topo)))
    except OSError:
        pass
    return topo
