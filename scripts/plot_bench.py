#!/usr/bin/env python3
"""Bar chart of a scripts/bench.py result: decode tok/s per shape per engine, limit marked;
kogcupy against context position, cold time to first token, the agent workload's total time,
and tok/s against GPU count (tensor parallel) when measured.

    python scripts/plot_bench.py bench/results/h200-2026-11-22.json   # writes the .png beside it

A dev-only tool: needs matplotlib, which is no runtime dependency of kogcupy.
"""
from __future__ import annotations

import json
import os
import sys
if {"-h", "--help"} & set(sys.argv[1:]):      # usage: the docstring above
    print(__doc__.strip())
    sys.exit(0)

ENGINE_ORDER = ("hf-eager", "torch-sdpa-graph", "kogcupy")
COLORS = {"hf-eager": "#9e9e9e", "torch-sdpa-graph": "#5b8def", "kogcupy": "#e8590c"}


def _on_gpus(r) -> str:
    """A prompt row's GPU count in its bar label (tensor parallel), nothing for one GPU."""
    n = r.get("n_gpus", 1)
    return f" x{n}" if n > 1 else ""


def grouped_bars(ax, rows, key, value, ylabel, title, log=False):
    """One group of bars per key(row), one bar per engine, the value written on each."""
    groups = list(dict.fromkeys(key(r) for r in rows))
    engines = [e for e in ENGINE_ORDER if any(r["engine"] == e for r in rows)]
    width = 0.8 / max(len(engines), 1)
    for j, eng in enumerate(engines):
        for i, g in enumerate(groups):
            r = next((r for r in rows if r["engine"] == eng and key(r) == g), None)
            if r is None:
                continue
            x = i - 0.4 + width * (j + 0.5)
            ax.bar(x, value(r), width, color=COLORS[eng], label=eng if i == 0 else None)
            ax.text(x, value(r) * 1.03, f"{value(r):.3g}", ha="center", va="bottom", fontsize=6)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), groups, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


