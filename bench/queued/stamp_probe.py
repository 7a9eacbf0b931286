"""Probe (not kept): move attention's chunk stamp (slot layer * 16 + 15) from the chunk's start
to a later point of the tensor-core chunk, in place; `restore` puts the file back.
Usage: python3 bench/queued/stamp_probe.py tiles-start|tiles-end|merged|restore"""
import shutil, sys
P = "kernels_src/attention.cuh"
BACKUP = "/tmp/attention.cuh.orig"
where = sys.argv[1]
if where == "restore":
    shutil.copy(BACKUP, P)
    sys.exit(0)
shutil.copy(P, BACKUP)
s = open(P).read()
STAMP = "    kog_prof(c, layer * 16 + 15);\n"
call = "        kog_prof(c, layer * 16 + 15);\n        kog_attn_chunk(c, layer, g, j0, j1);\n"
assert s.count(call) == 1
s = s.replace(call, "        kog_attn_chunk(c, layer, g, j0, j1);\n")
anchors = {
    "tiles-start": ["    for (int a = j0, i = 0; a < j1; a += T, ++i) {\n        kog_copy16_wait_groups<NB - 1>();"
                    "                     // this lane's copies of tile i landed\n"
                    "        kog_attn_tile_sync();"],
    "tiles-end": ["    // This warp's state (its dims of the G heads; the sum reduced over the lanes of a head)\n    // into o_at"],
}
if where in anchors:
    for a in anchors[where]:
        assert s.count(a) == 1, a
        s = s.replace(a, STAMP + a)
elif where == "merged":
    a1 = "        __syncthreads();                                      // o, ml are the unit's partial\n        return;\n"
    a2 = "    kog_attn_merge_states(NWA, NB * R * HD, o, ml);\n}\n"
    assert s.count(a1) == 1 and s.count(a2) == 1
    s = s.replace(a1, a1.replace("        return;\n", "    " + STAMP + "        return;\n"))
    s = s.replace(a2, a2[:-2] + STAMP + "}\n")
else:
    sys.exit("unknown point " + where)
open(P, "w").write(s)
