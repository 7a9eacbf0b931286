#!/usr/bin/env python3
"""`kogcupy serve` on the GPU: decode speed an OpenAI client sees vs engine.generate, and the time
from a client's disconnect to the engine being free again (issue 11's device check).

    python scripts/device_serve.py                          # random SmolLM2-135M shape
    python scripts/device_serve.py --shape llama-3.2-1b     # random Llama-3.2-1B shape
    python scripts/device_serve.py --model path/to/hf-dir   # a real model
    python scripts/device_serve.py --json bench/results/serve-h200-DATE.json

One process serves (the engine, uvicorn in a thread, the worker thread: as `kogcupy serve`
runs); the client runs in a second process (this script with --client), so the client's
Python does not compete with the server's for the GIL. Steps:

1. engine.generate on the prompt (greedy, --new-tokens tokens), --repeats times, before the
   server starts: the reference tok/s (result.tokens_per_s).
2. The same request streamed through POST /v1/completions by the `openai` client (raw httpx
   SSE when openai is not installed), --repeats times: client tok/s =
   (completion_tokens - 1) / (arrival of the last chunk - arrival of the first text chunk),
   the engine's definition seen from the client side.
3. --disconnects times: a long stream, the client closes the connection after 16 text chunks;
   "disconnect -> free" = from just before the client's close to the moment the engine's
   Generation ended (token stream finished with 'cancelled': the kernel has stopped) in the
   server process (both time.monotonic(), one host).

A random-weight model gets the embedded SmolLM2 tokenizer with no EOS ids (so every request
runs its full length); with shapes whose vocabulary is larger than SmolLM2's (49,152), ids
beyond it decode to no text, which does not change the counts (they come from `usage`).
Targets (issue 11): client tok/s >= 95% of engine.generate; disconnect -> free <= 50 ms.
Needs the serve extra and openai: pip install ".[cuda13,serve]" openai.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODEL_NAME = "bench"
CLOSE_AFTER_CHUNKS = 16


# ------------------------------------------------------------------------------- client side
def _stream_openai(url, body):
    """Yields (monotonic time, chunk dict) of a streamed completion through the openai client."""
    from openai import OpenAI
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    stream = client.completions.create(stream=True, **body)
    try:
        for ch in stream:
            yield time.monotonic(), ch.model_dump()
    finally:
        stream.response.close()


def _stream_httpx(url, body):
    import httpx
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                      timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield time.monotonic(), json.loads(line[6:])


def client_main(args) -> None:
    try:
        import openai  # noqa: F401
        stream, kind = _stream_openai, "openai"
    except ImportError:
        stream, kind = _stream_httpx, "httpx (openai is not installed)"
    prompt = json.loads(args.prompt_ids)
    out = {"client": kind, "streams": [], "disconnects": []}
    body = dict(model=MODEL_NAME, prompt=prompt, max_tokens=args.new_tokens, temperature=0,
                stream_options={"include_usage": True})
    for _ in range(args.repeats):
        t_first = t_end = None
        usage = None
        n_chunks = 0
        for now, ch in stream(args.url, body):
            choices = ch.get("choices") or []
            if choices and choices[0].get("text"):
                t_first = t_first or now
                n_chunks += 1
            if choices and choices[0].get("finish_reason"):
                t_end = now
            if ch.get("usage"):
                usage = ch["usage"]
        n = usage["completion_tokens"]
        tps = (n - 1) / (t_end - t_first) if t_first and t_end and t_end > t_first else 0.0
        out["streams"].append({"completion_tokens": n, "text_chunks": n_chunks,
                               "tokens_per_s": tps, "span_s": (t_end or 0) - (t_first or 0)})
    long_body = dict(body, max_tokens=args.disconnect_tokens)
    long_body.pop("stream_options")
    for _ in range(args.disconnects):
        gen = stream(args.url, long_body)
        seen = 0
        for _now, ch in gen:
            choices = ch.get("choices") or []
            if choices and choices[0].get("text"):
                seen += 1
                if seen >= CLOSE_AFTER_CHUNKS:
                    break
        t_close = time.monotonic()
        gen.close()                     # closes the HTTP response: the connection goes away
        out["disconnects"].append({"t_close": t_close, "chunks_read": seen})
        time.sleep(0.5)                 # let the server settle before the next one
    print("CLIENT_RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------- server side
class TimedEngine:
    """The engine, with the monotonic time at which each Generation ended recorded."""

    def __init__(self, engine):
        self._engine = engine
        self.ends: list[tuple[str, float]] = []       # (finish_reason, time.monotonic())

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, *a, **kw):
        return _TimedGeneration(self._engine.generate(*a, **kw), self.ends)


class _TimedGeneration:
    def __init__(self, gen, ends):
        self._gen = gen
        self._ends = ends
        self._recorded = False

    def __getattr__(self, name):          # stream, result, prompt_ids, ...
        return getattr(self._gen, name)

    def __iter__(self):
        return self

    def _record(self):
        if not self._recorded and self._gen.result is not None:
            self._recorded = True
            self._ends.append((self._gen.result.finish_reason, time.monotonic()))

    def __next__(self):
        try:
            return next(self._gen)
        except StopIteration:
            self._record()
            raise

    def close(self):
        r = self._gen.close()
        self._record()
        return r


def build_engine(args):
    from kogcupy.engine import Engine
    from kogcupy.model.loader import load_model, random_model
    from kogcupy.model.random_weights import shape_config
    from kogcupy.model.tokenizer import Tokenizer

    if args.model:
        model = load_model(args.model, dtype=args.dtype, context_length=args.context_length)
        what = args.model
    else:
        model = random_model(shape_config(args.shape), seed=0, dtype=args.dtype or "bfloat16",
                             rope_positions=args.context_length)
        if args.tokenizer:                           # a tokenizer.json (e.g. SmolLM2's, saved)
            from tokenizers import Tokenizer as _HFTokenizer
            backend = _HFTokenizer.from_file(args.tokenizer)
        else:
            backend = load_model(None).tokenizer.backend     # the embedded SmolLM2's
        model.tokenizer = Tokenizer(backend, bos_token_id=None, eos_token_ids=(),
                                    add_bos=False, chat_template=None,
                                    source="SmolLM2 tokenizer without EOS")
        what = f"random {args.shape}"
    engine = Engine(model, backend=args.backend, context_length=args.context_length,
                    gpus=args.gpus)
    engine.warm_up()                           # as `kogcupy serve` does before it listens
    return engine, what


def prompt_ids(engine, n: int) -> list[int]:
    text = ("Write a long and detailed story about a GPU that wanted to run one request as "
            "fast as its memory allows. ") * 8
    ids = engine.tokenizer.encode(text, add_bos=False)[:n]
    return ids + [100 + i for i in range(n - len(ids))]


def gpu_name() -> str:
    try:
        import cupy
        p = cupy.cuda.runtime.getDeviceProperties(0)
        name = p.get("name", b"?")
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception as e:  # noqa: BLE001
        return f"no GPU ({type(e).__name__})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model path (default: random --shape)")
    ap.add_argument("--shape", default="smollm2-135m",
                    help="random-weight shape (kogcupy.model.random_weights.SHAPES)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer.json for a random-weight shape (default: the embedded SmolLM2's)")
    ap.add_argument("--backend", default="monokernel")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--context-length", type=int, default=4096)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--disconnect-tokens", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--disconnects", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the results here")
    # client mode (the script runs itself as the client process)
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        return client_main(args)
    if args.prompt_tokens + max(args.new_tokens, args.disconnect_tokens) > args.context_length:
        ap.error("prompt + new/disconnect tokens exceed --context-length")

    import uvicorn

    from kogcupy.serve import create_app

    t0 = time.perf_counter()
    engine, what = build_engine(args)
    print(f"device_serve: {what} on {engine.backend_name} ({gpu_name()}), loaded in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    ids = prompt_ids(engine, args.prompt_tokens)

    # 1. the engine alone
    engine_tps = []
    for _ in range(args.repeats + 1):                 # the first run warms up (compiles)
        gen = engine.generate(ids, max_new_tokens=args.new_tokens, temperature=0.0)
        for _piece in gen:
            pass
        engine_tps.append(gen.result.tokens_per_s)
    n_engine = len(gen.result.token_ids)
    engine_tps = engine_tps[1:]

    # 2-3. the server in this process, the client in another
    timed = TimedEngine(engine)
    app = create_app(timed, served_model_name=MODEL_NAME, max_queue=4,
                     sampling_defaults={})   # greedy requests as the engine's run: no model defaults
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        cmd = [sys.executable, os.path.abspath(__file__), "--client", "--url", url,
               "--prompt-ids", json.dumps(ids), "--new-tokens", str(args.new_tokens),
               "--disconnect-tokens", str(args.disconnect_tokens),
               "--repeats", str(args.repeats), "--disconnects", str(args.disconnects)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        line = [x for x in proc.stdout.splitlines() if x.startswith("CLIENT_RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"device_serve: the client failed (rc {proc.returncode}):\n"
                     f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        client = json.loads(line[0][len("CLIENT_RESULT "):])
        t_wait = time.perf_counter()
        while not app.state.scheduler.idle and time.perf_counter() - t_wait < 10:
            time.sleep(0.01)
    finally:
        server.should_exit = True
        thread.join(30)

    cancelled = [t for reason, t in timed.ends if reason == "cancelled"]
    frees = []
    for d, t_end in zip(client["disconnects"], cancelled):
        frees.append(1e3 * (t_end - d["t_close"]))
    streams = client["streams"]
    client_tps = [s["tokens_per_s"] for s in streams]
    e_med = statistics.median(engine_tps)
    c_med = statistics.median(client_tps)
    ratio = 100.0 * c_med / e_med if e_med else 0.0
    free_med = statistics.median(frees) if frees else float("nan")
    rows = {
        "gpu": gpu_name(), "model": what, "backend": engine.backend_name, "gpus": args.gpus,
        "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "client": client["client"],
        "engine_tokens": n_engine, "engine_tokens_per_s": engine_tps,
        "client_streams": streams, "client_tokens_per_s": client_tps,
        "client_pct_of_engine": ratio,
        "disconnect_to_free_ms": frees, "disconnects_cancelled": len(cancelled),
        "disconnects_tried": len(client["disconnects"]),
        "targets": {"client_pct_of_engine": 95.0, "disconnect_to_free_ms": 50.0},
        "pass": bool(ratio >= 95.0 and frees and max(frees) <= 50.0),
        "date": time.strftime("%Y-%m-%d"),
    }
    print()
    print(f"kogcupy serve, {what}, {engine.backend_name} on {rows['gpu']}; "
          f"{len(ids)}-token prompt, {args.new_tokens} new tokens, client: {client['client']}")
    print(f"{'measure':<34}{'median':>12}{'all runs':>34}")
    print(f"{'engine.generate tok/s':<34}{e_med:>12.1f}   "
          + ", ".join(f"{x:.1f}" for x in engine_tps))
    print(f"{'streamed via the server tok/s':<34}{c_med:>12.1f}   "
          + ", ".join(f"{x:.1f}" for x in client_tps))
    print(f"{'client / engine':<34}{ratio:>11.1f}%   target >= 95%")
    print(f"{'disconnect -> engine free (ms)':<34}{free_med:>12.1f}   "
          + ", ".join(f"{x:.1f}" for x in frees) + "   target <= 50 ms")
    if len(cancelled) != len(client["disconnects"]):
        print(f"warning: {len(client['disconnects'])} disconnects but {len(cancelled)} "
              f"cancelled generations")
    print(f"{'result':<34}{'PASS' if rows['pass'] else 'FAIL':>12}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
