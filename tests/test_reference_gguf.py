"""The reference on the embedded SmolLM2 GGUF against transformers' own GGUF loader (fp32,
eager). Both see our tokenizer's ids: transformers' GGUF tokenizer lacks SmolLM2's digit split."""
from __future__ import annotations

import os

import numpy as np
import pytest

from kogcupy.reference.backend import ReferenceBackend
from kogcupy.sampling_params import SamplingParams
from tiny_models import hf_greedy, hf_logits

PROMPT = "Write a haiku about GPUs that stream 1234 tokens per second."
N_GREEDY = 32


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2.path), gguf_file=os.path.basename(smollm2.path),
        dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    ids = smollm2.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    assert "1234" in PROMPT and len(ids) > 30
    return ids


def test_gguf_logits_match_transformers(smollm2, hf_smollm2, prompt_ids):
    ours = ReferenceBackend(smollm2, context_length=256).logits(prompt_ids)
    theirs = hf_logits(hf_smollm2, prompt_ids)
    err = float(np.abs(ours - theirs).max())
    print(f"SmolLM2 GGUF: prompt logits max abs err {err:.2e} "
          f"(max |logit| {np.abs(theirs).max():.1f})")
    assert err < 1e-3


def test_gguf_greedy_matches_transformers(smollm2, hf_smollm2, prompt_ids):
    stream = ReferenceBackend(smollm2, context_length=256).start(
        prompt_ids, SamplingParams(), N_GREEDY, eos_ids=set())
    assert list(stream) == hf_greedy(hf_smollm2, prompt_ids, N_GREEDY)
