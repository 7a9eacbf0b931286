"""`kogcupy serve`: a real uvicorn server on a free localhost port, driven by the official
`openai` client (and raw httpx for malformed input).

Three engines: the embedded SmolLM2 on the reference backend (a real model: few, short
requests, it decodes a couple of tokens per second on CI), the tiny random llama with a real
tokenizer (the load test), and a scripted engine that streams a fixed text token by token
through a real tokenizer with a Qwen-style tool template (queue, disconnect and tool-call
tests; it fails the test if two generations ever overlap).
"""
from __future__ import annotations

import gc
import inspect
import json
import os
import random
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402

from kogcupy.engine import Engine, check_messages, template_messages  # noqa: E402
from kogcupy.errors import ContextLengthError, InputError  # noqa: E402
from kogcupy.model.tokenizer import Tokenizer  # noqa: E402
from kogcupy.model.tool_calls import (JSON, TAGS, CallArgs, CallEnd,  # noqa: E402
                                      CallStart, Content, ToolCall, ToolCallParser,
                                      answer_parser, call_opening, call_syntax,
                                      parse_tool_calls, starts_thinking)
from kogcupy.serve import create_app  # noqa: E402
from kogcupy.serve.app import Server as ServeServer  # noqa: E402
from kogcupy.serve.scheduler import Job  # noqa: E402

QWEN_TOOLS_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
NO_TOOLS_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                     "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                     "<|im_start|>assistant\n{% endif %}")
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
CALL_TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
             '{"city": "Paris"}}\n</tool_call>')
HAS_PREFIX_CACHE = "prefix_cache_gb" in inspect.signature(Engine.__init__).parameters


# ------------------------------------------------------------------------------- server harness
class Server:
    """uvicorn serving `app` in a thread on a free 127.0.0.1 port."""

    def __init__(self, app, api_key: str = "none"):
        self.app = app
        self.api_key = api_key
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(app, log_level="warning", lifespan="on",
                             timeout_graceful_shutdown=2)
        self.server = ServeServer(cfg)             # kogcupy's: Ctrl-C ends open requests
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "the server did not start")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    @property
    def scheduler(self):
        return self.app.state.scheduler

    def client(self, **kw):
        kw.setdefault("api_key", self.api_key)
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=120, **kw)

    def metric(self, name: str, **labels) -> float:
        return self.app.state.metrics.registry.get_sample_value(name, labels or None) or 0.0

    def requests(self, route: str, status: str) -> float:
        """kogcupy_requests_total once the requests sent have been counted: the middleware
        counts a request when it ends, which may be just after its client has the answer."""
        time.sleep(0.05)
        return self.metric("kogcupy_requests_total", route=route, status=status)

    def expect_requests(self, route: str, status: str, n: float):
        wait_until(lambda: self.metric("kogcupy_requests_total", route=route, status=status) == n,
                   10, f"{n} requests to {route} counted with status {status}")


def wait_until(pred, timeout: float, what: str = "condition"):
    t0 = time.perf_counter()
    while not pred():
        if time.perf_counter() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s: {what}")
        time.sleep(0.005)


def in_thread(fn, *a, **kw):
    """Run fn in a thread; returns (thread, box) where box['result'|'error'] is filled."""
    box = {}

    def run():
        try:
            box["result"] = fn(*a, **kw)
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


# ------------------------------------------------------------------------------- scripted engine
@dataclass
class ScriptResult:
    token_ids: list
    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens_per_s: float = 0.0


class _Stream:
    def __init__(self):
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()


class ScriptedGeneration:
    """The Generation contract over a scripted token list (decoded as the engine decodes)."""

    def __init__(self, engine, prompt_ids, tokens, eos: bool, stop):
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.stream = _Stream()
        self._tokens = tokens
        self._eos = eos
        self._stop = stop
        self._dec = engine.tokenizer.stream_decoder()
        self._i = 0
        self._text = ""           # decoded so far (cut at a stop string)
        self._sent = 0            # how much of it went out
        self.result = None

    def __iter__(self):
        return self

    def _finish(self, reason):
        if self.result is None:
            self.result = ScriptResult(list(self._tokens[:self._i]), self._text, reason,
                                       len(self.prompt_ids),   # (one token: no decode)
                                       tokens_per_s=100.0 if self._i > 1 else 0.0)
            self.engine._end(self)
        return self.result

    def __next__(self):
        e = self.engine
        while self.result is None:
            if self._i == 0:
                while not e.gate.wait(0.005):       # the test holds the first token back
                    if self.stream.cancelled.is_set():
                        break
            if self.stream.cancelled.is_set():
                self._finish("cancelled")
                break
            if self._i == len(self._tokens):
                self._finish("eos" if self._eos else "length")
                piece, self._sent = self._text[self._sent:], len(self._text)
                if piece:                                # the held-back tail
                    return piece
                break
            time.sleep(e.delay)
            if self._i == e.fail_at:
                raise RuntimeError("the GPU fell off the bus")
            self._text += self._dec.push(self._tokens[self._i])
            self._i += 1
            hits = [i for i in (self._text.find(s) for s in self._stop) if i >= 0]
            if hits:                                     # cut before the stop string
                self._text = self._text[:min(hits)]
                self._finish("stop")
                piece, self._sent = self._text[self._sent:], len(self._text)
                if piece:
                    return piece
                break
            # as the engine: a tail that may be a stop string's start is held back
            keep = max((k for s in self._stop for k in range(1, len(s))
                        if self._text.endswith(s[:k])), default=0)
            piece, self._sent = self._text[self._sent:len(self._text) - keep], \
                max(self._sent, len(self._text) - keep)
            if piece:
                return piece
        raise StopIteration

    def close(self):
        return self._finish("cancelled")


class ScriptedEngine:
    """Engine contract for server tests: the reply is `script(last user text)` token by token."""

    def __init__(self, tokenizer, script=None, delay=0.0, context_length=2048):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.script = script or (lambda user: f"reply to {user}")
        self.delay = delay
        self.eos = True
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[dict] = []           # generate() kwargs + "prompt" text, in order
        self.finished: list[str] = []         # finish reasons, in order
        self.active = 0
        self.max_active = 0
        self.raise_in_generate: Exception | None = None
        self.fail_at: int | None = None        # a generation raises before this token
        self._lock = threading.Lock()
        self.model = None

    def encode_messages(self, messages, tools=None, template_kwargs=None, fit_context=True,
                        add_generation_prompt=True, answer_prefix="", continue_final_message=False):
        check_messages(messages)
        ids = self.tokenizer.encode(self.tokenizer.render_chat(
            template_messages(messages), add_generation_prompt, tools=tools,
            variables=template_kwargs, continue_final_message=continue_final_message)
            + answer_prefix, add_bos=False)
        if fit_context and len(ids) >= self.context_length:
            raise ContextLengthError(f"prompt of {len(ids)} tokens does not fit the context "
                                     f"length", len(ids))
        return ids

    def encode_prompt(self, prompt, chat=None, tools=None):
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not prompt or not all(isinstance(i, int) and 0 <= i < 512 for i in prompt):
            raise InputError("bad token ids")
        return list(prompt)

    def generate(self, prompt, max_new_tokens=256, temperature=0.0, top_k=0, top_p=1.0,
                 min_p=0.0, repetition_penalty=1.0, seed=0, stop=None, chat=None, tools=None,
                 ignore_eos=False):
        if self.raise_in_generate is not None:
            raise self.raise_in_generate
        text = self.tokenizer.decode(prompt)
        users = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, re.S)
        reply = self.script(users[-1] if users else text)
        tokens = self.tokenizer.encode(reply, add_bos=False)
        eos = self.eos and len(tokens) < max_new_tokens
        tokens = tokens[:max_new_tokens]
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls.append(dict(prompt=text, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                   stop=list(stop or []), user=users[-1] if users else None,
                                   ignore_eos=ignore_eos))
        return ScriptedGeneration(self, list(prompt), tokens, eos, list(stop or []))

    def _end(self, gen):
        with self._lock:
            self.active -= 1
            self.finished.append(gen.result.finish_reason)


@pytest.fixture(scope="module")
def qwen_tokenizer(tiny_models):
    tk = tiny_models["llama"].tokenizer
    return Tokenizer(tk.backend, bos_token_id=None, eos_token_ids=tk.eos_token_ids,
                     add_bos=False, chat_template=QWEN_TOOLS_TEMPLATE)


@pytest.fixture
def scripted(qwen_tokenizer):
    """(engine, server) factory: scripted(max_queue=..., api_key=..., **engine_kw)."""
    servers = []

    def make(max_queue=16, api_key=None, tokenizer=None, max_body_bytes=None,
             allowed_origins=None, allowed_hosts=None, sampling_defaults=None, **kw):
        eng = ScriptedEngine(tokenizer or qwen_tokenizer, **kw)
        extra = {} if max_body_bytes is None else {"max_body_bytes": max_body_bytes}
        extra.update({} if sampling_defaults is None else {"sampling_defaults": sampling_defaults})
        extra.update({} if allowed_origins is None else {"allowed_origins": allowed_origins})
        extra.update({} if allowed_hosts is None else {"allowed_hosts": allowed_hosts})
        app = create_app(eng, served_model_name="scripted", api_key=api_key,
                         max_queue=max_queue, **extra)
        srv = Server(app, api_key=api_key or "none").__enter__()
        servers.append(srv)
        return eng, srv

    yield make
    for s in servers:
        s.__exit__(None, None, None)


@pytest.fixture
def serve_log():
    """The messages the server logs during the test, from a handler on kogcupy's own logger:
    caplog sees them only through the root logger, which a `kogcupy serve` run in the same
    process takes away (its own handler, no propagation)."""
    import logging
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda rec: lines.append(rec.getMessage())
    log = logging.getLogger("kogcupy.serve")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield lines
    log.removeHandler(handler)
    log.setLevel(level)


def chat(client, content, **kw):
    kw.setdefault("model", "scripted")
    return client.chat.completions.create(messages=[{"role": "user", "content": content}], **kw)


# ------------------------------------------------------------------------------- tool parsing
CALL_TEXTS = [
    CALL_TEXT,
    '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n'
    '{"name": "b", "arguments": {"y": [1, 2]}}\n</tool_call>',
    'No tools needed: 2 < 3 and <tool is not a tag.',
    '<tool_call>\nnot json\n</tool_call> trailing',
    '<tool_call>\n{"name": "c", "arguments": {"z": "é"}}',                     # cut by length
    'text <tool_ca',                                                          # a partial tag
    '<tool_call>\n{"name": "d", "arguments": {}}\n</tool_call>\n\nDone, that is all.\n',
    'I will check.\n<tool_call>{"name": "e", "arguments": {}}</tool_call>\n  Then a summary.',
    'A<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>oops</tool_call> B',
    '<tool_call>{"name":"g","arguments":{"q":"\u00fc","n":[1, 2]}}</tool_call>',  # as written
    '<tool_call>{"name": "h", "arguments": {"k": 1}}\n<tool_call>{"name": "i", "arguments": '
    '{"s": "<tool_call>"}}</tool_call>',            # left open, the next call; a tag in a string
    '<tool_call>\n{"name": "k", "arguments": {"a": 1}\n</tool_call>',  # no closing brace
    '<tool_call>{"name": "l", "arguments": {}} "\n<tool_call>{"name": "m", "arguments": {}}'
    '</tool_call>',                                 # a stray quote after a call left open
    'A.\n<tool_call>{"name": "n", "arguments": {}}\nAlso:\n<tool_call>{"name": "o", '
    '"arguments": {}}\nDone.\n',                  # calls left open, text after each
]


def _fed_in_pieces(parser, text, rng, one_char):
    """The parser's events for `text` fed one character at a time or in random 1-7 pieces."""
    events, i = [], 0
    while i < len(text):
        n = 1 if one_char else rng.randint(1, 7)
        events += parser.feed(text[i:i + n])
        i += n
    return events + parser.finish()


