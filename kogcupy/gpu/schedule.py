"""The monokernel's schedule as data: one table of its stages in the order they run, with what
each one waits for, reads, writes and publishes (kernels_src/SYNC.md explains the protocol).

tests/test_schedule.py checks the table against the code (stage order, kernel functions,
counters, tag stages, who produces what is waited on, the call order in monokernel.cu), and
SYNC.md's stage / counter / finish-code tables are ``markdown()``'s output (a test compares).

Notation, as in the kernel: t position, l layer, L layers, g kv head; a tagged vector's version
is ``kog_tag(pos, layer, KOG_STAGE_<S>) = (pos * L + layer) * 8 + S + 1`` (sync.cuh), written
below as ``<s>(pos, layer)``, e.g. x @ down(t, l-1). ``when`` is a Python condition over t, l,
L and lm (the LM head runs at this position: all_logits, or t >= the last prompt position);
empty means always. Single-GPU dataflow; ``tp`` notes what changes with KOG_TP > 1.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import abi

# KOG_STAGE_<name> = index (sync.cuh): the stage part of a version tag.
TAG_STAGES = ("EMBED", "QKV", "ATTN", "O", "GATE_UP", "DOWN")
_TAG_NAMES = {"EMBED": "embed", "QKV": "qkv", "ATTN": "attention", "O": "o",
              "GATE_UP": "gate_up", "DOWN": "down"}


@dataclass(frozen=True)
class Tag:
    """The version kog_tag(pos, layer, KOG_STAGE_<stage>) of a tagged vector."""
    pos: str      # "t", "t+1"
    layer: str    # "l", "l-1", "0", "L-1"
    stage: str    # one of TAG_STAGES

    def __str__(self):
        return f"{_TAG_NAMES[self.stage]}({self.pos}, {self.layer})"


@dataclass(frozen=True)
class Sum:
    """A residual sum of xsum (one GPU, sync.cuh), added in L2 by its parts and ready when
    every part is in: in(pos, layer), x entering the layer (layer L: the LM head's input), and
    mid(pos, layer), x after its o_proj. A write names its part -- "emb" (the embedding: all of
    in(pos, 0)), "down" (a cluster's partial of every row of down_residual(layer - 1), plus
    x after o_proj for the rows of its blocks' shares), "x" (x entering the layer, a block's share of
    rows), "o" (a head group's wo @ its merged attention partials); a wait names none (all parts: SUM_PARTS)."""
    kind: str     # "in" or "mid"
    pos: str
    layer: str
    part: str = ""

    def __str__(self):
        return f"{self.kind}({self.pos}, {self.layer})" + (f" += {self.part}" if self.part else "")


def sum_parts(kind: str, layer: int) -> tuple[str, ...]:
    """The parts a sum is complete with (sync.cuh: in(t, 0) 1, in(t, l) one per cluster of
    blocks, mid(t, l) KV + 1)."""
    if kind == "in":
        return ("emb",) if layer == 0 else ("down",)
    return ("x", "o")


@dataclass(frozen=True)
class Use:
    """One access of a stage: a KogParams buffer, and the tag or counter that orders it."""
    buffer: str                 # KogParams field ("counters" for a counter)
    tag: Tag | None = None      # tagged words: spins until each word carries this version
    sum: Sum | None = None      # residual-sum words: spins until each has all its parts
    counter: str = ""           # abi.counter_layout name, e.g. "KOG_CNT_KV"
    index: str = ""             # counter index, e.g. "[l][g]" -> KOG_CNT_KV + l * KV + g
    value: str = ""             # waits: acquire until counter >= value; writes: what is added
    when: str = ""              # condition (see module doc); "" always
    what: str = ""              # which part / why, for the reader
    peer: bool = False          # a wait on words other units of the SAME stage write

    def __str__(self):
        if self.counter:
            s = f"`{self.counter.removeprefix('KOG_CNT_')}{self.index}`"
            if self.value.startswith(("+", "=")):      # a write: add / store
                s += f" {self.value}"
            elif self.value:                            # a wait: acquire until >= value
                s += f" >= {self.value}"
        else:
            s = f"`{self.buffer}`" + (f" @ {self.tag}" if self.tag else "") + \
                (f" @ {self.sum}" if self.sum else "")
        if self.what:
            s += f" ({self.what})"
        return s + (f" [{self.when}]" if self.when else "")


@dataclass(frozen=True)
class Stage:
    name: str                   # kogcupy/reference/backend.py STAGES name
    kernel: str                 # device function that runs it
    source: str                 # file under kernels_src/ that defines it
    per_layer: bool
    hop: bool                   # waits for what OTHER blocks wrote in the stage before it:
                                # one grid-wide dependent hop on the critical path
    waits: tuple[Use, ...]      # tags / counters it spins on before its work
    reads: tuple[Use, ...]      # other inputs (weights, caches, ...), no wait
    writes: tuple[Use, ...]     # outputs: tagged words, counters released, host words
    who: str = "every block"
    tp: str = ""                # what differs with tensor parallelism
    part_of: tuple[str, ...] = ()   # device functions the kernel loop calls for it (before, after)


def _x(layer, stage, pos="t", **kw):
    return Use("x", Tag(pos, layer, stage), **kw)


def _sum(kind, layer, part="", pos="t", when="", **kw):
    return Use("xsum", sum=Sum(kind, pos, layer, part),
               when=" and ".join(c for c in (when, "KOG_TP == 1") if c), **kw)


STAGES: tuple[Stage, ...] = (
    Stage("embed", "kog_embed", "sampling.cuh", False, False,
          waits=(),
          reads=(Use("tokens", what="tokens[start_pos]"), Use("embed", what="its row")),
          writes=(_x("0", "EMBED", when="KOG_TP > 1"), _sum("in", "0", "emb"),
                  Use("counters", counter="KOG_CNT_TOK", value="+1")),
          who="block 0, position start_pos only (later positions: the sampler)"),
    Stage("attn_norm_qkv", "kog_stage_attn_norm_qkv", "norm_rope.cuh", True, True,
          waits=(Use("counters", counter="KOG_CNT_TOK", value="t+1", when="l == 0"),
                 _sum("in", "l", what="all")),
          reads=(Use("counters", counter="KOG_CNT_STOP", when="l == 0",
                     what="after the TOK acquire; set: return"),
                 Use("wqkv"), Use("bqkv")),
          writes=(Use("qkv", Tag("t", "l", "QKV"), what="its rows"),
                  _sum("mid", "l", "x", what="its share's rows of the x it read")),
          tp="x @ embed(t, 0) at l = 0, else the sum of every rank's xpart slot 1 @ down(t, l-1), "
             "kept in x_full; no sums"),
    Stage("attention", "kog_stage_attention", "attention.cuh", True, True,
          waits=(Use("qkv", Tag("t", "l", "QKV"), what="q rows of group g; k, v of head g"),
                 Use("counters", counter="KOG_CNT_KV", index="[l][g]", value="cached positions",
                     when="t > 0", what="skipped once an LM head ran at t-1, one GPU"),
                 Use("attn_partial", Tag("t", "l", "ATTN"), when="KOG_TP > 1",
                     what="the unit holding t: the other chunks'", peer=True)),
          reads=(Use("k_cache"), Use("v_cache"), Use("rope_cos"), Use("rope_sin"),
                 Use("q_norm"), Use("k_norm")),
          writes=(Use("k_cache", what="position t"), Use("v_cache", what="position t"),
                  Use("counters", counter="KOG_CNT_KV", index="[l][g]", value="+1",
                      when="not lm or KOG_TP > 1",
                      what="the unit holding t, when the next step polls it"),
                  Use("attn_partial", Tag("t", "l", "ATTN"),
                      what="every chunk (tensor parallel: every chunk but the one holding t)"),
                  Use("attn_out", Tag("t", "l", "ATTN"), when="KOG_TP > 1",
                      what="head group g, merged by the unit holding t")),
          who="units (kv head g, chunk) from the top of the grid down"),
    Stage("o_proj_residual", "kog_stage_o_proj_residual", "o_proj.cuh", True, True,
          waits=(Use("attn_partial", Tag("t", "l", "ATTN"), when="KOG_TP == 1",
                     what="every chunk of head group g of its item (g, rows), merged by the item "
                          "(kog_attn_combine)"),
                 Use("attn_out", Tag("t", "l", "ATTN"), when="KOG_TP > 1", what="all of it")),
          reads=(Use("wo", what="its rows, group g's columns"),),
          writes=(Use("xsum", when="KOG_TP == 1 and KOG_ZERO_EARLY",
                      what="= 0: its share of in(t+1, l), mid(t+1, l) (l = L-1: and in(t+1, L)), "
                           "every block, at the start, before any item; fenced at the last layer"),
                  _sum("mid", "l", "o", what="its item's rows: wo[rows, group g] @ group g's attention output"),),
          who="items (kv head group g, row slice) from block 0 up (KOG_OPROJ_SPARE: below the "
              "attention units' blocks)",
          tp="every block its rows, all of attn_out: writes its partial of every row to every "
             "rank's xpart slot 0 @ o(t, l)"),
    Stage("ffn_norm_gate_up_silu", "kog_stage_ffn_norm_gate_up_silu", "gate_up.cuh", True, True,
          waits=(_sum("mid", "l", what="all"),),
          reads=(Use("w_gate_up"),
                 Use("counters", counter="KOG_CNT_DYN", index="[l]", when="KOG_DYN_PERMILLE",
                     what="dynamic-tail cursor"),
                 Use("w_down", when="KOG_TP == 1",
                     what="down_residual's first rows, into its staging slots (cp.async), once "
                          "a warp's static units are done, when they are static units' rows")),
          writes=(Use("act", Tag("t", "l", "GATE_UP"), when="KOG_TP > 1", what="its units"),
                  Use("xsum", when="KOG_TP == 1 and not KOG_ZERO_EARLY",
                      what="= 0: its share of in(t+1, l), mid(t+1, l) (l = L-1: and in(t+1, L)), "
                           "before the wait; fenced at the last layer"),
                  Use("counters", counter="KOG_CNT_DYN", index="[l]", value="+grabs",
                      when="KOG_DYN_PERMILLE")),
          tp="x is the sum of every rank's xpart slot 0 @ o(t, l), kept in x_full; act is "
             "published to every block (one GPU: it stays in the block's shared memory)"),
    Stage("down_residual", "kog_stage_down_residual", "down.cuh", True, False,
          waits=(),
          reads=(Use("w_down", what="the columns of the units its block ran (stored transposed)"),),
          writes=(_sum("in", "l+1", "down",
                       what="its partial of every row, + x after o_proj for its share's rows"),),
          tp="waits for all of act @ gate_up(t, l) (a hop); its rows of w_down; writes its "
             "partial of every row to every rank's xpart slot 1 @ down(t, l)"),
    Stage("final_norm_lm_head", "kog_stage_final_norm_lm_head", "lm_head.cuh", False, True,
          waits=(_sum("in", "L", when="lm", what="all"),),
          reads=(Use("lm_head", when="lm"),
                 Use("counters", counter="KOG_CNT_DYN", index="[L]", when="lm and KOG_DYN_PERMILLE",
                     what="dynamic-tail cursor")),
          writes=(Use("logits", when="lm", what="its rows"),
                  Use("lm_part_val", when="lm"), Use("lm_part_idx", when="lm"),
                  Use("counters", counter="KOG_CNT_DYN", index="[L]", value="+grabs",
                      when="lm and KOG_DYN_PERMILLE"),
                  Use("counters", counter="KOG_CNT_CANCEL", value="= 1", when="lm and KOG_TP > 1",
                      what="rank 0's block 0 forwards the host's cancel to every rank"),
                  Use("counters", counter="KOG_CNT_LM", value="+1", when="lm",
                      what="each LM producer block")),
          who="the LM producer blocks, when lm",
          tp="x from xpart slot 1; logits / argmax to every rank; rank 0 block 0 forwards the "
             "host's cancel into every rank's CANCEL; LM released on every rank"),
    Stage("sample", "kog_stage_sample", "sampling.cuh", False, True,
          waits=(Use("counters", counter="KOG_CNT_LM", value="lm_steps * n_lm_producers", when="lm"),
                 Use("counters", counter="KOG_CNT_SAMPLE", value="rounds * blocks", when="slices",
                     peer=True, what="each round's totals, then block 0 the draw"),
                 _sum("in", "L", when="not lm", what="all; inside the prompt")),
          reads=(Use("logits", when="lm"), Use("lm_part_val", when="lm and not slices"),
                 Use("lm_part_idx", when="lm and not slices"),
                 Use("tokens"), Use("sample_ws", when="slices", what="the round totals"),
                 Use("embed", what="row of the next token"),
                 Use("host_ctl", what="[2] cancel, read before the wait")),
          writes=(Use("sample_ws", when="slices", what="its slice's part of each round; zeroes its "
                      "share of the next step's half"),
                  Use("counters", counter="KOG_CNT_SAMPLE", value="+1 a round", when="slices"),
                  Use("tokens", what="[t+1]"),
                  _x("0", "EMBED", pos="t+1", when="KOG_TP > 1",
                     what="the next token's row (kog_embed), unless stopping"),
                  _sum("in", "0", "emb", pos="t+1", what="the next token's row (kog_embed), unless stopping"),
                  Use("counters", counter="KOG_CNT_TOK", value="+1"),
                  Use("host_tokens", what="[g], then host_ctl[0] = g + 1 (release, system), by "
                      "kog_publish_token after block 0's layer-0 qkv of t+1 (or at the end)")),
          who="block 0; with a filter or a penalty (slices: the KOG_SAMPLE_SLICES build) every "
              "block first draws over its slice of the vocabulary (kog_sample_slices)",
          tp="waits LM (system scope) for every rank's producers; cancel from CANCEL",
          part_of=("kog_sample_slices", "kog_publish_token")),
    Stage("stop_check", "kog_stage_sample", "sampling.cuh", False, False,
          waits=(),
          reads=(Use("eos_ids", what="thread e the e-th, before the wait"),
                 Use("counters", counter="KOG_CNT_CANCEL", when="KOG_TP > 1"),
                 Use("counters", counter="KOG_CNT_OVERFLOW", when="KOG_TP == 1",
                     what="read before the wait")),
          writes=(Use("counters", counter="KOG_CNT_STOP", value="= 1", what="before TOK's release"),
                  Use("host_ctl", what="[1] = finish code, after the count")),
          who="block 0, inside kog_stage_sample"),
)

# Dependent hops per layer on one GPU (issue 12's target is <= 3 grid-wide ones). o_proj's is
# narrow: an item waits for its head group's attention units (its kv head's chunks), not for
# every group; down_residual has none (tensor parallel: 5, down waits for all of act).
HOPS_PER_LAYER = 4

# Counters (KogParams::counters, indices from abi.counter_layout): index, meaning.
COUNTERS = {
    "KOG_CNT_TOK": ("", "positions whose input embedding is in x (or whose stop flag is set)"),
    "KOG_CNT_LM": ("", "LM-head block completions (producers per LM-head run)"),
    "KOG_CNT_STOP": ("", "1 once the generation ends (set before TOK's release)"),
    "KOG_CNT_KV": ("[l][g]", "positions of kv head g appended to layer l's KV cache"),
    "KOG_CNT_DYN": ("[l], [L]", "dynamic-tail cursors: gate_up of layer l, LM head"),
    "KOG_CNT_CANCEL": ("", "tensor parallel: 1 once rank 0 forwarded the host's cancel"),
    "KOG_CNT_OVERFLOW": ("", "one GPU: 1 once a residual-sum part was not finite or |part| >= 2^27 "
                             "(kog_sum_word, any stage adding to xsum)"),
    "KOG_CNT_SAMPLE": ("", "the sampler's rounds over the vocabulary slices: +1 a block a round"),
}


def _finish(name: str) -> int:
    return next(code for code, n in abi.FINISH_CODES.items() if n == name)


# host_ctl[1] finish codes (abi.FINISH_CODES; sampling.cuh sets them in stop_check / sample).
FINISH_RUNNING = 0
FINISH_EOS = _finish("eos")              # the token is an EOS id
FINISH_LENGTH = _finish("length")        # max_new tokens generated
FINISH_CONTEXT = _finish("context")      # the KV cache is full
FINISH_CANCELLED = _finish("cancelled")  # the host's cancel word was set
FINISH_DONE = _finish("done")            # all_logits: every prompt position has logits
FINISH_OVERFLOW = _finish("overflow")    # OVERFLOW was set: the residual sums lost a value
FINISH_WHY = {FINISH_EOS: "stop_check: the sampled token is an EOS id",
              FINISH_LENGTH: "stop_check: max_new tokens generated",
              FINISH_CONTEXT: "stop_check: prompt + generated reached the context length",
              FINISH_CANCELLED: "stop_check: the host's cancel word was set",
              FINISH_DONE: "sample: all_logits, every prompt position has its logits",
              FINISH_OVERFLOW: "stop_check: OVERFLOW was set (a residual-sum part was not finite "
                               "or |part| >= 2^27); the host raises a DeviceError"}


def per_layer_hops() -> int:
    return sum(s.hop for s in STAGES if s.per_layer)


def _cell(uses) -> str:
    return "<br>".join(str(u) for u in uses) or "-"


BEGIN = "<!-- generated by kogcupy.gpu.schedule.markdown(): do not edit by hand -->"
END = "<!-- end of generated schedule -->"


def markdown() -> str:
    """SYNC.md's generated block: the stage, counter and finish-code tables."""
    out = [BEGIN, "",
           "**Stages**, in order, for each position t (layers l = 0 .. L-1; `[when]` as in "
           "`kogcupy/gpu/schedule.py`). A hop: the stage waits for what other blocks wrote in "
           "the stage before it.", "",
           "| stage | kernel (file) | who | waits for | also reads | writes / publishes | hop |",
           "|---|---|---|---|---|---|---|"]
    for s in STAGES:
        name = s.name + (" [l]" if s.per_layer else "")
        out.append(f"| `{name}` | `{s.kernel}` ({s.source}) | {s.who} | {_cell(s.waits)} | "
                   f"{_cell(s.reads)} | {_cell(s.writes)} | {'yes' if s.hop else '-'} |")
    out += ["", f"Grid-wide dependent hops per layer: **{per_layer_hops()}**.", "",
            "Tensor parallel (KOG_TP > 1) differences:", ""]
    out += [f"* `{s.name}`: {s.tp}" for s in STAGES if s.tp]
    out += ["", "**Counters** (`KogParams::counters`, monotone u32, indices `abi.counter_layout`; "
            "released with a block barrier then a release add by thread 0, acquired by thread 0 "
            "then a block barrier):", "",
            "| counter | index | meaning | written by | waited for / read by |", "|---|---|---|---|---|"]
    for name, (index, meaning) in COUNTERS.items():
        w = sorted({s.name for s in STAGES for u in s.writes if u.counter == name},
                   key=[s.name for s in STAGES].index)
        r = sorted({s.name for s in STAGES for u in s.waits + s.reads if u.counter == name},
                   key=[s.name for s in STAGES].index)
        out.append(f"| `{name.removeprefix('KOG_CNT_')}` | {index or '-'} | {meaning} | "
                   f"{', '.join(w) or '-'} | {', '.join(r) or '-'} |")
    out += ["", "**Finish codes** (`host_ctl[1]`, `abi.FINISH_CODES`; 0 while running):", "",
            "| code | constant | reason | set by: when |", "|---|---|---|---|"]
    out += [f"| {code} | `FINISH_{name.upper()}` | {name} | {FINISH_WHY[code]} |"
            for code, name in abi.FINISH_CODES.items() if name]
    out += ["", END]
    return "\n".join(out) + "\n"
