"""Tiny random HF checkpoints (one per supported family) for the oracle tests.

Each builder writes a HuggingFace directory (config.json + model.safetensors + tokenizer.json +
tokenizer_config.json) that ``kogcupy.load_model`` reads and transformers runs, so the NumPy
reference and transformers see the very same weights. Everything is fp32 and seeded.
"""
from __future__ import annotations

import json
import os

import numpy as np

VOCAB = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small model that wanted to run fast on one GPU.",
    "Batch one inference is limited by memory bandwidth, not by arithmetic.",
    "def main():\n    print('hello, world')\n    return 0\n",
    "In 2024 there were 365 days, 12 months and 52 weeks; 3.14159 is pi.",
    "Les modèles de langue génèrent du texte, un jeton à la fois. Ça marche!",
    "Attention, normalisation, rotary embeddings and a feed forward network.",
    "Question: what is the capital of France? Answer: Paris is the capital.",
]

# family -> (transformers config class name, model class name, config kwargs)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_theta=10000.0, tie_word_embeddings=True)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(     # llama3 rope scaling, untied head
        hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(      # q/k/v biases
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(      # qk-norm, head_dim*heads != hidden, MQA
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True)),
}


def build_tokenizer(directory: str, vocab_size: int = VOCAB, chat_template: bool = True) -> None:
    """A small byte-level BPE (GPT-2 style) trained on a fixed corpus, <= vocab_size tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(_CORPUS * 4, trainer=trainer)
    assert tk.get_vocab_size() <= vocab_size
    os.makedirs(directory, exist_ok=True)
    tk.save(os.path.join(directory, "tokenizer.json"))
    cfg = {"bos_token": None, "eos_token": EOS_TOKEN, "add_bos_token": False,
           "clean_up_tokenization_spaces": False}
    if chat_template:
        cfg["chat_template"] = CHATML_TEMPLATE
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)


def _randomize(model, seed: int) -> None:
    """HF init (std 0.02, unit norms, zero biases) hides bugs: use O(1) activations, non-unit
    norm gammas and non-zero biases so every folded / fused term matters."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:                                   # Linear (out, in)
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def build_hf_model(family: str, directory: str, seed: int = 0, vocab_size: int = VOCAB):
    """Write a tiny random `family` checkpoint + tokenizer into `directory`; returns the model."""
    import torch
    import transformers

    cfg_cls, model_cls, kw = FAMILIES[family]
    os.makedirs(directory, exist_ok=True)
    build_tokenizer(directory, vocab_size)
    with open(os.path.join(directory, "tokenizer.json"), encoding="utf-8") as f:
        eos_id = json.load(f)["added_tokens"][SPECIAL_TOKENS.index(EOS_TOKEN)]["id"]
    config = getattr(transformers, cfg_cls)(
        vocab_size=vocab_size, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=None, **kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(torch.float32).eval()
    _randomize(model, seed)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def load_hf_model(directory: str):
    """The saved checkpoint as transformers runs it: fp32, eager attention, CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager").eval()


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """n greedy tokens from a transformers model (argmax of fp32 logits, KV cache reused)."""
    import torch

    import inspect

    # transformers >= 5.2x names the KV cache `cache` (`past_key_values` is deprecated there)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.tensor([prompt_ids])
    out, past = [], None
    with torch.no_grad():
        for _ in range(n):
            r = model(input_ids=ids, use_cache=True, **{key: past})
            past = getattr(r, key)
            nxt = int(torch.argmax(r.logits[0, -1]))
            out.append(nxt)
            ids = torch.tensor([[nxt]])
    return out


def hf_logits(model, prompt_ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt_ids])).logits[0].float().numpy()


_HF_NAMES = {
    "embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{}.input_layernorm.weight",
    "wq": "model.layers.{}.self_attn.q_proj.weight", "wk": "model.layers.{}.self_attn.k_proj.weight",
    "wv": "model.layers.{}.self_attn.v_proj.weight", "bq": "model.layers.{}.self_attn.q_proj.bias",
    "bk": "model.layers.{}.self_attn.k_proj.bias", "bv": "model.layers.{}.self_attn.v_proj.bias",
    "q_norm": "model.layers.{}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{}.self_attn.k_norm.weight",
    "wo": "model.layers.{}.self_attn.o_proj.weight",
    "ffn_norm": "model.layers.{}.post_attention_layernorm.weight",
    "w_gate": "model.layers.{}.mlp.gate_proj.weight", "w_up": "model.layers.{}.mlp.up_proj.weight",
    "w_down": "model.layers.{}.mlp.down_proj.weight",
}


def load_tiny_model(directory: str):
    """kogcupy.load_model(directory); until the loader exists, the same Model packed here."""
    try:
        from kogcupy.model.loader import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        return load_model(directory)
    from dataclasses import dataclass

    from safetensors.numpy import load_file

    from kogcupy.model.config import load_hf_config
    from kogcupy.model.packing import pack_weights
    from kogcupy.model.tokenizer import Tokenizer

    cfg = load_hf_config(directory)
    sd = load_file(os.path.join(directory, "model.safetensors"))
    weights = pack_weights(cfg, lambda name, layer: sd[_HF_NAMES[name].format(layer)])

    @dataclass
    class _Model:
        config: object
        weights: dict
        tokenizer: object
        path: str
        dtype: str = "bfloat16"

    return _Model(cfg, weights, Tokenizer.from_dir(directory), directory)
