"""Tool calls in generated text, in the two forms chat templates ask for (``call_syntax``):
Hermes / Qwen2.5 / Qwen3 style ``<tool_call>{json}</tool_call>`` (TAGS), and Llama 3.x style
JSON (JSON, ``JsonCallParser``, below).

The chat template (which takes ``tools``) tells the model to answer a call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``ToolCallParser`` turns a stream of text pieces into ``Content`` and ``ToolCall`` events: text
outside the tags passes through as it comes (a tail that could still be the start of
``<tool_call>`` is held back), a call is emitted once its closing tag arrives, or the end of
the text, or the next call's opening tag (outside a JSON string: a model that left a call open
goes on to the next one; what it wrote after the call's JSON object is text). A block whose
body is not a JSON object with a ``name`` (or, given the request's tool names, names none of
them) is passed through as text, tags included, so nothing the model wrote is lost and no call
reaches a client for a tool it does not have. Whitespace-only text
just before or after a call is dropped (the newlines around the tags), however the text was
chunked; an answer without calls keeps every character, as one without tools would.
``parse_tool_calls`` runs the same parser over a whole text, so streamed and non-streamed
answers agree.

With ``stream_calls`` (the server's streams) a call whose body opens ``{"name": "...",
"arguments": {`` with a name it may call is sent as it is written, as vLLM and OpenAI stream
calls: ``CallStart`` once its name is in, ``CallArgs`` pieces of the arguments object's JSON
text as the model writes it, up to the brace that closes it, and ``CallEnd`` at the call's
closing tag. It is then a call whatever follows (what follows the object inside the call is
dropped). Any other call is parsed whole, as above. Either way a call in that form has its
arguments as the model wrote them, not re-encoded.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"    # a reasoning model's thoughts (Qwen3)
PYTHON_TAG = "<|python_tag|>"                      # Llama 3.x: may open a call

TAGS = "tags"       # <tool_call>{"name": ..., "arguments": {...}}</tool_call>, anywhere in the answer
JSON = "json"       # the answer is the call: {"name": ..., "parameters": {...}} (Llama 3.1-3.3)
_JSON_HINT = '{"name": function name, "parameters"'   # what a Llama 3.x template tells the model


def call_syntax(template: str | None) -> str | None:
    """The form of tool call a chat template asks for: TAGS, JSON, or None (one kogcupy does
    not parse, or none)."""
    if not template:
        return None
    if OPEN_TAG in template:
        return TAGS
    return JSON if _JSON_HINT in template else None


def starts_thinking(template: str | None, prompt_tail: Callable[[], str]) -> bool | None:
    """None when the template writes no think blocks; else whether the answer starts inside one
    (the prompt, whose end `prompt_tail()` gives, opened ``<think>`` for the model, as Qwen3's
    thinking templates do). A call inside a think block is a thought, not a call."""
    if not template or THINK_CLOSE not in template:
        return None
    tail = prompt_tail()
    return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)


@dataclass
class Content:
    text: str


@dataclass
class ToolCall:
    name: str
    arguments: str                       # a JSON text, as OpenAI's API carries it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class CallStart:
    """A streamed call's start: its name and id."""
    name: str
    id: str


@dataclass
class CallArgs:
    """The next piece of a streamed call's arguments (a JSON text)."""
    text: str


@dataclass
class CallEnd:
    """A streamed call's end: ``call.arguments`` is every piece sent; ``complete``: whether
    its arguments object closed and is JSON (as a call parsed whole must be)."""
    call: ToolCall
    complete: bool


class _JsonScan:
    """A text read as it grows (``feed(text)``, with all of it so far) through JSON's strings and
    brackets: ``end``, just past the bracket that closes the object the text starts with (None
    until then), and ``tag``, where ``<tool_call>`` first stands outside a string (-1 until
    then; quotes outside brackets open no string, so a stray one after a call's JSON hides no
    tag). ``feed`` returns how much of the text belongs to the object: all of it until it
    closes."""
    _SPECIAL = re.compile(r'["\\{}\[\]<]')

    def __init__(self):
        self.at, self.depth, self.in_str, self.esc = 0, 0, False, False
        self.end, self.tag = None, -1

    def feed(self, text: str) -> int:
        while self.tag < 0 and self.at < len(text):
            if self.esc:                      # (the escaped character)
                self.esc, self.at = False, self.at + 1
                continue
            m = self._SPECIAL.search(text, self.at)
            if m is None:
                self.at = len(text)
                break
            i, ch = m.start(), m.group()
            if ch == "<" and not self.in_str:
                if text.startswith(OPEN_TAG, i):
                    self.tag = i
                    break
                if len(text) - i < len(OPEN_TAG) and OPEN_TAG.startswith(text[i:]):
                    # (may yet become the tag: read from here again)
                    self.at = i
                    break
            self.at = i + 1
            if self.in_str:
                if ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
            elif ch == '"':
                self.in_str = self.depth > 0
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]" and self.depth:
                self.depth -= 1
                if self.depth == 0 and self.end is None:
                    self.end = i + 1
        return len(text) if self.end is None else self.end


