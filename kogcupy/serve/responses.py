"""Sending one job's answer: OpenAI JSON, or server-sent events as the text is generated.

``JobResponse`` is the ASGI response a route returns after it queued a job. It waits for the
job's events (the headers go out when the engine takes the request, so an error the engine
raises still gets its own status -- except for a stream still queued after QUEUED_HEADERS_S:
its headers go out then, with an SSE comment every KEEPALIVE_S while it waits, so that
proxies and clients with idle timeouts keep the connection), sends JSON or SSE chunks, and
watches the connection: when the client disconnects (queued, prefilling or streaming) the
job is cancelled at once.
Pieces that arrive while a chunk is being sent are merged into the next chunk, so a slow
client costs the engine nothing.
"""
from __future__ import annotations

import asyncio
import contextlib

from starlette.responses import JSONResponse, Response

from . import protocol as P
from ..model.tool_calls import TAGS, CallArgs, CallEnd, CallStart, Content, ToolCall, answer_parser

_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
QUEUED_HEADERS_S = 2.0       # a stream still waiting for the engine after this gets its headers
KEEPALIVE_S = 10.0           # ... and an SSE comment line this often while it waits


class Formatter:
    """How one endpoint turns events into OpenAI chunks / a whole response."""

    def __init__(self, rid: str, model: str, created: int, prompt_tokens: int,
                 include_usage: bool = False):
        self.rid, self.model, self.created = rid, model, created
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage

    def usage(self, result) -> dict:
        return P.usage_of(result, self.prompt_tokens)

    # the SSE framing: data lines, [DONE] at the end, an error object as the last event
    end = P.SSE_DONE

    def sse(self, obj: dict) -> bytes:
        return P.sse(obj)

    def sse_error(self, status: int, message: str) -> bytes:
        return P.sse(P.error_body(status, message))


class AnswerEvents:
    """A chat answer as events: its text (Content) and, when `tool_names` (the request's tools)
    are given, its calls to them, at most `max_calls` of them (1 with parallel_tool_calls: false
    or a named function; later ones are dropped; a call to another name stays text).
    `opening`: the answer's start that the prompt ended with (a forced call, call_opening).
    `syntax`: the template's form of call (tool_calls.call_syntax); `thinking`: whether the
    answer starts inside a think block (None: the template writes none; starts_thinking).
    `stream_calls`: calls streamed as they are written (ToolCallParser); else whole ToolCalls.
    `named`: the request named the function to call (OpenAI then ends a chat answer "stop")."""

    def __init__(self, tool_names: frozenset[str] = frozenset(), opening: str = "",
                 max_calls: int | None = None, stream_calls: bool = False,
                 syntax: str | None = TAGS, thinking: bool | None = None, named: bool = False):
        self.parser = answer_parser(syntax, tool_names, opening, stream_calls,
                                    thinking) if tool_names else None
        self.max_calls = max_calls
        self.n_calls = 0                    # calls kept so far
        self._dropping = False              # inside a streamed call past max_calls
        self.named = named
        self._args = dict(tool_names=tool_names, opening=opening, max_calls=max_calls,
                          syntax=syntax, thinking=thinking, named=named)

    def whole(self) -> "AnswerEvents":
        """The same answer's events for a whole (non-streamed) reply: its calls parsed whole,
        as the Python API's tool_calls (a call whose arguments never close stays text)."""
        return AnswerEvents(**self._args)

    def feed(self, text: str) -> list:
        return self._kept(self.parser.feed(text)) if self.parser is not None else [Content(text)]

    def finish(self) -> list:
        return self._kept(self.parser.finish()) if self.parser is not None else []

    def _kept(self, events) -> list:
        out = []
        for ev in events:
            if isinstance(ev, (ToolCall, CallStart)):           # a call begins
                self._dropping = self.max_calls is not None and self.n_calls >= self.max_calls
                self.n_calls += not self._dropping
            if not self._dropping:
                out.append(ev)
            if isinstance(ev, (ToolCall, CallEnd)):             # a call ends
                self._dropping = False
        return out


