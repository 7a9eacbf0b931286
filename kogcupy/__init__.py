"""kogcupy: batch-1 LLM inference in one persistent GPU kernel.

    import kogcupy
    model = kogcupy.load_model()            # the embedded SmolLM2-135M-Instruct
    engine = kogcupy.Engine(model)          # monokernel on a GPU, NumPy reference otherwise
    gen = engine.generate("Hello", max_new_tokens=32)
    for piece in gen:
        print(piece, end="", flush=True)
    print(f"\n{gen.result.tokens_per_s:.1f} tok/s")
"""
from .errors import KogError
from .model.config import ModelConfig
from .sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import kogcupy` stays cheap and never imports cupy by itself.
    if name == "load_model":
        from .model.loader import load_model
        return load_model
    if name == "Engine":
        from .engine import Engine
        return Engine
    raise AttributeError(f"module 'kogcupy' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"load_model", "Engine"})


__all__ = ["load_model", "Engine", "ModelConfig", "SamplingParams", "KogError", "__version__"]
