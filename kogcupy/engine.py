"""Engine: picks a backend, turns a prompt into token ids, streams text out of a TokenStream.

    engine = Engine(model)                              # "auto": monokernel on a GPU, else reference
    gen = engine.generate("Hello", max_new_tokens=32, stop=["\\n\\n"])
    for piece in gen:                # text pieces, never broken UTF-8 (a length cut inside a
                                     # character ends with U+FFFD, as HF's decode does)
        print(piece, end="", flush=True)
    gen.result                                          # GenerationResult, after exhaustion

A prompt is a str, token ids, or OpenAI-style chat messages (``[{"role": "user", "content":
"..."}]``, optionally with ``tools=[...]``), rendered through the model's chat template. Both
backends keep the KV of earlier requests (``prefix_cache_gb``, 0 = off) and prefill only what
a new prompt does not share with one of them (``result.cached_tokens``).

Stop strings are matched host-side on the detokenized text. Text that could still turn into a
stop string is held back, so the pieces a caller sees always concatenate to ``result.text``
(cut before the stop string). EOS tokens are in ``result.token_ids`` but not in the text.
"""
from __future__ import annotations

import json
import numbers
import secrets
import threading
import time
from dataclasses import dataclass, field

from .errors import ContextLengthError, DeviceError, InputError
from .sampling_params import SamplingParams

BACKENDS = ("auto", "reference", "monokernel")
DEFAULT_CONTEXT_LENGTH = 4096
FINISH_REASONS = ("eos", "stop", "length", "context", "cancelled")
ROLES = ("system", "user", "assistant", "tool")


