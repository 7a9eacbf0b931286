"""One generation at a time: a worker thread runs the engine, a bounded FIFO queue holds the rest.

The HTTP side (asyncio) submits a ``Job`` and reads its events from ``job.events`` (an
asyncio.Queue the worker fills through ``loop.call_soon_threadsafe``):

    ("start",)                  the engine accepted the request; pieces follow
    ("piece", text)             generated text (concatenates to the result's text)
    ("done", result)            the engine's GenerationResult
    ("error", status, message)  the request failed (400: bad input, 500/503: server side)

``job.cancel()`` (client gone) removes a queued job from the queue, or stops a running
generation at once: it cancels the engine's token stream (a flag the backend checks every
token; thread-safe) and the worker then closes the Generation (``gen.close()``) and takes the
next job. The worker never waits for a slow client: events queue up in memory instead.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
import traceback

from ..errors import InputError, KogError

log = logging.getLogger("kogcupy.serve")

_STOP = object()


class Job:
    def __init__(self, request_id: str, prompt_ids: list[int], gen_kwargs: dict,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.gen_kwargs = gen_kwargs
        self.loop = loop or asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.t_arrival = time.perf_counter()
        self.t_start: float | None = None
        self.t_first: float | None = None
        self.state = "new"               # new -> queued -> running -> done | dropped
        self.result = None
        self._cancelled = threading.Event()
        self._gen = None                 # the engine's Generation while running
        self._scheduler: "Scheduler | None" = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self):
        """The client left: drop it from the queue, or stop its generation now."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        if self._scheduler is not None:
            self._scheduler._remove_queued(self)
        _stop_stream(self._gen)

    def emit(self, event: tuple):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:             # the event loop is closed (server shutting down)
            pass


def _stop_stream(gen):
    """Ask the backend's token stream to stop (a flag; safe from any thread)."""
    stream = getattr(gen, "stream", None) if gen is not None else None
    cancel = getattr(stream, "cancel", None)
    if callable(cancel):
        try:
            cancel()
        except Exception:  # noqa: BLE001 -- the worker's gen.close() still stops it
            log.debug("stream.cancel() failed", exc_info=True)


class ShuttingDown(Exception):
    """submit() after stop(): the server is shutting down."""


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("queue full")
        self.retry_after = retry_after


