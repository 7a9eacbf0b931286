"""Device probe (forty-eighth session): the server's warm-up (Engine.warm_up: the sampler's
filter build, the prefill graphs) in a fresh process, run twice in a row -- the second
process finds the monokernel's builds in CuPy's on-disk kernel cache.

    python bench/queued/warm_up_twice.py SHAPE      # prints one line: shape, seconds
"""
import sys
import time

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from kogcupy.engine import Engine  # noqa: E402
from kogcupy.model.loader import random_model  # noqa: E402
from kogcupy.model.random_weights import shape_config  # noqa: E402

shape = sys.argv[1]
t0 = time.perf_counter()
eng = Engine(random_model(shape_config(shape), seed=0, rope_positions=4096), backend="monokernel",
             context_length=4096)
t1 = time.perf_counter()
n = eng.warm_up()
t2 = time.perf_counter()
print(f"{shape}: Engine() {t1 - t0:.2f} s, warm-up {t2 - t1:.2f} s ({n} graphs)")