# ------------------------------------------------------------------------------- backends
def nvidia_driver_loadable() -> bool:
    """The NVIDIA driver's library loads (the machine has a driver, of whatever version)."""
    import ctypes
    for name in ("libcuda.so.1", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            pass
    return False


NO_DRIVER = "no NVIDIA driver on this machine (libcuda cannot be loaded)"


def gpu_info() -> tuple[bool, str]:
    """(usable, why): cupy imports and sees at least one GPU."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install raising anything
        return False, f"cupy is not importable ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # cudaErrorNoDevice / driver missing surface as CUDARuntimeError
        if "InsufficientDriver" in str(e) and not nvidia_driver_loadable():
            return False, f"cupy sees no GPU: {NO_DRIVER}"   # (CUDA calls that "insufficient")
        return False, f"cupy sees no GPU ({type(e).__name__}: {e})"
    if n <= 0:
        return False, "cupy sees no GPU"
    return True, f"{n} GPU(s)"


def resolve_backend(backend: str) -> str:
    """'auto' -> 'monokernel' when a GPU is usable, else 'reference'."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "monokernel" if gpu_info()[0] else "reference"
    return backend


def check_backend_args(backend: str = "auto", gpus: int = 1) -> str:
    """The backend `backend` resolves to, after the checks that need no model: a GPU count
    for the reference backend, and no GPU at all for the monokernel (said first)."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise InputError(f"gpus must be an integer >= 1, got {gpus!r}")
    name = resolve_backend(backend)
    if name == "reference" and gpus != 1:
        if backend == "auto":           # 'auto' fell back to the CPU: the real problem is no GPU
            raise DeviceError(f"gpus={gpus} needs {gpus} GPUs, but {gpu_info()[1]}")
        raise InputError(f"gpus={gpus}: the reference backend runs on the CPU; "
                         f"multi-GPU needs the monokernel backend")
    if name == "monokernel":
        ok, why = gpu_info()
        if not ok:
            raise DeviceError(f"backend 'monokernel' needs a CUDA/ROCm GPU through CuPy, but "
                              f"{why}; use backend 'reference' (CPU) or 'auto'")
    return name


def check_model_for_backend(cfg, name: str, gpus: int = 1) -> None:
    """The checks that need the model's config but not its weights (run before loading them):
    the tensor-parallel split and the shapes the monokernel compiles for."""
    if name != "monokernel":
        return
    from .gpu.tensor_parallel import check
    check(cfg, gpus)
    from .gpu.kernels import check_model_shape
    check_model_shape(cfg)


def check_gpu_count(gpus: int, devices=None) -> None:
    """Enough GPUs visible for a tensor-parallel run (`devices`: the ranks' GPU ids, when not
    0 .. gpus - 1), said before the model loads."""
    need = gpus if devices is None else max(devices) + 1
    if need > 1:
        from .gpu.kccl import gpu_count
        have = gpu_count()
        if have < need:
            raise DeviceError(f"gpus={gpus} needs {need} GPUs, but {have} are visible; "
                              "check CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES")


def model_positions(model) -> int:
    """Positions the model can run: max_position_embeddings, or fewer when the RoPE table
    its weights carry is shorter."""
    n = int(model.config.max_position_embeddings)
    w = getattr(model, "weights", None)
    try:
        if w is None or "rope_cos" not in w:
            return n
        rows = w.shape("rope_cos")[0] if hasattr(w, "shape") else w["rope_cos"].shape[0]
    except Exception:  # noqa: BLE001 -- a stand-in model without weights
        return n
    return min(n, int(rows))


def check_context_length(context_length: int | None, limit: int | None = None) -> None:
    """InputError unless `context_length` is None or an integer in [2, limit]."""
    if context_length is None:
        return
    if isinstance(context_length, bool) or not isinstance(context_length, numbers.Integral) \
            or context_length < 2:
        raise InputError(f"context_length must be an integer >= 2, got {context_length!r}")
    if limit is not None and context_length > limit:
        raise InputError(f"context length {context_length} exceeds the {limit} positions this "
                         f"model supports; use {limit} or less")


def resolve_context_length(model, context_length: int | None) -> int:
    """None: DEFAULT_CONTEXT_LENGTH, or the model's positions when fewer; an explicit length
    beyond the model's positions is an InputError (never capped silently)."""
    limit = model_positions(model)
    max_pos = int(model.config.max_position_embeddings)
    check_context_length(context_length, max_pos)
    context_length = None if context_length is None else int(context_length)   # (NumPy's too)
    if context_length is not None and context_length > limit:
        how = (f"random_model(cfg, rope_positions={context_length})"
               if str(getattr(model, "path", "")).startswith("random(")
               else f"load_model(path, context_length={context_length})")
        raise InputError(f"context length {context_length}: the model was loaded with a RoPE "
                         f"table of {limit} positions (of its {max_pos}); load it with {how}")
    return min(DEFAULT_CONTEXT_LENGTH, limit) if context_length is None else context_length


def make_backend(model, backend: str = "auto", context_length: int = 4096, gpus: int = 1,
                 **backend_kw):
    name = check_backend_args(backend, gpus)
    if name == "reference":
        from .reference.backend import ReferenceBackend
        return ReferenceBackend(model, context_length=context_length, **backend_kw)
    check_model_for_backend(model.config, name, gpus)     # before touching any GPU
    check_gpu_count(gpus, backend_kw.get("devices"))
    try:
        from .gpu.monokernel import MonokernelBackend
    except ImportError as e:
        raise DeviceError(f"backend 'monokernel' is unavailable ({e})") from None
    if gpus != 1:
        from .gpu.multigpu import TensorParallelBackend
        return TensorParallelBackend(model, gpus=gpus, context_length=context_length, **backend_kw)
    return MonokernelBackend(model, context_length=context_length, **backend_kw)


# ------------------------------------------------------------------------------- text
def check_text(text: str, what: str = "prompt") -> None:
    """InputError unless `text` is valid Unicode that encodes as UTF-8. Python smuggles bytes
    it could not decode (a command-line argument, a file read with surrogateescape) into
    strings as lone surrogates (U+DC80..U+DCFF); the tokenizer cannot take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        bad = (f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF
               else f"lone surrogate U+{c:04X}")
        raise InputError(f"{what} is not valid UTF-8 text: undecodable {bad} at character "
                         f"{e.start}; pass UTF-8 text") from None


# ------------------------------------------------------------------------------- messages
def _is_messages(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and any(isinstance(m, dict) for m in prompt)


def check_messages(messages) -> None:
    """OpenAI-style chat messages: a non-empty list of {"role": one of ROLES, "content": str |
    None, ...}; assistant "tool_calls" a list of dicts, tool "tool_call_id" a str."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("chat messages must be a non-empty list of dicts like "
                         "{'role': 'user', 'content': '...'}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"chat message {i} is a {type(m).__name__}, not a dict like "
                             f"{{'role': 'user', 'content': '...'}}")
        role = m.get("role")
        if role not in ROLES:
            raise InputError(f"chat message {i}: unknown role {role!r}; use one of "
                             f"{', '.join(ROLES)}")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise InputError(f"chat message {i}: content must be a str or None, got "
                             f"{type(content).__name__}")
        if content:
            check_text(content, f"chat message {i}: content")
        calls = m.get("tool_calls")
        if calls is not None and not (isinstance(calls, (list, tuple))
                                      and all(isinstance(c, dict) for c in calls)):
            raise InputError(f"chat message {i}: tool_calls must be a list of dicts")
        if "tool_call_id" in m and not isinstance(m["tool_call_id"], str):
            raise InputError(f"chat message {i}: tool_call_id must be a str")


