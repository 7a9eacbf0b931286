"""The OpenAI API as kogcupy serves it: request models (pydantic, strict) and response shapes.

Requests are validated strictly: a wrong type or value is a 400 that names the field. Fields
of the OpenAI API and other servers' extras (vLLM's, llama.cpp's) that would change the output
and that kogcupy does not implement are accepted only with their neutral value (``n: 1``,
``logprobs: false``, ``presence_penalty: 0``, ``min_tokens: 0``, ...) and are a 400
otherwise (declared fields: check_supported; undeclared ones: each model's ``unsupported``).
Any other field (a client's bookkeeping: ``user``, ``metadata``, ``prompt_cache_key``,
``cache_control`` on a content part or a tool, a message's ``reasoning_content``, ...) is
ignored, as vLLM and llama.cpp do, and named in the server log (``ignored_fields``). Extra
fields (vLLM style): ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``,
``chat_template_kwargs``, ``add_generation_prompt``, ``continue_final_message``.

Responses are plain dicts shaped like OpenAI's (a stream chunk is built per token, so no
pydantic on that path); ``Usage`` is the one shared piece.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      ValidationInfo, field_validator)

from ..engine import check_text
from ..errors import InputError

MAX_STOP_STRINGS = 16
# kogcupy finish reason -> OpenAI's
FINISH_REASON = {"eos": "stop", "stop": "stop", "length": "length", "context": "length",
                 "cancelled": "stop"}


class APIError(Exception):
    """An error a client gets as OpenAI's JSON error object."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error",
             404: "invalid_request_error", 405: "invalid_request_error",
             413: "invalid_request_error", 415: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error",
             503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": APIError.TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


# ------------------------------------------------------------------------------- requests
def _integral(v):
    """5.0 -> 5 (a client's JSON writer may send a whole float; vLLM takes it); 5.5 stays."""
    return int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**64 else v


# an integer field that takes a whole float too (strict otherwise: "5" and 5.5 are 400s)
Int = Annotated[int, BeforeValidator(_integral)]


class _Strict(BaseModel):
    # Unknown fields are kept aside (model_extra), never used: ignored_fields names them. Those
    # in `unsupported` (name -> how to do without) would change the output or the response:
    # check_supported makes them a 400 unless neutral (None, false, 0, empty, or NEUTRAL's).
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    unsupported: ClassVar[dict[str, str]] = {}
    shapes: ClassVar[dict[str, str]] = {}    # field -> what it takes, for its 400 (unions)


class StreamOptions(_Strict):
    include_usage: bool = False
    unsupported = {"continuous_usage_stats": "usage comes in the last chunk only"}