@pytest.mark.parametrize("text", CALL_TEXTS)
def test_tool_call_parser_is_chunking_independent(text):
    content, calls = parse_tool_calls(text)
    rng = random.Random(0)
    for trial in range(40):
        events = _fed_in_pieces(ToolCallParser(), text, rng, trial == 0)
        assert "".join(e.text for e in events if isinstance(e, Content)) == content
        assert [(c.name, c.arguments) for c in events if isinstance(c, ToolCall)] == \
            [(c.name, c.arguments) for c in calls]
    # streamed as written: the same text and calls; a call's pieces add up to its arguments
    for trial in range(20):
        events = _fed_in_pieces(ToolCallParser(stream_calls=True), text, rng, trial == 0)
        assert "".join(e.text for e in events if isinstance(e, Content)) == content
        got, args = [], None
        for e in events:
            if isinstance(e, CallStart):
                args = ""
            elif isinstance(e, CallArgs):
                args += e.text
            elif isinstance(e, CallEnd):
                got.append((e.call.name, json.loads(args)))
                assert e.call.arguments == args and args == args.strip()
            elif isinstance(e, ToolCall):
                got.append((e.name, json.loads(e.arguments)))
        assert got == [(c.name, json.loads(c.arguments)) for c in calls]
        # (the arguments the same text either way: as written, not re-encoded)
        assert [e.call.arguments if isinstance(e, CallEnd) else e.arguments for e in events
                if isinstance(e, (CallEnd, ToolCall))] == [c.arguments for c in calls]


def test_streamed_call_arguments_are_the_object_once():
    """A streamed call's arguments are its arguments object, sent once: also when the whole
    call arrives in one piece (a fast model, a slow client), when the call has a key after
    the object or lacks its own closing brace; cut inside the object, the call is incomplete."""
    from kogcupy.serve.responses import AnswerEvents, ChatFormatter

    def streamed(text):
        f = ChatFormatter("id", "m", 0, 1, answer=AnswerEvents(frozenset({"f"}), stream_calls=True))
        calls = [c for ch in f.pieces(text) + f.finish(ScriptResult([], "", "length", 1))
                 for x in ch["choices"] for c in x["delta"].get("tool_calls") or []]
        assert calls[0]["function"] == {"name": "f", "arguments": ""}
        return "".join(c["function"]["arguments"] for c in calls)
    for body in ('{"name": "f", "arguments": {"a": "}{", "b": [1, {"c": 2}]}}',
                 '{"name": "f", "arguments": {"a": "}{", "b": [1, {"c": 2}]}, "id": "x"}',
                 '{"name":"f","arguments":{"a": "}{", "b": [1, {"c": 2}]}\n'):
        assert streamed("<tool_call>\n" + body + "\n</tool_call>") == \
            '{"a": "}{", "b": [1, {"c": 2}]}', body
    p = ToolCallParser(stream_calls=True)
    end = (p.feed('<tool_call>{"name": "f", "arguments": {"a": "x\\"}') + p.finish())[-1]
    assert isinstance(end, CallEnd) and not end.complete and end.call.arguments == '{"a": "x\\"}'


def test_tool_call_parser_reads_a_long_call_in_linear_time():
    """The server feeds a call token by token on its event loop: a piece's cost must not grow
    with the call (a 20,000-character call took seconds when each piece rescanned it)."""
    body = '<tool_call>{"name": "f", "arguments": {"s": "' + 'a\\"<b ' * 3000 + '"}}</tool_call>'
    for stream in (False, True):
        p, t0 = ToolCallParser(stream_calls=stream), time.perf_counter()
        for ch in body:
            p.feed(ch)
        p.finish()
        assert len(p.calls) == 1 and time.perf_counter() - t0 < 1.5


def test_tool_call_parser_results():
    content, calls = parse_tool_calls(CALL_TEXTS[0])
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].id.startswith("call_")
    content, calls = parse_tool_calls(CALL_TEXTS[1])
    assert content == "" and [json.loads(c.arguments) for c in calls] == [{"x": 1}, {"y": [1, 2]}]
    assert parse_tool_calls(CALL_TEXTS[2]) == (CALL_TEXTS[2], [])
    content, calls = parse_tool_calls(CALL_TEXTS[3])   # not a call: kept as text, tags included
    assert calls == [] and content == CALL_TEXTS[3]
    content, calls = parse_tool_calls(CALL_TEXTS[4])   # unclosed but complete JSON: a call
    assert content == "" and json.loads(calls[0].arguments) == {"z": "é"}
    assert parse_tool_calls(CALL_TEXTS[5]) == (CALL_TEXTS[5], [])
    content, calls = parse_tool_calls(CALL_TEXTS[6])   # text after a call: from its first word
    assert content == "Done, that is all.\n" and [c.name for c in calls] == ["d"]
    content, calls = parse_tool_calls(CALL_TEXTS[7])   # text on both sides: one newline between
    assert content == "I will check.\nThen a summary." and [c.name for c in calls] == ["e"]
    content, calls = parse_tool_calls(CALL_TEXTS[8])   # a call, then one that is not: kept apart
    assert content == "A\n<tool_call>oops</tool_call> B" and [c.name for c in calls] == ["f"]
    content, calls = parse_tool_calls(CALL_TEXTS[9])   # arguments as the model wrote them
    assert content == "" and calls[0].arguments == '{"q":"\u00fc","n":[1, 2]}'
    content, calls = parse_tool_calls(CALL_TEXTS[10])  # a call left open: the next one starts
    assert content == "" and [(c.name, c.arguments) for c in calls] == [
        ("h", '{"k": 1}'), ("i", '{"s": "<tool_call>"}')]
    content, calls = parse_tool_calls(CALL_TEXTS[11])  # the call's own closing brace missing
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("k", '{"a": 1}')]
    content, calls = parse_tool_calls(CALL_TEXTS[12])
    assert content == '"' and [c.name for c in calls] == ["l", "m"]
    content, calls = parse_tool_calls(CALL_TEXTS[13])  # what follows a call left open: text
    assert content == "A.\nAlso:\nDone.\n" and [c.name for c in calls] == ["n", "o"]
    for tail, text in (("\n</tool_call", ""), ("}\n", ""), ("\n<tool_", ""),  # a cut tag,
                       ("}\nDone.", "Done.")):                               # extra braces
        assert parse_tool_calls('<tool_call>{"name": "n", "arguments": {}}' + tail)[0] == text
    content, calls = parse_tool_calls('<tool_call>{"name": "g", "arguments": {}}\n\n<tool_call>'
                                      '{"name": "n", "arguments": {}} X', names=frozenset("n"))
    assert content == '<tool_call>{"name": "g", "arguments": {}}\nX' and len(calls) == 1
    # no call: the text as written, its trailing whitespace included (as without tools)
    for text in ("def f():\n    return 1\n", "  \n", "a \n\n<tool_c"):
        assert parse_tool_calls(text) == (text, [])
    # given the request's tools, a call to another name is text, tags included
    content, calls = parse_tool_calls(CALL_TEXTS[1], names=frozenset({"b"}))
    assert [c.name for c in calls] == ["b"] and content.startswith("<tool_call>")


def _chunked(parser, text, size=3):
    """A parser's events for `text` fed `size` characters at a time, then its end."""
    events = [e for i in range(0, len(text), size) for e in parser.feed(text[i:i + size])]
    return events + parser.finish()


def test_calls_in_a_think_block_are_thoughts():
    """A reasoning model's <think> block is text, a <tool_call> written in it too (vLLM's and
    llama.cpp's reasoning parsers read calls after </think> only); one after it is a call.
    A prompt that opened the block (thinking=True) starts the answer inside it."""
    call = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    thought = "<think>\nI could " + call + " but no.\n</think>\n\n"
    for thinking, text in ((False, thought + "Hello!"), (True, thought[7:] + "Hello!")):
        assert parse_tool_calls(text, thinking=thinking) == (text, [])
        content, calls = parse_tool_calls(text + call, thinking=thinking)
        assert content == text and [c.name for c in calls] == ["f"]
        for size in (1, 3, 7):
            events = _chunked(ToolCallParser(thinking=thinking), text + call, size)
            assert "".join(e.text for e in events if isinstance(e, Content)) == text
            assert [e.name for e in events if isinstance(e, ToolCall)] == ["f"]
    # a template without think blocks (thinking None): the tags are text and calls parse
    assert [c.name for c in parse_tool_calls(thought)[1]] == ["f"]
    assert starts_thinking("{{ '</think>' }}", lambda: "<|im_start|>assistant\n<think>\n") is True
    assert starts_thinking("{{ '</think>' }}", lambda: "<think>\n\n</think>\n\n") is False
    assert starts_thinking("no think tags", lambda: 1 / 0) is None     # (the prompt not read)


def test_llama_json_calls():
    """Llama 3.x templates ask for the answer to be the call: {"name", "parameters"} JSON,
    several joined by ';', after an optional <|python_tag|>. Held to the end once it starts
    with '{', so streamed and whole answers agree; JSON that is not all calls is text."""
    template = ('Respond in the format {"name": function name, "parameters": dictionary of '
                'argument name and its value}.')
    assert call_syntax(template) == JSON and call_syntax("<tool_call>") == TAGS
    assert call_syntax("{{ tools }}") is None
    one = '{"name": "f", "parameters": {"a": "x;y}"}}'
    names = frozenset({"f", "g"})
    for text, want in ((one, [("f", {"a": "x;y}"})]),
                       ("\n<|python_tag|>" + one + "; " + one.replace('"f"', '"g"'),
                        [("f", {"a": "x;y}"}), ("g", {"a": "x;y}"})]),
                       ('{"name": "f", "arguments": {}}\n', [("f", {})]),
                       ('{"name": "f", "parameters": {}};\n', [("f", {})])):
        content, calls = parse_tool_calls(text, names, syntax=JSON)
        assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == want
        for size in (1, 4):
            events = _chunked(answer_parser(JSON, names, stream_calls=True), text, size)
            assert [(e.name, e.arguments) for e in events] == [(c.name, c.arguments)
                                                               for c in calls]
    for text in ("Sure: " + one, '{"city": "Paris"}', one + " and more", one[:-1], one + ";;",
                 one.replace('"f"', '"h"'), "  ", ""):
        assert parse_tool_calls(text, names, syntax=JSON) == (text, []), text
    p = answer_parser(JSON, names)
    assert p.feed("Hel") == [Content("Hel")] and p.feed("lo") == [Content("lo")]
    p = answer_parser(JSON, names, opening=call_opening("f", JSON))
    assert call_opening("f", JSON) == '{"name": "f", "parameters":'
    assert p.feed(' {"a": 2}}') == [] and [c.arguments for c in p.finish()] == ['{"a": 2}']


def test_llama_and_thinking_templates_on_the_server(scripted, tiny_models):
    """The server reads calls in the form the template asks for: a Llama 3.x template's JSON
    answer is a call (streamed or not; forced with a "parameters" opening and no tag to stop
    at), and a thinking template (its prompt opens <think>) keeps a call in the thought text."""
    tk = tiny_models["llama"].tokenizer
    llama = QWEN_TOOLS_TEMPLATE.replace("<tool_call>", "").replace("</tool_call>", "").replace(
        '{{- "\\n</tools>', """{{- 'Respond in the format {"name": function name, "parameters": \
dictionary of argument name and its value}.' }}{{- "\\n</tools>""")
    assert "<tool_call>" not in llama and "function name" in llama
    eng, srv = scripted(tokenizer=Tokenizer(tk.backend, bos_token_id=None, add_bos=False,
                                            eos_token_ids=tk.eos_token_ids, chat_template=llama),
                        script=lambda u: '{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    c = srv.client()
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL])
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.content is None
    assert [(t.function.name, t.function.arguments) for t in m.tool_calls] == \
        [("get_weather", '{"city": "Oslo"}')]
    content, calls, finish = _stream_chat(c, msgs, tools=[WEATHER_TOOL])
    assert (content, finish) == ("", "tool_calls")
    assert [(x["name"], x["arguments"]) for x in calls] == [("get_weather", '{"city": "Oslo"}')]
    eng.script = lambda u: ' {"city": "Rome"}}'
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL],
                                  tool_choice="required")
    assert eng.calls[-1]["prompt"].endswith('assistant\n{"name": "get_weather", "parameters":')
    assert eng.calls[-1]["stop"] == []
    assert [t.function.arguments for t in r.choices[0].message.tool_calls] == ['{"city": "Rome"}']
    # (Qwen3's thinking templates open the block in the prompt and cut history at </think>)
    thinking = "{%- set cut = '</think>' %}" + QWEN_TOOLS_TEMPLATE.replace(
        "{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}")
    assert thinking != QWEN_TOOLS_TEMPLATE
    thought = 'I could <tool_call>{"name": "get_weather", "arguments": {}}</tool_call>\n</think>\n\n'
    eng, srv = scripted(tokenizer=Tokenizer(tk.backend, bos_token_id=None, add_bos=False,
                                            eos_token_ids=tk.eos_token_ids,
                                            chat_template=thinking),
                        script=lambda u: thought + "Hi." + CALL_TEXT[len("Let me check."):])
    c = srv.client()
    for stream, one in ((False, False), (True, False), (False, True)):
        kw = {"parallel_tool_calls": False} if one else {}   # (no stop at a thought's tag)
        if stream:
            content, calls, finish = _stream_chat(c, msgs, tools=[WEATHER_TOOL], **kw)
            names = [x["name"] for x in calls]
        else:
            r = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL],
                                          **kw)
            content, finish = r.choices[0].message.content, r.choices[0].finish_reason
            names = [t.function.name for t in r.choices[0].message.tool_calls]
        assert eng.calls[-1]["stop"] == []
        assert (content, names, finish) == (thought + "Hi.", ["get_weather"], "tool_calls")


