"""`kogcupy serve` on the GPU (skipped without one, or without the serve extra and `openai`):
the monokernel behind a live localhost server, driven by the official `openai` client.

One tiny random llama checkpoint (a real tokenizer; its logits flattened) whose
generation_config.json recommends sampling, so a request that sets no sampling field is drawn by the sampler's filter build
(top_k / top_p), which the server's warm-up compiles. Expected answers come from
engine.generate on the same engine before the server starts.
"""
from __future__ import annotations

import json
import shutil
import time

import pytest

pytestmark = pytest.mark.gpu

from test_gpu_monokernel import MonokernelBackend  # noqa: E402,F401 -- skips without a GPU

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from test_serve import Server, wait_until  # noqa: E402

from kogcupy.engine import Engine  # noqa: E402
from kogcupy.model.loader import load_model  # noqa: E402
from kogcupy.serve import create_app  # noqa: E402

RECOMMENDED = {"temperature": 0.8, "top_k": 20, "top_p": 0.9}
PROMPT = "The quick brown fox jumps over the lazy dog and"
N = 24


@pytest.fixture(scope="module")
def served(tiny_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_serve") / "tiny-llama"
    shutil.copytree(tiny_dirs["llama"], d)
    gen_path = d / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen.update(do_sample=True, **RECOMMENDED)
    gen_path.write_text(json.dumps(gen))
    # the tiny model's next-token distribution is nearly one-hot: flatten it (the final norm's
    # gain scales the logits) so that a drawn text differs from the greedy one
    from safetensors.numpy import load_file, save_file
    (st,) = d.glob("*.safetensors")
    w = load_file(st)
    w["model.norm.weight"] = w["model.norm.weight"] * 0.05
    save_file(w, st, metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 32768         # room for a stream long enough to leave
    (d / "config.json").write_text(json.dumps(cfg))
    model = load_model(str(d), context_length=32768)
    assert model.tokenizer.sampling_defaults == RECOMMENDED
    eng = Engine(model, backend="monokernel", context_length=32768)
    assert eng.backend_name == "monokernel"
    eng.warm_up()                                  # as `kogcupy serve` does before it listens
    msgs = [{"role": "user", "content": PROMPT}]
    expect = {
        "greedy": "".join(eng.generate(PROMPT, chat=False, max_new_tokens=N, temperature=0)),
        "drawn": "".join(eng.generate(PROMPT, chat=False, max_new_tokens=N, seed=7, **RECOMMENDED)),
        "chat": "".join(eng.generate(msgs, max_new_tokens=N, seed=11, **RECOMMENDED)),
    }
    with Server(create_app(eng, served_model_name="tiny")) as srv:
        yield srv, expect


def test_gpu_server_answers_as_engine_generate(served):
    srv, expect = served
    c = srv.client()
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=N, temperature=0)
    assert r.choices[0].text == expect["greedy"]
    # no sampling field: generation_config.json's recommendation, drawn on the GPU
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=N, seed=7)
    assert r.choices[0].text == expect["drawn"]
    assert expect["drawn"] != expect["greedy"]     # (a drawn text; this seed's differs)
    # streamed chat with usage: the same text as engine.generate
    msgs = [{"role": "user", "content": PROMPT}]
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=N, seed=11,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == expect["chat"]
    usage = chunks[-1].usage
    assert usage is not None and 1 <= usage.completion_tokens <= N
    # the second turn reuses the first turn's KV on the GPU
    msgs2 = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": "Go on."}]
    r = c.chat.completions.create(model="tiny", messages=msgs2, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens > 0, r.usage


def test_gpu_server_disconnect_frees_the_engine(served):
    srv, expect = served
    c = srv.client()
    stream = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=32000, temperature=0,
                                  stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    cancelled = srv.metric("kogcupy_generations_finished_total", finish_reason="cancelled")
    t0 = time.perf_counter()
    stream.response.close()
    wait_until(lambda: srv.metric("kogcupy_generations_finished_total", finish_reason="cancelled")
               == cancelled + 1, 10, "the generation cancelled")
    wait_until(lambda: srv.metric("kogcupy_requests_running") == 0, 5, "the engine is free")
    freed_s = time.perf_counter() - t0
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=N, temperature=0)
    assert r.choices[0].text == expect["greedy"]
    assert freed_s < 5, freed_s
