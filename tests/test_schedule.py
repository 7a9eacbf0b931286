"""The schedule table (kogcupy/gpu/schedule.py) against the code: the reference's stage order,
the kernel sources, the counter map, and SYNC.md (CPU only; reads source text)."""
import re
from pathlib import Path

import pytest

from kogcupy.gpu import abi, schedule
from kogcupy.reference import backend

SRC = Path(__file__).resolve().parents[1] / "kernels_src"
CUH = {f.name: f.read_text() for f in sorted(SRC.glob("*.cuh"))}
MONO = (SRC / "monokernel.cu").read_text()
FIELDS = {name for name, _, _, _ in abi.FIELDS}
TAGGED = {"x", "qkv", "attn_out", "act", "attn_partial"}


def _body(text: str, start: int) -> str:
    """The brace-balanced block from the first '{' at or after `start`."""
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j + 1]
    raise AssertionError("unbalanced braces")


def _definitions() -> dict[str, str]:
    """kog_* device function name -> its body, over every .cuh."""
    out = {}
    for text in CUH.values():
        for m in re.finditer(r"KOG_DEVICE[^;{(]*?\b(kog_\w+)\s*\(", text):
            out.setdefault(m.group(1), _body(text, m.end()))
    return out


DEFS = _definitions()
KERNEL_BODY = _body(MONO, MONO.index("kog_monokernel("))


def _text_of(stage) -> str:
    """The stage function's body (and those of the functions the loop runs for it, part_of), the
    bodies of the kog_* helpers they call, and the kernel loop that calls it (where embed's TOK
    release lives)."""
    body = DEFS[stage.kernel]
    helpers, todo = set(stage.part_of), [body] + [DEFS[h] for h in stage.part_of]
    while todo:                            # the helpers it calls, and theirs
        for m in re.finditer(r"\b(kog_\w+)\s*[<(]", todo.pop()):
            h = m.group(1)
            if h != stage.kernel and h not in helpers and h in DEFS:
                helpers.add(h)
                todo.append(DEFS[h])
    return "\n".join([body] + [DEFS[h] for h in sorted(helpers)] + [KERNEL_BODY])


def _uses(stage):
    return stage.waits + stage.reads + stage.writes


def test_stage_order_is_the_reference_order():
    assert tuple(s.name for s in schedule.STAGES) == backend.STAGES
    assert tuple(s.name for s in schedule.STAGES if s.per_layer) == backend.LAYER_STAGES


@pytest.mark.parametrize("stage", schedule.STAGES, ids=lambda s: s.name)
def test_stage_matches_its_source(stage):
    assert re.search(rf"KOG_DEVICE(_NOINLINE)?\s+\w+\s+{stage.kernel}\s*\(", CUH[stage.source]), \
        f"{stage.kernel} is not defined in {stage.source}"
    text = _text_of(stage)
    for u in _uses(stage):
        assert u.buffer in FIELDS, f"{u.buffer} is not a KogParams field"
        if not u.counter:                  # (counters: through kog_counter, by name below)
            assert re.search(rf"\bp->{u.buffer}\b", text), f"{stage.name} does not touch p->{u.buffer}"
        if u.sum is not None:
            assert u.buffer == "xsum" and re.search(rf"\bkog_xsum_{u.sum.kind}\(", text), (stage.name, str(u))
            if u in stage.writes:          # a part added in L2, encoded with its count
                assert re.search(r"\bkog_red_add_u64\([^;]*\bkog_sum_word\(", text), (stage.name, str(u))
            else:                          # polled until every part is in, by the stage itself
                assert re.search(rf"kog_load_activation<\w+, true(, KOG_IN_COPIES)?>\(kog_xsum_{u.sum.kind}\(",
                                 DEFS[stage.kernel]), (stage.name, str(u))
        if u.tag is not None:
            assert u.buffer in TAGGED
            assert re.search(rf"\bKOG_STAGE_{u.tag.stage}\b", text), (stage.name, str(u))
        if u.counter:
            assert u.buffer == "counters"
            assert re.search(rf"\b{u.counter}\b", text), (stage.name, u.counter)


def test_residual_sums_are_zeroed_for_their_next_position():
    """ffn_norm_gate_up_silu(t, l) zeroes its share of in(t+1, l) and mid(t+1, l) (and at the
    last layer in(t+1, L)) before its wait (kog_xsum_zero_next), or with KOG_ZERO_EARLY
    o_proj_residual(t, l) at its start; the host zeroes both parities per launch. Every sum a
    stage waits for is written by some stage."""
    zeroing = {s.name: [u.when for u in s.writes if u.buffer == "xsum" and u.sum is None and "= 0" in u.what]
               for s in schedule.STAGES}
    assert {k: v for k, v in zeroing.items() if v} == {
        "o_proj_residual": ["KOG_TP == 1 and KOG_ZERO_EARLY"],
        "ffn_norm_gate_up_silu": ["KOG_TP == 1 and not KOG_ZERO_EARLY"]}
    gate_up = DEFS["kog_stage_ffn_norm_gate_up_silu"]
    assert re.search(r"#if !KOG_ZERO_EARLY\s+kog_xsum_zero_next\(c, layer\);", gate_up)
    assert gate_up.index("kog_xsum_zero_next(c, layer)") < gate_up.index("kog_load_activation<")
    o_proj = DEFS["kog_stage_o_proj_residual"]
    one_gpu = o_proj[o_proj.index("#else"):]                  # (after the tensor-parallel branch)
    assert re.match(r"#else\s+#if KOG_ZERO_EARLY\s+(//.*\s+)*kog_xsum_zero_next\(c, layer\);", one_gpu)
    zero = DEFS["kog_xsum_zero_next"]
    for name in ("in", "mid", "last"):
        copies = r"r \* KOG_HIDDEN \+ " if name != "mid" else ""      # (every copy of an in sum)
        assert re.search(rf"kog_st_relaxed_u64\({name} \+ {copies}i, 0ull\)", zero), name
    # one fence a step, after the last layer's zero stores (SYNC.md: every chain runs through a
    # write of the zeroing thread after it)
    assert re.search(r"if \(layer == KOG_N_LAYERS - 1\) kog_fence_gpu\(\);", zero)
    assert zero.count("kog_fence_gpu()") == 1
    kinds = {u.sum.kind for s in schedule.STAGES for u in s.writes if u.sum is not None}
    assert kinds == {"in", "mid"}


