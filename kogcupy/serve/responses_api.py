"""OpenAI's Responses API (``POST /v1/responses``), the one agent SDKs and coding agents call
by default, served by the same engine as chat completions.

A request's ``instructions`` and ``input`` become chat messages for the model's template
(``input_messages``): a string is one user message; items are messages (``input_text`` /
``output_text`` parts), ``function_call`` items (an assistant message's tool calls; calls in a
row form one message) and ``function_call_output`` items (tool messages); ``reasoning`` items
are dropped (the template would not show them). Nothing is stored: ``previous_response_id``
and ``item_reference`` are a 400 that says to send the whole conversation, as a client with
``store: false`` does. Tools are function tools (flat: ``{"type": "function", "name": ...}``).

The answer is output items: a ``message`` with one ``output_text`` part and ``function_call``
items, in the order the model wrote them. Streamed, it is the API's typed events
(``event:`` and ``data:`` lines, ``sequence_number`` from 0, no ``[DONE]``): the response
created and in progress, an item added, its part added, text deltas, ... , the response
completed (or ``incomplete`` at ``max_output_tokens`` or the context's end).
"""
from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import Field

from . import protocol as P
from .responses import AnswerEvents, Formatter
from ..model.tool_calls import CallArgs, CallEnd, CallStart, Content, ToolCall


class ResponsesTool(P._Strict):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    def to_template(self) -> dict:
        """The chat-completions shape templates read."""
        fn = {"name": self.name}
        if self.description is not None:
            fn["description"] = self.description
        if self.parameters is not None:
            fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


class ResponsesToolChoice(P._Strict):
    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormat(P._Strict):
    type: Literal["text"]


class TextConfig(P._Strict):
    format: TextFormat | None = None            # (verbosity, a hint: ignored and logged)


