"""Engine on the reference backend: finish reasons, stop strings, streaming, chat, validation."""
from __future__ import annotations

import dataclasses
import time

import pytest

from kogcupy.engine import Engine, GenerationResult, resolve_backend
from kogcupy.errors import DeviceError, InputError
from kogcupy.reference.backend import ReferenceBackend

PROMPT = "Once upon a time there was a small model"


def run(gen) -> tuple[list[str], GenerationResult]:
    pieces = list(gen)
    assert gen.result is not None
    assert "".join(pieces) == gen.result.text
    assert all(pieces), "no empty pieces"
    return pieces, gen.result


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(tiny_models["llama"], backend="reference", context_length=128)


def test_length_and_result_fields(engine):
    pieces, r = run(engine.generate(PROMPT, max_new_tokens=20, chat=False))
    assert r.finish_reason == "length" and len(r.token_ids) == 20
    assert r.backend == "reference" == engine.backend_name
    assert engine.warm_up() == 0                             # (the GPU backends' prefill graphs)
    assert r.prompt_tokens == len(engine.tokenizer.encode(PROMPT))
    assert r.prefill_s > 0 and r.decode_s > 0 and r.tokens_per_s > 0
    assert r.gb_per_s > 0 and r.pct_of_bandwidth is None     # host bandwidth is not known
    assert r.text == engine.tokenizer.decode(r.token_ids)
    assert "tok/s" in r.stats_line() and "finish length" in r.stats_line()
    assert "\ufffd" not in r.text and len(pieces) > 1


def test_same_tokens_as_backend_and_prompt_forms(engine):
    ids = engine.tokenizer.encode(PROMPT)
    a = run(engine.generate(PROMPT, max_new_tokens=12, chat=False))[1]
    b = run(engine.generate(ids, max_new_tokens=12))[1]
    stream = engine.backend.start(ids, engine_params(), 12, set())
    assert a.token_ids == b.token_ids == list(stream)


def engine_params():
    from kogcupy.sampling_params import SamplingParams
    return SamplingParams()


def test_chat_template_is_default_for_text(engine):
    tk = engine.tokenizer
    assert tk.has_chat_template
    gen = engine.generate(PROMPT, max_new_tokens=2)
    expected = tk.encode(tk.render_chat([{"role": "user", "content": PROMPT}]), add_bos=False)
    assert gen.prompt_ids == expected
    assert engine.generate(PROMPT, max_new_tokens=2, chat=False).prompt_ids == tk.encode(PROMPT)
    with pytest.raises(InputError, match="chat"):
        engine.generate([1, 2, 3], chat=True)


def test_stop_strings_cut_text(engine):
    full = run(engine.generate(PROMPT, max_new_tokens=40, chat=False))[1].text
    assert len(full) > 20
    stop = full[12:15]
    idx = full.find(stop)
    pieces, r = run(engine.generate(PROMPT, max_new_tokens=40, chat=False,
                                    stop=["never-there", stop]))
    assert r.finish_reason == "stop"
    assert r.text == full[:idx]
    assert engine.tokenizer.decode(r.token_ids).startswith(full[:idx] + stop)
    assert len(r.token_ids) < 40
    # a stop string that never completes: same text as without stop, held-back text released
    pieces, r = run(engine.generate(PROMPT, max_new_tokens=40, chat=False,
                                    stop=full[-3:] + "\x00"))
    assert r.text == full and r.finish_reason == "length"
    # stop at the very start
    r = run(engine.generate(PROMPT, max_new_tokens=40, chat=False, stop=full[:2]))[1]
    assert r.text == "" and r.finish_reason == "stop"


def test_context_finish(tiny_models):
    eng = Engine(tiny_models["qwen3"], backend="reference", context_length=24)
    ids = eng.tokenizer.encode(PROMPT)
    r = run(eng.generate(ids, max_new_tokens=100))[1]
    assert r.finish_reason == "context" and len(ids) + len(r.token_ids) == 24
    with pytest.raises(InputError, match="context length"):
        eng.generate(list(range(24)), max_new_tokens=4)
    assert eng.generate(list(range(23)), max_new_tokens=4).prompt_ids == list(range(23))


