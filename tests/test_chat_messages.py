"""Chat messages (and tools) as prompts: rendered through the model's chat template, validated."""
from __future__ import annotations

import pytest

from kogcupy.engine import Engine, template_messages
from kogcupy.errors import InputError
from kogcupy.model.loader import Model
from kogcupy.model.tokenizer import Tokenizer

# Writes what the tiny ChatML template drops: tools, tool calls and tool call ids.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t['function']['name'] }}"
    "{% endfor %}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}{% for c in m.get('tool_calls') or [] %}"
    "call {{ c['function']['name'] }}({{ c['function']['arguments'] | tojson }}){% endfor %}"
    "{% if m.get('tool_call_id') %} for {{ m['tool_call_id'] }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
]


def _retemplated(tk: Tokenizer, template: str) -> Tokenizer:
    """The tokenizer `tk` with another chat template."""
    return Tokenizer(tk.backend, bos_token_id=tk.bos_token_id, eos_token_ids=tk.eos_token_ids,
                     add_bos=tk.add_bos, chat_template=template)


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(tiny_models["llama"], backend="reference", context_length=256)


@pytest.fixture(scope="module")
def tools_engine(tiny_models):
    m = tiny_models["llama"]
    model = Model(config=m.config, weights=m.weights, path=m.path, dtype=m.dtype,
                  tokenizer=_retemplated(m.tokenizer, TOOLS_TEMPLATE))
    return Engine(model, backend="reference", context_length=256)


def test_messages_render_through_the_template(engine):
    tk = engine.tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "The fox"}]
    ids = tk.encode(tk.render_chat(msgs, add_generation_prompt=True), add_bos=False)
    assert engine.encode_messages(msgs) == ids == engine.encode_prompt(msgs)
    assert tk.decode(ids).endswith("The fox<|im_end|>\n<|im_start|>assistant\n")
    gen = engine.generate(msgs, max_new_tokens=3)
    list(gen)
    assert gen.prompt_ids == ids and len(gen.result.token_ids) == 3
    # a str prompt with chat is the one-user-message conversation
    assert engine.encode_prompt("The fox") == engine.encode_messages(
        [{"role": "user", "content": "The fox"}])


def test_token_ids_as_an_array(engine):
    np = pytest.importorskip("numpy")
    ids = [5, 6, 7]
    assert engine.encode_prompt(np.array(ids, np.int64)) == ids
    assert engine.encode_prompt(tuple(np.array(ids, np.int32))) == ids    # NumPy ints
    assert np.array_equal(engine.logits(np.array(ids)), engine.logits(ids))
    gen = engine.generate(np.array(ids), max_new_tokens=2)
    list(gen)
    assert gen.prompt_ids == ids and len(gen.result.token_ids) == 2
    for bad, what in ((np.array([1.5, 2.0]), "a 1-D ndarray of float64"),
                      ([1, 2.0], "a list holding a float"), ([1, None], "a list holding None"),
                      (np.int64(5), "an int64")):
        with pytest.raises(InputError, match=f"token ids .*got {what}"):
            engine.logits(bad)
    with pytest.raises(InputError, match="got a 2-D ndarray of int64"):
        engine.generate(np.array([[1, 2]]), max_new_tokens=2)


def test_tools_and_tool_messages(tools_engine):
    tk = tools_engine.tokenizer
    ids = tools_engine.encode_messages(CONVERSATION, tools=TOOLS)
    # (as HF templates read them: a null content "", a call's arguments the object)
    assert ids == tk.encode(tk.render_chat(template_messages(CONVERSATION),
                                           add_generation_prompt=True, tools=TOOLS),
                            add_bos=False)
    text = tk.decode(ids)
    # the OpenAI JSON text of the arguments is written once, not as a quoted string
    assert "Tools: get_weather" in text and 'call get_weather({"city": "Paris"})' in text
    assert "sunny for c1" in text and text.endswith("<|im_start|>assistant\n")
    assert "Tools:" not in tk.decode(tools_engine.encode_messages(CONVERSATION))
    gen = tools_engine.generate(CONVERSATION, tools=TOOLS, max_new_tokens=2)
    assert gen.prompt_ids == ids
    gen.close()


class _ScriptedStream:
    """A backend stream that yields given token ids, then ends on eos."""

    def __init__(self, ids):
        self._it = iter(ids)
        self.finish_reason = None

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except StopIteration:
            self.finish_reason = "eos"
            raise

    def cancel(self):
        self._it = iter(())