def template_messages(messages) -> list[dict]:
    """OpenAI-style messages as HF chat templates read them: a null content is "" (an assistant
    message with tool_calls), a tool call's arguments (OpenAI: a JSON text) the object
    (templates write ``arguments | tojson``)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        if m.get("tool_calls"):
            m["tool_calls"] = [_call_for_template(c) for c in m["tool_calls"]]
        out.append(m)
    return out


def _call_for_template(call: dict) -> dict:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        return call                     # (not JSON: the template gets the text)
    return {**call, "function": {**fn, "arguments": args}}


# ------------------------------------------------------------------------------- results
@dataclass
class GenerationResult:
    token_ids: list[int]            # generated ids (EOS included when it ended the stream)
    text: str                       # == "".join(pieces yielded)
    finish_reason: str              # eos | stop | length | context | cancelled
    prompt_tokens: int
    prefill_s: float                # until the first generated token was available (none:
                                    # until the generation stopped)
    decode_s: float                 # first generated token -> last generated token
    tokens_per_s: float             # decode tokens (after the first) / decode_s
    backend: str
    gb_per_s: float | None = None           # weight bytes streamed per second while decoding
    pct_of_bandwidth: float | None = None   # gb_per_s / the device's measured read bandwidth
    cached_tokens: int = 0          # prompt tokens restored from the prefix cache, not run
    seed: int | None = None         # the sampling seed (given, or drawn when none was)
    # generated with tools: the text's calls to one of them (in the template's form, as
    # tool_calls.call_syntax reads it) as OpenAI tool_calls, and the text outside those
    # (without tools: no calls, content == text)
    tool_calls: list[dict] = field(default_factory=list)
    content: str = ""

    def count_and_rate(self) -> list[str]:
        """['N tokens', 'R tok/s'] (no rate from a single token: it needs two tokens' times)."""
        n = len(self.token_ids)
        rate = [f"{self.tokens_per_s:.1f} tok/s"] if n > 1 else []
        return [f"{n} token" + "s" * (n != 1)] + rate

    def stats_line(self) -> str:
        parts = self.count_and_rate()
        if self.gb_per_s is not None:
            bw = f"{self.gb_per_s:.1f} GB/s"
            if self.pct_of_bandwidth is not None:
                bw += f" ({self.pct_of_bandwidth:.1f}% of read bandwidth)"
            parts.append(bw)
        parts += [f"prefill {self.prefill_s:.3f} s ({self.prompt_tokens} prompt tokens, "
                  f"{self.cached_tokens} cached)",
                  f"backend {self.backend}", f"finish {self.finish_reason}"]
        return "kogcupy: " + ", ".join(parts)


class Generation:
    """Iterator of text pieces for one request; ``.result`` once it is exhausted or closed."""

    def __init__(self, backend, stream, prompt_ids: list[int], tokenizer, eos_ids: set[int],
                 stop: list[str], seed: int | None = None, tools=None,
                 skip_special_tokens: bool = False, lock=None):
        self._backend = backend
        self._lock = lock or threading.RLock()   # the engine's: one backend step at a time
        self._tools = tools             # the request's tools: calls to them are parsed at the end
        self._tokenizer = tokenizer
        self.stream = stream
        self.seed = seed                # the sampling seed (result.seed)
        self.prompt_ids = prompt_ids
        self._decoder = tokenizer.stream_decoder(skip_special_tokens) if tokenizer is not None \
            else None
        self._eos = eos_ids
        self._stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self._token_ids: list[int] = []
        self._text = ""                 # everything decoded so far (up to a stop string)
        self._emitted = 0               # chars of _text already yielded
        self._t_begin: float | None = None     # the first __next__ (the prefill starts)
        self._t_first: float | None = None
        self._t_last: float | None = None
        self.result: GenerationResult | None = None

    def __iter__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __next__(self) -> str:
        if self.result is not None:
            raise StopIteration
        try:
            with self._lock:
                if self.result is not None:      # (closed by another thread meanwhile)
                    raise StopIteration
                if self._t_begin is None:
                    self._t_begin = time.perf_counter()
                return self._next_piece()
        except KeyboardInterrupt:
            self._cancel()
            raise

    def close(self) -> GenerationResult:
        """Cancel the stream (if still running); the result then has finish 'cancelled'."""
        if self.result is None:
            self._cancel()
        return self.result

    # -- internals ------------------------------------------------------------------------
    def _cancel(self):
        self.stream.cancel()                 # (a flag: at once, from any thread)
        with self._lock:
            self._drain()
            self._finalize("cancelled")

    def _drain(self):
        """Let the backend wind down after a cancel; later tokens are dropped."""
        for _ in self.stream:
            pass

    def _stop_hit(self, search_from: int) -> int:
        hits = [i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0]
        return min(hits) if hits else -1

    def _holdback(self) -> int:
        """Length of the longest tail of _text that is a proper prefix of a stop string."""
        t = self._text
        for k in range(min(self._max_stop - 1, len(t) - self._emitted), 0, -1):
            if any(s.startswith(t[-k:]) for s in self._stop):
                return k
        return 0

    def _take(self, end: int) -> str:
        piece = self._text[self._emitted:end]
        self._emitted = end
        return piece

    def _add_text(self, piece: str) -> str | None:
        """Append decoded text; returns the stop-cut piece if a stop string completed."""
        before = len(self._text)
        self._text += piece
        if self._stop:
            hit = self._stop_hit(max(0, before - self._max_stop + 1))
            if hit >= 0:
                self._text = self._text[:hit]
                out = self._take(hit)
                self.stream.cancel()
                self._drain()
                self._finalize("stop")
                return out
        return None

    def _next_piece(self) -> str:
        while True:
            try:
                tok = next(self.stream)
            except StopIteration:
                tail = self._decoder.flush() if self._decoder is not None else ""
                out = self._add_text(tail)
                if out is not None:
                    return self._or_stop(out)
                out = self._take(len(self._text))
                self._finalize(self.stream.finish_reason or "length")
                return self._or_stop(out)
            now = time.perf_counter()
            if self._t_first is None:
                self._t_first = now
            self._t_last = now
            self._token_ids.append(int(tok))
            if tok in self._eos or self._decoder is None:
                continue
            out = self._add_text(self._decoder.push(int(tok)))
            if out is not None:
                return self._or_stop(out)
            out = self._take(len(self._text) - self._holdback())
            if out:
                return out

    @staticmethod
    def _or_stop(piece: str) -> str:
        if not piece:
            raise StopIteration
        return piece

    def _finalize(self, finish_reason: str):
        if self.result is not None:
            return
        n = len(self._token_ids)
        decode_s = (self._t_last - self._t_first) if n > 1 else 0.0
        tps = (n - 1) / decode_s if decode_s > 0 else 0.0
        prefill_s = float(getattr(self.stream, "prefill_s", 0.0) or 0.0)
        if n == 0 and self._t_begin is not None:  # stopped in the prefill: the time it ran
            prefill_s = time.perf_counter() - self._t_begin
        gbps = pct = None
        bpt = getattr(self._backend, "bytes_per_token", None)
        if bpt and tps > 0:
            gbps = float(bpt) * tps / 1e9
            bw = getattr(self._backend, "read_bandwidth_Bps", None)
            if bw:
                pct = 100.0 * float(bpt) * tps / float(bw)
        text = self._text[:self._emitted]
        content, calls = text, []
        if self._tools:
            from .model.tool_calls import (call_syntax, parse_tool_calls, starts_thinking,
                                           tool_names)
            template = self._tokenizer.chat_template
            content, calls = parse_tool_calls(
                text, names=tool_names(self._tools), syntax=call_syntax(template),
                thinking=starts_thinking(template,
                                         lambda: self._tokenizer.decode(self.prompt_ids[-16:])))
        self.result = GenerationResult(
            token_ids=list(self._token_ids), text=text,
            finish_reason=finish_reason, prompt_tokens=len(self.prompt_ids),
            prefill_s=prefill_s, decode_s=decode_s,
            tokens_per_s=tps, backend=self._backend.name, gb_per_s=gbps, pct_of_bandwidth=pct,
            cached_tokens=int(getattr(self.stream, "cached_tokens", 0) or 0),
            seed=self.seed, tool_calls=[c.to_openai() for c in calls], content=content)


def _backend_arguments() -> set[str]:
    """The keyword arguments some backend's constructor takes (beyond the Engine's own)."""
    import inspect
    from .gpu.monokernel import MonokernelBackend
    from .gpu.multigpu import TensorParallelBackend
    from .reference.backend import ReferenceBackend
    names = set()
    for cls in (ReferenceBackend, MonokernelBackend, TensorParallelBackend):
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                names.add(p.name)
    return names - {"self", "model", "context_length", "gpus", "prefix_cache_gb", "backend"}


# ------------------------------------------------------------------------------- engine
def _token_ids(x) -> list[int] | None:
    """x as a list of int token ids (a list, tuple, or 1-D NumPy array / tensor of integers),
    or None when it is not one."""
    if hasattr(x, "tolist") and not isinstance(x, (str, list, tuple)):
        if getattr(x, "ndim", 1) != 1:
            return None
        x = x.tolist()
    if not isinstance(x, (list, tuple)) or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in x):
        return None
    return [int(i) for i in x]