def test_eos_finish_hides_eos(tiny_models):
    model = tiny_models["qwen2"]
    eng = Engine(model, backend="reference")
    first = run(eng.generate(PROMPT, max_new_tokens=3, chat=False))[1].token_ids
    # make the model's second greedy token an EOS
    cfg = dataclasses.replace(model.config, eos_token_ids=(first[1],))
    eng = Engine(dataclasses.replace(model, config=cfg), backend="reference")
    r = run(eng.generate(PROMPT, max_new_tokens=30, chat=False))[1]
    assert r.finish_reason == "eos" and r.token_ids == first[:2]
    assert r.text == model.tokenizer.decode(first[:1])
    # ignore_eos (vLLM's; benchmarks): on past it to max_new_tokens, the EOS kept out of the text
    r = run(eng.generate(PROMPT, max_new_tokens=3, chat=False, ignore_eos=True))[1]
    assert r.finish_reason == "length" and r.token_ids == first
    assert r.text == model.tokenizer.decode([first[0], first[2]], skip_special_tokens=True)
    with pytest.raises(InputError, match="ignore_eos must be True or False"):
        eng.generate(PROMPT, ignore_eos="yes")


def test_cancel_by_close_and_keyboard_interrupt(engine):
    gen = engine.generate(PROMPT, max_new_tokens=50, chat=False)
    got = [next(gen), next(gen)]
    r = gen.close()
    assert r.finish_reason == "cancelled" and r.text == "".join(got)
    assert gen.stream.finish_reason == "cancelled"
    assert list(gen) == [] and gen.close() is r

    gen = engine.generate(PROMPT, max_new_tokens=50, chat=False)
    inner = gen.stream

    class Interrupting:
        n = 0
        finish_reason = property(lambda self: inner.finish_reason)
        prefill_s = property(lambda self: inner.prefill_s)

        def __iter__(self):
            return self

        def __next__(self):
            self.n += 1
            if self.n == 4:
                raise KeyboardInterrupt
            return next(inner)

        def cancel(self):
            inner.cancel()

    gen.stream = Interrupting()
    got = []
    with pytest.raises(KeyboardInterrupt):
        for piece in gen:
            got.append(piece)
    assert gen.result.finish_reason == "cancelled"
    assert gen.result.text == "".join(got) and len(gen.result.token_ids) == 3

    # Ctrl-C in the prefill: no token, and the stats give the time the prefill ran
    gen = engine.generate(PROMPT, max_new_tokens=50, chat=False)
    inner = gen.stream

    class InPrefill(Interrupting):
        def __next__(self):
            if not self.n:
                self.n = 1
                time.sleep(0.05)
                raise KeyboardInterrupt
            return next(inner)

    gen.stream = InPrefill()
    with pytest.raises(KeyboardInterrupt):
        next(gen)
    r = gen.result
    assert r.token_ids == [] and r.finish_reason == "cancelled" and r.prefill_s >= 0.05
    assert "prefill 0.000 s" not in r.stats_line()


def test_generate_validation(engine):
    for kw in (dict(max_new_tokens=0), dict(max_new_tokens=-1), dict(temperature=-1.0),
               dict(top_p=0.0), dict(top_k=-3), dict(stop=[""]), dict(min_p=1.5)):
        with pytest.raises(InputError):
            engine.generate(PROMPT, **kw)
    for chat in (False, None):                 # (None: through the chat template)
        with pytest.raises(InputError, match="empty"):
            engine.generate("", chat=chat)
    with pytest.raises(InputError, match="outside"):
        engine.generate([1, 10**6])
    with pytest.raises(InputError):
        engine.generate(3.5)
    # wrong types are InputErrors too (not TypeErrors), strings are not numbers
    for kw in (dict(temperature=None), dict(top_p=None), dict(temperature="0.5"),
               dict(top_k=True), dict(seed=1.5), dict(stop=5), dict(max_new_tokens="5")):
        with pytest.raises(InputError):
            engine.generate(PROMPT, **kw)


