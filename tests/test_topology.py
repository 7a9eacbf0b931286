"""The topology model (kogcupy/gpu/topology.py) on the CPU: the MI300X description and the
grouping of SMs by a latency probe's profile (synthetic measurements)."""
import json
from dataclasses import asdict

import numpy as np

from kogcupy.gpu import topology as T


def test_mi300x_description():
    topo = T.mi300x()
    assert len(topo.domains) == 8 and all(len(d) == 38 for d in topo.domains)
    assert sorted(sum(topo.domains, [])) == list(range(304))
    assert topo.parents == [0, 0, 1, 1, 2, 2, 3, 3]            # 2 XCDs per I/O die
    assert topo.domain_of(0) == 0 and topo.domain_of(303) == 7 and topo.domain_of(38) == 1
    per_xcd = np.bincount([T.mi300x_block_xcd(b) for b in range(T.MI300X_GRID)], minlength=8)
    assert per_xcd.tolist() == [32] * 8                        # 256 of 304 CUs, 32 per XCD
    assert [T.mi300x_block_iod(b) for b in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert T.MI300X_BLOCK == (64, 8)


def _synthetic(rng, n_sm=132, n_lines=256, near=210.0, far=290.0, noise=6.0):
    sm_ids = rng.permutation(n_sm)                             # launch order != SM id
    side = (sm_ids // 2) % 2 == 1                              # interleaved, as TPC pairs are
    home = rng.random(n_lines) < 0.5
    lat = np.where(side[:, None] == home[None, :], near, far)
    return lat + rng.normal(0, noise, lat.shape), sm_ids, side


def test_split_domains_recovers_the_partitions():
    rng = np.random.default_rng(1)
    lat, sm_ids, side = _synthetic(rng)
    domains, near, far = T.split_domains(lat, sm_ids)
    want = sorted([sorted(sm_ids[side].tolist()), sorted(sm_ids[~side].tolist())], key=lambda g: g[0])
    assert domains == want
    assert abs(near - 210) < 2 and abs(far - 290) < 2


def test_split_domains_uniform_gpu_is_one_domain():
    rng = np.random.default_rng(2)
    lat, sm_ids, _ = _synthetic(rng, near=250.0, far=252.0)    # < MIN_GAP apart
    domains, near, far = T.split_domains(lat, sm_ids)
    assert domains == [sorted(sm_ids.tolist())] and near == far


def test_topology_describe_and_cache_round_trip():
    topo = T.Topology("GPU X", "l2-partitions", [[0, 1, 2, 5], [3, 4]], 200.0, 280.0)
    text = "\n".join(topo.describe())
    assert "2 domain(s)" in text and "ids 0-2,5" in text and "+40%" in text
    assert T.Topology(**json.loads(json.dumps(asdict(topo)))) == topo


def test_cache_is_per_chip(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a = T._cache_path("NVIDIA H200", T._uuid({"uuid": bytes(range(16))}))
    b = T._cache_path("NVIDIA H200", T._uuid({"uuid": bytes(range(1, 17))}))
    assert a != b and a.parent == tmp_path / "kogcupy" and "000102" in a.name