# ------------------------------------------------------------------------------- scripted engine
def test_models_health_metrics(scripted):
    eng, srv = scripted()
    c = srv.client()
    assert [m.id for m in c.models.list().data] == ["scripted"]
    assert c.models.retrieve("scripted").id == "scripted"
    r = httpx.get(srv.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert httpx.head(srv.url + "/health").status_code == 200     # (load balancers' probes)
    chat(c, "hi", max_tokens=8)
    text = httpx.get(srv.url + "/metrics").text
    for name in ("kogcupy_requests_total", "kogcupy_queue_depth",
                 "kogcupy_time_to_first_token_seconds_bucket",
                 "kogcupy_decode_tokens_per_second_bucket",
                 "kogcupy_prefix_cache_hit_tokens_total"):
        assert name in text
    srv.expect_requests("/v1/chat/completions", "200", 1)


def test_sampling_fields_reach_the_engine(scripted):
    eng, srv = scripted()
    r = chat(srv.client(), "hi", max_tokens=5, temperature=0.3, top_p=0.9, seed=11,
             stop=["zzz"], extra_body={"top_k": 7, "min_p": 0.05, "repetition_penalty": 1.1,
                                       "ignore_eos": True})
    kw = eng.calls[-1]
    assert (kw["max_new_tokens"], kw["temperature"], kw["top_p"], kw["seed"], kw["stop"],
            kw["top_k"], kw["min_p"], kw["repetition_penalty"], kw["ignore_eos"]) == \
        (5, 0.3, 0.9, 11, ["zzz"], 7, 0.05, 1.1, True)
    assert r.choices[0].finish_reason == "length"
    chat(srv.client(), "hi")                      # OpenAI defaults: temperature 1, random seed
    kw = eng.calls[-1]
    assert kw["temperature"] == 1.0 and kw["top_k"] == 0 and kw["top_p"] == 1.0
    assert kw["ignore_eos"] is False
    assert kw["max_new_tokens"] == eng.context_length - len(eng.encode_messages(
        [{"role": "user", "content": "hi"}]))
    seeds = []
    for _ in range(2):                            # seed -1: a random one (llama.cpp's -1)
        chat(srv.client(), "hi", seed=-1, extra_body={"top_k": -1})
        seeds.append(eng.calls[-1]["seed"])
        assert eng.calls[-1]["top_k"] == 0
    assert seeds[0] != seeds[1] and 2**64 - 1 not in seeds
    chat(srv.client(), "hi", seed=-5)             # OpenAI's int64: its bits
    assert eng.calls[-1]["seed"] == 2**64 - 5
    chat(srv.client(), "hi", max_tokens=3.0, seed=7.0, extra_body={"top_k": 2.0})  # whole floats
    got = [eng.calls[-1][k] for k in ("max_new_tokens", "seed", "top_k")]
    assert got == [3, 7, 2] and all(type(v) is int for v in got)
    # (the scripted engine itself: a tail held back as a stop string's possible start comes
    # out when the text ends, as the engine's does)
    assert chat(srv.client(), "hi", stop=["hi!"]).choices[0].message.content == "reply to hi"
    # add_generation_prompt: false (vLLM's): no assistant opening after the last message
    assert eng.calls[-1]["prompt"].endswith("<|im_start|>assistant\n")
    chat(srv.client(), "hi", extra_body={"add_generation_prompt": False})
    assert eng.calls[-1]["prompt"].endswith("hi<|im_end|>\n"), eng.calls[-1]["prompt"]
    # continue_final_message (vLLM's): the answer continues the assistant's last message
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, it"}]
    for extra in ({}, {"add_generation_prompt": False}):
        r = srv.client().chat.completions.create(model="scripted", messages=msgs, extra_body={
            "continue_final_message": True, **extra})
        assert eng.calls[-1]["prompt"].endswith("hi<|im_end|>\n<|im_start|>assistant\nSure, it")
        assert r.choices[0].message.content == "reply to hi"
    r = httpx.post(srv.url + "/v1/chat/completions", json={
        "messages": msgs, "continue_final_message": True, "add_generation_prompt": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "add_generation_prompt", r.text


def test_model_sampling_defaults_fill_what_a_request_leaves_out(scripted, qwen_tokenizer):
    """generation_config.json's sampling (the tokenizer's sampling_defaults) for the fields a
    request does not send; what it sends wins (top_k 0: off); sampling_defaults={} (the CLI's
    --generation-config none): OpenAI's defaults."""
    model = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05}
    tk = Tokenizer(qwen_tokenizer.backend, bos_token_id=None, eos_token_ids=qwen_tokenizer.eos_token_ids,
                   add_bos=False, chat_template=qwen_tokenizer.chat_template, sampling_defaults=model)
    eng, srv = scripted(tokenizer=tk)
    fields = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    chat(srv.client(), "hi")
    assert [eng.calls[-1][k] for k in fields] == [0.6, 0.95, 20, 0.0, 1.05]
    chat(srv.client(), "hi", temperature=0.0, extra_body={"top_k": 0, "min_p": 0.1})
    assert [eng.calls[-1][k] for k in fields] == [0.0, 0.95, 0, 0.1, 1.05]
    srv.client().completions.create(model="scripted", prompt="hi", top_p=0.5)
    assert [eng.calls[-1][k] for k in fields] == [0.6, 0.5, 20, 0.0, 1.05]
    chat(srv.client(), "hi", extra_body={"top_k": -1, "repetition_penalty": 1.0})
    assert [eng.calls[-1][k] for k in fields] == [0.6, 0.95, 0, 0.0, 1.0]
    r = srv.client().responses.create(model="scripted", input="hi")
    assert (r.temperature, r.top_p) == (0.6, 0.95) and eng.calls[-1]["top_k"] == 20
    r = srv.client().responses.create(model="scripted", input="hi", temperature=0.2)
    assert (r.temperature, r.top_p) == (0.2, 0.95) and eng.calls[-1]["temperature"] == 0.2
    eng, srv = scripted(tokenizer=tk, sampling_defaults={})
    chat(srv.client(), "hi")
    assert [eng.calls[-1][k] for k in fields] == [1.0, 1.0, 0, 0.0, 1.0]
    assert srv.client().responses.create(model="scripted", input="hi").temperature == 1.0


def test_fifo_order_four_clients(scripted):
    eng, srv = scripted(delay=0.002)
    eng.gate.clear()                              # the first generation waits for the gate
    jobs = []
    for i in range(4):
        jobs.append(in_thread(chat, srv.client(), f"client {i}", max_tokens=32))
        if i == 0:
            wait_until(lambda: len(eng.calls) == 1, 10, "first request running")
        else:
            wait_until(lambda: srv.scheduler.queued == i, 10, f"request {i} queued")
    eng.gate.set()
    for i, (t, box) in enumerate(jobs):
        t.join(30)
        assert "error" not in box, box.get("error")
        assert box["result"].choices[0].message.content == f"reply to client {i}"
        assert box["result"].choices[0].finish_reason == "stop"
    assert [c["user"] for c in eng.calls] == [f"client {i}" for i in range(4)]
    assert eng.max_active == 1 and eng.finished == ["eos"] * 4


def test_disconnect_mid_stream_frees_the_engine(scripted):
    eng, srv = scripted(delay=0.01, script=lambda u: "word " * 400)
    body = {"model": "scripted", "messages": [{"role": "user", "content": "go"}],
            "stream": True, "max_tokens": 400}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and '"content":"w' in line:
                break
        t_close = time.perf_counter()
    wait_until(lambda: srv.scheduler.idle, 2, "engine free after the disconnect")
    freed = time.perf_counter() - t_close
    assert eng.finished == ["cancelled"] and freed < 0.5, freed
    assert srv.metric("kogcupy_generations_finished_total", finish_reason="cancelled") == 1
    eng.script = lambda u: "fine"
    assert chat(srv.client(), "again").choices[0].message.content == "fine"


def test_role_chunk_comes_with_the_first_token(scripted):
    """The stream's first data chunk (role + text) waits for the first token, as vLLM's: a
    client that times its first chunk measures the prefill (held here by the gate)."""
    eng, srv = scripted()
    eng.gate.clear()
    threading.Timer(0.4, eng.gate.set).start()
    body = {"model": "scripted", "messages": [{"role": "user", "content": "go"}], "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        waited = time.perf_counter() - t0
        rest = [line for line in lines if line.startswith("data:")]
    chunk = json.loads(first[5:])
    assert waited >= 0.35, waited
    assert chunk["choices"][0]["delta"]["role"] == "assistant"
    assert chunk["choices"][0]["delta"]["content"] == ""
    text = "".join(json.loads(line[5:])["choices"][0]["delta"].get("content") or ""
                   for line in rest[:-1] if json.loads(line[5:])["choices"])
    assert rest[-1] == "data: [DONE]" and text == "reply to go", rest[:2]


def test_tool_call_streams_as_written(scripted):
    """An answer that opens with a tool call: the role chunk goes out with the first token,
    the call's name as soon as it is written, then its arguments in pieces (vLLM's and
    OpenAI's stream), not the whole call at its closing tag."""
    args = '{"city": "Paris", "days": [1, 2, 3], "note": "a } inside"}'
    text = '<tool_call>\n{"name": "get_weather", "arguments": ' + args + '}\n</tool_call>'
    eng, srv = scripted(delay=0.02, script=lambda u: text)
    body = {"model": "scripted", "messages": [{"role": "user", "content": "go"}], "stream": True,
            "tools": [WEATHER_TOOL]}
    t0, seen = time.perf_counter(), []
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen.append((time.perf_counter() - t0, json.loads(line[6:])))
    t_end = seen[-1][0]
    assert seen[0][1]["choices"][0]["delta"]["role"] == "assistant" and seen[0][0] < t_end / 3
    deltas = [(t, c) for t, ch in seen for x in ch["choices"]
              for c in x["delta"].get("tool_calls") or []]
    t_name, first = deltas[0]
    assert first["function"] == {"name": "get_weather", "arguments": ""} and first["index"] == 0
    assert first["id"].startswith("call_") and first["type"] == "function"
    assert t_name < t_end / 2, (t_name, t_end)
    pieces = [c["function"]["arguments"] for t, c in deltas[1:]]
    assert all(c["index"] == 0 and set(c["function"]) == {"arguments"} for t, c in deltas[1:])
    assert len(pieces) > 3 and "".join(pieces) == args
    assert seen[-1][1]["choices"][0]["finish_reason"] == "tool_calls"
    # the openai SDK's stream helpers put the pieces together (chat, and the Responses API's)
    msgs = [{"role": "user", "content": "go"}]
    with srv.client().chat.completions.stream(model="scripted", messages=msgs,
                                               tools=[WEATHER_TOOL]) as st:
        call = st.get_final_completion().choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("get_weather", args)
    flat = {"type": "function", **WEATHER_TOOL["function"]}
    with srv.client().responses.stream(model="scripted", input="go", tools=[flat]) as st:
        items = st.get_final_response().output
    assert [(i.type, i.name, i.arguments) for i in items] == [("function_call", "get_weather", args)]


def test_queued_request_whose_client_left_is_dropped(scripted):
    eng, srv = scripted(max_queue=2)
    eng.gate.clear()
    a = in_thread(chat, srv.client(), "A")
    wait_until(lambda: len(eng.calls) == 1, 10, "A running")
    body = {"model": "scripted", "messages": [{"role": "user", "content": "B"}]}
    with pytest.raises(httpx.TimeoutException):   # B's client gives up while B is queued
        httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=0.5)
    wait_until(lambda: srv.scheduler.queued == 0, 5, "B dropped from the queue")
    c = in_thread(chat, srv.client(), "C")
    wait_until(lambda: srv.scheduler.queued == 1, 5, "C queued")
    eng.gate.set()
    for t, box in (a, c):
        t.join(30)
        assert "error" not in box, box.get("error")
    assert [k["user"] for k in eng.calls] == ["A", "C"]
    assert srv.metric("kogcupy_queued_requests_dropped_total") == 1
    # a client that left is not a server error: no 500 counted, a 499 (nginx's convention)
    route = "/v1/chat/completions"
    srv.expect_requests(route, "499", 1)
    assert srv.requests(route, "500") == 0


def test_ctrl_c_ends_open_requests_cleanly(scripted, serve_log):
    """Ctrl-C / SIGTERM while a stream runs and a request waits: both end at once, the stream
    with an error event and [DONE], the queued one with a 503 (and a log line), and the server
    stops."""
    eng, srv = scripted(delay=0.01, script=lambda u: "word " * 400)
    body = {"model": "scripted", "messages": [{"role": "user", "content": "go"}],
            "stream": True, "max_tokens": 400}
    lines, queued = [], None
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            lines.append(line)
            if queued is None and '"content":"w' in line:
                queued = in_thread(httpx.post, srv.url + "/v1/chat/completions", timeout=30,
                                   json={**body, "stream": False})
                wait_until(lambda: srv.scheduler.queued == 1, 10, "the second request queued")
                t0 = time.perf_counter()
                srv.server.handle_exit(signal.SIGINT, None)
    assert time.perf_counter() - t0 < 3
    ends = [x for x in lines if x][-2:]
    assert "shutting down" in ends[0] and '"error"' in ends[0] and ends[1] == "data: [DONE]", ends
    t, box = queued
    t.join(10)
    assert box["result"].status_code == 503 and "shutting down" in box["result"].text
    srv.thread.join(10)
    assert not srv.thread.is_alive() and eng.finished == ["cancelled"]
    said = [m for m in serve_log if "-> 503" in m]
    assert len(said) == 1 and said[0].startswith("chatcmpl-") and "(it was queued)" in said[0], \
        serve_log


def test_request_in_flight_at_shutdown_gets_503(scripted):
    """A request still tokenizing when Ctrl-C comes must not restart the engine's worker."""
    eng, srv = scripted()
    real = eng.encode_messages

    def slow(*a, **kw):
        time.sleep(0.6)
        return real(*a, **kw)
    eng.encode_messages = slow
    late = in_thread(httpx.post, srv.url + "/v1/chat/completions", timeout=30,
                     json={"model": "scripted", "messages": [{"role": "user", "content": "x"}]})
    time.sleep(0.2)
    srv.server.handle_exit(signal.SIGINT, None)
    t, box = late
    t.join(10)
    assert box["result"].status_code == 503 and "shutting down" in box["result"].text, box
    srv.thread.join(10)
    assert not srv.thread.is_alive() and eng.calls == []


def test_queued_stream_gets_headers_and_keepalives(scripted, monkeypatch):
    """A stream waiting behind another generation gets its headers and SSE comments (proxies and
    clients with idle timeouts keep it), then its answer as usual."""
    import kogcupy.serve.responses as R
    monkeypatch.setattr(R, "QUEUED_HEADERS_S", 0.2)
    monkeypatch.setattr(R, "KEEPALIVE_S", 0.2)
    eng, srv = scripted()
    eng.gate.clear()
    first = in_thread(chat, srv.client(), "A")
    wait_until(lambda: len(eng.calls) == 1, 10, "A running")
    body = {"model": "scripted", "messages": [{"role": "user", "content": "B"}], "stream": True}
    lines = []
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200                  # before B runs
        for line in r.iter_lines():
            lines.append(line)
            if lines.count(": queued") == 2:
                eng.gate.set()
    first[0].join(30)
    lines = [x for x in lines if x]
    assert lines[0] == ": queued" and lines[-1] == "data: [DONE]"
    text = "".join(json.loads(x[6:])["choices"][0]["delta"].get("content") or ""
                   for x in lines if x.startswith("data: {"))
    assert text == "reply to B"


def test_queue_full_is_429_with_retry_after(scripted):
    eng, srv = scripted(max_queue=1)
    eng.gate.clear()
    a = in_thread(chat, srv.client(), "A")
    wait_until(lambda: len(eng.calls) == 1, 10, "A running")
    b = in_thread(chat, srv.client(), "B")
    wait_until(lambda: srv.scheduler.queued == 1, 10, "B queued")
    r = httpx.post(srv.url + "/v1/chat/completions", json={
        "model": "scripted", "messages": [{"role": "user", "content": "C"}]})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error" and "busy" in r.json()["error"]["message"]
    with pytest.raises(openai.RateLimitError):
        chat(srv.client(), "D")
    eng.gate.set()
    for t, box in (a, b):
        t.join(30)
        assert box["result"].choices[0].message.content in ("reply to A", "reply to B")
    assert [k["user"] for k in eng.calls] == ["A", "B"]
    eng, srv = scripted(max_queue=0)     # none may wait: says so, not "0 waiting (max 0)"
    eng.gate.clear()
    a = in_thread(chat, srv.client(), "A")
    wait_until(lambda: len(eng.calls) == 1, 10, "A running")
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [
        {"role": "user", "content": "C"}]})
    assert r.status_code == 429 and "none may wait (--max-queue 0)" in r.json()["error"]["message"]
    eng.gate.set()
    a[0].join(30)