def test_seeds_and_sentinels(engine):
    import numpy as np
    kw = dict(max_new_tokens=6, chat=False, temperature=1.5)
    ra = run(engine.generate(PROMPT, **kw))[1]
    rb = run(engine.generate(PROMPT, **kw))[1]
    assert ra.seed is not None and ra.seed != rb.seed             # no seed: a random one
    again = run(engine.generate(PROMPT, seed=np.int64(ra.seed), top_k=-1, **kw))[1]
    assert again.token_ids == ra.token_ids and again.seed == ra.seed
    assert run(engine.generate(PROMPT, seed=-1, max_new_tokens=2))[1].seed >= 0


def test_logits_arguments(engine):
    from kogcupy.errors import ContextLengthError
    with pytest.raises(InputError, match="str or a list of token ids"):
        engine.logits(5)
    with pytest.raises(ContextLengthError, match="exceed the context length 128") as e:
        engine.logits([1] * 129)
    assert e.value.prompt_tokens == 129


def test_engine_arguments(tiny_models):
    with pytest.raises(InputError, match="unknown argument.*context_len"):
        Engine(tiny_models["llama"], backend="reference", context_len=64)
    with pytest.raises(InputError, match="kogcupy.load_model"):
        Engine("path/to/model")


def test_backend_choice(tiny_models, monkeypatch):
    import kogcupy.engine as E
    monkeypatch.setattr(E, "gpu_info", lambda: (False, "cupy sees no GPU"))
    assert resolve_backend("auto") == "reference"
    assert isinstance(Engine(tiny_models["llama"]).backend, ReferenceBackend)
    with pytest.raises(DeviceError, match="reference"):
        Engine(tiny_models["llama"], backend="monokernel")
    with pytest.raises(InputError, match="unknown backend"):
        Engine(tiny_models["llama"], backend="tpu")
    with pytest.raises(InputError, match="gpus"):
        Engine(tiny_models["llama"], backend="reference", gpus=2)
    monkeypatch.setattr(E, "gpu_info", lambda: (True, "1 GPU(s)"))
    assert resolve_backend("auto") == "monokernel"
    # the tensor-parallel split is checked before any GPU is touched (tiny llama: 4 heads)
    with pytest.raises(InputError, match="does not divide the model's 4 attention heads"):
        Engine(tiny_models["llama"], backend="monokernel", gpus=3)
    with pytest.raises(InputError, match="1 to 8 GPUs"):
        Engine(tiny_models["llama"], backend="monokernel", gpus=16)


def test_sampled_generation_reproducible(engine):
    kw = dict(max_new_tokens=16, temperature=0.9, top_k=40, top_p=0.95, seed=42, chat=False)
    a = run(engine.generate(PROMPT, **kw))[1]
    b = run(engine.generate(PROMPT, **kw))[1]
    assert a.token_ids == b.token_ids and a.text == b.text


def test_smollm2_chat_ends_with_eos(smollm2):
    eng = Engine(smollm2, backend="reference", context_length=512)
    pieces, r = run(eng.generate("What is the capital of France?", max_new_tokens=40))
    assert r.finish_reason == "eos" and r.token_ids[-1] in smollm2.tokenizer.eos_token_ids
    assert "Paris" in r.text and "<|im_end|>" not in r.text


def test_bandwidth_fields_when_backend_knows_its_bandwidth(tiny_models):
    eng = Engine(tiny_models["llama"], backend="reference")
    eng.backend.read_bandwidth_Bps = 20e9
    r = run(eng.generate(PROMPT, max_new_tokens=8, chat=False))[1]
    assert r.gb_per_s == pytest.approx(eng.backend.bytes_per_token * r.tokens_per_s / 1e9)
    assert r.pct_of_bandwidth == pytest.approx(100 * r.gb_per_s * 1e9 / 20e9)
    assert "% of read bandwidth" in r.stats_line()