class Scheduler:
    """The engine's only user: a worker thread and a FIFO of at most ``max_queue`` waiting jobs."""

    def __init__(self, engine, max_queue: int = 16, metrics=None):
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self._cv = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._stopping = False
        self._closed = False             # stop() ran: no restart, new requests are refused
        self._thread: threading.Thread | None = None
        self._avg_job_s = 1.0            # moving average of generation time (Retry-After)
        self.completed = 0               # jobs the worker finished (any outcome)
        if metrics is not None:
            metrics.queue_depth.set_function(lambda: len(self._queue))
            metrics.running.set_function(lambda: 1 if self._running is not None else 0)

    # -- control ---------------------------------------------------------------------------
    def start(self):
        with self._cv:
            if self._thread is not None or self._closed:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="kogcupy-serve-worker",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0):
        """Cancel the running generation, fail the queued ones (503), end the worker."""
        with self._cv:
            self._stopping = self._closed = True
            queued, self._queue = list(self._queue), collections.deque()
            running = self._running
            self._cv.notify_all()
        for job in queued:
            job.state = "done"
            job.emit(("error", 503, "the server is shutting down"))
            log.info("%s -> 503: the server is shutting down (it was queued)", job.id)
        if running is not None:
            running._cancelled.set()
            _stop_stream(running._gen)
        t = self._thread
        if t is not None:
            t.join(timeout)
        self._thread = None

    # -- state -------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def idle(self) -> bool:
        with self._cv:
            return self._running is None and not self._queue

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue's expected drain time, 1..60."""
        est = self._avg_job_s * (len(self._queue) + 1)
        return int(min(60, max(1, math.ceil(est))))

    # -- submit / cancel -----------------------------------------------------------------------
    def submit(self, job: Job):
        """Queue `job` (FIFO); QueueFull, or ShuttingDown once stop() ran."""
        with self._cv:
            if self._closed:
                raise ShuttingDown()
            if self._stopping or self._thread is None:
                raise RuntimeError("the scheduler is not running")
            if len(self._queue) >= self.max_queue and not (self.max_queue == 0 and
                                                           self._running is None):
                if self.metrics is not None:
                    self.metrics.rejected.inc()
                raise QueueFull(self.retry_after())
            job._scheduler = self
            job.state = "queued"
            self._queue.append(job)
            self._cv.notify()

    def _remove_queued(self, job: Job):
        with self._cv:
            if job.state != "queued":
                return
            try:
                self._queue.remove(job)
            except ValueError:
                return
            job.state = "dropped"
        if self.metrics is not None:
            self.metrics.dropped.inc()
        log.info("%s dropped: the client left while it was queued", job.id)

    # -- worker --------------------------------------------------------------------------------
    def _next_job(self) -> Job | None:
        with self._cv:
            while not self._queue and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            job = self._queue.popleft()
            job.state = "running"
            self._running = job
            return job

    def _work(self):
        while True:
            job = self._next_job()
            if job is None:
                return
            try:
                if job.cancelled:        # raced with cancel(): nobody is waiting for it
                    job.state = "dropped"
                    if self.metrics is not None:
                        self.metrics.dropped.inc()
                    continue
                self._run(job)
            finally:
                with self._cv:
                    self._running = None
                    self.completed += 1
                job = None               # keep nothing of a finished request alive

    def _run(self, job: Job):
        job.t_start = time.perf_counter()
        if self.metrics is not None:
            self.metrics.queue_wait.observe(job.t_start - job.t_arrival)
        gen = None
        try:
            gen = self.engine.generate(job.prompt_ids, **job.gen_kwargs)
            job._gen = gen
            if job.cancelled:            # the client left while generate() set up
                _stop_stream(gen)
            job.emit(("start",))
            for piece in gen:
                if job.t_first is None:
                    job.t_first = time.perf_counter()
                job.emit(("piece", piece))
                if job.cancelled:
                    break
            result = gen.result if gen.result is not None else gen.close()
            job.result = result
            job.emit(("done", result))
            self._account(job, result)
        except InputError as e:
            job.emit(("error", 400, " ".join(str(e).split())))
            log.info("%s rejected by the engine: %s", job.id, e)
        except KogError as e:
            job.emit(("error", 500, " ".join(str(e).split())))
            log.error("%s failed: %s", job.id, e)
        except Exception:  # noqa: BLE001 -- a bug: log it, tell the client nothing more
            job.emit(("error", 500, f"internal error while generating (request {job.id}); "
                                    f"see the server log"))
            log.error("%s failed:\n%s", job.id, traceback.format_exc())
        finally:
            if gen is not None and getattr(gen, "result", None) is None:
                try:
                    gen.close()
                except Exception:  # noqa: BLE001
                    log.error("%s: closing the generation failed:\n%s", job.id,
                              traceback.format_exc())
            job._gen = None
            job.state = "done"
            elapsed = time.perf_counter() - job.t_start
            self._avg_job_s = 0.8 * self._avg_job_s + 0.2 * elapsed

    def _account(self, job: Job, r):
        prompt = int(getattr(r, "prompt_tokens", len(job.prompt_ids)) or 0)
        cached = int(getattr(r, "cached_tokens", 0) or 0)
        n_gen = len(getattr(r, "token_ids", ()) or ())
        tps = float(getattr(r, "tokens_per_s", 0.0) or 0.0)
        ttft = (job.t_first - job.t_arrival) if job.t_first is not None else None
        m = self.metrics
        if m is not None:
            m.finished.labels(r.finish_reason).inc()
            m.prompt_tokens.inc(prompt)
            m.cached_tokens.inc(cached)
            m.generated_tokens.inc(n_gen)
            if ttft is not None:
                m.ttft.observe(ttft)
            if tps > 0:
                m.decode_tps.observe(tps)
        log.info("%s prompt=%d cached=%d generated=%d queued=%.3fs ttft=%s tok/s=%s "
                 "finish=%s", job.id, prompt, cached, n_gen, job.t_start - job.t_arrival,
                 f"{ttft:.3f}s" if ttft is not None else "-",
                 f"{tps:.1f}" if tps > 0 else "-", r.finish_reason)   # (one token: no decode)
