#!/usr/bin/env python3
"""Compiler report of the monokernel for one shape (no GPU needed): ptxas registers and
spills, every local-memory instruction (STL/LDL) with the source line it comes from, and the
kinds of global loads (the weight stream should be LDG.E.NA...128).

    python scripts/sass_report.py llama-3.2-1b ['{"KOG_DYN_PERMILLE": 50}'] [--arch sm_90]
    python scripts/sass_report.py llama-3.2-1b --dump > a.sass     # the whole SASS, to diff

`--dump` prints the disassembly without line information: a source change that leaves it
byte-identical (cmp) on the shapes that matter changed nothing the GPU runs.

Needs nvcc and nvdisasm (CUDA toolkit; or `pip download nvidia-cuda-nvdisasm` and point
KOG_NVDISASM at its bin/nvdisasm).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from kogcupy.gpu import abi, kernels  # noqa: E402
from kogcupy.gpu.build_plan import THREADS, build_plan  # noqa: E402
from kogcupy.model.random_weights import shape_config  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape")
    ap.add_argument("tuning", nargs="?", default="{}")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--blocks", type=int, default=132, help="grid the build is planned for (H200: 132)")
    ap.add_argument("--memory-gib", type=float, default=139.8,
                    help="the GPU's memory the build is planned for (H200: 139.8; an H100: 79.1)")
    ap.add_argument("--dump", action="store_true", help="print the SASS (no line info) instead of the report")
    args = ap.parse_args(argv)
    nvdisasm = os.environ.get("KOG_NVDISASM") or shutil.which("nvdisasm")
    if not shutil.which("nvcc") or not nvdisasm:
        sys.exit("sass_report: needs nvcc and nvdisasm on PATH (or KOG_NVDISASM=/path/nvdisasm)")
    cfg = shape_config(args.shape)
    plan = build_plan(cfg, args.blocks, 4096, tuning=json.loads(args.tuning), memory_gib=args.memory_gib)
    d = kernels.model_defines(cfg, "bfloat16", THREADS, plan.smem_floats,
                              len(abi.PARTITION_COLUMNS), plan.tuning)
    src = kernels.monokernel_source()
    with tempfile.TemporaryDirectory() as tmp:
        cu, cubin = os.path.join(tmp, "monokernel.cu"), os.path.join(tmp, "monokernel.cubin")
        with open(cu, "w") as f:
            f.write(src)
        r = subprocess.run(["nvcc", f"-arch={args.arch}", "-std=c++17", "-cubin",
                            *([] if args.dump else ["-lineinfo"]),
                            "-o", cubin, cu, *kernels.define_options(d), "-Xptxas", "-v"],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr[-4000:])
        sass = subprocess.run([nvdisasm, *([] if args.dump else ["--print-line-info"]), cubin],
                              capture_output=True, text=True, check=True).stdout
    if args.dump:
        sys.stdout.write(sass)
        return
    print(f"{args.shape} {args.arch} tuning {plan.tuning}")
    for line in r.stderr.splitlines():
        if "registers" in line or "spill" in line:
            print("  " + line.strip())
    src_lines = src.splitlines()
    at, local, loads = None, collections.Counter(), collections.Counter()
    for line in sass.splitlines():
        m = re.search(r"//## File .*line (\d+)", line)
        if m:
            at = int(m.group(1))
        op = re.search(r"\b((?:STL|LDL)[A-Z0-9.]*|LDG[A-Z0-9.]*)", line)
        if op and op.group(1).startswith(("STL", "LDL")):
            local[(at, op.group(1))] += 1
        elif op:
            loads[op.group(1)] += 1
    print(f"local-memory instructions: {sum(local.values())} (source line of the inlined text)")
    for (ln, op), n in sorted(local.items(), key=lambda kv: kv[0][0] or 0):
        text = src_lines[ln - 1].strip()[:90] if ln else "?"
        print(f"  {op:<10} x{n:<3} line {ln}: {text}")
    print("global loads:")
    for op, n in loads.most_common():
        print(f"  {op:<36} {n}")


if __name__ == "__main__":
    main()