def test_stats_line_counts_and_rates():
    r = GenerationResult(token_ids=[7], text="", finish_reason="eos", prompt_tokens=5,
                         prefill_s=0.25, decode_s=0.0, tokens_per_s=0.0, backend="reference")
    assert r.stats_line().startswith("kogcupy: 1 token, prefill 0.250 s (5 prompt tokens")
    r = dataclasses.replace(r, token_ids=[7, 8, 9], decode_s=0.5, tokens_per_s=4.0)
    assert r.stats_line().startswith("kogcupy: 3 tokens, 4.0 tok/s, prefill")


def test_threads_take_turns(tiny_models, monkeypatch):
    """A generate() from another thread waits for the step that runs (it used to reset the
    KV cache under it: wrong greedy text, no error), then stops the earlier Generation."""
    import threading

    from kogcupy.reference.backend import ReferenceTokenStream
    eng = Engine(tiny_models["llama"], backend="reference", context_length=256)
    want = run(eng.generate([5, 6, 7], max_new_tokens=8, ignore_eos=True))[1].token_ids
    in_step, release = threading.Event(), threading.Event()
    step = ReferenceTokenStream.__next__

    def slow_step(self):                  # the first step of the long run holds until released
        if not in_step.is_set():
            in_step.set()
            release.wait(10)
        return step(self)
    monkeypatch.setattr(ReferenceTokenStream, "__next__", slow_step)
    long = eng.generate([1, 2, 3], max_new_tokens=200, ignore_eos=True)
    first = threading.Thread(target=next, args=(long,))
    first.start()
    assert in_step.wait(10)
    box = {}
    other = threading.Thread(target=lambda: box.update(gen=eng.generate(
        [5, 6, 7], max_new_tokens=8, ignore_eos=True)))
    other.start()
    other.join(0.3)
    assert other.is_alive() and not box        # waits for the running step
    release.set()
    first.join(10)
    other.join(10)
    assert run(box["gen"])[1].token_ids == want
    list(long)                                   # (its first piece went to the other thread)
    assert long.result.finish_reason == "cancelled"


def test_library_arguments_checked_as_documented(tiny_models):
    """What a library user passes wrongly is an InputError naming it; NumPy numbers count."""
    import numpy as np

    import kogcupy
    from kogcupy import SamplingParams, load_model
    m = tiny_models["llama"]
    eng = Engine(m, backend="reference", context_length=np.int64(64), prefix_cache_gb=np.float32(.1))
    assert eng.context_length == 64 and type(eng.context_length) is int
    for call, match in ((lambda: eng.generate("hi", SamplingParams()), "keyword arguments"),
                        (lambda: eng.generate("hi", chat="false"), "chat must be"),
                        (lambda: Engine(m, backend="reference", batch_prefill="no"), "batch_prefill"),
                        (lambda: Engine(m, backend="reference", trace=5), "trace"),
                        (lambda: load_model(123), "takes a path"),
                        (lambda: SamplingParams(seed=-2), r"-1 \(a random one\)")):
        with pytest.raises(InputError, match=match):
            call()
    assert 0 <= SamplingParams(seed=-1).seed < 2**63
    assert {"Engine", "load_model"} <= set(dir(kogcupy))
    with pytest.raises(AttributeError, match="no attribute 'Foo'"):
        kogcupy.Foo  # noqa: B018


def test_a_replaced_gpu_stream_cancels_nothing():
    """Closing a Generation that a later generate() replaced (its stream no longer the GPU's
    active one) must not set the shared cancel flag, which the running launch would read."""
    import types

    import numpy as np

    from kogcupy.gpu.monokernel import MonokernelTokenStream
    ctl = types.SimpleNamespace(u32=np.zeros(4, np.uint32))
    old, new = (MonokernelTokenStream.__new__(MonokernelTokenStream) for _ in range(2))
    backend = types.SimpleNamespace(_ctl=ctl, _active=new)
    for s in (old, new):
        s._b, s.finish_reason, s._cancelled = backend, None, False
    old.cancel()
    assert old._cancelled and ctl.u32[2] == 0
    new.cancel()
    assert new._cancelled and ctl.u32[2] == 1
