"""A short monokernel run for compute-sanitizer (scripts/sanitize_kernels.sh): a tiny model,
greedy and sampled generations, and a teacher-forced logits pass.

    python scripts/sanitize_kernels.py [blocks] [q heads per kv head] [greedy tokens] [head_dim] [hidden]
"""
from __future__ import annotations

import sys
if {"-h", "--help"} & set(sys.argv[1:]):      # usage: the docstring above
    print(__doc__.strip())
    sys.exit(0)
from types import SimpleNamespace

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from kogcupy.model.config import ModelConfig  # noqa: E402
from kogcupy.gpu.monokernel import MonokernelBackend  # noqa: E402
from kogcupy.model.random_weights import random_packed_weights  # noqa: E402
from kogcupy.sampling_params import SamplingParams  # noqa: E402

# argv[2]: q heads per kv head (default 2; 12 gives the tensor-core attention two 8-head
# tiles); argv[4]: head_dim (default 64; 128 shares each 16-position group between two warps
# that meet at the block's barrier)
gqa = int(sys.argv[2]) if len(sys.argv) > 2 else 2
head_dim = int(sys.argv[4]) if len(sys.argv) > 4 else 64
# argv[5]: hidden size (default 128; the FFN is twice it): 1024 on 16 blocks puts every block's
# first down rows in gate_up's hands (gate_up.cuh, kog_down_prefetched)
hidden = int(sys.argv[5]) if len(sys.argv) > 5 else 128
cfg = ModelConfig(arch="qwen3", vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden,
                  n_layers=2, n_heads=2 * gqa, n_kv_heads=2, head_dim=head_dim, rms_norm_eps=1e-6,
                  rope_theta=1e4, max_position_embeddings=256, tie_word_embeddings=True)
w = random_packed_weights(cfg, seed=0, rope_positions=256)
m = SimpleNamespace(config=cfg, weights=w, dtype="bfloat16", tokenizer=None, path="random")
blocks = int(sys.argv[1]) if len(sys.argv) > 1 else 16
be = MonokernelBackend(m, context_length=256, blocks=blocks, debug_positions=4)
# argv[3]: greedy tokens (default 197: 200 positions, past one attention chunk, so the split
# attention and its combine run too; racecheck is slow, fewer tokens still run every stage)
n_greedy = int(sys.argv[3]) if len(sys.argv) > 3 else 197
a = list(be.start([1, 2, 3], SamplingParams(), n_greedy, set()))
b = list(be.start([4, 5], SamplingParams(temperature=0.9, top_k=10, top_p=0.9, min_p=0.01,
                                         repetition_penalty=1.1, seed=3), 8, set()))
c = list(be.start([6, 7], SamplingParams(temperature=1.0, seed=5), 8, set()))   # the LM head draws
lg = be.logits([1, 2, 3, 4, 5, 6])
knobs = ("KOG_CLUSTER", "KOG_GATE_UP_EARLY", "KOG_QKV_EARLY", "KOG_DOWN_DEPTH", "KOG_ZERO_EARLY", "KOG_POLL_SENTINEL")
print("plan", {k: be.tuning[k] for k in knobs})     # (which paths this run checked)
print("greedy", len(a), a[:10], "sampled", b, c, "logits finite", bool((lg == lg).all()))