class ResponsesRequest(P._Strict):
    @staticmethod
    def precheck(obj: dict):
        """Tools of another shape than the API's flat function tools, named as such."""
        tools = obj.get("tools")
        for i, t in enumerate(tools if isinstance(tools, list) else []):
            if not isinstance(t, dict):
                continue
            if t.get("type") not in ("function", None):
                raise P.APIError(400, f"tools of type {json.dumps(t.get('type'))[:40]} are not "
                                      f"supported: kogcupy calls function tools only",
                                 param=f"tools[{i}].type", code="unsupported_value")
            if "function" in t and "name" not in t:
                raise P.APIError(400, "the Responses API's function tools are flat: {\"type\": "
                                      "\"function\", \"name\": ..., \"parameters\": {...}}; this "
                                      "one nests them in 'function' as chat completions do",
                                 param=f"tools[{i}]")

    unsupported = {
        **P._Sampling.unsupported,
        "presence_penalty": "use 'repetition_penalty'", "frequency_penalty":
        "use 'repetition_penalty'", "logit_bias": "", "response_format": "", "max_tokens":
        "use 'max_output_tokens'", "messages": "send the messages as 'input'",
        "previous_response_id": "responses are not stored: send the whole conversation as "
                                "input (as with store: false)",
        "conversation": "conversations are not stored: send the whole conversation as input",
        "background": "", "prompt": "stored prompts are not supported", "max_tool_calls": "",
        "top_logprobs": "", "n": ""}
    shapes = {"tool_choice": 'it must be "auto", "none", "required" or {"type": "function", '
                             '"name": ...}',
              "input": "it must be a string or a list of input items (messages, function_call, "
                       "function_call_output)",
              "text": 'only {"format": {"type": "text"}}: JSON mode and structured outputs '
                      "are not supported"}
    model: str | None = None
    input: Union[str, list[dict[str, Any]]]
    instructions: str | None = None
    max_output_tokens: P.Int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    tools: list[ResponsesTool] | None = None
    tool_choice: Union[Literal["auto", "none", "required"], ResponsesToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = False
    text: TextConfig | None = None
    # "auto" is taken as "disabled": a prompt past the context is a 400 either way
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None             # (reasoning.encrypted_content: none to give)
    # vLLM-style extras, as on chat completions
    top_k: P.Int | None = Field(default=None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: P.Int | None = None
    stop: Union[str, list[str], None] = None
    ignore_eos: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # bookkeeping, echoed or unused
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None

    def tool_choice_name(self) -> str | None:
        """The function a named tool_choice forces (None: none named)."""
        tc = self.tool_choice
        return tc.name if isinstance(tc, ResponsesToolChoice) else None


def check_request(req: ResponsesRequest) -> None:
    P.check_extras(req)
    P.check_stop(req.stop)
    for i, what in enumerate(req.include or []):
        if "logprobs" in what:
            raise P.APIError(400, f"include {what!r}: logprobs are not supported",
                             param=f"include[{i}]", code="unsupported_value")
    if req.tool_choice not in (None, "none", "auto") and not req.tools:   # ("auto": the default)
        raise P.APIError(400, "tool_choice is only allowed when tools are specified",
                         param="tool_choice")
    P.check_named_tool(req, "tool_choice.name")
    P.check_seed(req.seed)


def _content_text(content, where: str, kinds: tuple[str, ...]) -> str:
    """Content at `where` (a string, or parts of `kinds` with their text; a refusal part's is
    its "refusal") as one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise P.APIError(400, f"{where} must be a string or a list of content parts",
                         param=where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = "refusal" if kind == "refusal" else "text"
        if kind not in kinds or not isinstance(part.get(key), str):
            what = f"without a string '{key}'" if kind in kinds else f"of type {json.dumps(kind)}"
            raise P.APIError(400, f"{where}[{j}]: content parts {what} are not supported "
                                  f"here: kogcupy serves text models (parts of type "
                                  f"{' or '.join(kinds)})", param=f"{where}[{j}]",
                              code="unsupported_value")
        out.append(part[key])
    return "\n".join(out)


def _field(item: dict, key: str, where: str) -> str:
    v = item.get(key)
    if not isinstance(v, str):
        raise P.APIError(400, f"{where}.{key} must be a string", param=f"{where}.{key}")
    return v


def input_messages(req: ResponsesRequest) -> list[dict]:
    """instructions + input -> chat messages (HF template conventions); 400s name the item."""
    msgs: list[dict] = []
    if req.instructions:
        msgs.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        msgs.append({"role": "user", "content": req.input})
        return msgs
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise P.APIError(400, f"{where}.role must be user, system, developer or "
                                      f"assistant, got {json.dumps(role)[:40]}",
                                 param=f"{where}.role")
            kinds = ("output_text", "refusal") if role == "assistant" else ("input_text",)
            msgs.append({"role": "system" if role == "developer" else role,
                         "content": _content_text(item.get("content"), f"{where}.content", kinds)})
        elif kind == "function_call":
            call = {"id": _field(item, "call_id", where), "type": "function",
                    "function": {"name": _field(item, "name", where),
                                 "arguments": _field(item, "arguments", where)}}
            last = msgs[-1] if msgs else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)     # one assistant turn
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out = item.get("output")
            msgs.append({"role": "tool", "tool_call_id": _field(item, "call_id", where),
                         "content": out if isinstance(out, str) else
                         _content_text(out, f"{where}.output", ("input_text",))})
        elif kind == "reasoning":
            continue                        # a reasoning model's own; templates do not show it
        elif kind == "item_reference":
            raise P.APIError(400, f"{where}: item references are not supported: responses are "
                                  f"not stored, send the items themselves", param=where,
                              code="unsupported_value")
        else:
            raise P.APIError(400, f"{where}: input items of type {json.dumps(kind)[:40]} are not "
                                  f"supported (message, function_call, function_call_output)",
                             param=f"{where}.type", code="unsupported_value")
    if not msgs:
        raise P.APIError(400, "input is empty: send at least one message", param="input")
    return msgs


def usage(result, prompt_tokens: int) -> dict:
    u = P.usage_of(result, prompt_tokens)
    return {"input_tokens": u["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
                                     "cache_write_tokens": 0},
            "output_tokens": u["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["total_tokens"]}


def _sse(obj: dict) -> bytes:
    return b"event: " + obj["type"].encode() + b"\n" + P.sse(obj)


class ResponsesFormatter(Formatter):
    """Events of one job -> the Responses API's output items and stream events."""

    end = b""                               # no [DONE]: response.completed ends the stream

    def __init__(self, rid: str, model: str, created: int, prompt_tokens: int,
                 req: ResponsesRequest, answer: AnswerEvents | None = None,
                 sampling: dict = P.SAMPLING_DEFAULTS):
        super().__init__(rid, model, created, prompt_tokens)
        self.req = req
        self.sampling = sampling             # the server's defaults (echoed where req has none)
        self.answer = answer or AnswerEvents(stream_calls=True)   # (its calls streamed)
        self.output: list[dict] = []         # finished items
        self._msg: dict | None = None        # the message item being written
        self._fc: dict | None = None         # the function_call item being streamed
        self._seq = 0

    # -- the response object -------------------------------------------------------------
    def _response(self, status: str, result=None) -> dict:
        r = self.req
        incomplete = status == "incomplete"
        return {"id": self.rid, "object": "response", "created_at": self.created,
                "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": r.instructions, "max_output_tokens": r.max_output_tokens,
                "model": self.model, "output": list(self.output) if result is not None else [],
                "parallel_tool_calls": r.parallel_tool_calls is not False,
                "previous_response_id": None, "reasoning": None, "store": False,
                "temperature": self.sampling["temperature"] if r.temperature is None else r.temperature,
                "text": {"format": {"type": "text"}},
                "tool_choice": (r.tool_choice.model_dump() if isinstance(
                    r.tool_choice, ResponsesToolChoice) else r.tool_choice or "auto"),
                "tools": [t.model_dump(exclude_none=True) for t in r.tools or []],
                "top_p": self.sampling["top_p"] if r.top_p is None else r.top_p,
                "truncation": "disabled",
                "usage": usage(result, self.prompt_tokens) if result is not None else None,
                "user": r.user, "metadata": r.metadata or {}}

    @staticmethod
    def _status(result) -> str:
        return "incomplete" if result.finish_reason in ("length", "context") else "completed"

    # -- items ---------------------------------------------------------------------------
    def _event(self, kind: str, **fields) -> dict:
        ev = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return ev

    def _text(self, text: str) -> list[dict]:
        out = []
        if self._msg is None:
            if self.output:                 # after a call: the parser's separating newline
                text = text.lstrip("\n")
                if not text:
                    return out
            self._msg = {"id": P.new_id("msg", "_"), "type": "message", "status": "in_progress",
                         "role": "assistant", "content": []}
            idx = len(self.output)
            out.append(self._event("response.output_item.added", output_index=idx,
                                   item={**self._msg, "content": []}))
            out.append(self._event("response.content_part.added", item_id=self._msg["id"],
                                   output_index=idx, content_index=0,
                                   part={"type": "output_text", "text": "", "annotations": []}))
            self._msg["text"] = ""
        self._msg["text"] += text
        out.append(self._event("response.output_text.delta", item_id=self._msg["id"],
                               output_index=len(self.output), content_index=0, delta=text,
                               logprobs=[]))
        return out

    def _close_message(self, status: str = "completed") -> list[dict]:
        if self._msg is None:
            return []
        m, self._msg = self._msg, None
        idx = len(self.output)
        part = {"type": "output_text", "text": m.pop("text"), "annotations": []}
        item = {**m, "status": status, "content": [part]}
        self.output.append(item)
        return [self._event("response.output_text.done", item_id=m["id"], output_index=idx,
                            content_index=0, text=part["text"], logprobs=[]),
                self._event("response.content_part.done", item_id=m["id"], output_index=idx,
                            content_index=0, part=part),
                self._event("response.output_item.done", output_index=idx, item=item)]

    def _call(self, ev) -> list[dict]:
        """A whole ToolCall, or a streamed call's CallStart / CallArgs / CallEnd."""
        if isinstance(ev, (ToolCall, CallStart)):
            out = self._close_message()
            self._fc = {"id": P.new_id("fc", "_"), "type": "function_call",
                        "status": "in_progress", "call_id": ev.id, "name": ev.name,
                        "arguments": ""}
            out.append(self._event("response.output_item.added", output_index=len(self.output),
                                   item=dict(self._fc)))
            if isinstance(ev, CallStart):
                return out
            return out + self._call(CallArgs(ev.arguments)) + self._call(CallEnd(ev, True))
        item, idx = self._fc, len(self.output)
        if isinstance(ev, CallArgs):
            return [self._event("response.function_call_arguments.delta", item_id=item["id"],
                                output_index=idx, delta=ev.text)]
        call = ev.call
        out = [self._event("response.function_call_arguments.done", item_id=item["id"],
                           output_index=idx, name=call.name, arguments=call.arguments)]
        item.update(arguments=call.arguments, status="completed" if ev.complete else "incomplete")
        self.output.append(item)
        self._fc = None
        out.append(self._event("response.output_item.done", output_index=idx, item=item))
        return out

    def _events(self, events) -> list[dict]:
        out = []
        for ev in events:
            out += self._text(ev.text) if isinstance(ev, Content) else self._call(ev)
        return out

    # -- the Formatter interface ---------------------------------------------------------
    def start(self) -> list[dict]:
        head = self._response("in_progress")
        return [self._event("response.created", response=head),
                self._event("response.in_progress", response=head)]

    def pieces(self, text: str) -> list[dict]:
        return self._events(self.answer.feed(text))

    def finish(self, result) -> list[dict]:
        out = self._events(self.answer.finish())
        status = self._status(result)
        out += self._close_message("incomplete" if status == "incomplete" else "completed")
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return out + [self._event(kind, response=self._response(status, result))]

    def full(self, text: str, result) -> dict:
        self.answer = self.answer.whole()    # calls parsed whole, as a whole chat answer's
        if text:                            # (as a stream: no empty message item)
            self.pieces(text)
        self.finish(result)
        return self._response(self._status(result), result)

    def sse(self, obj: dict) -> bytes:
        return _sse(obj)

    def sse_error(self, status: int, message: str) -> bytes:
        """A stream's end after its status line went out: the API's error event, then the
        response failed (its terminal event)."""
        code = P.error_body(status, message)["error"]["type"]
        failed = {**self._response("failed"), "error": {"code": code, "message": message}}
        return _sse(self._event("error", code=code, message=message, param=None)) + \
            _sse(self._event("response.failed", response=failed))