BAD_REQUESTS = [
    # (route, body or raw bytes, status, param or None, text in the message)
    ("chat", b"{not json", 400, None, "not valid JSON"),
    ("chat", b"[1, 2]", 400, None, "JSON object"),
    ("chat", b"", 400, None, "empty request body"),
    ("chat", {"model": "scripted"}, 400, "messages", "missing"),
    ("chat", {"model": "scripted", "messages": []}, 400, "messages", "at least 1"),
    ("chat", {"model": "scripted", "messages": "hi"}, 400, "messages", "list"),
    ("chat", {"model": "scripted", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role", "robot"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", "5"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content", ""),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "temperature": "hot"}, 400, "temperature", "hot"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "temperature": 5}, 400, "temperature", "less than or equal to 2"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "max_tokens": 5.5}, 400, "max_tokens", "integer"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "max_tokens": 100000}, 400, "max_tokens", "context length"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "top_p": 0}, 400, "top_p", "greater than 0"),
    ("chat", {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404, "model",
     "gpt-4o"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}], "n": 2},
     400, "n", "n=2"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "logprobs": True}, 400, "logprobs", "not supported"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "presence_penalty": 0.5}, 400, "presence_penalty", "repetition_penalty"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "min_tokens": 4}, 400, "min_tokens", "not supported"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "functions": [{"name": "f"}]}, 400, "functions", "use 'tools'"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "chat_template_kwargs": {"add_generation_prompt": False}}, 400,
     "chat_template_kwargs", "template variable 'add_generation_prompt' cannot be set: kogcupy "
                             "sets it (send it as the request's own field)"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "length_penalty": 1.5}, 400, "length_penalty", "not supported"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"},
                                                {"role": "assistant", "content": "A",
                                                 "prefix": True}]},
     400, "messages[1].prefix", "prefix completion"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}], "stream": True,
              "stream_options": {"continuous_usage_stats": True}}, 400,
     "stream_options.continuous_usage_stats", "last chunk"),
    ("completions", {"model": "scripted", "prompt": "a", "max_completion_tokens": 2}, 400,
     "max_completion_tokens", "use 'max_tokens'"),
    ("completions", {"model": "scripted", "prompt": "a",
                     "response_format": {"type": "json_object"}}, 400, "response_format", ""),
    ("chat", b'{"messages": [{"role": "user", "content": "x"}], "metadata": ' + b"[" * 3000
     + b"]" * 3000 + b"}", 400, None, "nested too deeply"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "tools": [WEATHER_TOOL], "tool_choice": {"type": "function",
                                                       "function": {"name": "get_time"}}},
     400, "tool_choice.function.name", "'get_time', which is not among the tools ('get_weather')"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "tools": [WEATHER_TOOL], "tool_choice": "required",
              "add_generation_prompt": False}, 400, "tool_choice", "add_generation_prompt"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}, {
              "role": "assistant", "content": "I"}], "tools": [WEATHER_TOOL],
              "tool_choice": "required", "continue_final_message": True}, 400, "tool_choice",
     "cannot continue the last message (continue_final_message)"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "f"}},
     400, "tool_choice", '"required" or {"type": "function", "function": {"name": ...}}'),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "response_format": {"type": "json_object"}}, 400, "response_format", ""),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "stop": ["a", ""]}, 400, "stop", "non-empty (stop[1] is '')"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x " * 3000}]},
     400, "messages", "maximum context length"),
    ("completions", {"model": "scripted", "prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    ("completions", {"model": "scripted", "prompt": "a", "echo": True}, 400, "echo", ""),
    ("completions", {"model": "scripted", "prompt": "a", "best_of": 3}, 400, "best_of", ""),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "a"}], "best_of": 2},
     400, "best_of", ""),
    ("completions", {"model": "scripted", "prompt": "a", "logprobs": 0}, 400, "logprobs", ""),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x",
                                                 "refusal": "no"}]},
     400, "messages[0].refusal", "only an assistant message"),
    ("completions", {"model": "scripted", "prompt": [1, 99999]}, 400, "prompt", "token ids"),
    ("chat", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     "temperature", "finite"),
    ("chat", b'{"messages": [{"role": "user", "content": "x"}], "repetition_penalty": Infinity}',
     400, "repetition_penalty", "finite"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "max_completion_tokens": 100000}, 400, "max_completion_tokens",
     "context length is 2048 tokens; the prompt has 46 tokens and max_completion_tokens=100000"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": None}]}, 400,
     "messages[0].content", "required"),
    ("chat", {"model": "scripted", "messages": [{"role": "assistant", "content": None}]}, 400,
     "messages[0].content", "required for an assistant message without tool_calls"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "tool_choice": "auto"}, 400, "tool_choice", "tools are specified"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": None}]}, 400,
     "messages[0].content", "required for a user message"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"},
                                                {"role": "tool", "content": "sunny"}]}, 400,
     "messages[1].tool_call_id", "required for a tool message"),
    ("chat", {"model": "scripted", "messages": [{"role": "user", "content": "x"}],
              "seed": -2**63 - 1},
     400, "seed", "[-2**63, 2**64)"),
    ("completions", {"model": "scripted", "prompt": "a", "seed": 2**64}, 400, "seed", "got"),
    ("chat", b'{"messages": [{"role": "user", "content": "x"}], "stop": "\\udcff"}', 400,
     "stop", "stop is not valid UTF-8"),
    ("chat", b'{"messages": [{"role": "user", "content": "x"}], "stop": ["a", "\\ud800"]}', 400,
     "stop", "stop[1] is not valid UTF-8 text: undecodable lone surrogate U+D800"),
]


