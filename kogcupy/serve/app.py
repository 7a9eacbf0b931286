"""The ASGI app: OpenAI-compatible routes over one Engine.

    app = create_app(engine, served_model_name="smollm2", api_key=None, max_queue=16)
    run_server(app, host="127.0.0.1", port=8000)     # (Server: Ctrl-C ends open requests)

Routes: POST /v1/chat/completions, POST /v1/completions, POST /v1/responses (JSON or SSE
with "stream": true; responses_api.py), GET /v1/models, GET /v1/models/{id}, POST /tokenize,
POST /detokenize (vLLM's), GET /health, GET /metrics (Prometheus). With ``api_key`` every /v1
route and /tokenize, /detokenize need ``Authorization: Bearer <key>``. Errors are OpenAI's JSON
error object.
"""
from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets

import anyio
import uvicorn
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from ..engine import check_text
from ..errors import ContextLengthError, InputError
from ..model.tool_calls import (CLOSE_TAG, OPEN_TAG, TAGS, call_opening, call_syntax,
                                starts_thinking, tool_names)
from ..sampling_params import SamplingParams
from . import protocol as P
from . import responses_api as RA
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .responses import AnswerEvents, ChatFormatter, CompletionFormatter, JobResponse, json_error
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown

log = logging.getLogger("kogcupy.serve")

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16           # OpenAI's default for /v1/completions
_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models",
           "/tokenize", "/detokenize", "/health", "/metrics")
_KEYED = ("/v1", "/tokenize", "/detokenize")     # routes that need the API key, when one is set


def default_model_name(engine) -> str:
    """The hub id the model was found by (as vLLM names it), else its file or directory."""
    model = getattr(engine, "model", None)
    if getattr(model, "name", None):
        return model.name
    path = str(getattr(model, "path", "") or "")
    name = os.path.basename(path.rstrip("/\\"))
    for ext in (".gguf", ".safetensors"):
        if name.endswith(ext):
            name = name[:-len(ext)]
    return name or "kogcupy"


def _under(path: str, route: str) -> bool:
    """Whether a request path is the route or below it ("/v1/models/x" is under "/v1/models")."""
    return path == route or path.startswith(route + "/")


def _route(path: str) -> str:
    """The route label of a request path in the metrics (an unknown path: "other")."""
    return next((r for r in _ROUTES if _under(path, r)), "other")