class FunctionDef(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef

    def to_template(self) -> dict:
        """The tool as chat templates read it: its declared fields only (extras are ignored)."""
        fields = set(FunctionDef.model_fields)
        return {"type": "function",
                "function": self.function.model_dump(include=fields, exclude_none=True)}


class ToolChoiceFunction(_Strict):
    name: str = Field(min_length=1)


class NamedToolChoice(_Strict):
    """tool_choice naming the function the answer must call."""
    type: Literal["function"]
    function: ToolChoiceFunction


class ToolCallFunction(_Strict):
    name: str
    arguments: Union[str, dict]
    parsed_arguments: None = None       # (the openai client's .parse() helpers)


class ToolCallIn(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction
    index: int | None = None            # kept by clients that assembled a streamed call; unused


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    unsupported = {"prefix": "a prefix completion is not supported"}
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    # What the openai client's message.model_dump() carries back into the next request (from
    # kogcupy, or another provider's turn): an assistant's refusal stands for its content when
    # that is empty (as the Responses API's refusal parts); annotations (citations) are dropped;
    # the rest kogcupy never produces, so only their empty values are taken
    refusal: str | None = None
    annotations: list[Any] | None = None

    @field_validator("refusal")
    @classmethod
    def _assistant_refusal(cls, v, info: ValidationInfo):
        if v and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message has one")
        return v
    audio: None = None
    function_call: None = None
    parsed: None = None

    def to_template(self) -> dict:
        """The message as chat templates read it (HF conventions)."""
        content = self.content
        if isinstance(content, list):               # text parts, one a line (as vLLM joins them)
            content = "\n".join(p.text for p in content)
        if not content and self.refusal:
            content = self.refusal
        m: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                             "content": content}          # (None: engine.template_messages)
        if self.name is not None:
            m["name"] = self.name
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            m["tool_calls"] = [{"id": tc.id, "type": "function",
                                "function": {"name": tc.function.name,
                                             "arguments": tc.function.arguments}}
                               for tc in self.tool_calls]
        return m


class _Sampling(_Strict):
    # other APIs' and servers' (OpenAI's legacy and newer, vLLM's, llama.cpp's) that change
    # the output
    unsupported = {
        "functions": "use 'tools'", "function_call": "use 'tools' and 'tool_choice'",
        "min_tokens": "", "stop_token_ids": "use 'stop' strings",
        "include_stop_str_in_output": "", "bad_words": "", "allowed_token_ids": "",
        "logits_processors": "", "guided_json": "structured output is not supported",
        "guided_regex": "", "guided_choice": "", "guided_grammar": "",
        "structured_outputs": "", "grammar": "", "json_schema": "", "prompt_logprobs": "",
        "truncate_prompt_tokens": "", "use_beam_search": "", "length_penalty": "",
        "n_predict": "use 'max_tokens'", "repeat_penalty": "use 'repetition_penalty'",
        "typical_p": "", "tfs_z": "", "mirostat": "", "mirostat_tau": "", "mirostat_eta": "",
        "web_search_options": "", "audio": "",
        "modalities": "text is the only modality"}
    model: str | None = None                                  # (none: the served model)
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)   # (OpenAI's range)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: Int | None = Field(default=None, ge=-1, le=2**31 - 1)            # -1 or 0: off
    min_p: float | None = Field(default=None, ge=0, lt=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: Int | None = None                                   # (null or -1: a random one)
    ignore_eos: bool | None = None                            # (vLLM's: to max_tokens)
    stop: Union[str, list[str], None] = None
    stream: bool | None = False                               # (null: false)
    stream_options: StreamOptions | None = None
    # Bookkeeping fields that do not change the output: accepted, not used (nor logged)
    user: str | None = None                                   # an end-user id
    store: bool | None = None                                 # nothing is stored
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None                       # (the prefix cache needs none)
    # Accepted with their neutral value only (check_supported):
    n: Int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None


class ChatCompletionRequest(_Sampling):
    unsupported = {**_Sampling.unsupported, "echo": "", "best_of": "",
                   "chat_template": "the model's own template is used", "documents": ""}
    shapes = {"tool_choice": 'it must be "auto", "none", "required" or {"type": "function", '
                             '"function": {"name": ...}}'}
    messages: list[Message] = Field(min_length=1)
    chat_template_kwargs: dict[str, Any] | None = None       # (vLLM's: e.g. enable_thinking)
    add_generation_prompt: bool = True                       # (vLLM's: false, no assistant opening)
    continue_final_message: bool = False                     # (vLLM's: the answer continues it)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    tools: list[ToolDef] | None = None
    tool_choice: Union[Literal["auto", "none", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: Int | None = None
    response_format: dict | None = None

    def tool_choice_name(self) -> str | None:
        """The function a named tool_choice forces (None: none named)."""
        tc = self.tool_choice
        return tc.function.name if isinstance(tc, NamedToolChoice) else None


class CompletionRequest(_Sampling):
    unsupported = {**_Sampling.unsupported, "max_completion_tokens": "use 'max_tokens'",
                   "messages": "send chat messages to /v1/chat/completions",
                   "response_format": "", "tools": "", "tool_choice": "", "top_logprobs": ""}
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: Int | None = None
    logprobs: Int | None = None


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt (add_special_tokens: the model's BOS) or chat messages
    (add_generation_prompt: the assistant's opening, as a chat request renders it)."""
    unsupported = {"chat_template": "the model's own is used"}
    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True
    messages: list[Message] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[ToolDef] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def _loc(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif any(c in part for c in "[]") or part in ("str", "int", "dict", "function-after",
                                                      "literal['auto','none','required']"):
            continue                     # a union member's tag, not a field
        else:
            out += ("." if out else "") + part
    return out


def parse_request(cls, obj: Any):
    """Validate a decoded JSON body; APIError(400) naming the first offending field."""
    if not isinstance(obj, dict):
        raise APIError(400, "the request body must be a JSON object")
    if cls in (ChatCompletionRequest, TokenizeRequest):
        _check_content_parts(obj.get("messages"))
    if hasattr(cls, "precheck"):                # (a shape the field errors would not name)
        cls.precheck(obj)
    try:
        return cls.model_validate(obj)
    except ValidationError as e:
        errs = e.errors(include_url=False)
        first = errs[0]
        name = _loc(first["loc"])
        field = first["loc"][0]
        if first["type"] == "missing" and len(first["loc"]) == 1:
            raise APIError(400, f"missing required parameter '{name}'", param=name) from None
        if field in cls.shapes:                 # a union's errors would name one shape only
            got = json.dumps(obj[field])[:80] if _jsonable(obj[field]) else "?"
            shape = cls.shapes[field]
            raise APIError(400, f"invalid value for '{field}' ({got}): {shape}", param=field,
                           code="unsupported_value" if "not supported" in shape
                           and isinstance(obj[field], dict) else None) from None
        if first["type"] == "missing":
            raise APIError(400, f"missing required parameter '{name}'", param=name) from None
        same = [x for x in errs if _loc(x["loc"]) == name]
        what = "; ".join(dict.fromkeys(x["msg"] for x in same))
        got = first.get("input")
        got = json.dumps(got)[:60] if _jsonable(got) else type(got).__name__
        raise APIError(400, f"invalid value for '{name}' ({got}): {what}", param=name) from None


def _check_content_parts(messages):
    """Content parts other than text (images, audio, files) get their own message."""
    if not isinstance(messages, list):
        return
    for i, m in enumerate(messages):
        parts = m.get("content") if isinstance(m, dict) else None
        if not isinstance(parts, list):
            continue
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise APIError(400, f"content part of type {json.dumps(kind)} is not supported: "
                                    f"kogcupy serves text models (only {{\"type\": \"text\"}} "
                                    f"parts)", param=f"messages[{i}].content",
                               code="unsupported_value")


def _jsonable(x) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False


# what an unsupported field's "not asked for" looks like besides None, false, 0 and empty
NEUTRAL = {"length_penalty": (1,), "repeat_penalty": (1,), "typical_p": (1,), "tfs_z": (1,),
           "modalities": (["text"],), "best_of": (1,)}


def _extras(model: BaseModel, at: str = ""):
    """(path, name, value, model) of every unknown field of a request, nested ones too."""
    for k, v in (model.model_extra or {}).items():
        yield f"{at}{k}", k, v, model
    for name in type(model).model_fields:
        v = getattr(model, name)
        for i, item in enumerate(v if isinstance(v, list) else [v]):
            if isinstance(item, BaseModel):
                where = f"{at}{name}[{i}]." if isinstance(v, list) else f"{at}{name}."
                yield from _extras(item, where)


def _neutral(name: str, v) -> bool:
    return any(v == n and type(v) is not bool or v is n
               for n in (None, False, 0, "", [], {}, *NEUTRAL.get(name, ())))


def ignored_fields(req: BaseModel) -> list[str]:
    """Paths of the request's unknown fields, which are ignored (the server log names them);
    check_supported has refused the unsupported ones that were not neutral."""
    return [path for path, name, v, m in _extras(req) if name not in m.unsupported]


def check_extras(req) -> None:
    """400 for an undeclared field a request model lists as unsupported, unless neutral."""
    for path, name, v, m in _extras(req):
        if name in m.unsupported and not _neutral(name, v):
            how = m.unsupported[name]
            raise APIError(400, f"{path} is not supported by kogcupy" + (f": {how}" if how else ""),
                           param=path, code="unsupported_parameter")


def check_stop(stop) -> None:
    """400 for too many, empty or undecodable stop strings."""
    if stop is None:
        return
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}",
                       param="stop")
    for i, s in enumerate(stops):
        name = "stop" if isinstance(stop, str) else f"stop[{i}]"
        if not s:
            raise APIError(400, "stop strings must be non-empty" +
                           ("" if name == "stop" else f" ({name} is '')"), param="stop")
        try:
            check_text(s, name)
        except InputError as e:
            raise APIError(400, " ".join(str(e).split()), param="stop") from None


def check_named_tool(req, param: str) -> None:
    """400 when a named tool_choice names no function among the request's tools."""
    named = req.tool_choice_name()
    names = [t.to_template()["function"]["name"] for t in req.tools or []]
    if named is not None and named not in names:
        raise APIError(400, f"tool_choice names the function {named!r}, which is not among "
                            f"the tools ({', '.join(map(repr, names))})", param=param)


def check_seed(seed) -> None:
    if seed is not None and not -2**63 <= seed < 2**64:     # OpenAI's int64, or a uint64
        raise APIError(400, f"seed must be null or -1 (a random one), or in [-2**63, 2**64), "
                            f"got {seed}", param="seed")


def check_supported(req) -> None:
    """400 for features kogcupy does not implement (neutral values pass), with OpenAI's error
    codes for them (a client may drop the parameter and retry); other 400s have none."""
    def no(param, msg, code=None):
        raise APIError(400, msg, param=param, code=code)
    param_code, value_code = "unsupported_parameter", "unsupported_value"

    check_extras(req)

    if req.n not in (None, 1):
        no("n", f"n={req.n} is not supported: kogcupy generates one choice per request (n=1)",
           value_code)
    for p in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, p)
        if v not in (None, 0, 0.0):
            no(p, f"{p} is not supported; use repetition_penalty (e.g. 1.1) instead", param_code)
    if req.logit_bias:
        no("logit_bias", "logit_bias is not supported", param_code)
    check_stop(req.stop)
    check_seed(req.seed)
    if req.stream_options is not None and not req.stream:
        no("stream_options", "stream_options is only allowed with stream: true")
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs:
            no("logprobs", "logprobs are not supported", param_code)
        if req.top_logprobs not in (None, 0):
            no("top_logprobs", "top_logprobs is not supported", param_code)
        if req.response_format not in (None, {"type": "text"}):
            no("response_format", "response_format other than {\"type\": \"text\"} (JSON mode, "
                                  "structured outputs) is not supported", value_code)
        if req.tool_choice not in (None, "none") and not req.tools:
            no("tool_choice", "tool_choice is only allowed when tools are specified")
        for i, m in enumerate(req.messages):
            if m.content is None and not (m.role == "assistant" and (m.tool_calls or m.refusal)):
                no(f"messages[{i}].content",
                   f"messages[{i}].content is required for "
                   f"{'an' if m.role == 'assistant' else 'a'} {m.role} message"
                   + (" without tool_calls" if m.role == "assistant" else ""))
            if m.role == "tool" and m.tool_call_id is None:
                no(f"messages[{i}].tool_call_id", f"messages[{i}].tool_call_id is required for "
                   f"a tool message (the id of the assistant's tool call it answers)")
        check_named_tool(req, "tool_choice.function.name")
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            no("max_tokens", "max_tokens and max_completion_tokens disagree; send one of them")
    else:
        if req.logprobs is not None:                            # (0: the sampled tokens')
            no("logprobs", "logprobs are not supported", param_code)
        if req.echo:
            no("echo", "echo is not supported", param_code)
        if req.suffix:
            no("suffix", "suffix (fill-in-the-middle) is not supported", param_code)
        if req.best_of not in (None, 1):
            no("best_of", f"best_of={req.best_of} is not supported (best_of must be 1)",
               value_code)


def generation_prompt(req) -> tuple[bool, bool]:
    """(add_generation_prompt, continue_final_message) of a chat or tokenize request: with
    continue_final_message, add_generation_prompt is false unless sent true (a 400: vLLM's)."""
    if not req.continue_final_message:
        return req.add_generation_prompt, False
    if req.add_generation_prompt and "add_generation_prompt" in req.model_fields_set:
        raise APIError(400, "continue_final_message continues the last message: "
                            "add_generation_prompt cannot be true with it",
                       param="add_generation_prompt")
    return False, True


# OpenAI's defaults of the sampling fields a request leaves out (top_k, min_p and
# repetition_penalty: off); the server overlays the model's generation_config.json (create_app)
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                     "repetition_penalty": 1.0}


def sampling_kwargs(req, max_new_tokens: int, seed: int, defaults: dict = SAMPLING_DEFAULTS) -> dict:
    """engine.generate keyword arguments of a validated request (a negative seed is taken mod
    2**64, as an int64's bits); a field the request leaves out (None) comes from `defaults`
    (every key of SAMPLING_DEFAULTS)."""
    stop = req.stop

    def pick(name):
        v = getattr(req, name)
        return defaults[name] if v is None else v

    return dict(max_new_tokens=max_new_tokens,
                temperature=float(pick("temperature")),
                top_k=max(0, int(pick("top_k"))),
                top_p=float(pick("top_p")),
                min_p=float(pick("min_p")),
                repetition_penalty=float(pick("repetition_penalty")),
                seed=seed % 2**64,
                stop=[stop] if isinstance(stop, str) else list(stop or []),
                ignore_eos=bool(req.ignore_eos))


# ------------------------------------------------------------------------------- responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def usage_of(result, prompt_tokens: int) -> dict:
    n = len(getattr(result, "token_ids", ()) or ())
    cached = int(getattr(result, "cached_tokens", 0) or 0)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=n, total_tokens=prompt_tokens + n,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached)).model_dump()


def new_id(prefix: str, sep: str = "-") -> str:
    """A fresh id as OpenAI spells the kind's: chatcmpl-..., cmpl-...; resp_..., msg_..."""
    return f"{prefix}{sep}{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def chat_completion(rid, model, created, content, tool_calls, finish, usage) -> dict:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}],
            "usage": usage}


def chat_chunk(rid, model, created, delta: dict, finish=None, with_usage=False) -> dict:
    c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if with_usage:
        c["usage"] = None
    return c


def completion(rid, model, created, text, finish, usage) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage}


def completion_chunk(rid, model, created, text, finish=None, with_usage=False) -> dict:
    c = {"id": rid, "object": "text_completion", "created": created, "model": model,
         "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if with_usage:
        c["usage"] = None
    return c


def usage_chunk(rid, model, created, obj: str, usage: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage}


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