def _describe(x) -> str:
    """What a wrong prompt is, for an error: 'a 2-D ndarray', 'a list holding a float', 'dict'."""
    def a(name: str) -> str:
        return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
    if hasattr(x, "ndim") and not isinstance(x, (str, list, tuple)):
        if x.ndim == 0:
            return a(type(x).__name__)
        return f"a {x.ndim}-D {type(x).__name__} of {getattr(x, 'dtype', '?')}"
    if isinstance(x, (list, tuple)):
        for i in x:
            if not isinstance(i, numbers.Integral) or isinstance(i, bool):
                return f"a {type(x).__name__} holding {'None' if i is None else a(type(i).__name__)}"
    return type(x).__name__


class Engine:
    """One model on one backend; ``generate`` serves one request at a time (batch 1). Threads
    may share it: their calls take turns a step at a time, and a later generate() or logits()
    still stops an unfinished Generation, whichever thread iterates it."""

    def __init__(self, model, backend: str = "auto", context_length: int | None = None,
                 gpus: int = 1, prefix_cache_gb: float | None = None, **backend_kw):
        """context_length: KV-cache positions (None: 4096, or the model's positions when fewer;
        more than the model's positions is an InputError). prefix_cache_gb: memory (1e9 bytes)
        for the KV of earlier requests; None = the backend's default, 0 = off."""
        if not hasattr(model, "config") or not hasattr(model, "weights"):
            raise InputError(f"Engine takes a model from kogcupy.load_model(...), got "
                             f"{type(model).__name__}: Engine(kogcupy.load_model(path))")
        known = _backend_arguments()
        unknown = sorted(set(backend_kw) - known)
        if unknown:
            raise InputError(f"Engine got unknown argument(s) {', '.join(unknown)}; it takes "
                             f"backend, context_length, gpus, prefix_cache_gb and the backends' "
                             f"{', '.join(sorted(known))}")
        check_backend_args(backend, gpus)
        context_length = resolve_context_length(model, context_length)
        if prefix_cache_gb is not None:
            backend_kw["prefix_cache_gb"] = prefix_cache_gb
        self.model = model
        self._lock = threading.RLock()       # the backend's state: one call or step at a time
        self.backend = make_backend(model, backend, context_length, gpus, **backend_kw)
        self.backend_name: str = self.backend.name
        # the backend may cap it (memory)
        self.context_length: int = int(getattr(self.backend, "context_length", context_length))

    def warm_up(self) -> int:
        """Prepare what a backend would otherwise set up at a request's first use (the GPU
        backends: prefill graphs for every prompt size up to 2,048 tokens, one run of each
        longer chunk size); returns how many graphs it prepared (0: nothing to do, as on the
        reference backend)."""
        warm = getattr(self.backend, "warm_up", None)
        with self._lock:
            return warm() if warm is not None else 0

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def eos_ids(self) -> set[int]:
        ids = set(self.model.config.eos_token_ids)
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.eos_token_ids)
        return ids

    def encode_messages(self, messages, tools=None, template_kwargs=None,
                        fit_context: bool = True, add_generation_prompt: bool = True,
                        answer_prefix: str = "", continue_final_message: bool = False
                        ) -> list[int]:
        """OpenAI-style messages (and tools) -> ids of the chat template's rendering, ending with
        the assistant generation prompt (unless add_generation_prompt=False), then
        ``answer_prefix`` (text the answer starts with: the model continues it).
        ``continue_final_message``: the rendering ends inside the last message (usually an
        assistant's), whose text the answer continues (vLLM's and HF's; needs
        add_generation_prompt=False).
        ``template_kwargs``: more variables for the template (HF's
        ``apply_chat_template(**kwargs)``, e.g.
        ``{"enable_thinking": False}``); ``fit_context=False``: no ContextLengthError (counting
        tokens)."""
        check_messages(messages)
        if tools is not None and not (isinstance(tools, (list, tuple))
                                      and all(isinstance(t, dict) for t in tools)):
            raise InputError("tools must be a list of OpenAI tool dicts like "
                             "{'type': 'function', 'function': {...}}")
        tk = self.tokenizer
        if tk is None or not tk.has_chat_template:
            raise InputError("chat messages need a model with a chat template; pass a text "
                             "prompt (chat=False) instead")
        if tools and not tk.takes_tools:
            raise InputError("this model's chat template takes no tools: the model would never "
                             "see them; pass tools=None")
        for i, m in enumerate(messages):
            if m.get("tool_calls") and not tk.renders_tool_calls:
                raise InputError(f"chat message {i}: this model's chat template drops an "
                                 f"assistant message's tool_calls (the model would never see "
                                 f"them)")
        if continue_final_message and (add_generation_prompt or answer_prefix):
            raise InputError("continue_final_message continues the last message: it needs "
                             "add_generation_prompt=False and no answer prefix")
        text = tk.render_chat(template_messages(messages),
                              add_generation_prompt=bool(add_generation_prompt),
                              tools=None if tools is None else list(tools),
                              variables=template_kwargs,
                              continue_final_message=bool(continue_final_message)) + answer_prefix
        ids = tk.encode(text, add_bos=False)                # templates write BOS themselves
        if fit_context:
            self.model.config.check_request(ids, self.context_length, template=True)
        return ids

    def encode_prompt(self, prompt, chat: bool | None = None, tools=None) -> list[int]:
        """Prompt (str, token ids or chat messages) -> ids, through the chat template when asked
        / by default (always for messages)."""
        if chat is not None and not isinstance(chat, bool):
            raise InputError(f"chat must be True, False or None, got {chat!r}")
        if _is_messages(prompt):
            if chat is False:
                raise InputError("chat messages are always rendered through the chat template; "
                                 "chat=False needs a text prompt")
            return self.encode_messages(prompt, tools)
        if isinstance(prompt, str):
            check_text(prompt)
            if not prompt:
                raise InputError("the prompt is empty")
            tk = self.tokenizer
            if tk is None:
                raise InputError("this model has no tokenizer: pass the prompt as token ids")
            if chat is None:
                chat = tk.has_chat_template
            if chat:
                if not tk.has_chat_template:
                    raise InputError("the model has no chat template; use chat=False (--no-chat)")
                return self.encode_messages([{"role": "user", "content": prompt}], tools)
            ids = tk.encode(prompt)
        elif (ids := _token_ids(prompt)) is not None:
            if chat:
                raise InputError("chat=True needs a text prompt, not token ids")
        else:
            raise InputError(f"prompt must be a str, a list of token ids or a list of chat "
                             f"messages, got {_describe(prompt)}")
        if tools is not None:
            raise InputError("tools need a chat prompt (chat messages, or a str with chat on)")
        self.model.config.check_request(ids, self.context_length)
        return ids

    def logits(self, ids) -> "np.ndarray":  # noqa: F821
        """[n, vocab] float32 logits of a full forward over `ids` (str: encoded, no chat)."""
        if isinstance(ids, str):
            ids = self.encode_prompt(ids, chat=False)
        given, ids = ids, _token_ids(ids)
        if ids is None:
            raise InputError(f"logits takes a str or a list of token ids (ints), got "
                             f"{_describe(given)}")
        if len(ids) > self.context_length:
            raise ContextLengthError(f"{len(ids)} tokens exceed the context length "
                                     f"{self.context_length}", len(ids))
        with self._lock:
            return self.backend.logits(ids)

    def generate(self, prompt, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int | None = None, stop=None,
                 chat: bool | None = None, tools=None, ignore_eos: bool = False) -> Generation:
        """A Generation: iterate it for the text as it is made (nothing runs before), then
        ``.result``. prompt: str (through the chat template when the model has one, unless
        chat=False), token ids, or OpenAI-style messages; tools: OpenAI tool dicts passed to
        the chat template (the text streams as the model writes it; ``result.tool_calls`` then
        holds its calls to one of them, in the form the template asks for, as OpenAI tool
        calls, ``result.content`` the rest).
        temperature 0 is greedy; top_k 0 or -1, top_p 1, min_p 0, repetition_penalty 1 are
        off; seed None or -1: a random one (``result.seed``); stop: strings the text ends
        before; ignore_eos: generate on past EOS up to max_new_tokens (benchmarks; EOS tokens
        stay out of the text). One request at a time: a later generate() or logits()
        stops this one (its finish reason is then 'cancelled')."""
        if isinstance(max_new_tokens, SamplingParams):
            raise InputError("generate takes the sampling as keyword arguments (temperature=, "
                             "top_k=, top_p=, min_p=, repetition_penalty=, seed=), not a "
                             "SamplingParams")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
                or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        if seed is None or (isinstance(seed, numbers.Integral) and seed == -1):
            seed = secrets.randbits(63)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, seed=seed)
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise InputError(f"stop must be a str or a list of str, got {type(stop).__name__}")
        stop = list(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise InputError("stop strings must be non-empty strings")
        for s in stop:
            check_text(s, "stop string")
        if not isinstance(ignore_eos, bool):
            raise InputError(f"ignore_eos must be True or False, got {ignore_eos!r}")
        ids = self.encode_prompt(prompt, chat, tools)
        eos = self.eos_ids
        with self._lock:
            stream = self.backend.start(ids, params, max_new_tokens,
                                        set() if ignore_eos else eos)
        # ignore_eos: past EOS the model writes made-up turns; their markers (special tokens)
        # stay out of the text, as the EOS tokens do
        return Generation(self.backend, stream, ids, self.tokenizer, eos, stop, params.seed,
                          tools=tools or None, skip_special_tokens=ignore_eos, lock=self._lock)