def test_template_kwargs(tools_engine):
    """Extra template variables (HF's apply_chat_template kwargs, vLLM's chat_template_kwargs)
    reach the template; the engine's own variables cannot be replaced through them."""
    msgs = [{"role": "user", "content": "Hi"}]
    tk = tools_engine.tokenizer
    assert not tk.decode(tools_engine.encode_messages(msgs)).endswith("<think></think>")
    off = tools_engine.encode_messages(msgs, template_kwargs={"enable_thinking": False})
    assert tk.decode(off).endswith("<|im_start|>assistant\n<think></think>")
    assert tools_engine.encode_messages(msgs, template_kwargs={"self": 1}) == \
        tools_engine.encode_messages(msgs)                  # (any other name: unused here)
    for bad, why in (({"add_generation_prompt": False}, "kogcupy sets it .send it as the request"),
                     ({"messages": []}, "kogcupy sets it; the names"), ({"eos_token": "x"}, "sets it"),
                     ({"raise_exception": 1}, "sets it"), ({"not a name": 1}, "an identifier"),
                     ([1], "must be a dict")):
        with pytest.raises(InputError, match="template variable.*" + why):
            tools_engine.encode_messages(msgs, template_kwargs=bad)
    # nesting past what the template's tojson can follow: an InputError, not a RecursionError
    deep = {}
    for _ in range(5000):
        deep = {"a": deep}
    call = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}]}]
    with pytest.raises(InputError, match="RecursionError"):
        tools_engine.encode_messages(msgs + call)


def test_tool_calls_come_back_in_the_result(tools_engine, monkeypatch):
    tk = tools_engine.tokenizer
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
            '"Paris"}}\n</tool_call>')
    ids = tk.encode(text, add_bos=False)
    assert tk.decode(ids) == text
    monkeypatch.setattr(tools_engine.backend, "start", lambda *a, **k: _ScriptedStream(ids))
    gen = tools_engine.generate(CONVERSATION, tools=TOOLS, max_new_tokens=64)
    assert "".join(gen) == text              # the text streams as written
    r = gen.result
    assert r.text == text and r.content == "Let me check."
    assert [c["function"] for c in r.tool_calls] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert r.tool_calls[0]["type"] == "function" and r.tool_calls[0]["id"].startswith("call_")
    # the result goes back into the conversation as the assistant's turn
    turn = {"role": "assistant", "content": r.content, "tool_calls": r.tool_calls}
    assert 'call get_weather({"city": "Paris"})' in tk.decode(
        tools_engine.encode_messages(CONVERSATION + [turn], tools=TOOLS))
    # a call to a tool the request does not have stays text
    other = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    gen = tools_engine.generate(CONVERSATION, tools=other, max_new_tokens=64)
    "".join(gen)
    assert gen.result.tool_calls == [] and gen.result.content == text
    # without tools nothing is parsed
    gen = tools_engine.generate(CONVERSATION, max_new_tokens=64)
    list(gen)
    assert gen.result.tool_calls == [] and gen.result.content == text


def test_llama_and_thought_calls_in_the_result(tiny_models, monkeypatch):
    """The result's calls are read in the template's form: Llama 3.x's JSON answer is a call;
    with a template that writes think blocks, a <tool_call> inside one is thought text."""
    m = tiny_models["llama"]
    llama = TOOLS_TEMPLATE + ('{#- Respond in the format {"name": function name, "parameters": '
                              'dictionary of argument name and its value}. #}')
    thinking = TOOLS_TEMPLATE + "{#- </think> #}"
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    for template, text, content in (
            (llama, '{"name": "get_weather", "parameters": {"city": "Oslo"}}', ""),
            (thinking, "<think>" + call + "</think>" + call, "<think>" + call + "</think>")):
        model = Model(config=m.config, weights=m.weights, path=m.path, dtype=m.dtype,
                      tokenizer=_retemplated(m.tokenizer, template))
        eng = Engine(model, backend="reference", context_length=256)
        ids = eng.tokenizer.encode(text, add_bos=False)
        monkeypatch.setattr(eng.backend, "start", lambda *a, **k: _ScriptedStream(ids))
        gen = eng.generate(CONVERSATION, tools=TOOLS, max_new_tokens=64)
        "".join(gen)
        assert gen.result.content == content, template
        assert [c["function"] for c in gen.result.tool_calls] == [
            {"name": "get_weather", "arguments": '{"city": "Oslo"}'}]