class ChatFormatter(Formatter):
    def __init__(self, *a, answer: AnswerEvents | None = None, **kw):
        super().__init__(*a, **kw)
        self.answer = answer or AnswerEvents(stream_calls=True)   # (its calls streamed)
        self._n_sent = 0                    # tool calls streamed (their chunk's index)
        self._complete = 0                  # streamed calls whose arguments closed as JSON

    def _chunk(self, delta, finish=None):
        return P.chat_chunk(self.rid, self.model, self.created, delta, finish, self.include_usage)

    def start(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def _events(self, events) -> list[dict]:
        out, text = [], ""
        for ev in events:
            if isinstance(ev, Content):
                text += ev.text
                continue
            if text:
                out.append(self._chunk({"content": text}))
                text = ""
            if isinstance(ev, CallEnd):
                self._complete += ev.complete
                continue
            if isinstance(ev, CallArgs):    # (the call started in an earlier chunk)
                out.append(self._chunk({"tool_calls": [{"index": self._n_sent - 1,
                                                        "function": {"arguments": ev.text}}]}))
                continue
            # a call parsed whole (complete), or a streamed call's start: its id and name
            self._complete += isinstance(ev, ToolCall)
            call = (ev if isinstance(ev, ToolCall) else ToolCall(ev.name, "", ev.id)).to_openai()
            call["index"] = self._n_sent
            self._n_sent += 1
            out.append(self._chunk({"tool_calls": [call]}))
        if text:
            out.append(self._chunk({"content": text}))
        return out

    def pieces(self, text: str) -> list[dict]:
        return self._events(self.answer.feed(text))

    def _finish_reason(self, result, n_calls: int) -> str:
        """"tool_calls" when the answer ended on its own with a call to run: a whole answer's
        calls all parse; a stream's count only those whose arguments closed as JSON (one that
        did not -- cut by a stop string, or ended by a tag first -- went out as written and
        cannot be taken back; a whole answer has it as text). A call to the function the
        request named ends "stop", as OpenAI's (and vLLM's) do."""
        if n_calls and not self.answer.named and result.finish_reason in ("eos", "stop"):
            return "tool_calls"
        return P.FINISH_REASON.get(result.finish_reason, "stop")

    def finish(self, result) -> list[dict]:
        out = self._events(self.answer.finish())
        out.append(self._chunk({}, self._finish_reason(result, self._complete)))
        if self.include_usage:
            out.append(P.usage_chunk(self.rid, self.model, self.created, "chat.completion.chunk",
                                     self.usage(result)))
        return out

    def full(self, text: str, result) -> dict:
        answer = self.answer.whole()
        events = answer.feed(text) + answer.finish()
        text = "".join(e.text for e in events if isinstance(e, Content))
        calls = [e.to_openai() for e in events if not isinstance(e, Content)]
        content = text if (text or not calls) else None
        return P.chat_completion(self.rid, self.model, self.created, content, calls or None,
                                 self._finish_reason(result, len(calls)), self.usage(result))


class CompletionFormatter(Formatter):
    def start(self) -> list[dict]:
        return []

    def pieces(self, text: str) -> list[dict]:
        return [P.completion_chunk(self.rid, self.model, self.created, text, None,
                                   self.include_usage)]

    def finish(self, result) -> list[dict]:
        out = [P.completion_chunk(self.rid, self.model, self.created, "",
                                  P.FINISH_REASON.get(result.finish_reason, "stop"),
                                  self.include_usage)]
        if self.include_usage:
            out.append(P.usage_chunk(self.rid, self.model, self.created, "text_completion",
                                     self.usage(result)))
        return out

    def full(self, text: str, result) -> dict:
        return P.completion(self.rid, self.model, self.created, text,
                            P.FINISH_REASON.get(result.finish_reason, "stop"), self.usage(result))


_SHUTDOWN = "the generation was cancelled: the server is shutting down"


class JobResponse(Response):
    """`formatter`: the endpoint's Formatter (responses_api.py has the Responses API's)."""

    def __init__(self, job, formatter: Formatter, stream: bool):
        self.job = job
        self.fmt = formatter
        self.stream = stream
        self.background = None
        self._ended = False             # saw "done" or "error": nothing left to cancel

    async def __call__(self, scope, receive, send):
        job = self.job

        async def watch():
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    job.cancel()
                    job.events.put_nowait(("gone",))
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            if self.stream:
                await self._stream(scope, receive, send)
            else:
                await self._whole(scope, receive, send)
        except OSError:                 # the connection broke while sending
            pass
        finally:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher
            if not self._ended:
                job.cancel()

    def _head(self) -> bytes:
        """The stream's opening events (chat: the role chunk), sent with its first text."""
        return b"".join(self.fmt.sse(c) for c in self.fmt.start())

    def _sse_error(self, status: int, message: str) -> bytes:
        """The end of a stream whose status line is already sent: the error event, then the
        stream's end."""
        return self.fmt.sse_error(status, message) + self.fmt.end

    async def _next(self):
        ev = await self.job.events.get()
        if ev[0] in ("done", "error"):
            self._ended = True
        return ev

    async def _error(self, scope, receive, send, status, message):
        await JSONResponse(P.error_body(status, message), status_code=status)(scope, receive, send)

    async def _whole(self, scope, receive, send):
        parts = []
        while True:
            ev = await self._next()
            kind = ev[0]
            if kind == "gone":
                return
            if kind == "error":
                return await self._error(scope, receive, send, ev[1], ev[2])
            if kind == "piece":
                parts.append(ev[1])
            elif kind == "done":
                result = ev[1]
                if result.finish_reason == "cancelled":
                    return await self._error(scope, receive, send, 503, _SHUTDOWN)
                body = self.fmt.full("".join(parts), result)
                return await JSONResponse(body)(scope, receive, send)

    async def _next_within(self, seconds: float):
        """The next event, or None when none came within `seconds`."""
        try:
            return await asyncio.wait_for(self._next(), seconds)
        except asyncio.TimeoutError:
            return None

    async def _stream(self, scope, receive, send):
        # "start" once the engine took the request; a request still queued after
        # QUEUED_HEADERS_S gets its headers and keep-alive comments while it waits
        ev = await self._next_within(QUEUED_HEADERS_S)
        started = ev is None
        if started:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        while ev is None:
            await send({"type": "http.response.body", "body": b": queued\n\n", "more_body": True})
            ev = await self._next_within(KEEPALIVE_S)
        if ev[0] == "gone":
            return
        if ev[0] == "error":
            if started:                      # the status is sent: the error is an event
                return await send({"type": "http.response.body", "more_body": False,
                                   "body": self._head() + self._sse_error(ev[1], ev[2])})
            return await self._error(scope, receive, send, ev[1], ev[2])
        if not started:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        # the role chunk goes out with the first text (as vLLM's): a client that times its
        # first chunk measures the prefill, not the queue -- also when that text is held back
        # (a tool call's start, sent once its name is in)
        fmt = self.fmt
        head = self._head()
        out = b""
        pending = [ev] if ev[0] != "start" else []
        q = self.job.events
        while True:
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
                out = b""
            batch = pending or [await self._next()]
            pending = []
            while not q.empty():         # merge whatever arrived meanwhile
                batch.append(q.get_nowait())
                if batch[-1][0] in ("done", "error"):
                    self._ended = True
            text, last = "", None
            for ev in batch:
                if ev[0] == "piece":
                    text += ev[1]
                elif ev[0] in ("done", "error", "gone"):
                    last = ev
                    break
            chunks = fmt.pieces(text) if text else []
            out = b"".join(fmt.sse(c) for c in chunks)
            if text and head:
                out, head = head + out, b""
            if last is None:
                continue
            if last[0] == "gone":
                return
            if last[0] == "error":           # (the head first: a stream opens with it)
                out = head + out + self._sse_error(last[1], last[2])
            elif last[1].finish_reason == "cancelled":
                out = head + out + self._sse_error(503, _SHUTDOWN)
            else:
                out = head + out + b"".join(fmt.sse(c) for c in fmt.finish(last[1])) + fmt.end
            await send({"type": "http.response.body", "body": out, "more_body": False})
            return


def json_error(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(P.error_body(status, message, param, code), status_code=status,
                        headers=headers)