def test_tokenize_and_detokenize(scripted):
    """vLLM's /tokenize (a prompt or messages; counted past the context too) and /detokenize."""
    eng, srv = scripted()
    tk = eng.tokenizer
    r = httpx.post(srv.url + "/tokenize", json={"model": "scripted", "prompt": "The fox ran"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tk.encode("The fox ran") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == eng.context_length
    msgs = [{"role": "user", "content": "weather?"}]
    r = httpx.post(srv.url + "/tokenize", json={"messages": msgs, "tools": [WEATHER_TOOL]})
    assert r.json()["tokens"] == eng.encode_messages(msgs, tools=[WEATHER_TOOL])
    r = httpx.post(srv.url + "/tokenize", json={"messages": msgs, "add_generation_prompt": False,
                                                "return_token_strs": True})
    assert r.json()["tokens"] == eng.encode_messages(msgs, add_generation_prompt=False) \
        != eng.encode_messages(msgs)
    assert r.json()["token_strs"] == [tk.id_to_token(i) for i in r.json()["tokens"]]
    said = msgs + [{"role": "assistant", "content": "Sunny"}]
    r = httpx.post(srv.url + "/tokenize", json={"messages": said, "continue_final_message": True})
    assert r.json()["tokens"] == eng.encode_messages(said, add_generation_prompt=False,
                                                     continue_final_message=True)
    assert tk.decode(r.json()["tokens"]).endswith("<|im_start|>assistant\nSunny"), r.text
    long = [{"role": "user", "content": "x " * 3000}]           # past the context: counted
    r = httpx.post(srv.url + "/tokenize", json={"messages": long})
    assert r.status_code == 200 and r.json()["count"] > eng.context_length
    r = httpx.post(srv.url + "/detokenize", json={"tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": "The fox ran"}
    for route, req, param in (("/tokenize", {"prompt": "a", "messages": msgs}, "prompt"),
                              ("/tokenize", {}, "prompt"),
                              ("/detokenize", {"tokens": [0, tk.vocab_size]}, "tokens"),
                              ("/detokenize", {"tokens": ["a"]}, "tokens[0]"),
                              ("/tokenize", {"prompt": "a", "model": "nope"}, "model"),
                              ("/tokenize", {"messages": msgs, "add_special_tokens": True},
                               "add_special_tokens"),
                              ("/tokenize", {"messages": msgs, "chat_template_kwargs": {
                                  "messages": 1}}, "chat_template_kwargs"),
                              ("/tokenize", {"messages": [{"role": "user", "content": [
                                  {"type": "image_url", "image_url": {"url": "x"}}]}]},
                               "messages[0].content")):
        r = httpx.post(srv.url + route, json=req)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text


def test_run_server_returns_on_ctrl_c(monkeypatch):
    """uvicorn raises the Ctrl-C again once it has shut down (main thread); run_server returns,
    so `kogcupy serve` exits 0 as uvicorn's own CLI does."""
    import kogcupy.serve.app as A
    ran = []

    def run(self):
        ran.append(self.config.port)
        raise KeyboardInterrupt

    monkeypatch.setattr(A.Server, "run", run)
    assert A.run_server(object(), port=8765) is None and ran == [8765]


def test_a_second_ctrl_c_quits_without_a_traceback():
    """A second Ctrl-C while the server shuts down (uvicorn's force quit) skipped the app's
    shutdown; asyncio then cancelled it and the log got a traceback. It shuts down cleanly."""
    import subprocess
    import sys
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    code = ("import contextlib\nfrom fastapi import FastAPI\nfrom kogcupy.serve.app import "
            "run_server\n@contextlib.asynccontextmanager\nasync def life(app):\n    yield\n"
            f"run_server(FastAPI(lifespan=life), port={port})\nprint('returned')\n")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        def listening():
            with socket.socket() as c:
                return c.connect_ex(("127.0.0.1", port)) == 0
        wait_until(listening, 30, "listening")
        p.send_signal(signal.SIGINT)
        time.sleep(0.05)                  # (not at once: two pending signals are one)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert out == "returned\n" and "Application shutdown complete" in err, err
    assert "Traceback" not in err, err

def test_deeply_nested_json_is_never_a_server_error(scripted):
    """Nesting that the JSON decoder, pydantic or the template's tojson cannot follow is a
    400 wherever it stops (the depths around the interpreter's recursion limit)."""
    eng, srv = scripted(max_body_bytes=100_000)
    for depth in (940, 970, 985, 995, 1200):
        params = '{"a": ' * depth + "1" + "}" * depth
        body = ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "tools": '
                '[{"type": "function", "function": {"name": "f", "parameters": %s}}]}' % params)
        r = httpx.post(srv.url + "/v1/chat/completions", content=body.encode(),
                       headers={"content-type": "application/json"})
        assert r.status_code in (200, 400), (depth, r.status_code, r.text[:300])


def test_only_json_bodies_run(scripted):
    """A body sent as text/plain, a form or with no type (what a web page may POST to a local
    server without a CORS preflight) is a 415 and never reaches the engine; JSON types run."""
    eng, srv = scripted()
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    for path in ("/v1/chat/completions", "/tokenize"):
        for ct in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                   "multipart/form-data; boundary=x", None):
            r = httpx.post(srv.url + path, content=body, headers={} if ct is None else {"content-type": ct})
            err = r.json()["error"]
            assert r.status_code == 415 and "application/json" in err["message"], (path, ct, r.text)
            assert err["type"] == "invalid_request_error"
    assert eng.calls == []
    for ct in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json"):
        r = httpx.post(srv.url + "/v1/chat/completions", content=body, headers={"content-type": ct})
        assert r.status_code == 200, (ct, r.text)
    assert len(eng.calls) == 3


def test_host_names_outside_allowed_hosts_are_refused(scripted, serve_log):
    """allowed_hosts (kogcupy serve on 127.0.0.1: localhost and 127.0.0.1): a request whose
    Host names another host -- a page that rebound its own name to this machine -- is a 400
    (an OpenAI error naming --allowed-host, and a log line) and never runs; the server's own
    names run."""
    eng, srv = scripted(allowed_hosts=["localhost", "127.0.0.1"])
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "www.localhost"):
        serve_log.clear()
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"host": host})
        assert r.status_code == 400, (host, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and f"Host '{host}' is not a name" in \
            err["message"] and "--allowed-host" in err["message"], (host, err)
        assert "localhost, 127.0.0.1" not in err["message"]  # (the page reads the answer)
        assert serve_log == [f"POST /v1/chat/completions -> 400: {err['message']} (it answers "
                             f"localhost, 127.0.0.1)"], serve_log
        assert httpx.get(srv.url + "/v1/models", headers={"host": host}).status_code == 400
    assert eng.calls == []
    assert srv.requests("/v1/chat/completions", "400") == srv.requests("/v1/models", "400") == 4
    with socket.create_connection(("127.0.0.1", int(srv.url.rsplit(":", 1)[1]))) as c:
        c.sendall(b"GET /v1/models HTTP/1.0\r\n\r\n")          # (HTTP/1.0: no Host needed)
        answer = b""
        while chunk := c.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400") and b"no Host header" in answer, answer
    port = srv.url.rsplit(":", 1)[1]
    for host in (None, f"localhost:{port}", "LOCALHOST"):
        r = httpx.post(srv.url + "/v1/chat/completions", json=body,
                       headers={} if host is None else {"host": host})
        assert r.status_code == 200, (host, r.text)
    assert len(eng.calls) == 3


def test_unknown_routes_are_logged(scripted, serve_log):
    """A wrong route or method is a JSON 404 / 405 and a server log line, its path escaped."""
    eng, srv = scripted()
    for method, path, status, said in (
            ("GET", "/nothing", 404, "GET /nothing -> 404: no route GET /nothing"),
            ("POST", "/chat/completions", 404, "POST /chat/completions -> 404: no route POST "
             "/chat/completions; did you mean /v1/chat/completions? (a client's base_url ends "
             "with /v1)"),
            ("GET", "/x%1By%C3%A9", 404, "GET /x\\x1by\\xe9 -> 404: no route GET /x\\x1by\\xe9"),
            ("GET", "/'a%22", 404, "GET /'a\" -> 404: no route GET /'a\""),   # (quotes as sent)
            ("GET", "/a" + "%C3%A9" * 100, 404,     # (escaped, then cut at 300 characters)
             "GET /a" + "\\xe9" * 74 + "\\x... -> 404: no route GET /a" + "\\xe9" * 71 + "\\..."),
            ("GET", "/v1/chat/completions", 405, "GET /v1/chat/completions -> 405: method GET "
                                                 "is not allowed on /v1/chat/completions")):
        serve_log.clear()
        r = httpx.request(method, srv.url + path)
        assert r.status_code == status and r.json()["error"]["message"], r.text
        assert serve_log == [said], serve_log


def test_bad_requests_get_openai_errors(scripted):
    eng, srv = scripted(max_body_bytes=20_000)
    for route, body, status, param, text in BAD_REQUESTS:
        url = srv.url + ("/v1/chat/completions" if route == "chat" else "/v1/completions")
        if isinstance(body, bytes):
            r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        else:
            r = httpx.post(url, json=body)
        err = r.json()["error"]
        assert (r.status_code, err.get("param")) == (status, param), (body, r.text)
        assert text in err["message"] and err["type"] and "Traceback" not in r.text, r.text
        # what clients that trim their history look for (OpenAI's code for it)
        assert (err["code"] == "context_length_exceeded") == ("context length" in text), r.text
        # OpenAI's codes for what is not implemented (clients drop the parameter and retry)
        assert (err["code"] in ("unsupported_parameter", "unsupported_value")) == \
            ("not supported" in err["message"]), r.text
    r = httpx.post(srv.url + "/v1/chat/completions", content=b"x" * 30_000)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.get(srv.url + "/v1/nothing")
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        chat(srv.client(), "x", model="nope")
    with pytest.raises(openai.BadRequestError, match="n=2") as e:
        chat(srv.client(), "x", n=2)
    assert e.value.code == "unsupported_value"            # n exists, 2 is not served
    with pytest.raises(openai.BadRequestError, match="logit_bias") as e:
        chat(srv.client(), "x", logit_bias={"1": 5})
    assert e.value.code == "unsupported_parameter"        # not implemented at all
    assert eng.calls == []                        # none of them reached the engine
    assert srv.scheduler.idle


def test_engine_errors(scripted):
    eng, srv = scripted()
    eng.raise_in_generate = InputError("a bad prompt, says the engine")
    with pytest.raises(openai.BadRequestError, match="says the engine"):
        chat(srv.client(), "x")
    eng.raise_in_generate = RuntimeError("secret internals")
    r = httpx.post(srv.url + "/v1/chat/completions", json={
        "model": "scripted", "messages": [{"role": "user", "content": "x"}], "stream": True})
    assert r.status_code == 500 and "secret" not in r.text and "server log" in r.text
    eng.raise_in_generate = None
    assert chat(srv.client(), "ok").choices[0].message.content == "reply to ok"
    # a bug before any response (here in encode) is a 500 in /metrics too, not a 499
    route = "/v1/chat/completions"
    before = srv.requests(route, "500")
    eng.encode_messages = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bug"))
    r = httpx.post(srv.url + route, json={
        "model": "scripted", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 500
    srv.expect_requests(route, "500", before + 1)
    assert srv.requests(route, "499") == 0


def test_api_key(scripted, serve_log):
    eng, srv = scripted(api_key="sekret", allowed_origins=["http://ui.example"])
    assert chat(srv.client(), "hi").choices[0].message.content == "reply to hi"
    # CORS: a browser's preflight from an allowed origin passes without the key; others get none
    pre = {"access-control-request-method": "POST",
           "access-control-request-headers": "authorization,content-type"}
    r = httpx.options(srv.url + "/v1/chat/completions", headers={"origin": "http://ui.example", **pre})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"
    r = httpx.options(srv.url + "/v1/chat/completions", headers={"origin": "http://evil.example", **pre})
    assert "access-control-allow-origin" not in r.headers
    with pytest.raises(openai.AuthenticationError):
        chat(srv.client(api_key="wrong"), "hi")
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sekret"},
                    {"authorization": "Basic sekret"}):
        serve_log.clear()
        r = httpx.post(srv.url + "/v1/chat/completions", headers=headers, json={})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert [m for m in serve_log if "->" in m] == [     # (the chat's own line may be late)
            "POST /v1/chat/completions -> 401: " + r.json()["error"]["message"]], serve_log
        assert httpx.get(srv.url + "/v1/models", headers=headers).status_code == 401
        assert httpx.post(srv.url + "/tokenize", headers=headers,
                          json={"prompt": "a"}).status_code == 401
    assert httpx.post(srv.url + "/tokenize", headers={"authorization": "Bearer sekret"},
                      json={"prompt": "a"}).status_code == 200
    assert httpx.get(srv.url + "/health").status_code == 200
    assert len(eng.calls) == 1


def test_tools_rejected_without_template_support(scripted, tiny_models):
    tk = tiny_models["llama"].tokenizer
    plain = Tokenizer(tk.backend, bos_token_id=None, eos_token_ids=tk.eos_token_ids,
                      add_bos=False, chat_template=NO_TOOLS_TEMPLATE)
    eng, srv = scripted(tokenizer=plain)
    with pytest.raises(openai.BadRequestError, match="does not support tools"):
        chat(srv.client(), "x", tools=[WEATHER_TOOL])
    # tools switched off by tool_choice "none": the request runs without them
    r = chat(srv.client(), "x", tools=[WEATHER_TOOL], tool_choice="none")
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    # a history with a call the template would drop: said, not ignored
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "scripted",
                                                          "messages": history})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages[1].tool_calls"