# the head of a call streamed as written: its name, then an object of arguments
_STREAM_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)')


def _stream_head(body: str) -> tuple[str, int] | None:
    """A call's body that opens as a call streamed as written: (its name, where its arguments
    object starts); else None."""
    m = _STREAM_HEAD.match(body)
    if m is None:
        return None
    try:
        name = json.loads('"' + m.group(1) + '"')
    except ValueError:
        return None
    return (name, m.end()) if name else None


def call_opening(name: str | None = None, syntax: str = TAGS) -> str:
    """The start of an answer that must call a tool (OpenAI's tool_choice "required": any of
    them; a named function: that one), in the template's `syntax`. The prompt ends with it and
    the model continues the call's JSON from there; a parser fed it first (answer_parser's
    `opening`) reads the answer as the model saw it."""
    head = (OPEN_TAG + '\n{"name": ') if syntax == TAGS else '{"name": '
    if name is None:
        return head + '"'
    # (no space after the colon: models write it as the start of the arguments' first token)
    key = "arguments" if syntax == TAGS else "parameters"
    return head + json.dumps(name, ensure_ascii=False) + f', "{key}":'


def tool_names(tools) -> frozenset[str] | None:
    """The names of tool dicts (OpenAI's {"type": "function", "function": {"name": ...}}, or a
    flat {"name": ...}) that calls may name; None (any name) when a tool has no name."""
    named = [(t["function"] if isinstance(t.get("function"), dict) else t).get("name")
             for t in tools]
    return frozenset(named) if all(isinstance(n, str) for n in named) else None


def parse_call_body(body: str) -> ToolCall | None:
    """The JSON between the tags -> ToolCall, or None when it is not a call. A body that opens
    as a streamed call does (``{"name": "...", "arguments": {``) gives its arguments object's
    text as written, whatever follows it (so streamed and whole answers agree, and a call that
    lacks its own closing brace is still one); any other JSON object with a name is re-encoded."""
    head = _stream_head(body)
    if head is not None:
        rest, scan = body[head[1]:], _JsonScan()
        k = scan.feed(rest)
        if scan.end is not None and _is_json(rest[:k]):
            return ToolCall(head[0], rest[:k])
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not (isinstance(args, str) and _is_json(args)):   # (some models write a JSON text)
        args = json.dumps(args, ensure_ascii=False)
    return ToolCall(obj["name"], args)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _split_unclosed(body: str) -> tuple[str, str]:
    """An unclosed call's body -> (up to the end of the JSON object it starts with, the rest);
    (body, "") when it starts with none or the object does not close. A rest that is only
    extra closing braces or a cut tag (the answer stopped inside ``</tool_call>``) is none."""
    lead = len(body) - len(body.lstrip())
    if not body.startswith("{", lead):
        return body, ""
    scan = _JsonScan()
    k = scan.feed(body[lead:])
    if scan.end is None:
        return body, ""
    rest = body[lead + k:].lstrip().lstrip("}]")         # (extra closing braces)
    tail = rest.strip()
    cut_tag = tail and (CLOSE_TAG.startswith(tail) or OPEN_TAG.startswith(tail))
    return body[:lead + k], "" if cut_tag else rest