def plot(json_path: str, png_path: str | None = None) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot: matplotlib is missing; `pip install matplotlib` (dev-only)")
    with open(json_path, encoding="utf-8") as f:
        doc = json.load(f)
    rows = [r for r in doc["rows"] if r["metric"] == "decode" and r["position"] == 0
            and r.get("n_gpus", 1) == 1]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    engines = [e for e in ENGINE_ORDER if any(r["engine"] == e for r in rows)]
    by = {(r["shape"], r["engine"]): r for r in rows}

    kog = [r for r in doc["rows"] if r["metric"] == "decode" and r["engine"] == "kogcupy"
           and r["status"] == "ok"]
    pos_rows = [r for r in kog if r.get("n_gpus", 1) == 1]
    tp_rows = [r for r in kog if r["position"] == 0]
    with_ctx = len({r["position"] for r in pos_rows}) > 1
    with_tp = len({r.get("n_gpus", 1) for r in tp_rows}) > 1
    ttft = [r for r in doc["rows"] if r["metric"] == "ttft" and r["status"] == "ok"]
    agent = [r for r in doc["rows"] if r["metric"] == "agent" and r["status"] == "ok"]
    n_ax = 1 + with_ctx + with_tp + bool(ttft) + bool(agent)
    fig, axes = plt.subplots(1, n_ax, figsize=(8 + 5 * (n_ax - 1), 5), squeeze=False,
                             gridspec_kw={"width_ratios": [2] + [1] * (n_ax - 1)})
    axes = list(axes[0])
    extra = axes[1 + with_ctx:len(axes) - with_tp]       # the prompt panels, in order
    if ttft:
        grouped_bars(extra.pop(0), ttft, lambda r: f"{r['shape']}\n{r['prompt_len'] // 1000}k"
                     + _on_gpus(r),
                     lambda r: r["ttft_s"] * 1e3, "time to first token, ms (cold prompt, log)",
                     "time to first token", log=True)
    if agent:
        grouped_bars(extra.pop(0), agent, lambda r: r["shape"] + _on_gpus(r), lambda r: r["total_s"],
                     f"agent workload total s ({agent[0]['turns']} turns, "
                     f"{agent[0]['new_tokens']} new tokens each)", "multi-turn agent workload")
    ax = axes[0]
    width = 0.8 / max(len(engines), 1)
    for i, shape in enumerate(shapes):
        for j, eng in enumerate(engines):
            x = i - 0.4 + width * (j + 0.5)
            r = by.get((shape, eng))
            if r is None:
                continue
            if r["status"] != "ok":
                ax.text(x, 1, "error", rotation=90, ha="center", va="bottom", fontsize=8,
                        color=COLORS[eng])
                continue
            ax.bar(x, r["tokens_per_s"], width, color=COLORS[eng],
                   label=eng if i == next(k for k, s in enumerate(shapes)
                                          if (s, eng) in by) else None)
            ax.text(x, r["tokens_per_s"] * 1.05, f"{r['tokens_per_s']:.0f}\n"
                    f"{r['pct_of_limit']:.0f}%", ha="center", va="bottom", fontsize=7, zorder=3,
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=0.5))
        lim = by.get((shape, "limit"))
        if lim:
            ax.hlines(lim["tokens_per_s"], i - 0.45, i + 0.45, colors="black", linestyles="--",
                      label="bandwidth limit" if i == 0 else None)
            ax.text(i + 0.45, lim["tokens_per_s"], f" {lim['tokens_per_s']:.0f}", va="center",
                    fontsize=7)
    ax.set_yscale("log")
    top = max([r["tokens_per_s"] for r in rows if r["tokens_per_s"]] + [10])
    ax.set_ylim(1, top * 4)
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_ylabel("decode tokens/s (batch 1, log)")
    ax.set_title(f"{doc['gpu']}, {doc['date']}: stream-read {doc['read_bw_TBps']:.2f} TB/s; "
                 f"{doc['args']['new_tokens']} tokens after {doc['args']['prompt_len']}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=4)

    if with_tp:
        ax3 = axes[-1]
        for shape in dict.fromkeys(r["shape"] for r in tp_rows):
            pts = sorted((r.get("n_gpus", 1), r["tokens_per_s"]) for r in tp_rows
                         if r["shape"] == shape)
            ax3.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=shape)
            for g, t in pts:
                ax3.annotate(f"{t:.0f}", (g, t), textcoords="offset points", xytext=(0, 6),
                             ha="center", fontsize=7)
        ax3.set_xticks(sorted({r.get("n_gpus", 1) for r in tp_rows}))
        ax3.set_xlabel("GPUs (tensor parallel, in-kernel all-reduce)")
        ax3.set_ylabel("kogcupy decode tokens/s")
        ax3.set_ylim(0, None)
        ax3.grid(alpha=0.3)
        ax3.legend(fontsize=8)
        ax3.set_title("kogcupy scaling over GPUs", fontsize=10)

    if with_ctx:
        ax2 = axes[1]
        for shape in shapes:
            pts = sorted((r["position"], r["pct_of_limit_with_kv"], r["pct_of_limit"])
                         for r in pos_rows if r["shape"] == shape)
            line, = ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=shape)
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], ls="--", color=line.get_color())
        ax2.set_xlabel("context position (prompt length)")
        ax2.set_ylabel("kogcupy % of limit (solid: weights + KV read; dashed: weights)")
        ax2.set_ylim(0, 100)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
        ax2.set_title("kogcupy vs context", fontsize=10)

    fig.tight_layout()
    png_path = png_path or os.path.splitext(json_path)[0] + ".png"
    fig.savefig(png_path, dpi=130)
    plt.close(fig)
    return png_path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        sys.exit("usage: plot_bench.py RESULT.json [OUT.png]")
    print(plot(*argv))


if __name__ == "__main__":
    main()