def test_client_round_trip_fields_accepted(scripted):
    """What agents send back: the openai client's message.model_dump() (refusal, annotations,
    audio, function_call as null), a streamed call's index, bookkeeping fields, null stream."""
    eng, srv = scripted(script=lambda u: CALL_TEXT)
    c = srv.client()
    first = chat(c, "weather?", tools=[WEATHER_TOOL])
    eng.script = lambda u: "ok"
    back = first.choices[0].message.model_dump()
    assert back["refusal"] is None and back["tool_calls"]
    back["tool_calls"][0]["index"] = 0
    msgs = [{"role": "user", "content": "weather?"}, back,
            {"role": "tool", "tool_call_id": back["tool_calls"][0]["id"], "content": "sunny"}]
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL],
                                  store=False, metadata={"run": "1"}, user="u",
                                  extra_body={"stream": None, "service_tier": "auto"})
    assert r.choices[0].message.content == "ok"
    assert '"get_weather"' in eng.calls[-1]["prompt"] and "sunny" in eng.calls[-1]["prompt"]
    # no "model": the one served (as vLLM and llama.cpp do)
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user",
                                                                         "content": "x"}]})
    assert r.status_code == 200 and r.json()["model"] == "scripted"
    # another provider's turn: a refusal stands for its empty content, citations are dropped
    turn = {"role": "assistant", "content": None, "refusal": "I cannot say.",
            "annotations": [{"type": "url_citation", "url_citation": {"url": "https://x"}}]}
    r = c.chat.completions.create(model="scripted", messages=[
        {"role": "user", "content": "a"}, turn, {"role": "user", "content": "b"}])
    assert "<|im_start|>assistant\nI cannot say.<|im_end|>" in eng.calls[-1]["prompt"]
    assert "url_citation" not in eng.calls[-1]["prompt"]
    r = httpx.post(srv.url + "/tokenize", json={"messages": [
        {"role": "user", "content": "x", "refusal": "no"}]})        # (as chat: BAD_REQUESTS)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].refusal"


def test_empty_model_name_is_the_served_model(scripted):
    """"model" left out, null or "" all mean the one served model (vLLM's rule); another name is
    a 404 (BAD_REQUESTS)."""
    eng, srv = scripted(script=lambda u: "ok")
    for extra in ({}, {"model": None}, {"model": ""}):
        r = httpx.post(srv.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "x"}], **extra})
        assert r.status_code == 200 and r.json()["model"] == "scripted", (extra, r.text)


def test_unknown_fields_are_ignored_and_logged(scripted, serve_log):
    """Fields kogcupy does not know (other clients' and servers' extras) are ignored, as vLLM
    and llama.cpp do, and the server log names them; known ones that would change the output
    are a 400 unless neutral (BAD_REQUESTS)."""
    eng, srv = scripted(script=lambda u: "ok")
    body = {"messages": [{"role": "user", "reasoning_content": None, "content": [
                {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}]}],
            "prompt_cache_key": "k", "frobnicate": True, "ignore_eos": False,
            "reasoning_effort": "low", "length_penalty": 1.0, "modalities": ["text"], "best_of": 1,
            "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
    chunks = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"]) == "ok" and chunks[-1]["usage"]["completion_tokens"] == 2
    lines = [m for m in serve_log if "ignored" in m]
    assert lines == [f"{chunks[0]['id']} POST /v1/chat/completions: ignored unknown fields "
                     "frobnicate, reasoning_effort, stream_options.include_obfuscation, "
                     "messages[0].reasoning_content, messages[0].content[0].cache_control"], serve_log
    # on a tool too: ignored, so never in the prompt; a field name is logged escaped and cut
    tool = {**WEATHER_TOOL, "cache_control": {"type": "ephemeral"},
            "function": {**WEATHER_TOOL["function"], "x_extra": "SECRET"}}
    serve_log.clear()
    r = httpx.post(srv.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "tools": [tool],
        "\nFORGED\\\x1b[31m'\"" + "k" * 500: 1})
    assert r.status_code == 200, r.text
    assert '"get_weather"' in eng.calls[-1]["prompt"] and "SECRET" not in eng.calls[-1]["prompt"] \
        and "cache_control" not in eng.calls[-1]["prompt"]
    line, = [m for m in serve_log if "ignored" in m]
    assert line.startswith(f"{r.json()['id']} POST /v1/chat/completions: ignored unknown "
                           "fields \\nFORGED\\\\\\x1b[31m'\"kkk"), line
    serve_log.clear()       # (the generation's own line may come after its response: not read)
    r = httpx.post(srv.url + "/tokenize", json={"prompt": "x", "frobnicate": 1})
    assert r.status_code == 200 and [m for m in serve_log if "ignored" in m] == [
        "POST /tokenize: ignored unknown field frobnicate"], serve_log
    assert "\n" not in line and "\x1b" not in line and len(line) < 260, line


def test_forced_tool_choice(scripted, tiny_models):
    """tool_choice "required" or a named function: the prompt ends with the call's opening
    (the model continues its JSON) and the answer parses with that opening in front."""
    eng, srv = scripted(script=lambda u: ' {"city": "Paris"}}\n</tool_call>\nMore text.')
    c = srv.client()
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL],
                                  tool_choice=named)
    assert eng.calls[-1]["prompt"].endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments":')
    assert eng.calls[-1]["stop"] == ["</tool_call>"]          # one call, then the answer ends
    m = r.choices[0].message             # (a named function's call ends "stop", as OpenAI's)
    assert r.choices[0].finish_reason == "stop" and m.content is None
    assert [(t.function.name, json.loads(t.function.arguments)) for t in m.tool_calls] == \
        [("get_weather", {"city": "Paris"})]
    content, calls, finish = _stream_chat(c, msgs, tools=[WEATHER_TOOL], tool_choice=named)
    assert (content, finish) == ("", "stop")
    assert [(x["name"], json.loads(x["arguments"])) for x in calls] == \
        [("get_weather", {"city": "Paris"})]
    # "required" with one tool: its name is forced too; more calls may follow, as OpenAI's
    eng.script = lambda u: (' {"city": "Lima"}}\n</tool_call>\n'
                            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
                            '\n</tool_call>')
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL],
                                  tool_choice="required", stop=["zzz"])
    assert eng.calls[-1]["prompt"].endswith(
        'assistant\n<tool_call>\n{"name": "get_weather", "arguments":')
    assert eng.calls[-1]["stop"] == ["zzz"]
    assert [json.loads(t.function.arguments)["city"] for t in r.choices[0].message.tool_calls] \
        == ["Lima", "Oslo"] and r.choices[0].finish_reason == "tool_calls"
    # "required" with several: the model picks the name; a call to a tool the request does not
    # have is no tool call (it stays text), whatever the choice
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    eng.script = lambda u: 'get_time", "arguments": {}}\n</tool_call>'
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL, clock],
                                  tool_choice="required")
    assert eng.calls[-1]["prompt"].endswith('assistant\n<tool_call>\n{"name": "')
    assert [t.function.name for t in r.choices[0].message.tool_calls] == ["get_time"]
    eng.script = lambda u: 'London", "arguments": {"city": "London"}}\n</tool_call>'
    for choice in ("required", "auto"):
        r = c.chat.completions.create(model="scripted", messages=msgs,
                                      tools=[WEATHER_TOOL, clock], tool_choice=choice)
        m = r.choices[0].message
        assert not m.tool_calls and r.choices[0].finish_reason == "stop"
        assert '"London"' in m.content
    content, calls, finish = _stream_chat(c, msgs, tools=[WEATHER_TOOL, clock],
                                          tool_choice="required")
    assert (calls, finish) == ([], "stop") and '"London"' in content
    flat = [{"type": "function", "name": t["function"]["name"],
             "parameters": t["function"]["parameters"]} for t in (WEATHER_TOOL, clock)]
    r = c.responses.create(model="scripted", input=msgs, tools=flat, tool_choice="required")
    assert [o.type for o in r.output] == ["message"] and '"London"' in r.output_text
    # a template that takes tools in a form of call kogcupy does not read: no call is parsed
    # or forced (vLLM's 400 without a tool parser); "none" still puts the tools in the prompt
    tk = tiny_models["llama"].tokenizer
    other = Tokenizer(tk.backend, bos_token_id=None, eos_token_ids=tk.eos_token_ids,
                      add_bos=False, chat_template="{{ tools | tojson }}" + NO_TOOLS_TEMPLATE)
    eng, srv = scripted(tokenizer=other)
    for choice in ("required", "auto", named):
        with pytest.raises(openai.BadRequestError, match="no tool calls kogcupy can read"):
            srv.client().chat.completions.create(model="scripted", messages=msgs,
                                                 tools=[WEATHER_TOOL], tool_choice=choice)
    assert not eng.calls
    srv.client().chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL],
                                         tool_choice="none")
    assert '"get_weather"' in eng.calls[-1]["prompt"]
    r = httpx.post(srv.url + "/tokenize", json={"messages": msgs, "tools": [WEATHER_TOOL]})
    assert r.status_code == 200 and r.json()["count"] > 0, r.text     # (no answer to read)


