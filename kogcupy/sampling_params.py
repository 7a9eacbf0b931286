"""SamplingParams: what a request asks of the sampler, validated once for every backend."""
from __future__ import annotations

import numbers
import secrets
from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 -> greedy (argmax)
    top_k: int = 0                    # 0 or -1 -> off (kept as 0)
    top_p: float = 1.0                # 1 -> off
    min_p: float = 0.0                # 0 -> off
    repetition_penalty: float = 1.0   # 1 -> off (HF/CTRL rule over prompt + generated ids)
    seed: int = 0

    def __post_init__(self):
        def bad(msg):
            raise InputError(f"invalid sampling parameter: {msg}")
        # numbers of any kind (NumPy's too) become Python's; anything else is an InputError
        for name, kind in (("temperature", numbers.Real), ("top_p", numbers.Real),
                           ("min_p", numbers.Real), ("repetition_penalty", numbers.Real),
                           ("top_k", numbers.Integral), ("seed", numbers.Integral)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, kind):
                bad(f"{name} must be {'an integer' if kind is numbers.Integral else 'a number'}, "
                    f"got {v!r} ({type(v).__name__})")
            object.__setattr__(self, name, int(v) if kind is numbers.Integral else float(v))
        if not (0.0 <= self.temperature < float("inf")):
            bad(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k == -1:                    # vLLM's and HF servers' "off"
            object.__setattr__(self, "top_k", 0)
        if self.top_k < 0:
            bad(f"top_k must be an integer >= 1, or 0 or -1 for off, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p < 1.0):
            bad(f"min_p must be in [0, 1), got {self.min_p}")
        if not (0.0 < self.repetition_penalty < float("inf")):
            bad(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.seed == -1:                     # a random one, as generate's and the CLI's -1
            object.__setattr__(self, "seed", secrets.randbits(63))
        if not 0 <= self.seed < 2**64:
            bad(f"seed must be -1 (a random one) or an integer in [0, 2**64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def draws_in_lm_head(self) -> bool:
        """Sampling with every id kept and no penalty: the GPU's LM head blocks draw as they
        write their logits (kernels_src/sampling.cuh), so no rank needs the whole vocabulary."""
        return (self.temperature > 0.0 and self.top_k == 0 and self.top_p >= 1.0
                and self.min_p <= 0.0 and self.repetition_penalty == 1.0)

    @property
    def draws_over_slices(self) -> bool:
        """A filter or a penalty: the GPU's blocks draw over their slices of the vocabulary in
        rounds (a kernel build of its own), and on several GPUs every rank needs all logits."""
        return (not self.greedy and not self.draws_in_lm_head) or self.repetition_penalty != 1.0
