"""Golden output: the embedded SmolLM2 at temperature 0 must write exactly the stored text
(tests/golden/*.json, generated once with the reference and read by a human). The greedy path's
smallest top-1/top-2 logit margin is ~1.3e-2, far above fp32 noise (~1e-4)."""
from __future__ import annotations

import json
import os

import pytest

from kogcupy.engine import Engine

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")


def load_golden(name: str) -> dict:
    with open(os.path.join(GOLDEN_DIR, name), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("name", ["smollm2_chat_greedy.json"])
def test_greedy_output_matches_golden(name, smollm2):
    g = load_golden(name)
    eng = Engine(smollm2, backend="reference", context_length=512)
    gen = eng.generate(g["prompt"], max_new_tokens=g["max_new_tokens"], chat=g["chat"])
    text = "".join(gen)
    assert gen.result.finish_reason == g["finish_reason"]
    assert gen.result.token_ids == g["token_ids"]
    assert text == gen.result.text == g["text"]