@pytest.mark.parametrize("messages, match", [
    ([], "empty"),                             # generate: empty token ids; encode_messages too
    ({"role": "user", "content": "hi"}, "str, a list of token ids or a list of chat messages"),
    ([{"role": "user", "content": "hi"}, "hello"], "message 1 is a str"),
    ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
    ([{"content": "hi"}], "unknown role None"),
    ([{"role": "user", "content": ["hi"]}], "content must be a str or None"),
    ([{"role": "assistant", "content": None, "tool_calls": "f()"}], "tool_calls"),
    ([{"role": "tool", "content": "x", "tool_call_id": 3}], "tool_call_id"),
])
def test_bad_messages_are_input_errors(engine, messages, match):
    with pytest.raises(InputError, match=match):
        engine.generate(messages, max_new_tokens=2)
    if isinstance(messages, list):
        with pytest.raises(InputError, match=match):
            engine.encode_messages(messages)


def test_null_content_and_dropped_calls(engine):
    # a null content renders as "" (the tiny ChatML template concatenates it)
    assert engine.encode_messages([{"role": "user", "content": None}]) == \
        engine.encode_messages([{"role": "user", "content": ""}])
    # a template that drops an assistant's tool_calls: said, not lost silently
    with pytest.raises(InputError, match="drops an assistant message's tool_calls"):
        engine.encode_messages(CONVERSATION)


def test_tools_and_chat_flag_errors(engine, tiny_models):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(InputError, match="tools must be a list"):
        engine.encode_messages(msgs, tools={"name": "f"})
    with pytest.raises(InputError, match="tools need a chat prompt"):
        engine.generate([1, 2, 3], tools=TOOLS, max_new_tokens=2)
    with pytest.raises(InputError, match="tools need a chat prompt"):
        engine.generate("hi", chat=False, tools=TOOLS, max_new_tokens=2)
    with pytest.raises(InputError, match="chat=False"):
        engine.generate(msgs, chat=False, max_new_tokens=2)
    with pytest.raises(InputError, match=r"chat template included\) does not fit the context length"):
        engine.encode_messages([{"role": "user", "content": "word " * 300}])
    # a template without `tools` would drop them silently (the server answers 400 the same way)
    assert not engine.tokenizer.takes_tools
    with pytest.raises(InputError, match="takes no tools"):
        engine.generate(msgs, tools=TOOLS, max_new_tokens=2)


LLAMA3_LIKE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
               "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
               "{% endif %}")


def test_continue_final_message(engine, tiny_dirs):
    """continue_final_message (vLLM's and HF's): the prompt ends where the last message's text
    ends, which the answer continues; the rendering is HF apply_chat_template's, also for texts
    that occur in the template's own markup and on templates that trim."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    tk = engine.tokenizer
    for template in (None, LLAMA3_LIKE):
        t = tk if template is None else _retemplated(tk, template)
        for role, last in (("assistant", "Sure, the answer is"), ("assistant", " 42\n"),
                           ("assistant", "Sure, "), ("assistant", "<"), ("assistant", "im"),
                           ("assistant", "end"), ("assistant", "|"), ("assistant", ""),
                           ("user", "Hi")):
            msgs = [{"role": "user", "content": "Hi"}, {"role": role, "content": last}]
            text = t.render_chat(msgs, add_generation_prompt=False, continue_final_message=True)
            want = hf.apply_chat_template(msgs, tokenize=False, continue_final_message=True,
                                          chat_template=template or hf.chat_template)
            assert text == want, (template, last, text, want)
            assert text.rstrip().endswith(last.strip()) and text.startswith(t.render_chat(msgs[:1], False))
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, it"}]
    ids = engine.encode_messages(msgs, add_generation_prompt=False, continue_final_message=True)
    assert tk.decode(ids).endswith("<|im_start|>assistant\nSure, it")
    gen = engine.generate(ids, max_new_tokens=2)
    list(gen)
    assert len(gen.result.token_ids) == 2
    dropping = _retemplated(tk, "{% for m in messages %}{{ m['content'] | replace('<b>', '') }}"
                                "{% endfor %}")
    for bad, match in (([{"role": "user", "content": "a <b> c"}], "does not write the last"),
                       ([{"role": "user", "content": ["a"]}], "with text content"),
                       ([], "with text content")):
        with pytest.raises(InputError, match=match):
            dropping.render_chat(bad, False, continue_final_message=True)
    with pytest.raises(InputError, match="needs add_generation_prompt=False"):
        engine.encode_messages(msgs, continue_final_message=True)