def test_responses_api(scripted):
    """/v1/responses with the openai client: input and instructions become the chat prompt,
    text and calls come back as output items, streamed as the API's typed events."""
    eng, srv = scripted(script=lambda u: CALL_TEXT if "Weather" in u else f"reply to {u}")
    c = srv.client()
    r = c.responses.create(model="scripted", input="hi", instructions="Be brief.")
    prompt = eng.calls[-1]["prompt"]
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")
    assert r.output_text == "reply to hi" and r.status == "completed"
    assert [(o.type, o.role, o.status) for o in r.output] == [("message", "assistant", "completed")]
    assert r.usage.input_tokens == len(eng.encode_messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]))
    assert r.usage.output_tokens == len(eng.tokenizer.encode("reply to hi", add_bos=False))
    # max_output_tokens reached: incomplete, as OpenAI says it
    r = c.responses.create(model="scripted", input="hello there", max_output_tokens=2)
    assert (r.status, r.incomplete_details.reason, r.usage.output_tokens) == \
        ("incomplete", "max_output_tokens", 2) and eng.calls[-1]["max_new_tokens"] == 2

    # tools: a text item, then a function_call item; streamed, the typed events
    tool = {"type": "function", "name": "get_weather", "description": "Current weather",
            "parameters": WEATHER_TOOL["function"]["parameters"]}
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = c.responses.create(model="scripted", input=msgs, tools=[tool])
    assert '"name": "get_weather"' in eng.calls[-1]["prompt"]            # tools were rendered
    assert [o.type for o in r.output] == ["message", "function_call"]
    assert r.output[0].content[0].text == "Let me check."
    call = r.output[1]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    with c.responses.stream(model="scripted", input=msgs, tools=[tool]) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed" and "response.output_text.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    assert [o.type for o in final.output] == ["message", "function_call"]
    assert final.output[1].call_id.startswith("call_") and final.output_text == "Let me check."
    eng.script = lambda u: CALL_TEXT + "\nAfter."      # text after a call: a message of its own
    with c.responses.stream(model="scripted", input=msgs, tools=[tool]) as stream:
        out = stream.get_final_response().output
    assert [o.type for o in out] == ["message", "function_call", "message"]
    assert out[2].content[0].text == "After."
    eng.script = lambda u: CALL_TEXT if "Weather" in u else f"reply to {u}"
    raw = httpx.post(srv.url + "/v1/responses", json={"input": "yo", "stream": True}).text
    assert raw.startswith("event: response.created\ndata: {") and "[DONE]" not in raw
    seq = [json.loads(x.split("data: ", 1)[1])["sequence_number"] for x in raw.split("\n\n") if x]
    assert seq == list(range(len(seq)))

    # the next turn: the call and its output go back as items
    eng.script = lambda u: "It is sunny."
    turn2 = msgs + [{"type": "function_call", "call_id": call.call_id, "name": "get_weather",
                     "arguments": call.arguments},
                    {"type": "function_call_output", "call_id": call.call_id,
                     "output": "sunny, 21 C"}]
    r = c.responses.create(model="scripted", input=turn2, tools=[tool])
    assert r.output_text == "It is sunny."
    prompt = eng.calls[-1]["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    # a named tool_choice forces the call
    eng.script = lambda u: ' {"city": "Oslo"}}\n</tool_call>'
    r = c.responses.create(model="scripted", input=msgs, tools=[tool],
                           tool_choice={"type": "function", "name": "get_weather"})
    assert [(o.type, o.name, o.arguments) for o in r.output] == \
        [("function_call", "get_weather", '{"city": "Oslo"}')]

    n = len(eng.calls)
    for body, param, what in [
            ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id",
             "not stored"),
            ({"input": [{"role": "user", "content": [{"type": "input_image",
                                                      "image_url": "x"}]}]},
             "input[0].content[0]", "input_image"),
            ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type", "function"),
            ({"input": "x", "tools": [WEATHER_TOOL]}, "tools[0]", "function tools are flat"),
            ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "not stored"),
            ({"input": []}, "input", "empty"),
            ({"input": "x", "tool_choice": {"type": "function", "name": "nope"}, "tools": [tool]},
             "tool_choice.name", "not among the tools"),
            ({"input": "x", "text": {"format": {"type": "json_object"}}}, "text",
             "structured outputs are not supported"),
            ({"input": ["hi"]}, "input", "a string or a list of input items"),
            ({"input": "x", "presence_penalty": 0.5}, "presence_penalty", "repetition_penalty"),
            ({"input": "x", "tools": [tool], "tool_choice": {"type": "function",
                                                             "function": {"name": "f"}}},
             "tool_choice", '"required" or {"type": "function", "name": ...}'),
            ({"input": "x", "include": ["message.output_text.logprobs"]}, "include[0]",
             "logprobs"),
            ({"max_output_tokens": 3}, "input", "missing required parameter 'input'")]:
        r = httpx.post(srv.url + "/v1/responses", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param \
            and what in r.json()["error"]["message"], (body, r.text)
        err = r.json()["error"]
        assert (err["code"] in ("unsupported_parameter", "unsupported_value")) == \
            ("not supported" in err["message"]), r.text
    assert len(eng.calls) == n
    srv.expect_requests("/v1/responses", "400", 13)
    # what agent clients send by default is accepted (ignored where it has no effect here)
    eng.script = lambda u: f"reply to {u}"
    r = httpx.post(srv.url + "/v1/responses", json={
        "input": [{"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
                  {"type": "reasoning", "id": "rs_1", "summary": []},
                  {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        "include": ["reasoning.encrypted_content"], "truncation": "auto", "store": False,
        "reasoning": {"effort": "medium"}, "text": {"format": {"type": "text"},
                                                    "verbosity": "low"},
        "prompt_cache_key": "k", "parallel_tool_calls": True})
    assert r.status_code == 200 and r.json()["output"][0]["content"][0]["text"] == "reply to hi"
    assert "<|im_start|>assistant\nNo.<|im_end|>" in eng.calls[-1]["prompt"]

    # a failure in the generation: streamed, the events so far, then error and response.failed
    for fail_at in (0, 2):
        eng.script, eng.fail_at = (lambda u: "one two three four"), fail_at
        raw = httpx.post(srv.url + "/v1/responses", json={"input": "x", "stream": True}).text
        kinds = [x.split("\n")[0][7:] for x in raw.split("\n\n") if x]
        assert kinds[:2] == ["response.created", "response.in_progress"], raw
        assert kinds[-2:] == ["error", "response.failed"], raw
        assert ("response.output_text.delta" in kinds) == (fail_at > 0), raw
        failed = json.loads(raw.split("\n\n")[-2].split("data: ", 1)[1])["response"]
        assert failed["status"] == "failed" and "internal error" in failed["error"]["message"]
    eng.fail_at = None


def _stream_chat(client, messages, **kw):
    """Accumulate a streamed chat answer the way agents do."""
    content, calls, finish, n_chunks = "", {}, None, 0
    for ch in client.chat.completions.create(model="scripted", messages=messages, stream=True,
                                             **kw):
        n_chunks += 1
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = tc.id or slot["id"]
            slot["name"] += tc.function.name or ""
            slot["arguments"] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_tool_calls_streamed_and_not(scripted):
    two_calls = CALL_TEXTS[1]
    eng, srv = scripted(script=lambda u: two_calls if "both" in u else CALL_TEXT)
    c = srv.client()
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL])
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.content == "Let me check."
    assert m.tool_calls[0].function.name == "get_weather" and m.tool_calls[0].type == "function"
    assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris"}
    prompt = eng.calls[-1]["prompt"]
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt      # tools were rendered

    content, calls, finish = _stream_chat(c, msgs, tools=[WEATHER_TOOL])
    assert (content, finish) == ("Let me check.", "tool_calls")
    assert [(x["name"], json.loads(x["arguments"])) for x in calls] == \
        [("get_weather", {"city": "Paris"})] and calls[0]["id"].startswith("call_")

    both = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
            for n in "ab"]
    content, calls, finish = _stream_chat(c, [{"role": "user", "content": "both"}], tools=both)
    assert content == "" and [x["name"] for x in calls] == ["a", "b"]
    for stream in (False, True):                  # parallel_tool_calls: false -> the first call
        if stream:
            content, calls, finish = _stream_chat(c, [{"role": "user", "content": "both"}],
                                                  tools=both, parallel_tool_calls=False)
        else:
            r = c.chat.completions.create(model="scripted", tools=both,
                                          messages=[{"role": "user", "content": "both"}],
                                          parallel_tool_calls=False)
            calls = [{"name": t.function.name} for t in r.choices[0].message.tool_calls]
        assert [x["name"] for x in calls] == ["a"]
        assert eng.calls[-1]["stop"] == ["</tool_call>"]      # the answer ends with the call
    content, calls, finish = _stream_chat(c, [{"role": "user", "content": "both"}], tools=both)

    # next turn: the assistant's call and the tool's answer go back through the template
    turn2 = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0]["id"], "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny, 21 C"}]
    eng.script = lambda u: "It is sunny."
    r = c.chat.completions.create(model="scripted", messages=turn2, tools=[WEATHER_TOOL])
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].finish_reason == "stop"
    prompt = eng.calls[-1]["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt

    # tool_choice "none": tools stay in the prompt, the text is not parsed
    eng.script = lambda u: CALL_TEXT
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL],
                                  tool_choice="none")
    assert r.choices[0].message.content == CALL_TEXT and not r.choices[0].message.tool_calls


def test_a_call_whose_arguments_never_close(scripted):
    """A call closed by its tag before its arguments object: whole answers give it as text
    (chat and Responses); a stream has sent it as written, so it ends "stop", not as a call to
    run, and the Responses item is incomplete. tool_choice "auto" with no tools is the default."""
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>'
    eng, srv = scripted(script=lambda u: broken)
    c, msgs = srv.client(), [{"role": "user", "content": "go"}]
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL])
    m = r.choices[0].message
    assert (m.content, m.tool_calls, r.choices[0].finish_reason) == (broken, None, "stop")
    content, calls, finish = _stream_chat(c, msgs, tools=[WEATHER_TOOL])
    assert finish == "stop" and [x["arguments"] for x in calls] == ['{"city": "Paris"\n']
    flat = {"type": "function", **WEATHER_TOOL["function"]}
    out = c.responses.create(model="scripted", input="go", tools=[flat]).output
    assert [(i.type, i.content[0].text) for i in out] == [("message", broken)]
    with c.responses.stream(model="scripted", input="go", tools=[flat]) as st:
        out = st.get_final_response().output
    assert [(i.type, i.status) for i in out] == [("function_call", "incomplete")]
    # arguments that close but do not parse (a trailing comma): the same; with a good call
    # beside it, both answers end "tool_calls" (the whole one with the broken call as text)
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",}}\n</tool_call>'
    good = CALL_TEXT.split("\n", 1)[1]
    for script, calls_whole, finish in ((bad, 0, "stop"), (good + "\n" + bad, 1, "tool_calls")):
        eng.script = lambda u: script
        r = c.chat.completions.create(model="scripted", messages=msgs, tools=[WEATHER_TOOL])
        assert len(r.choices[0].message.tool_calls or []) == calls_whole
        assert r.choices[0].finish_reason == finish and bad in r.choices[0].message.content
        assert _stream_chat(c, msgs, tools=[WEATHER_TOOL])[2] == finish
    eng.script = lambda u: "fine"
    assert c.responses.create(model="scripted", input="go", tool_choice="auto").output_text == "fine"


def test_load_many_short_requests(tiny_models):
    """>= 200 short requests from 8 clients on a real (tiny) engine: every answer complete and
    equal to engine.generate, nothing left queued, the server's memory flat."""
    eng = Engine(tiny_models["llama"], backend="reference", context_length=128)
    n_clients, per_client = 8, 26
    prompts = [f"The quick brown fox {i}" for i in range(n_clients)]
    expect = {}
    for p in prompts:
        g = eng.generate([{"role": "user", "content": p}], max_new_tokens=4)
        expect[("chat", p)] = "".join(g)
        g = eng.generate(p, chat=False, max_new_tokens=4)
        expect[("text", p)] = "".join(g)
    app = create_app(eng, served_model_name="tiny", max_queue=16)

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def client_run(c, i, n, out):
        p = prompts[i]
        for k in range(n):
            kind = ("chat", "text")[k % 2]
            stream = k % 4 >= 2
            if kind == "chat":
                kw = dict(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=4,
                          temperature=0)
                if stream:
                    text = "".join(ch.choices[0].delta.content or "" for ch in
                                   c.chat.completions.create(stream=True, **kw) if ch.choices)
                else:
                    text = c.chat.completions.create(**kw).choices[0].message.content
            else:
                kw = dict(model="tiny", prompt=p, max_tokens=4, temperature=0)
                if stream:
                    text = "".join(ch.choices[0].text for ch in
                                   c.completions.create(stream=True, **kw) if ch.choices)
                else:
                    text = c.completions.create(**kw).choices[0].text
            out.append((kind, p, text))

    def run_all(clients, n, out, timeout):
        threads = [in_thread(client_run, c, i, n, out) for i, c in enumerate(clients)]
        for t, box in threads:
            t.join(timeout)
            assert not t.is_alive() and "error" not in box, box.get("error")

    with Server(app) as srv:
        clients = [srv.client() for _ in range(n_clients)]   # reused: memory is the server's
        run_all(clients, 8, [], 120)                        # warm-up: pools, caches, arenas
        gc.collect()
        before, objs_before = rss_mb(), len(gc.get_objects())
        results: list = []
        t0 = time.perf_counter()
        run_all(clients, per_client, results, 300)
        elapsed = time.perf_counter() - t0
        gc.collect()
        after, objs_after = rss_mb(), len(gc.get_objects())
        assert len(results) == n_clients * per_client >= 200
        wrong = [(k, p, t) for k, p, t in results if t != expect[(k, p)]]
        assert not wrong, wrong[:3]
        assert srv.scheduler.idle and srv.scheduler.queued == 0
        total = n_clients * (per_client + 8)
        assert srv.metric("kogcupy_generations_finished_total", finish_reason="length") + \
            srv.metric("kogcupy_generations_finished_total", finish_reason="eos") == total
        wait_until(lambda: srv.metric("kogcupy_requests_total", route="/v1/completions",
                                      status="200") +
                   srv.metric("kogcupy_requests_total", route="/v1/chat/completions",
                              status="200") == total, 10, "every request counted")
        print(f"load: {len(results)} requests in {elapsed:.1f} s, rss {before:.1f} -> "
              f"{after:.1f} MB, gc objects {objs_before} -> {objs_after}")
        assert after - before < 8, (before, after)
        assert objs_after - objs_before < 2000, (objs_before, objs_after)
        assert not [o for o in gc.get_objects() if type(o) is Job]   # no job kept alive


