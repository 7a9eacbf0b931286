"""`kogcupy profile` without a GPU: the stamp -> trace / summary conversion
(kogcupy/gpu/profile.py) on synthetic stamp arrays with known durations, and the CLI's checks
and output with the GPU side faked."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import kogcupy.cli
from kogcupy.cli import cli
from kogcupy.gpu import profile as prof

T0 = 1_700_000_000_000_000_000          # a %globaltimer-like epoch (ns)
STEP, WAIT, DUR, SKEW = 1000, 200, 700, 10   # stage pitch, start->inputs, start->end, per block


def synthetic(blocks=3, layers=2, offset=0):
    """Stage j (execution order) on block b: start T0 + j*STEP + b*SKEW, inputs ready WAIT
    later, end DUR after the start."""
    P = np.zeros((blocks, layers * 16 + 8), np.uint64)
    for j, (_, _, slot) in enumerate(prof.stage_slots(layers)):
        for b in range(blocks):
            s = T0 + offset + j * STEP + b * SKEW
            P[b, slot:slot + 3] = (s, s + WAIT, s + DUR)
    return P


def xs(events, **match):
    return [e for e in events if e["ph"] == "X" and all(e.get(k) == v for k, v in match.items())]


def test_stage_slots_follow_the_kernel_slot_map():
    slots = prof.stage_slots(2)
    assert slots[:6] == [("qkv", 0, 0), ("attention", 0, 3), ("o_proj", 0, 6),
                         ("gate_up", 0, 9), ("down", 0, 12), ("qkv", 1, 16)]
    assert slots[-2:] == [("lm_head", None, 32), ("sampler", None, 35)]
    with pytest.raises(ValueError, match="n_layers"):
        prof.n_layers_of(np.zeros((4, 30)))


def test_known_durations_give_exact_slices():
    P = synthetic(blocks=3, layers=2)
    ev = prof.trace_events(P)
    assert len(xs(ev, cat="stage")) == 3 * 12 and len(xs(ev, cat="wait")) == 3 * 12
    # o_proj of layer 1 is stage j = 7; block 2
    [o] = xs(ev, name="o_proj", tid=2, args={"layer": 1})
    assert o["pid"] == 0 and o["ts"] == (7 * STEP + 2 * SKEW) / 1000 and o["dur"] == DUR / 1000
    [w] = xs(ev, name="o_proj wait", tid=2, args={"layer": 1})
    assert w["ts"] == o["ts"] and w["dur"] == WAIT / 1000
    [lm] = xs(ev, name="lm_head", tid=0)
    assert lm["ts"] == 10 * STEP / 1000 and lm["args"] == {}
    assert min(e["ts"] for e in xs(ev)) == 0.0                 # the earliest stamp is zero
    names = {e["tid"]: e["args"]["name"] for e in ev if e.get("name") == "thread_name"}
    assert names == {0: "block 0", 1: "block 1", 2: "block 2"}
    # on each track the enclosing stage comes before its wait
    track = [e["name"] for e in xs(ev, tid=1)]
    assert track[:4] == ["qkv", "qkv wait", "attention", "attention wait"]


def test_unrecorded_zeros_are_skipped():
    P = synthetic(blocks=3, layers=2)
    P[2, 3:6] = 0                     # block 2 never reached attention of layer 0
    P[1, 7] = 0                       # block 1 had no o_proj rows (no inputs-ready stamp)
    P[0, 14] = 0                      # block 0's down end lost
    ev = prof.trace_events(P)
    assert not xs(ev, tid=2, name="attention", args={"layer": 0})
    assert not xs(ev, tid=2, name="attention wait", args={"layer": 0})
    assert len(xs(ev, tid=1, name="o_proj", args={"layer": 0})) == 1
    assert not xs(ev, tid=1, name="o_proj wait", args={"layer": 0})
    assert not xs(ev, tid=0, name="down", args={"layer": 0})
    [w] = xs(ev, tid=0, name="down wait", args={"layer": 0})
    assert w["dur"] == WAIT / 1000
    assert len(xs(ev)) == 2 * 3 * 12 - 2 - 1 - 1
    P[2, 16 + 3:16 + 6] = 0           # ... nor attention of layer 1
    rows = {r["stage"]: r for r in prof.summary_rows(P)}
    assert rows["attention"]["blocks"] == 2 and rows["qkv"]["blocks"] == 3
    assert rows["attention"]["time_us"] == DUR / 1000
    idle = prof.block_idle(P)
    assert idle["work_us"][2] == pytest.approx(10 * (DUR - WAIT) / 1000)
    assert idle["work_us"][1] == pytest.approx(11 * (DUR - WAIT) / 1000)


def test_several_gpus_share_rank_0s_time_base():
    ev = prof.trace_events([synthetic(blocks=2), synthetic(blocks=3, offset=5000)])
    assert {e["pid"] for e in ev} == {0, 1}
    procs = {e["pid"]: e["args"]["name"] for e in ev if e["name"] == "process_name"}
    assert procs == {0: "GPU 0", 1: "GPU 1"}
    [a] = xs(ev, pid=0, tid=1, name="down", args={"layer": 1})
    [b] = xs(ev, pid=1, tid=1, name="down", args={"layer": 1})
    assert b["ts"] - a["ts"] == 5.0
    assert not xs(ev, pid=0, tid=2) and xs(ev, pid=1, tid=2)
    assert prof.time_zero([synthetic(offset=5000), synthetic()]) == T0 + 5000


def test_trace_json_loads_with_the_required_keys(tmp_path):
    path = tmp_path / "trace.json"
    n = prof.write_trace(path, [synthetic(), synthetic(offset=300)], {"model": "x"})
    t = json.loads(path.read_text())
    assert set(t) >= {"traceEvents", "displayTimeUnit"} and len(t["traceEvents"]) == n
    assert t["otherData"] == {"model": "x"}
    for e in t["traceEvents"]:
        assert e["ph"] in ("X", "M") and isinstance(e["pid"], int) and isinstance(e["tid"], int)
        if e["ph"] == "X":
            assert {"name", "ts", "dur", "cat"} <= set(e) and e["dur"] >= 0
    assert sum(e["name"] == "thread_name" for e in t["traceEvents"]) == 2 * 3
    # .gz: compressed (what the name promises), read back by content; no part file left
    gz = tmp_path / "trace.json.gz"
    assert prof.write_trace(gz, [synthetic(), synthetic(offset=300)], {"model": "x"}) == n
    assert gz.read_bytes()[:2] == b"\x1f\x8b" and prof.read_trace(gz) == t == prof.read_trace(path)
    (tmp_path / "plain.json.gz").write_bytes(path.read_bytes())
    assert prof.read_trace(tmp_path / "plain.json.gz") == t
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.json.gz", "trace.json", "trace.json.gz"]
    with pytest.raises(TypeError):                  # a failed write leaves the old trace whole
        prof.write_trace(gz, [synthetic()], {"model": object()})
    assert prof.read_trace(gz) == t and len(list(tmp_path.iterdir())) == 3


def test_summary_rows_and_idle():
    P = synthetic(blocks=3, layers=2)
    rows = prof.summary_rows(P)
    assert [r["stage"] for r in rows] == [*prof.STAGES, "lm_head", "sampler"]
    hop = (STEP + WAIT - 2 * SKEW - DUR) / 1000      # first inputs - previous last end
    for r in rows:
        assert r["blocks"] == 3
        assert r["time_us"] == DUR / 1000 and r["wait_us"] == WAIT / 1000
        assert r["work_us"] == (DUR - WAIT) / 1000
        assert r["hop_us"] == pytest.approx(hop) and r["span_us"] == STEP / 1000
    idle = prof.block_idle(P)
    window = (11 * STEP + 2 * SKEW + DUR) / 1000
    assert idle["window_us"] == window
    np.testing.assert_allclose(idle["work_us"], 12 * (DUR - WAIT) / 1000)
    np.testing.assert_allclose(idle["idle_us"], window - 12 * (DUR - WAIT) / 1000)
    np.testing.assert_allclose(idle["gap_us"], window - 12 * DUR / 1000)
    text = prof.format_summary(rows, idle)
    assert "gate_up" in text and "idle" in text and "% of the step" in text


def test_one_slow_stage_shows_in_its_row_only():
    """A slot-map error (stage k read from stage k+-1's slots) fails here."""
    P = synthetic(blocks=3, layers=2)
    P[:, 16 + 9 + 2] += 5000          # gate_up of layer 1 ends 5 us later on every block
    rows = {r["stage"]: r for r in prof.summary_rows(P)}
    # median of three blocks at DUR - WAIT (layer 0) and three 5 us longer (layer 1)
    assert rows["gate_up"]["work_us"] == (DUR - WAIT + 2500) / 1000
    assert rows["down"]["work_us"] == (DUR - WAIT) / 1000
    assert rows["o_proj"]["work_us"] == (DUR - WAIT) / 1000
    assert rows["down"]["hop_us"] < 0              # layer 1's down saw its inputs "early"
    [g] = xs(prof.trace_events(P), tid=0, name="gate_up", args={"layer": 1})
    assert g["dur"] == (DUR + 5000) / 1000


def test_chain_rows_from_the_previous_layers_last_down_end():
    P = synthetic(blocks=3, layers=4)
    P[1, 2 * 16 + 3 + 1] += 4000      # block 1's attention inputs 4 us late, in layer 2 only
    P[0, 16 * np.arange(1, 4) + 6 + 1] += 3000   # block 0's o_proj inputs 3 us late, every layer
    P[2, 16 + 9 + 1] = 0              # block 2 took no part in layer 1's gate_up
    P = np.vstack([P, P[2:3]])        # block 3 takes part in no stage (start and end only) ...
    P[3, [16 * l + 3 * k + 1 for l in range(4) for k in range(5)]] = 0
    P[3, [16 * l + 3 * k + 2 for l in range(4) for k in range(5)]] += 5000   # ... and ends late
    rows = {r["stage"]: r for r in prof.chain_rows(P)}
    assert list(rows) == list(prof.STAGES)
    for k, name in enumerate(prof.STAGES):
        base = (k + 1) * STEP - 2 * SKEW - DUR         # a stage's block 0 inputs - WAIT
        r = rows[name]
        last = 3000 if name == "o_proj" else 2 * SKEW
        assert r["first_us"] == (base + WAIT + (SKEW if name == "o_proj" else 0)) / 1000, name
        assert r["median_us"] == (base + WAIT + (2 * SKEW if name == "o_proj" else SKEW)) / 1000
        assert r["last_us"] == (base + WAIT + last) / 1000, name     # (layer 2's outlier: a median)
        assert r["last_end_us"] == (k + 1) * STEP / 1000
    text = prof.format_chain(prof.chain_rows(P))
    assert "critical path" in text and "last_end" in text


def test_chain_rows_stream_rate():
    """With the stages' MB, a GEMV stage's row gives MB over (last end - median inputs ready)."""
    P = synthetic(blocks=3, layers=3)
    mb = {"qkv": 1.0, "o_proj": 2.0, "gate_up": 4.0, "down": 8.0}
    rows = {r["stage"]: r for r in prof.chain_rows(P, mb)}
    for name, m in mb.items():
        r = rows[name]
        assert r["tbs"] == pytest.approx(m / (r["last_end_us"] - r["median_us"])), name
    assert "tbs" not in rows["attention"]
    assert all("tbs" not in r for r in prof.chain_rows(P))
    text = prof.format_chain(list(rows.values()))
    assert "TB/s" in text and f"{rows['down']['tbs']:8.2f}" in text
    assert "TB/s" not in prof.format_chain(prof.chain_rows(P))
    from kogcupy.model.random_weights import shape_config
    q = prof.stage_mb(shape_config("qwen3-1.7b"))          # hidden 2,048, FFN 6,144, qkv 4,096
    assert q == pytest.approx({"qkv": 16.777216, "o_proj": 8.388608, "gate_up": 50.331648,
                               "down": 25.165824})


def test_attention_chunk_start_splits_the_units_work():
    P = synthetic(blocks=3, layers=2)
    assert prof.attention_parts(P) is None                  # no chunk stamp: no split
    for layer in range(2):
        a = layer * 16 + 3
        P[:2, layer * 16 + prof.CHUNK_SLOT] = P[:2, a + 1] + 100 * (layer + 1)   # blocks 0, 1
    P[2, 16 + prof.CHUNK_SLOT] = P[2, 16 + 3 + 2] + 1        # after its end: not a split
    ev = prof.trace_events(P)
    [c] = xs(ev, name=prof.CHUNK, tid=1, args={"layer": 1})
    [a] = xs(ev, name="attention", tid=1, args={"layer": 1})
    assert c["cat"] == "part" and c["ts"] == a["ts"] + (WAIT + 200) / 1000
    assert c["ts"] + c["dur"] == a["ts"] + a["dur"]         # it ends with the stage
    assert len(xs(ev, name=prof.CHUNK)) == 4
    parts = prof.attention_parts(P)
    assert parts == {"prep_us": 0.15, "chunk_us": (DUR - WAIT - 150) / 1000, "units": 4}
    back = prof.stamps_from_trace(prof.trace(P))[0]
    assert prof.attention_parts(back) == parts and prof.summary_rows(back) == prof.summary_rows(P)
    assert "q norm / RoPE / k, v append 0.15 us" in prof.format_summary(prof.summary_rows(P), None, parts)


def test_a_saved_trace_gives_the_same_tables(tmp_path):
    P0, P1 = synthetic(blocks=3, layers=3), synthetic(blocks=2, layers=3, offset=300)
    P0[1, 16 + 3 + 1] += 400          # block 1 sees attention's inputs late
    P0[2, 6:9] = 0                    # block 2 never reached o_proj of layer 0
    P1[0, 16 + 6 + 1] = 0             # (no inputs-ready stamp)
    path = tmp_path / "trace.json"
    prof.write_trace(path, [P0, P1])
    back = prof.stamps_from_trace(json.loads(path.read_text()))
    assert [b.shape for b in back] == [P0.shape, P1.shape]
    for P, B in zip((P0, P1), back):
        assert prof.summary_rows(B) == prof.summary_rows(P)
        assert prof.chain_rows(B) == prof.chain_rows(P)
        for k, v in prof.block_idle(P).items():
            np.testing.assert_array_equal(prof.block_idle(B)[k], v)
    with pytest.raises(ValueError, match="no stage slices"):
        prof.stamps_from_trace({"traceEvents": []})


# --------------------------------------------------------------------------------- CLI
def invoke(args):
    return CliRunner().invoke(cli, ["profile", *args])


def assert_user_error(r, match):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kogcupy: error:"), r.stderr
    assert match in lines[0], lines[0]


@pytest.fixture
def gpu_never_asked(monkeypatch):
    import kogcupy.engine as E
    import kogcupy.model.loader as ML

    def fail(*a, **kw):
        pytest.fail("the GPU or the model was touched before the argument checks")
    monkeypatch.setattr(E, "gpu_info", fail)
    monkeypatch.setattr(ML, "load_model", fail)


@pytest.mark.parametrize("args, match", [
    (["--model", "x", "--shape", "llama-3.2-1b"], "--model or --shape, not both"),
    (["--shape", "gpt-9"], "unknown --shape 'gpt-9'"),
    (["--position", "-1"], "--position must be >= 0"),
    (["--position", "100", "--new-tokens", "5"], "stops before --position 100"),
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--dtype", "fp8"], "'fp8' is not one of 'bfloat16', 'float16'"),
    (["--out", "/nonexistent/dir/t.json"], "does not exist"),
    (["--shape", "llama-3.2-1b", "--gpus", "3"], "does not divide"),
    (["--shape", "smollm2-135m", "--position", "9000"], "exceeds the 8192 positions"),
])
def test_checks_that_need_no_gpu_run_first(gpu_never_asked, args, match):
    assert_user_error(invoke(args), match)


def test_no_gpu_is_one_line(monkeypatch, tmp_path):
    import kogcupy.engine as E
    monkeypatch.setattr(E, "gpu_info", lambda: (False, "cupy sees no GPU"))
    assert_user_error(invoke(["--shape", "llama-3.2-1b", "--out", str(tmp_path / "t.json")]),
                      "kogcupy profile needs a GPU (cupy sees no GPU)")


def test_no_gpu_before_the_weights(tiny_dirs, monkeypatch):
    import kogcupy.engine as E
    import kogcupy.model.weights as W
    monkeypatch.setattr(E, "gpu_info", lambda: (False, "cupy sees no GPU"))
    monkeypatch.setattr(W, "pack_weights", lambda *a, **kw: pytest.fail("weights were read"))
    assert_user_error(invoke(["--model", tiny_dirs["llama"], "--position", "10"]),
                      "kogcupy profile needs a GPU")
    assert_user_error(invoke(["--model", tiny_dirs["llama"], "--position", "300"]),
                      "exceeds the 256 positions")


class _FakeBackend:
    """What the CLI uses of MonokernelBackend / TensorParallelBackend; stamps are synthetic."""

    def __init__(self, gpus, position):
        self.gpu_name, self.n_blocks = "Fake GPU", 3
        self.position = position
        self.started = None
        if gpus > 1:
            self.ranks = [_FakeRank(r) for r in range(gpus)]

    def start(self, ids, params, max_new, eos):
        self.started = (ids, max_new, eos)
        return iter(range(max_new))

    def stage_profile(self):
        return synthetic(blocks=3, layers=2)


class _FakeRank:
    def __init__(self, r):
        self.r = r

    def stage_profile(self):
        return synthetic(blocks=3, layers=2, offset=1000 * self.r)


def test_cli_writes_the_trace_and_prints_the_table(monkeypatch, tmp_path):
    made = []

    def backend(model, cfg, ctx, dtype, gpus, position):
        made.append((cfg.n_layers, ctx, gpus, position))
        made.append(_FakeBackend(gpus, position))
        return made[-1]
    monkeypatch.setattr(kogcupy.cli, "_profile_gpus", lambda gpus: None)
    monkeypatch.setattr(kogcupy.cli, "_profile_backend", backend)
    out = tmp_path / "t.json"
    r = invoke(["--shape", "llama-3.2-1b", "--position", "200", "--gpus", "2", "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert made[0] == (16, 4096, 2, 200)
    ids, max_new, eos = made[1].started
    assert ids == list(range(1, 33)) and 32 - 1 + max_new - 1 >= 200 and eos == set()
    t = json.loads(out.read_text())
    assert {e["pid"] for e in t["traceEvents"]} == {0, 1}
    assert t["otherData"]["position"] == 200
    assert "GPU 1 (first stamp +1.0 us" in r.stdout and "approximate" in r.stdout
    assert "attention" in r.stdout and "hop_us" in r.stdout and "ui.perfetto.dev" in r.stdout


def test_summarize_prints_a_saved_traces_tables(tmp_path):
    import gzip
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(prof.trace([synthetic(), synthetic(offset=1000)], {"model": "m", "position": 7}), f)
    r = invoke(["--summarize", str(path)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "model m, position 7" in r.stdout and "GPU 1 (first stamp +1.0 us" in r.stdout
    assert r.stdout.count("critical path") == 2 and "hop_us" in r.stdout
    assert "TB/s" not in r.stdout                      # (no shape, no stage_mb: no rate)
    for meta in ({"model": "shape qwen3-1.7b (random weights)", "gpus": 1},
                 {"model": "m", "stage_mb": {"qkv": 1.0, "o_proj": 2.0, "gate_up": 4.0, "down": 8.0}}):
        (tmp_path / "s.json").write_text(json.dumps(prof.trace([synthetic()], meta)))
        r = invoke(["--summarize", str(tmp_path / "s.json")])
        assert r.exit_code == 0 and "TB/s" in r.stdout and "stage_mb" not in r.stdout, r.output
    assert_user_error(invoke(["--summarize", str(tmp_path / "none.json")]), "no such file")
    (tmp_path / "x.json").write_text("{}")
    assert_user_error(invoke(["--summarize", str(tmp_path / "x.json")]), "not a trace written by")
    assert_user_error(invoke(["--summarize", str(path), "--shape", "x", "--position", "3"]),
                      "without --shape, --position")
    (tmp_path / "cut.json.gz").write_bytes(path.read_bytes()[:200])
    assert_user_error(invoke(["--summarize", str(tmp_path / "cut.json.gz")]), "not a trace")
    (tmp_path / "bad.json.gz").write_bytes(path.read_bytes()[:20] + b"x" * 300)
    assert_user_error(invoke(["--summarize", str(tmp_path / "bad.json.gz")]), "not a trace")
    good = prof.trace([synthetic()])
    for bad in ({**good, "otherData": "x"},
                {"traceEvents": [{**e, "tid": -1} if e["ph"] == "X" else e for e in good["traceEvents"]]},
                {"traceEvents": [{**e, "args": {"layer": 10 ** 7}} if e["ph"] == "X" else e
                                 for e in good["traceEvents"]]},
                {"traceEvents": [{**e, "tid": 1.5} if e["ph"] == "X" else e for e in good["traceEvents"]]},
                {"traceEvents": [{**e, "args": {"layer": 0.5}} if e["ph"] == "X" else e
                                 for e in good["traceEvents"]]}):
        (tmp_path / "b.json").write_text(json.dumps(bad))
        r = invoke(["--summarize", str(tmp_path / "b.json")])
        if bad.get("otherData") == "x":             # (the slices are fine: no header line)
            assert r.exit_code == 0 and "critical path" in r.stdout, r.output
        else:
            assert_user_error(r, "not a kogcupy profile slice")


def test_a_gpu_whose_clock_reads_earlier_keeps_every_stamp(tmp_path):
    stamps = [synthetic(), synthetic(offset=-5000)]
    back = prof.stamps_from_trace(prof.trace(stamps))
    for P, B in zip(stamps, back):
        assert (B > 0).sum() == (P > 0).sum()
        assert prof.summary_rows(B) == prof.summary_rows(P)
    assert prof.time_zero(back[:1]) - prof.time_zero(back[1:]) == 5000


def test_readme_documents_profile():
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    synopsis = readme.split("## Command line")[1].split("## Serving")[0]
    for p in cli.commands["profile"].params:
        for opt in p.opts:
            if opt.startswith("--") and opt != "--help":
                assert opt in synopsis, opt
    assert "approximate" in synopsis and "ui.perfetto.dev" in synopsis


def _delay_probe():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "delay_probe.py"
    spec = importlib.util.spec_from_file_location("delay_probe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_delay_probe_slots_are_the_stages_inputs_ready_stamps():
    """scripts/delay_probe.py delays the slot each stage stamps when its inputs are ready."""
    import re
    from pathlib import Path
    src = Path(__file__).resolve().parents[1] / "kernels_src"
    files = {"qkv": "norm_rope.cuh", "attention": "attention.cuh", "o_proj": "o_proj.cuh",
             "gate_up": "gate_up.cuh", "down": "down.cuh"}
    slots = _delay_probe().STAGE_SLOTS
    assert set(slots) == set(files)
    for stage, slot in slots.items():
        text = (src / files[stage]).read_text()
        assert re.search(rf"kog_prof\(c, layer \* 16 \+ {slot}\);", text), (stage, slot)


def test_delay_probe_shares():
    """A stage fully on the critical path passes its whole delay to the step (1.0 a layer);
    numbers of the SmolLM2 run (30 layers, 1 us, H100, 2026-12-05)."""
    share = _delay_probe().sensitivities([389.7, 386.7], {"qkv": 417.5, "o_proj": 388.2 + 9.0},
                                         30, 1000)
    assert share["qkv"] == pytest.approx(29.3 / 30, abs=1e-9)
    assert share["o_proj"] == pytest.approx(0.3, abs=1e-9)
