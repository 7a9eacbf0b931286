"""The NumPy reference engine (the oracle the GPU is diffed against, and the no-GPU backend)
and the sampler whose semantics the GPU sampler shares."""
