"""The NumPy reference against transformers (fp32, eager) on tiny random checkpoints of every
family, plus its own invariants (batch prefill == token by token, trace, KV cache, stream)."""
from __future__ import annotations

import numpy as np
import pytest

from kogcupy.errors import InputError
from kogcupy.reference.backend import LAYER_STAGES, STAGES, ReferenceBackend, ReferenceModel
from kogcupy.sampling_params import SamplingParams
from tiny_models import FAMILIES, hf_greedy, hf_logits, load_hf_model

PROMPT = "Once upon a time there was a small model. 3.14159 is pi; Paris is the capital."
N_GREEDY = 32
GREEDY = SamplingParams()


def max_rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def hf_models(tiny_dirs):
    return {fam: load_hf_model(d) for fam, d in tiny_dirs.items()}


def prompt_ids(model) -> list[int]:
    ids = model.tokenizer.encode(PROMPT)
    assert 20 <= len(ids) <= 64
    return ids


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_logits_match_transformers(family, tiny_models, hf_models):
    model = tiny_models[family]
    ids = prompt_ids(model)
    ours = ReferenceBackend(model).logits(ids)                 # (n, V)
    theirs = hf_logits(hf_models[family], ids)                 # (n, V)
    assert ours.shape == theirs.shape == (len(ids), model.config.vocab_size)
    err = max_rel_err(ours, theirs)
    print(f"{family}: prompt logits max rel err {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_tokens_match_transformers(family, tiny_models, hf_models):
    model = tiny_models[family]
    ids = prompt_ids(model)
    stream = ReferenceBackend(model).start(ids, GREEDY, N_GREEDY, eos_ids=set())
    ours = list(stream)
    assert stream.finish_reason == "length"
    assert ours == hf_greedy(hf_models[family], ids, N_GREEDY)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
def test_batch_prefill_equals_token_by_token(family, tiny_models):
    model = tiny_models[family]
    ids = prompt_ids(model)
    cfg = model.config
    tb, tt = {}, {}
    a = ReferenceModel(cfg, model.weights, 128, trace=tb).prefill(ids, batch=True, all_logits=True)
    rt = ReferenceModel(cfg, model.weights, 128, trace=tt)
    b = rt.prefill(ids, batch=False, all_logits=True)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
    c = ReferenceModel(cfg, model.weights, 128).prefill(ids, all_logits=True, chunk=7)
    np.testing.assert_allclose(c, b, rtol=0, atol=1e-5 * np.abs(b).max())
    assert tb.keys() == tt.keys()
    for key in tb:
        np.testing.assert_allclose(tb[key], tt[key], rtol=1e-4, atol=1e-4, err_msg=str(key))
    # the KV cache holds the same keys/values either way
    ra = ReferenceModel(cfg, model.weights, 128)
    ra.prefill(ids, batch=True)
    n = len(ids)
    np.testing.assert_allclose(ra.k_cache[:, :n], rt.k_cache[:, :n], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ra.v_cache[:, :n], rt.v_cache[:, :n], rtol=1e-4, atol=1e-5)


def test_trace_records_every_stage(tiny_models):
    model = tiny_models["qwen3"]
    cfg = model.config
    trace = {}
    be = ReferenceBackend(model, context_length=64, trace=trace)
    ids = prompt_ids(model)[:5]
    toks = list(be.start(ids, GREEDY, 3, eos_ids=set()))
    n_pos = len(ids) + 2                                       # last token is never fed back
    for pos in range(n_pos):
        assert trace[("embed", pos, None)].shape == (cfg.hidden_size,)
        for layer in range(cfg.n_layers):
            for stage in LAYER_STAGES:
                assert (stage, pos, layer) in trace
        assert trace[("attn_norm_qkv", pos, 1)].shape == (cfg.qkv_dim,)
        assert trace[("attention", pos, 0)].shape == (cfg.q_dim,)
        assert trace[("ffn_norm_gate_up_silu", pos, 0)].shape == (cfg.intermediate_size,)
    # logits only for the positions that were sampled; one sample + stop_check per token
    sampled = range(len(ids) - 1, n_pos)
    assert sorted(p for (s, p, _) in trace if s == "final_norm_lm_head") == list(sampled)
    assert [int(trace[("sample", p, None)]) for p in sampled] == toks
    assert [int(trace[("stop_check", p, None)]) for p in sampled] == [0, 0, 1]
    assert {s for (s, _, _) in trace} == set(STAGES)
    # callable hook sees the same stages
    seen = []
    ReferenceModel(cfg, model.weights, 64, trace=lambda s, p, l, a: seen.append((s, p, l))
                   ).prefill(ids)
    assert ("down_residual", 4, 1) in seen and ("final_norm_lm_head", 4, None) in seen


def test_kv_cache_layout(tiny_models):
    model = tiny_models["llama"]
    cfg = model.config
    rm = ReferenceModel(cfg, model.weights, 100)
    assert rm.k_cache.shape == (cfg.n_layers, 100, cfg.n_kv_heads, cfg.head_dim)
    assert rm.k_cache.dtype == rm.v_cache.dtype == np.float32
    # context is capped by the RoPE table
    assert ReferenceModel(cfg, model.weights, 10**6).context_length == cfg.max_position_embeddings


def test_stream_finish_reasons_and_cancel(tiny_models):
    model = tiny_models["llama"]
    be = ReferenceBackend(model, context_length=16)
    ids = prompt_ids(model)[:10]
    s = be.start(ids, GREEDY, 100, eos_ids=set())
    out = list(s)
    assert s.finish_reason == "context" and len(ids) + len(out) == 16
    assert s.prefill_s > 0
    first = out[0]
    s = be.start(ids, GREEDY, 100, eos_ids={first})
    assert list(s) == [first] and s.finish_reason == "eos"          # EOS is yielded
    s = be.start(ids, GREEDY, 3, eos_ids=set())
    assert len(list(s)) == 3 and s.finish_reason == "length"
    s = be.start(ids, GREEDY, 100, eos_ids=set())
    next(s), next(s)
    s.cancel()
    assert list(s) == [] and s.finish_reason == "cancelled"
    # a second start() takes the cache: the first stream ends as cancelled
    s1 = be.start(ids, GREEDY, 5, eos_ids=set())
    next(s1)
    s2 = be.start(ids, GREEDY, 5, eos_ids=set())
    assert list(s1) == [] and s1.finish_reason == "cancelled"
    assert len(list(s2)) == 5


def test_sampled_stream_is_seeded(tiny_models):
    model = tiny_models["qwen2"]
    be = ReferenceBackend(model)
    ids = prompt_ids(model)
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    a = list(be.start(ids, p, 16, eos_ids=set()))
    b = list(be.start(ids, p, 16, eos_ids=set()))
    c = list(be.start(ids, SamplingParams(temperature=1.0, top_p=0.95, seed=8), 16, set()))
    assert a == b and a != c


def test_bad_prompts(tiny_models):
    model = tiny_models["llama"]
    be = ReferenceBackend(model, context_length=16)
    with pytest.raises(InputError, match="context length"):
        be.start(list(range(16)), GREEDY, 4, set())
    with pytest.raises(InputError, match="empty"):
        be.start([], GREEDY, 4, set())
    with pytest.raises(InputError, match="outside"):
        be.start([1, 2, 512], GREEDY, 4, set())
    with pytest.raises(InputError, match="max_new_tokens"):
        be.start([1, 2], GREEDY, 0, set())
    assert len(list(be.start(list(range(15)), GREEDY, 4, set()))) == 1   # 15 + 1 fills it