class _Guard:
    """Pure ASGI middleware: API key on /v1 routes and /tokenize, /detokenize (before any body
    is read), request counts."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = _route(path)
        status = [499]                  # no response started: the client went away first

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            if self.key is not None and any(_under(path, r) for r in _KEYED) \
                    and not self._authorized(scope):
                msg = "invalid or missing API key: send the header 'Authorization: Bearer <key>'"
                log.info("%s %s -> 401: %s", scope.get("method"), _loggable(path), msg)
                resp = json_error(401, msg, code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        except BaseException:
            if status[0] == 499:        # failed before a response: a server error
                status[0] = 500
            raise
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()

    def _authorized(self, scope) -> bool:
        given = b""
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                given = v
                break
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer":
            token = b""
        return hmac.compare_digest(token.strip(), self.key)


def _loggable(text: str, limit: int = 300) -> str:
    """`text` from a request (a path, a message quoting a field) as one log line's part:
    control and non-ASCII characters (and backslashes) escaped as Python writes them, quotes
    left as they are, cut at `limit`."""
    out = "".join(c if " " <= c <= "~" and c != "\\" else ascii(c)[1:-1] for c in text[:limit])
    return out if len(out) <= limit and len(text) <= limit else out[:limit] + "..."


class _HostCheck:
    """Starlette's TrustedHostMiddleware decides which Host names are served; a refused one
    gets kogcupy's JSON error, which says how to add the name (not which names are served:
    the page that sent it reads the answer), a server log line and its count in the
    metrics (instead of the middleware's plain "Invalid host header")."""

    def __init__(self, app, allowed_hosts: list[str], metrics: Metrics):
        from starlette.middleware.trustedhost import TrustedHostMiddleware
        self.app = app
        self.hosts = allowed_hosts
        self.metrics = metrics
        self.check = TrustedHostMiddleware(self._accepted, allowed_hosts=allowed_hosts,
                                           www_redirect=False)

    async def _accepted(self, scope, receive, send):
        scope["kogcupy.host_ok"] = True
        await self.app(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.check(scope, receive, send)

        async def unless_refused(msg):              # (the middleware's own refusal is dropped)
            if scope.get("kogcupy.host_ok"):
                await send(msg)

        await self.check(scope, receive, unless_refused)
        if not scope.get("kogcupy.host_ok"):
            host = next((v.decode("latin-1") for k, v in scope.get("headers", ())
                         if k == b"host"), None)
            msg = ("the request has no Host header (HTTP/1.1 requires one)" if host is None
                   else f"Host {ascii(host[:80])} is not a name this server answers; to serve "
                        f"it, start kogcupy serve with --allowed-host NAME")
            log.info("%s %s -> 400: %s (it answers %s)", scope.get("method"),
                     _loggable(scope.get("path", "")), msg, ", ".join(self.hosts))
            self.metrics.requests.labels(_route(scope.get("path", "")), "400").inc()
            await json_error(400, msg)(scope, receive, send)


def create_app(engine, served_model_name: str | None = None, api_key: str | None = None,
               max_queue: int = 16, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               allowed_origins: list[str] | None = None, allowed_hosts: list[str] | None = None,
               sampling_defaults: dict | None = None):
    """The ASGI app serving `engine` (see the module docstring); ``app.state`` holds the
    ``scheduler``, ``metrics`` and ``engine``. `allowed_origins`: browser origins that may call
    it (CORS; ["*"] for any), none by default. `allowed_hosts`: the Host header names it
    answers (Starlette's TrustedHostMiddleware: a web page that rebinds its own name to this
    machine gets a 400); any by default. `sampling_defaults`: the sampling fields a request
    leaves out (temperature, top_p, top_k, min_p, repetition_penalty); None: the model's
    generation_config.json's (the tokenizer's ``sampling_defaults``), {}: OpenAI's."""
    name = served_model_name or default_model_name(engine)
    metrics = Metrics()
    scheduler = Scheduler(engine, max_queue=max_queue, metrics=metrics)
    tk = getattr(engine, "tokenizer", None)
    supports_tools = tk is not None and tk.takes_tools
    renders_calls = tk is not None and tk.renders_tool_calls
    syntax = call_syntax(tk.chat_template) if supports_tools else None   # its calls' form
    if sampling_defaults is None:
        sampling_defaults = dict(getattr(tk, "sampling_defaults", None) or {})
    if sampling_defaults:
        log.info("default sampling from the model's generation_config.json: %s (a request's own "
                 "values win; --generation-config none: OpenAI's defaults)",
                 ", ".join(f"{k}={v}" for k, v in sampling_defaults.items()))
    sampling = {**P.SAMPLING_DEFAULTS, **sampling_defaults}   # what a request leaves out
    created = P.now()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(scheduler.stop)

    app = FastAPI(title="kogcupy", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.engine = engine
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.served_model_name = name

    # -- errors ------------------------------------------------------------------------------
    @app.exception_handler(P.APIError)
    async def _api_error(request, e: P.APIError):
        if e.status != 429:                          # 429s are logged where they happen
            log.info("%s %s -> %d: %s", request.method, _loggable(request.url.path), e.status,
                     _loggable(e.message))
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        path = request.url.path
        hint = ""                                   # (a client's base_url without /v1)
        if not path.startswith("/v1/") and any(r.path == "/v1" + path for r in app.routes
                                               if hasattr(r, "path")):
            hint = f"; did you mean /v1{path}? (a client's base_url ends with /v1)"
        msg = {404: f"no route {request.method} {request.url.path}{hint}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(
            e.status_code, str(e.detail))
        log.info("%s %s -> %d: %s", request.method, _loggable(request.url.path), e.status_code,
                 _loggable(msg))
        return json_error(e.status_code, msg)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, _loggable(request.url.path))
        return json_error(500, "internal server error; see the server log")

    # -- helpers -------------------------------------------------------------------------------
    async def read_json(request: Request) -> dict:
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > max_body_bytes:
            raise P.APIError(413, f"request body of {cl} bytes exceeds the limit of "
                                  f"{max_body_bytes} bytes")
        # JSON only (FastAPI's strict rule): a web page may POST text/plain, a form or an
        # untyped body to a local server without a CORS preflight; such a body is refused,
        # never run.
        ct = request.headers.get("content-type")
        mt = (ct or "").split(";")[0].strip().lower()
        if mt != "application/json" and not (mt.startswith("application/") and mt.endswith("+json")):
            what = "no Content-Type" if ct is None else f"Content-Type {ascii(ct[:60])}"
            raise P.APIError(415, f"{what}: the body must be sent as JSON, with "
                                  f"'Content-Type: application/json'")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise P.APIError(413, f"request body exceeds the limit of {max_body_bytes} bytes")
        if not body:
            raise P.APIError(400, "empty request body: send a JSON object")
        try:
            return json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError) as e:
            raise P.APIError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise P.APIError(400, "the request body is nested too deeply") from None

    async def accept(request: Request, cls, check, rid: str = ""):
        """The request body as `cls`, for the served model, `check`ed (400s); its unknown
        fields are ignored (vLLM's and llama.cpp's way) and the log names them (with `rid`,
        the id of the generation it starts, which its own log line has too)."""
        req = P.parse_request(cls, await read_json(request))
        check_model(req.model)
        check(req)
        ignored = [_loggable(p, 64) for p in P.ignored_fields(req)]   # (one log line)
        if ignored:
            log.warning("%s%s %s: ignored unknown field%s %s", rid and rid + " ", request.method,
                        _loggable(request.url.path), "s" if len(ignored) > 1 else "",
                        ", ".join(ignored[:12]) +
                        (f" (+{len(ignored) - 12} more)" if len(ignored) > 12 else ""))
        return req

    def check_model(model: str):
        if model and model != name:             # (left out, null or "": the served model, as vLLM)
            raise P.APIError(404, f"model '{model}' does not exist; this server serves "
                                  f"'{name}' (GET /v1/models)", param="model",
                             code="model_not_found")

    def prompt_too_long(n: int, param: str) -> P.APIError:
        """OpenAI's error for a prompt past the context (clients that trim history key on
        its code)."""
        ctx = int(engine.context_length)
        return P.APIError(400, f"This model's maximum context length is {ctx} tokens; the "
                               f"prompt has {n} tokens (at most {ctx - 1}): shorten it",
                          param=param, code="context_length_exceeded")

    async def encode(fn, *args, param: str, **kw) -> list[int]:
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args, **kw))
        except ContextLengthError as e:
            raise prompt_too_long(e.prompt_tokens, param) from None
        except InputError as e:
            raise P.APIError(400, " ".join(str(e).split()), param=param) from None

    def plan(req, ids: list[int], requested: int | None, default: int | None,
             prompt_param: str, max_param: str = "max_tokens") -> dict:
        """engine.generate kwargs; 400 (code context_length_exceeded, as OpenAI) when the
        prompt or max_tokens do not fit the context."""
        ctx = int(engine.context_length)
        n = len(ids)
        room = ctx - n
        if room < 1:
            raise prompt_too_long(n, prompt_param)
        if requested is None:
            max_new = room if default is None else min(default, room)
        elif requested > room:
            raise P.APIError(400, f"This model's maximum context length is {ctx} tokens; the "
                                  f"prompt has {n} tokens and {max_param}={requested} asks "
                                  f"for {n + requested}: at most {room} tokens can be "
                                  f"generated", param=max_param, code="context_length_exceeded")
        else:
            max_new = requested
        seed = secrets.randbits(64) if req.seed in (None, -1) else req.seed
        kw = P.sampling_kwargs(req, max_new, seed, sampling)
        try:
            SamplingParams(temperature=kw["temperature"], top_k=kw["top_k"], top_p=kw["top_p"],
                           min_p=kw["min_p"], repetition_penalty=kw["repetition_penalty"],
                           seed=kw["seed"])
        except InputError as e:
            raise P.APIError(400, str(e)) from None
        return kw

    def submit(rid: str, ids: list[int], kw: dict) -> Job:
        job = Job(rid, ids, kw)
        scheduler.start()                           # no-op once running (lifespan started it)
        try:
            scheduler.submit(job)
        except ShuttingDown:
            raise P.APIError(503, "the server is shutting down") from None
        except QueueFull as e:
            log.info("%s rejected: queue full (%d waiting)", rid, scheduler.queued)
            n = scheduler.queued
            waiting = (f"{n} request{'s are' if n != 1 else ' is'} waiting (max "
                       f"{scheduler.max_queue})" if scheduler.max_queue else
                       "a generation is running and none may wait (--max-queue 0)")
            raise P.APIError(429, f"the server is busy: {waiting}; retry after "
                                  f"{e.retry_after} s", code="queue_full",
                             headers={"Retry-After": str(e.retry_after)}) from None
        return job

    # -- routes ------------------------------------------------------------------------------
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok", "model": name, "running": int(scheduler.busy),
                "queued": scheduler.queued}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "kogcupy",
                "max_model_len": int(engine.context_length)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    def template_tools(req_tools, tool_choice, messages: list[dict],
                       template_kwargs, where: str = "messages") -> list | None:
        """A request's tools (its tool models) for the template (None: none, or switched off),
        after the checks the template needs (tools, tool calls it would drop, its variables)."""
        tools = [t.to_template() for t in req_tools] if req_tools else None
        if tools and tool_choice == "none" and not supports_tools:
            tools = None                             # switched off: the template needs none
        if tools and not supports_tools:
            raise P.APIError(400, f"model '{name}' does not support tools: its chat template "
                                  f"takes no 'tools'", param="tools")
        for i, m in enumerate(messages):
            if m.get("tool_calls") and not renders_calls:
                raise P.APIError(400, f"model '{name}' does not support tools: its chat template "
                                      f"drops an assistant message's tool_calls",
                                 param=f"{where}[{i}].tool_calls" if where == "messages" else where)
        if template_kwargs and engine.tokenizer is not None:
            try:
                engine.tokenizer.check_template_variables(template_kwargs)
            except InputError as e:
                raise P.APIError(400, str(e), param="chat_template_kwargs") from None
        return tools

    def forced_call(tool_choice, function_name: str | None, tools: list | None,
                    add_generation_prompt: bool, continue_final_message: bool) -> str:
        """The answer's forced opening for tool_choice "required" or a named function (the
        model continues the call's JSON; "required" with one tool names it, as a named choice
        would), "" otherwise."""
        if tool_choice != "required" and function_name is None:
            return ""
        if function_name is None and tools and len(tools) == 1:
            function_name = tools[0]["function"]["name"]
        if continue_final_message:
            raise P.APIError(400, "a forced tool call (tool_choice) cannot continue the last "
                                  "message (continue_final_message): the call is a new "
                                  "answer", param="tool_choice")
        if not add_generation_prompt:
            raise P.APIError(400, "a forced tool call (tool_choice) needs add_generation_prompt: "
                                  "the call is the assistant's answer", param="tool_choice")
        return call_opening(function_name, syntax)

    async def chat_job(req, messages: list[dict], requested: int | None, max_param: str,
                       make_formatter, where: str, add_generation_prompt: bool = True,
                       continue_final_message: bool = False):
        """Queue a chat-template request (chat completions, responses): the prompt (with a
        forced call's opening), its sampling, and the formatter, made by
        ``make_formatter(prompt_tokens, answer=)``, `answer` the AnswerEvents that read its
        calls to the request's tools, when they are parsed (a call to another name stays
        text)."""
        tools = template_tools(req.tools, req.tool_choice, messages, req.chat_template_kwargs,
                               where)
        if tools and req.tool_choice != "none" and syntax is None:
            raise P.APIError(400, f"model '{name}' has no tool calls kogcupy can read: its chat "
                                  f"template asks for neither {OPEN_TAG} tags nor Llama 3 JSON "
                                  f"calls (tool_choice \"none\" puts the tools in the prompt "
                                  f"and leaves the answer as text)", param="tools")
        function_name = req.tool_choice_name()
        opening = forced_call(req.tool_choice, function_name, tools, add_generation_prompt,
                              continue_final_message)
        ids = await encode(engine.encode_messages, messages, tools=tools,
                           template_kwargs=req.chat_template_kwargs,
                           add_generation_prompt=add_generation_prompt, answer_prefix=opening,
                           continue_final_message=continue_final_message, param=where)
        kw = plan(req, ids, requested, None, where, max_param)
        parse = bool(tools) and req.tool_choice != "none"
        names = tool_names(tools) if parse else frozenset()
        one_call = parse and (function_name is not None or req.parallel_tool_calls is False)
        thinking = None
        if parse and not opening:           # (a forced call's opening is no thought)
            thinking = starts_thinking(tk.chat_template, lambda: tk.decode(ids[-16:]))
        if one_call and syntax == TAGS and thinking is None:
            kw["stop"] = [*kw["stop"], CLOSE_TAG]    # the answer ends with the call's closing
            # tag (not where a call may be a thought: later calls are dropped instead)
        answer = AnswerEvents(names, opening, 1 if one_call else None, stream_calls=True,
                              syntax=syntax, thinking=thinking, named=function_name is not None)
        fmt = make_formatter(len(ids), answer=answer)
        return JobResponse(submit(fmt.rid, ids, kw), fmt, stream=bool(req.stream))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's: a prompt's or a conversation's token ids, counted even past the context (a
        client checks them against max_model_len)."""
        req = await accept(request, P.TokenizeRequest, P.check_extras)
        if (req.prompt is None) == (req.messages is None):
            raise P.APIError(400, "send either 'prompt' or 'messages'", param="prompt")
        if engine.tokenizer is None:
            raise P.APIError(400, "this model has no tokenizer", param="prompt")
        if req.messages is not None:
            if "add_special_tokens" in req.model_fields_set and req.add_special_tokens:
                raise P.APIError(400, "add_special_tokens with messages is not supported: the "
                                      "chat template writes the special tokens",
                                 param="add_special_tokens", code="unsupported_value")
            msgs = [m.to_template() for m in req.messages]
            tools = template_tools(req.tools, None, msgs, req.chat_template_kwargs)
            opening, continued = P.generation_prompt(req)
            ids = await encode(engine.encode_messages, msgs, tools=tools,
                               template_kwargs=req.chat_template_kwargs,
                               add_generation_prompt=opening, continue_final_message=continued,
                               fit_context=False, param="messages")
        else:
            try:
                check_text(req.prompt, "prompt")
            except InputError as e:
                raise P.APIError(400, " ".join(str(e).split()), param="prompt") from None
            ids = await anyio.to_thread.run_sync(lambda: engine.tokenizer.encode(
                req.prompt, add_bos=None if req.add_special_tokens else False))
        out = {"count": len(ids), "max_model_len": int(engine.context_length), "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [engine.tokenizer.id_to_token(i) for i in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await accept(request, P.DetokenizeRequest, P.check_extras)
        if engine.tokenizer is None:
            raise P.APIError(400, "this model has no tokenizer", param="tokens")
        vocab = int(engine.tokenizer.vocab_size)
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise P.APIError(400, f"token id {bad} is not in the vocabulary (0 to {vocab - 1})",
                             param="tokens")
        text = await anyio.to_thread.run_sync(engine.tokenizer.decode, req.tokens)
        return {"prompt": text}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        rid = P.new_id("chatcmpl")
        req = await accept(request, P.ChatCompletionRequest, P.check_supported, rid)
        usage = bool(req.stream_options and req.stream_options.include_usage)
        opening, continued = P.generation_prompt(req)
        return await chat_job(
            req, [m.to_template() for m in req.messages],
            req.max_completion_tokens or req.max_tokens,
            "max_completion_tokens" if req.max_completion_tokens else "max_tokens",
            lambda n, **kw: ChatFormatter(rid, name, P.now(), n, include_usage=usage, **kw),
            "messages", opening, continued)

    @app.post("/v1/responses")
    async def responses(request: Request):
        rid = P.new_id("resp", "_")
        req = await accept(request, RA.ResponsesRequest, RA.check_request, rid)
        return await chat_job(
            req, RA.input_messages(req), req.max_output_tokens, "max_output_tokens",
            lambda n, **kw: RA.ResponsesFormatter(rid, name, P.now(), n, req,
                                                  sampling=sampling, **kw),
            "input")

    @app.post("/v1/completions")
    async def completions(request: Request):
        rid = P.new_id("cmpl")
        req = await accept(request, P.CompletionRequest, P.check_supported, rid)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise P.APIError(400, f"one prompt per request (got {len(prompt)}): kogcupy "
                                      f"serves batch 1", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise P.APIError(400, "the prompt is empty", param="prompt")
        ids = await encode(engine.encode_prompt, prompt, chat=False, param="prompt")
        kw = plan(req, ids, req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt")
        job = submit(rid, ids, kw)
        fmt = CompletionFormatter(rid, name, P.now(), len(ids),
                                  include_usage=bool(req.stream_options and
                                                     req.stream_options.include_usage))
        return JobResponse(job, fmt, stream=bool(req.stream))

    app.add_middleware(_Guard, api_key=api_key, metrics=metrics)
    if allowed_origins:                              # outermost: preflights need no API key
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    if allowed_hosts:                                # outermost: every request's Host
        app.add_middleware(_HostCheck, allowed_hosts=list(allowed_hosts), metrics=metrics)
    return app


class Server(uvicorn.Server):
    """uvicorn's server, ending open requests at once on Ctrl-C / SIGTERM: before its graceful
    shutdown waits for the connections, the scheduler stops -- the running generation is
    cancelled, queued and later requests get HTTP 503 (an SSE stream: the error event and
    [DONE]) -- so every response completes instead of being cut off after the timeout."""

    async def shutdown(self, sockets=None):
        state = getattr(self.config.app, "state", None)
        scheduler = getattr(state, "scheduler", None)
        if scheduler is not None:
            await anyio.to_thread.run_sync(scheduler.stop)
        await super().shutdown(sockets=sockets)
        # a second Ctrl-C skips the app's shutdown, whose task asyncio then cancels with a
        # traceback; it is quick here (the scheduler has stopped), so it runs anyway
        done = getattr(self.lifespan, "shutdown_event", None)
        if self.force_exit and done is not None and not done.is_set():
            await self.lifespan.shutdown()


def run_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve `app` with uvicorn until Ctrl-C (a clean stop: returns) or SIGTERM (uvicorn raises
    the signal again once shut down, so the process ends by it, as under uvicorn's own CLI)."""
    try:
        Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                              timeout_graceful_shutdown=5)).run()
    except KeyboardInterrupt:            # (uvicorn re-raises the Ctrl-C after its shutdown)
        pass
