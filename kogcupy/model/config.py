"""ModelConfig: one frozen dataclass describing a decoder-only transformer kogcupy can run.

Built from a HuggingFace ``config.json`` (transformers v4 ``rope_scaling``/``rope_theta`` or v5
``rope_parameters``) or from GGUF metadata (see ``weights.py``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import ContextLengthError, InputError, ModelLoadError, UnsupportedModelError

# HF `model_type` -> kogcupy family. The families differ only in qkv bias and qk-norm.
SUPPORTED_ARCHS = {
    "llama": "llama",      # Llama 2/3.x, SmolLM2, TinyLlama
    "qwen2": "qwen2",      # Qwen2 / Qwen2.5: q/k/v biases
    "qwen3": "qwen3",      # Qwen3: RMSNorm on q and k per head
}
SUPPORTED_TEXT = "llama (Llama-2/3.x, SmolLM2, TinyLlama), qwen2 (Qwen2, Qwen2.5), qwen3"

# What `kogcupy models` and the README's "Supported models" list (a test keeps them one):
# (family, examples, notes).
MODEL_FAMILIES = (
    ("llama", "Llama-2, Llama-3.x (llama3 RoPE scaling), SmolLM2, TinyLlama",
     "tied or untied embeddings"),
    ("qwen2", "Qwen2, Qwen2.5", "q/k/v biases"),
    ("qwen3", "Qwen3 dense", "q/k RMSNorm"),
)
# (checkpoint, how it is tested)
TESTED_CHECKPOINTS = (
    ("SmolLM2-135M-Instruct Q4_1 GGUF (the embedded default)",
     "reference vs transformers logits and greedy text, golden outputs (CPU tests)"),
    ("tiny random llama / qwen2 / qwen3 (HF safetensors, GGUF, packed)",
     "reference vs transformers logits (CPU tests); GPU stage by stage vs the reference"),
    ("Llama-3.2-1B, Qwen3-1.7B, Llama-3.1-8B shapes (random bf16 weights)",
     "GPU vs reference, benchmarks (1-4 GPUs)"),
)
MODEL_FORMATS = (
    "HuggingFace safetensors directories (single or sharded; bf16/fp16/fp32; transformers v4 "
    "and v5 config.json)",
    "GGUF (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, Q2_K-Q6_K; dequantized; a split GGUF, "
    "NAME-00001-of-0000N.gguf, from its first file or its directory)",
    "kogcupy packed directories (kogcupy-repack)",
    "a hub id in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE, what hf download fills)",
)
# what is refused, rather than run differently (weights._pickle_error, _check_unsupported_features)
MODEL_REFUSALS = (
    "PyTorch pickle checkpoints (convert them to safetensors)",
    "quantized safetensors (quantization_config: use the unquantized checkpoint or a GGUF)",
    "an activation other than SiLU",
    "sliding-window attention",
)


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("llama3" rope type)."""
    rope_type: str                       # only "llama3"
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    arch: str                            # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"        # checkpoint dtype: "bfloat16" | "float16" | "float32"
    # derived
    qkv_bias: bool = field(init=False)
    qk_norm: bool = field(init=False)
    q_dim: int = field(init=False)       # n_heads * head_dim
    kv_dim: int = field(init=False)      # n_kv_heads * head_dim
    qkv_dim: int = field(init=False)     # q_dim + 2 * kv_dim (fused QKV rows)

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS.values():
            raise UnsupportedModelError(
                f"unsupported architecture {self.arch!r}; kogcupy runs {SUPPORTED_TEXT}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads",
                     "n_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ModelLoadError(f"model config: {name} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ModelLoadError(
                f"model config: n_heads={self.n_heads} is not a multiple of "
                f"n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ModelLoadError(f"model config: head_dim={self.head_dim} must be even for RoPE")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("qkv_bias", self.arch == "qwen2")
        set_("qk_norm", self.arch == "qwen3")
        set_("q_dim", self.n_heads * self.head_dim)
        set_("kv_dim", self.n_kv_heads * self.head_dim)
        set_("qkv_dim", self.q_dim + 2 * self.kv_dim)

    @property
    def gqa_group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def check_token_ids(self, token_ids, what: str = "token_ids") -> None:
        """InputError unless `token_ids` is a non-empty 1-D list of ids inside the vocabulary."""
        if len(token_ids) == 0:
            raise InputError(f"{what} is empty: nothing to run")
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"{what} must be a list of integer token ids")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise InputError(f"{what} has token ids outside [0, {self.vocab_size})")

    def check_request(self, prompt_ids, context_length: int, max_new_tokens: int = 1,
                      template: bool = False) -> None:
        """InputError unless a generation request fits: valid prompt ids, at most
        context_length - 1 of them (one position is left to generate), max_new_tokens >= 1.
        `template`: the ids are a rendered chat template (the error says so)."""
        self.check_token_ids(prompt_ids, "prompt")
        if len(prompt_ids) > context_length - 1:
            what = " (chat template included)" if template else ""
            more = (f" or raise the context length (--context-length; Engine(context_length=N)"
                    f"; the model has {self.max_position_embeddings:,} positions)"
                    if context_length < self.max_position_embeddings else
                    " (it is the model's own limit)")
            raise ContextLengthError(
                f"prompt of {len(prompt_ids)} tokens{what} does not fit the context length "
                f"{context_length} (at most {context_length - 1} prompt tokens); shorten it"
                f"{more}", len(prompt_ids))
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["rope_scaling"] = dataclasses.asdict(self.rope_scaling) if self.rope_scaling else None
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The config a packed directory stores (to_dict); a missing or unknown key is a
        TypeError that names it."""
        d = dict(d)
        fields = [f for f in dataclasses.fields(cls) if f.init]
        for f in fields:
            if f.name not in d and f.default is dataclasses.MISSING:
                raise TypeError(f"no {f.name!r} key")
        unknown = sorted(set(d) - {f.name for f in fields})
        if unknown:
            raise TypeError(f"unknown key {unknown[0]!r}")
        rs = d.get("rope_scaling")
        d["rope_scaling"] = RopeScaling(**rs) if rs else None
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)

    def n_params(self, include_embedding: bool = True) -> int:
        """Parameter count of the matrices a decode step reads (norms and biases included)."""
        h, L = self.hidden_size, self.n_layers
        per_layer = h * self.qkv_dim + self.q_dim * h + 3 * h * self.intermediate_size + 2 * h
        if self.qkv_bias:
            per_layer += self.qkv_dim
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        n = L * per_layer + h + self.vocab_size * h          # + final norm + LM head
        if include_embedding and not self.tie_word_embeddings:
            n += self.vocab_size * h
        return n


def _rope_from_hf(cfg: dict) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from either transformers v4 or v5 config.json layout."""
    params = cfg.get("rope_parameters")          # v5: {"rope_type":..., "rope_theta":...}
    if isinstance(params, dict) and "full_attention" in params:
        params = params["full_attention"]
    scaling = cfg.get("rope_scaling")             # v4
    theta = cfg.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        scaling = params
    if theta is None:
        theta = 10000.0
    if not scaling:
        return float(theta), None
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    if rtype in (None, "default"):
        return float(theta), None
    if rtype != "llama3":
        raise UnsupportedModelError(
            f"unsupported rope scaling type {rtype!r}; kogcupy supports 'default' and 'llama3'")
    try:
        return float(theta), RopeScaling(
            rope_type="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ModelLoadError(f"config.json: llama3 rope scaling lacks {e.args[0]!r}") from None


def _check_unsupported_features(cfg: dict) -> None:
    """UnsupportedModelError for what a supported model type's config.json can ask for that
    kogcupy does not run (rather than run it differently, silently): quantized weights, another
    activation than SiLU, sliding-window attention on some layers."""
    q = cfg.get("quantization_config")
    if q:
        method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
        raise UnsupportedModelError(
            f"quantized checkpoint (quant_method={method!r}) is not supported: kogcupy reads "
            f"BF16 / F16 / F32 safetensors or a GGUF file; use the unquantized checkpoint")
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"config.json: hidden_act {act!r} is not supported; "
                                    f"kogcupy's FFN is SwiGLU (silu)")
    n_layers = cfg.get("num_hidden_layers")
    window, positions = cfg.get("sliding_window"), cfg.get("max_position_embeddings")
    # (qwen2 / qwen3 in transformers: use_sliding_window false means full attention whatever
    # layer_types says)
    sliding = "sliding_attention" in (cfg.get("layer_types") or []) and \
        cfg.get("use_sliding_window") is not False
    if cfg.get("use_sliding_window") and isinstance(n_layers, int):
        first = cfg.get("max_window_layers", 0)
        sliding |= isinstance(first, int) and first < n_layers
    if sliding and not (isinstance(window, int) and isinstance(positions, int)
                        and window >= positions):
        raise UnsupportedModelError(
            f"config.json: sliding-window attention (sliding_window={window}) is not "
            f"supported; kogcupy attends to every earlier position on every layer")


def _size(cfg: dict, key: str, default=None) -> int:
    """config.json's cfg[key] (or `default` when it is absent or null): an integer >= 1."""
    v = cfg.get(key)
    if v is None:
        if default is None:
            raise KeyError(key)
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ModelLoadError(f"config.json: {key} must be an integer, got {v!r}")
    if v < 1:
        raise ModelLoadError(f"config.json: {key} must be >= 1, got {v}")
    return v


def config_from_hf(cfg: dict) -> ModelConfig:
    """ModelConfig from a parsed HuggingFace config.json."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures")
    if model_type is None:
        seen = f" (architectures {archs})" if archs else ""
        raise ModelLoadError(f'config.json has no "model_type"{seen}; kogcupy runs '
                             f'{SUPPORTED_TEXT}')
    if model_type not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"unsupported model type {model_type!r} (architectures {archs}); "
            f"kogcupy runs {SUPPORTED_TEXT}")
    _check_unsupported_features(cfg)
    try:
        hidden = _size(cfg, "hidden_size")
        n_heads = _size(cfg, "num_attention_heads")
        theta, scaling = _rope_from_hf(cfg)
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return ModelConfig(
            arch=SUPPORTED_ARCHS[model_type],
            vocab_size=_size(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_size(cfg, "intermediate_size"),
            n_layers=_size(cfg, "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=_size(cfg, "num_key_value_heads", n_heads),
            head_dim=_size(cfg, "head_dim", hidden // n_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=_size(cfg, "max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        )
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks required key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"config.json has a malformed value: {e}") from None


def load_hf_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{directory}: no config.json; expected a HuggingFace model "
                             f"directory, a kogcupy packed directory or a .gguf file")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except PermissionError:
        raise                    # (the machine's error, named, not "cannot parse")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot parse config.json ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: config.json is not a JSON object")
    return config_from_hf(cfg)