def test_counters_and_tag_stages_exist():
    layout = abi.counter_layout(3, 2)
    named = {u.counter for s in schedule.STAGES for u in _uses(s) if u.counter}
    assert named <= set(schedule.COUNTERS)
    assert set(schedule.COUNTERS) == set(layout) - {"KOG_N_COUNTERS"}
    defines = dict(re.findall(r"#define KOG_STAGE_(\w+) (\d+)", CUH["sync.cuh"]))
    assert {k: int(v) for k, v in defines.items()} == {s: i for i, s in enumerate(schedule.TAG_STAGES)}
    for s in schedule.STAGES:
        for u in _uses(s):
            if u.tag is not None:
                assert u.tag.stage in defines, (s.name, str(u))


@pytest.mark.parametrize("tp", [1, 2])
def test_every_wait_is_published_earlier(tp):
    """Unrolled run (3 layers, positions 0..2, the LM head from position 1, every option on):
    each tag / counter a stage waits for was written by an earlier stage instance (`peer`
    waits: by the same stage, other units)."""
    L = 3
    written = set()                          # (buffer, pos, layer, tag stage) or counter name
    layer_stages = [s for s in schedule.STAGES if s.per_layer]
    for t in range(3):
        run = [(s, 0) for s in schedule.STAGES[:1] if t == 0]   # later: the sampler embeds
        run += [(s, l) for l in range(L) for s in layer_stages]
        run += [(s, 0) for s in schedule.STAGES if not s.per_layer and s.name != "embed"]
        for s, l in run:
            env = dict(t=t, l=l, L=L, lm=t >= 1, slices=t >= 1, KOG_DYN_PERMILLE=1, KOG_TP=tp,
                       KOG_ZERO_EARLY=1)

            def on(uses):
                return [u for u in uses if not u.when or eval(u.when, {}, env)]

            def sum_parts(u):
                return schedule.sum_parts(u.sum.kind, eval(u.sum.layer, {}, env))

            def key(u, part=None):
                if u.sum is not None:
                    return (u.buffer, u.sum.kind, eval(u.sum.pos, {}, env), eval(u.sum.layer, {}, env),
                            u.sum.part if part is None else part)
                if u.tag is None:
                    return u.counter
                return u.buffer, eval(u.tag.pos, {}, env), eval(u.tag.layer, {}, env), u.tag.stage
            for u in on(s.waits):
                keys = [key(u, part) for part in sum_parts(u)] if u.sum else [key(u)]
                assert u.peer or all(k in written for k in keys), \
                    f"{s.name} (t={t}, l={l}) waits for {u}: unwritten"
            written |= {key(u) for u in on(s.writes) if u.tag or u.counter or u.sum}
            for u in on(s.waits):
                keys = [key(u, part) for part in sum_parts(u)] if u.sum else [key(u)]
                assert all(k in written for k in keys), f"{s.name}: peer wait {u} is not written by the stage"


def test_monokernel_calls_the_stages_in_table_order():
    calls = re.findall(r"\b(kog_embed|kog_stage_\w+)\s*\(", KERNEL_BODY)
    kernels = [s.kernel for s in schedule.STAGES]
    assert calls == [k for i, k in enumerate(kernels) if i == 0 or k != kernels[i - 1]]


def test_hops_per_layer():
    assert schedule.per_layer_hops() == schedule.HOPS_PER_LAYER == 4


def test_finish_codes():
    assert {getattr(schedule, f"FINISH_{n.upper()}"): n for n in abi.FINISH_CODES.values() if n} == \
        {c: n for c, n in abi.FINISH_CODES.items() if n}
    # every code the kernel stores is a literal with a comment naming its constant
    sets = re.findall(r"\b(?:reason|finish) = ([1-9])u;\s*//\s*(FINISH_\w+)", CUH["sampling.cuh"])
    assert len(re.findall(r"\b(?:reason|finish) = [1-9]u;", CUH["sampling.cuh"])) == len(sets) == 6
    assert {int(v): getattr(schedule, name) for v, name in sets} == \
        {c: c for c, n in abi.FINISH_CODES.items() if n}


def test_sync_md_has_the_generated_tables():
    text = (SRC / "SYNC.md").read_text()
    i, j = text.index(schedule.BEGIN), text.index(schedule.END)
    assert text[i:j + len(schedule.END)] + "\n" == schedule.markdown(), \
        "SYNC.md's schedule tables are stale: paste kogcupy.gpu.schedule.markdown() between the markers"