# ------------------------------------------------------------------------------- SmolLM2 (real)
@pytest.fixture(scope="module")
def smol(smollm2):
    eng = Engine(smollm2, backend="reference", context_length=512)
    app = create_app(eng, served_model_name="smollm2")
    with Server(app) as srv:
        yield eng, srv


HAIKU = [{"role": "user", "content": "Write a haiku about GPUs."}]


@pytest.fixture(scope="module")
def smol_greedy(smol):
    """The greedy 4-token answer to HAIKU, from the server (non-streamed) and the engine."""
    eng, srv = smol
    r = srv.client().chat.completions.create(model="smollm2", messages=HAIKU, max_tokens=4,
                                             temperature=0)
    g = eng.generate(HAIKU, max_new_tokens=4, temperature=0.0)
    return r, "".join(g), g.result


def test_smol_chat_matches_engine_and_usage(smol, smol_greedy):
    eng, srv = smol
    r, text, result = smol_greedy
    assert r.choices[0].message.content == text == result.text and text
    assert r.choices[0].finish_reason == "length" and r.model == "smollm2"
    n_prompt = len(eng.encode_messages(HAIKU))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (n_prompt, 4, n_prompt + 4)
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    chunks = list(srv.client().chat.completions.create(
        model="smollm2", messages=HAIKU, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == n_prompt
    # the Responses API: the same prompt, so the same greedy text
    r = srv.client().responses.create(model="smollm2", input=HAIKU, max_output_tokens=4,
                                      temperature=0)
    assert (r.output_text, r.usage.input_tokens, r.status) == (text, n_prompt, "incomplete")


def test_smol_completions_seeded_sampling(smol):
    eng, srv = smol
    kw = dict(model="smollm2", prompt="The capital of France is", max_tokens=4,
              temperature=0.9, seed=5)
    c = srv.client()
    a = c.completions.create(**kw).choices[0].text
    b = "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kw)
                if ch.choices)
    g = eng.generate("The capital of France is", chat=False, max_new_tokens=4, temperature=0.9,
                     seed=5)
    assert a == b == "".join(g) and a


def test_smol_stop_string(smol, smol_greedy):
    eng, srv = smol
    text = smol_greedy[1]
    words = text.split(" ")
    assert len(words) >= 2, text
    stop = " " + words[1]
    r = srv.client().chat.completions.create(model="smollm2", messages=HAIKU, max_tokens=4,
                                             temperature=0, stop=stop)
    assert r.choices[0].message.content == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.xfail(not HAS_PREFIX_CACHE, reason="needs the engine's prefix cache (issue 10)",
                   strict=True)
def test_smol_second_turn_reports_cached_tokens(smol, smol_greedy):
    eng, srv = smol
    turn2 = HAIKU + [{"role": "assistant", "content": smol_greedy[1]},
                     {"role": "user", "content": "Another one."}]
    r = srv.client().chat.completions.create(model="smollm2", messages=turn2, max_tokens=1,
                                             temperature=0)
    n_turn1 = len(eng.encode_messages(HAIKU))
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert n_turn1 <= cached < r.usage.prompt_tokens, (cached, n_turn1)
    assert srv.metric("kogcupy_prefix_cache_hit_tokens_total") >= cached


def test_smol_disconnect_mid_stream(smol):
    eng, srv = smol
    with srv.client().chat.completions.create(model="smollm2", messages=HAIKU, max_tokens=100,
                                              temperature=0, stream=True) as s:
        for ch in s:
            if ch.choices and ch.choices[0].delta.content:
                break
    wait_until(lambda: srv.scheduler.idle, 20, "engine free after the disconnect")
    assert srv.metric("kogcupy_generations_finished_total", finish_reason="cancelled") == 1


def test_smol_rejects_tools(smol):
    eng, srv = smol
    with pytest.raises(openai.BadRequestError, match="does not support tools"):
        srv.client().chat.completions.create(model="smollm2", messages=HAIKU, max_tokens=1,
                                             tools=[WEATHER_TOOL])


# ------------------------------------------------------------------------------- CLI
def test_cli_serve_busy_port_and_bad_options():
    from click.testing import CliRunner

    from kogcupy.cli import cli
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = CliRunner().invoke(cli, ["serve", "--backend", "reference", "--port", str(port)])
    assert r.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in r.output, r.output
    r = CliRunner().invoke(cli, ["serve", "--max-queue", "-1"])
    assert r.exit_code == 2 and "--max-queue" in r.output
    r = CliRunner().invoke(cli, ["serve", "--allowed-origin", "localhost:3000/ui"])
    assert r.exit_code == 2 and "scheme://host[:port]" in r.output, r.output
    for opt in ("--api-key", "--served-model-name"):      # (not: no key, the file's name)
        r = CliRunner().invoke(cli, ["serve", opt, " "])
        assert r.exit_code == 2 and f"{opt} is empty" in r.output, r.output
    for key in ("", " "):
        r = CliRunner().invoke(cli, ["serve"], env={"KOGCUPY_API_KEY": key})
        assert r.exit_code == 2 and "KOGCUPY_API_KEY is set but empty" in r.output, r.output
    r = CliRunner().invoke(cli, ["serve", "--help"])
    assert r.exit_code == 0 and "--api-key" in r.output and "--served-model-name" in r.output


def _serve_without_model(monkeypatch, engine, events: list):
    """`kogcupy serve` with `engine` in place of a loaded model and nothing listening: "serve"
    goes to `events` where the server would start. Returns (a port nothing listens on, the
    list create_app's keyword arguments go to)."""
    import kogcupy.cli
    import kogcupy.serve
    apps = []
    monkeypatch.setattr(kogcupy.cli, "load_engine", lambda *a, **k: engine)
    monkeypatch.setattr(kogcupy.serve, "create_app", lambda engine, **kw: apps.append(kw) or "app")
    monkeypatch.setattr(kogcupy.serve, "default_model_name", lambda engine: "m")
    monkeypatch.setattr(kogcupy.serve, "run_server", lambda app, **kw: events.append("serve"))
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1], apps


def test_cli_serve_host_names(monkeypatch):
    """On a loopback address (127.x, localhost, by the address it resolves to) the server
    answers only the names localhost, 127.0.0.1 and --host's (and --allowed-host's); '*' or
    another --host: any (unless --allowed-host names some). Off the loopback addresses, no
    --api-key is warned of."""
    import types

    from click.testing import CliRunner

    from kogcupy.cli import cli
    engine = types.SimpleNamespace(backend_name="reference", context_length=64, warm_up=lambda: 0)
    port, seen = _serve_without_model(monkeypatch, engine, [])
    for args, want in (([], ["localhost", "127.0.0.1"]),
                       (["--host", "localhost"], ["localhost", "127.0.0.1"]),
                       (["--allowed-host", "MyBox.local"], ["localhost", "127.0.0.1", "mybox.local"]),
                       (["--allowed-host", "*"], []),
                       (["--host", "0.0.0.0"], []),
                       (["--host", "127.0.0.2"], ["localhost", "127.0.0.1", "127.0.0.2"]),
                       (["--host", "127.1"], ["localhost", "127.0.0.1", "127.1"]),
                       (["--host", "LocalHost"], ["localhost", "127.0.0.1"]),
                       (["--host", "0.0.0.0", "--allowed-host", "*.example.com"], ["*.example.com"])):
        r = CliRunner().invoke(cli, ["serve", "--port", str(port)] + args)
        assert r.exit_code == 0, (args, r.output)
        assert seen[-1]["allowed_hosts"] == want, args
        assert ("without --api-key" in r.output) == ("0.0.0.0" in args), (args, r.output)
    r = CliRunner().invoke(cli, ["serve", "--allowed-host", "myhost:8000"])
    assert r.exit_code == 2 and "without a port" in r.output, r.output


def test_cli_serve_generation_config(monkeypatch):
    """--generation-config auto (the default): the model's sampling defaults (create_app reads
    them: None); none: OpenAI's ({})."""
    import types

    from click.testing import CliRunner

    from kogcupy.cli import cli
    engine = types.SimpleNamespace(backend_name="reference", context_length=64, warm_up=lambda: 0)
    port, seen = _serve_without_model(monkeypatch, engine, [])
    for args, want in (([], None), (["--generation-config", "auto"], None),
                       (["--generation-config", "none"], {})):
        r = CliRunner().invoke(cli, ["serve", "--port", str(port)] + args)
        assert r.exit_code == 0 and seen[-1]["sampling_defaults"] == want, (args, r.output)
    r = CliRunner().invoke(cli, ["serve", "--generation-config", "vllm"])
    assert r.exit_code == 2 and "'auto', 'none'" in r.output, r.output


def test_cli_serve_warms_up_before_it_listens(monkeypatch):
    """`kogcupy serve` warms the engine up (the GPU backends' prefill graphs) after loading it
    and before serving, and says how many sizes it prepared; nothing is said when there was
    nothing to prepare (the reference backend)."""
    import types

    from click.testing import CliRunner

    from kogcupy.cli import cli
    calls = []
    for warmed in (16, 0):
        engine = types.SimpleNamespace(backend_name="monokernel", context_length=4096,
                                       warm_up=lambda w=warmed: calls.append("warm_up") or w)
        port, _ = _serve_without_model(monkeypatch, engine, calls)
        r = CliRunner().invoke(cli, ["serve", "--backend", "reference", "--port", str(port)])
        assert r.exit_code == 0, r.output
        assert ("warmed up (the sampler's filter build, 16 prefill graphs)" in r.output) == (warmed == 16)
    assert calls == ["warm_up", "serve"] * 2


def test_request_log_line(scripted, serve_log):
    """A request's line in the server log; tok/s is '-' where one token had no decode."""
    eng, srv = scripted(script=lambda u: "ok then")
    for max_tokens, tps in ((1, "-"), (3, "100.0")):
        serve_log.clear()
        r = httpx.post(srv.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": max_tokens})
        assert r.status_code == 200, r.text
        for _ in range(200):                     # (logged by the worker just after the reply)
            if any(" generated=" in m for m in serve_log):
                break
            time.sleep(0.01)
        line, = [m for m in serve_log if " generated=" in m]
        assert f" generated={max_tokens} " in line and f" tok/s={tps} finish=length" in line, line


def test_cli_serve_logs_loading_where_stderr_is_no_terminal(smollm2, monkeypatch):
    """Under a service manager or into a log file (no terminal: no progress line) `serve`
    still says that it loads the model and when it has, as two lines of its own."""
    from click.testing import CliRunner

    import kogcupy.model.loader
    import kogcupy.serve
    from kogcupy.cli import cli
    monkeypatch.setattr(kogcupy.model.loader, "load_model", lambda *a, **k: smollm2)
    monkeypatch.setattr(kogcupy.serve, "run_server", lambda app, **kw: None)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    r = CliRunner().invoke(cli, ["serve", "--backend", "reference", "--port", str(port)])
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert lines[0].startswith("kogcupy: loading ") and lines[0].endswith(" (reference) ..."), lines
    assert re.match(r"kogcupy: loaded .* in \d+\.\d s$", lines[1]), lines
    assert lines[2].startswith("kogcupy: serving ") and "\r" not in r.stderr


def test_text_content_parts_are_joined_by_newlines():
    # OpenAI content parts ({"type": "text"} each) reach the chat template as one string, a
    # part a line (vLLM's convention), not glued together
    from kogcupy.serve.protocol import Message
    m = Message(role="user", content=[{"type": "text", "text": "first part"},
                                      {"type": "text", "text": "second part"}])
    assert m.to_template()["content"] == "first part\nsecond part"
    assert Message(role="developer", content="x").to_template() == {"role": "system", "content": "x"}