def _partial_prefix_len(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class ToolCallParser:
    """Incremental parser; ``feed(piece)`` and finally ``finish()`` return lists of events."""

    def __init__(self, opening: str = "", names: frozenset[str] | None = None,
                 stream_calls: bool = False, thinking: bool | None = None):
        self._names = names       # the tools a call may name (None: any)
        self._thinking = thinking  # inside a think block (None: the model writes none)
        self._stream_calls = stream_calls
        self._streaming: ToolCall | None = None   # the call being streamed
        self._args_at = 0         # where its arguments start in the call's body
        self._args_sent = ""      # its arguments text sent so far
        self._scan = _JsonScan()  # where its arguments object ends
        self._tags = _JsonScan()  # where a call's body meets the next call's opening tag
        self._buf = ""            # text not yet emitted
        self._inside = False      # after an OPEN_TAG, waiting for its CLOSE_TAG
        self._ws = ""             # whitespace-only content held until we know what follows
        self._any = False         # content emitted
        self._after_call = False  # the text after a call: from its first non-space, set off
        self.calls: list[ToolCall] = []   # from the text before the call by one newline
        if opening:                       # an answer that starts inside a call (call_opening)
            self.feed(opening)

    def _content(self, text: str, out: list):
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
            self._ws = "\n" if self._any else ""
        body = text.rstrip()
        if not body:
            self._ws += text
            return
        out.append(Content(self._ws + body))
        self._any = True
        self._ws = text[len(body):]      # trailing whitespace waits for what follows

    def _call(self, head: str, body: str, out: list, closed: bool) -> bool:
        """The call parsed from `head` (its body's JSON), or the whole `body` as text: which."""
        call = parse_call_body(head.strip())
        if call is not None and self._names is not None and call.name not in self._names:
            call = None
        ws = ""
        if call is None:
            raw = OPEN_TAG + body + (CLOSE_TAG if closed else "")
            if not closed:               # (its trailing whitespace waits for what follows)
                raw, ws = raw.rstrip(), raw[len(raw.rstrip()):]
            sep = "\n" if self._after_call and self._any else ""
            self._after_call = False
            out.append(Content(sep + self._ws + raw))
            self._any = True
        else:
            self.calls.append(call)
            out.append(call)
            self._after_call = True
        self._ws = ws
        return call is not None

    def feed(self, piece: str) -> list:
        out: list = []
        self._buf += piece
        while True:
            if self._thinking:          # thoughts are text, calls in them too
                i = self._buf.find(THINK_CLOSE)
                if i < 0:
                    keep = _partial_prefix_len(self._buf, THINK_CLOSE)
                    self._content(self._buf[:len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                i += len(THINK_CLOSE)
                self._content(self._buf[:i], out)
                self._buf, self._thinking = self._buf[i:], False
                continue
            if not self._inside:
                i = self._buf.find(OPEN_TAG)
                t = -1 if self._thinking is None else self._buf.find(THINK_OPEN)
                if t >= 0 and (i < 0 or t < i):
                    t += len(THINK_OPEN)
                    self._content(self._buf[:t], out)
                    self._buf, self._thinking = self._buf[t:], True
                    continue
                if i >= 0:
                    self._content(self._buf[:i], out)
                    self._buf = self._buf[i + len(OPEN_TAG):]
                    self._inside = True
                    self._tags = _JsonScan()
                    continue
                keep = _partial_prefix_len(self._buf, OPEN_TAG)
                if self._thinking is not None:
                    keep = max(keep, _partial_prefix_len(self._buf, THINK_OPEN))
                self._content(self._buf[:len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep:]
                return out
            j = self._buf.find(CLOSE_TAG)
            self._tags.feed(self._buf if j < 0 else self._buf[:j])
            i = self._tags.tag
            if i >= 0:                  # the call left open: it ends, the next starts
                body, self._buf = self._buf[:i], self._buf[i + len(OPEN_TAG):]
                self._tags = _JsonScan()
                self._close(body, out, closed=False)
                continue
            if j < 0:
                if self._stream_calls:      # (a tail that may start either tag waits)
                    held = max(_partial_prefix_len(self._buf, CLOSE_TAG),
                               _partial_prefix_len(self._buf, OPEN_TAG))
                    self._stream(self._buf[:len(self._buf) - held], out)
                return out
            body, self._buf = self._buf[:j], self._buf[j + len(CLOSE_TAG):]
            self._inside = False
            self._close(body, out, closed=True)

    def _stream(self, body: str, out: list):
        """A call's body so far: start streaming it once its head is in, then send its
        arguments as far as they can go."""
        if self._streaming is None:
            head = _stream_head(body)
            if head is None or (self._names is not None and head[0] not in self._names):
                return
            name, self._args_at = head
            self._streaming, self._args_sent = ToolCall(name, ""), ""
            self._scan = _JsonScan()
            self._ws = ""
            out.append(CallStart(name, self._streaming.id))
        args = body[self._args_at:]
        k = self._scan.feed(args)
        if k > len(self._args_sent):
            out.append(CallArgs(args[len(self._args_sent):k]))
            self._args_sent = args[:k]

    def _close(self, body: str, out: list, closed: bool):
        """A call's whole body (`closed`: its closing tag came, else the text ended or the next
        call began): a streamed call's last arguments and its end (complete when its arguments
        object closed), or the call parsed whole. Unclosed, the text after the call's JSON
        object is the answer's (a model that forgot the closing tag went on writing)."""
        head, rest = (body, "") if closed else _split_unclosed(body)
        if self._stream_calls:
            self._stream(body, out)
        if self._streaming is None:
            if not self._call(head, body, out, closed):
                return
        else:
            call, self._streaming = self._streaming, None
            call.arguments = self._args_sent
            self.calls.append(call)
            out.append(CallEnd(call, self._scan.end is not None and _is_json(call.arguments)))
            self._after_call = True
            self._ws = ""
        self._content(rest, out)

    def finish(self) -> list:
        """End of the text: an unclosed call is parsed as far as it goes, the rest is text."""
        out: list = []
        if self._inside:
            self._inside = False
            self._close(self._buf, out, closed=False)
        else:
            self._content(self._buf, out)
        if self._ws:                     # the answer's own trailing whitespace (not a call's)
            out.append(Content(self._ws))
        self._buf = ""
        self._ws = ""
        return out


class JsonCallParser:
    """Llama 3.x's calls: an answer that calls tools is JSON from its first character (after
    an optional ``<|python_tag|>``), ``{"name": ..., "parameters": {...}}``, several joined by
    ``;``. An answer that starts otherwise is text as it comes; one that starts with ``{`` is
    held to its end, then is calls if it parses whole as calls to the request's tools, else
    text (so streamed and whole answers agree). Events as ToolCallParser's, calls whole."""

    def __init__(self, opening: str = "", names: frozenset[str] | None = None):
        self._names = names
        self._buf = ""
        self._mode = None                 # None (undecided), "text", "json"
        self.calls: list[ToolCall] = []
        if opening:
            self.feed(opening)

    def feed(self, piece: str) -> list:
        if self._mode == "text":
            return [Content(piece)] if piece else []
        self._buf += piece
        if self._mode == "json":
            return []
        head = self._buf.lstrip()
        if not head or (PYTHON_TAG.startswith(head) and head != PYTHON_TAG):
            return []                     # (whitespace, or what may be the python tag)
        if head.startswith(PYTHON_TAG):
            head = head[len(PYTHON_TAG):].lstrip()
            if not head:
                return []
        if head[0] == "{":
            self._mode = "json"
            return []
        self._mode, text, self._buf = "text", self._buf, ""
        return [Content(text)]

    def _parse(self, text: str) -> list[ToolCall] | None:
        text = text.strip()
        if text.startswith(PYTHON_TAG):
            text = text[len(PYTHON_TAG):]
        calls = []
        while True:
            text = text.lstrip()
            scan = _JsonScan()
            k = scan.feed(text)
            if scan.end is None:
                return None
            call = parse_call_body(text[:k])
            if call is None or (self._names is not None and call.name not in self._names):
                return None
            calls.append(call)
            text = text[k:].lstrip()
            if text[:1] == ";":
                text = text[1:].lstrip()
            if not text:
                return calls

    def finish(self) -> list:
        text, self._buf = self._buf, ""
        calls = self._parse(text) if self._mode == "json" else None
        if calls:
            self.calls += calls
            return list(calls)
        return [Content(text)] if text else []


def answer_parser(syntax: str | None = TAGS, names: frozenset[str] | None = None,
                  opening: str = "", stream_calls: bool = False, thinking: bool | None = None):
    """The parser of an answer's calls in a template's `syntax` (call_syntax; None: TAGS)."""
    if syntax == JSON:
        return JsonCallParser(opening, names)
    return ToolCallParser(opening, names, stream_calls, thinking)


def parse_tool_calls(text: str, names: frozenset[str] | None = None, syntax: str | None = TAGS,
                     thinking: bool | None = None) -> tuple[str, list[ToolCall]]:
    """Whole text -> (content without the call blocks, calls; to `names` only, when given)."""
    p = answer_parser(syntax, names, thinking=thinking)
    events = p.feed(text) + p.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    return content, p.calls
