"""The engine thread and its bridge to the event loop.

One thread owns the engine and runs its step loop; nothing else touches it. Coroutines talk
to it through a thread-safe inbox (add / abort / stop commands) and get each request's
outputs back on an asyncio queue, filled from the engine thread with
`loop.call_soon_threadsafe`. Between two steps the thread drains the inbox, so a request
arrives or leaves the batch at a step boundary (continuous batching).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from duoserve.engine.llm_engine import LLMEngine, RequestError
from duoserve.engine.request import Request, RequestOutput
from duoserve.layers.sampler import SamplingParams
from duoserve.server.metrics import ServerMetrics
from duoserve.server.protocol import APIError

logger = logging.getLogger("duoserve.server")
IDLE_POLL_S = 0.2  # how often an idle engine thread wakes up (stop, log line)
EXPERT_STATS_EVERY_S = 1.0


class RequestStream:
    """One request's outputs, in order, as the event loop sees them."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.arrival_time = time.monotonic()
        self.is_finished = False
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | APIError] = asyncio.Queue()

    def put(self, item: RequestOutput | APIError) -> None:
        """Deliver an output or an error (called from the engine thread)."""
        # RuntimeError: the loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.is_finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        # A slow reader skips to the newest output: each one carries the full text so far.
        while not self._queue.empty() and isinstance(item, RequestOutput) and not item.finished:
            item = self._queue.get_nowait()
        if isinstance(item, APIError):
            self.is_finished = True
            raise item
        self.is_finished = item.finished
        return item


@dataclass
class _Tracked:
    """Engine-thread bookkeeping of one request in flight."""

    stream: RequestStream
    request: Request
    last_token_time: float | None = None


class EngineBridge:
    """Runs `engine` on its own thread; submit() and abort() are called from the event loop."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, max_waiting: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.is_draining = False
        self.active: set[str] = set()  # event loop side: submitted, handler not yet done
        self.num_running = 0  # snapshots written by the engine thread
        self.num_waiting = 0
        self._num_submitted = 0  # written by the loop thread only
        self._num_added = 0  # written by the engine thread only
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._next_stats_time = 0.0
        self._ids = itertools.count()

    # ------------------------------------------------------------------ event loop side

    def start(self) -> None:
        assert self._thread is None, "the engine thread is already running"
        self._thread = threading.Thread(target=self._run, name="duoserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Abort what is left and join the engine thread."""
        if self._thread is None:
            return
        self._inbox.put(("stop",))
        self._thread.join(timeout_s)
        self._thread = None

    @property
    def is_alive(self) -> bool:
        """Whether the engine thread is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_queued(self) -> int:
        """Requests waiting for admission, including those not yet seen by the engine thread."""
        return self.num_waiting + (self._num_submitted - self._num_added)

    def submit(self, prompt_ids: list[int], params: SamplingParams, prefix: str) -> RequestStream:
        """Queue a validated request; 503 while draining or when too many are waiting."""
        if self.is_draining:
            self.metrics.on_rejected("draining")
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        if not self.is_alive:
            raise APIError(503, "the engine is not running", code="engine_not_running")
        if self.num_queued >= self.max_waiting:
            self.metrics.on_rejected("overloaded")
            raise APIError(
                503,
                f"the server is overloaded: {self.num_queued} requests are waiting for "
                f"admission (--max-waiting {self.max_waiting}); retry later",
                code="server_overloaded",
            )
        request_id = f"{prefix}-{uuid.uuid4().hex[:24]}-{next(self._ids)}"
        stream = RequestStream(request_id, asyncio.get_running_loop())
        self._num_submitted += 1
        self.active.add(request_id)
        self._inbox.put(("add", stream, prompt_ids, params))
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (a no-op once it has finished)."""
        self._inbox.put(("abort", request_id))

    def call_in_engine_thread(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread between two steps; its result or error in a future.

        For benchmarks that reconfigure the engine (switch expert policies, read counters)
        while it serves: only the engine thread may touch the engine.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self.is_alive:
            future.set_exception(RuntimeError("the engine thread is not running"))
            return future
        self._inbox.put(("call", fn, future))
        return future

    @property
    def is_idle(self) -> bool:
        """No request submitted, waiting or running (as last seen by the engine thread)."""
        return not self.active and self.num_queued == 0 and self.num_running == 0

    def release(self, stream: RequestStream) -> None:
        """The handler is done with `stream`; abort the request if it is still running."""
        if not stream.is_finished:
            self.abort(stream.request_id)
        self.active.discard(stream.request_id)

    async def wait_drained(self, timeout_s: float) -> bool:
        """Wait until no request is in flight, at most timeout_s; True if drained."""
        deadline = time.monotonic() + timeout_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.active

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while self._handle_commands(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    self._step()
                self._after_step()
        except Exception:  # pragma: no cover - the loop itself failing is a bug
            logger.exception("the engine thread crashed")
        finally:
            for request_id in list(self._tracked):
                self._abort(request_id)
            self._refuse_queued()
            self.num_running = self.num_waiting = 0

    def _refuse_queued(self) -> None:
        """Answer requests that were queued but never reached the engine."""
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                self._num_added += 1
                command[1].put(
                    APIError(503, "the server is shutting down", None, "server_shutting_down")
                )
            elif command[0] == "call":
                command[2].set_exception(RuntimeError("the engine thread has stopped"))

    def _handle_commands(self, block: bool) -> bool:
        """Apply queued commands; False once told to stop."""
        try:
            command = self._inbox.get(timeout=IDLE_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if command[0] == "stop":
                return False
            if command[0] == "add":
                self._add(*command[1:])
            elif command[0] == "call":
                self._call(*command[1:])
            else:
                self._abort(command[1])
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, stream: RequestStream, prompt_ids: list[int], params: SamplingParams) -> None:
        try:
            request = self.engine.add_request(prompt_ids, params, request_id=stream.request_id)
        except RequestError as exc:
            stream.put(APIError(400, str(exc), param="prompt"))
            return
        except Exception as exc:  # an engine bug must not stop the engine thread
            logger.exception("add_request failed")
            stream.put(APIError(500, f"the engine refused the request: {type(exc).__name__}"))
            return
        finally:
            self._num_added += 1
        # NOTE: latency counts from the HTTP arrival, not from when this thread got to it.
        request.arrival_time = stream.arrival_time
        self._tracked[stream.request_id] = _Tracked(stream, request)

    @staticmethod
    def _call(fn: Callable[[], Any], future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except Exception as exc:  # handed to the caller, the thread keeps serving
            future.set_exception(exc)

    def _abort(self, request_id: str) -> None:
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return
        self.engine.abort_request(request_id)
        self.metrics.on_finish("abort", 0.0, None, None)
        tracked.stream.put(RequestOutput.of(tracked.request, 0))

    def _step(self) -> None:
        scheduler = self.engine.scheduler
        t0 = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as exc:
            logger.exception("engine step failed; failing %d requests", len(self._tracked))
            self._fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
            return
        seconds = time.perf_counter() - t0
        batch = scheduler.last_batch
        if batch is not None:
            prompt_tokens = batch.num_tokens if batch.phase == "prefill" else 0
            self.metrics.on_step(batch.phase, seconds, prompt_tokens)
            scheduler.observe_step(seconds)
        now = time.monotonic()
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is not None:
                self._observe(tracked, out, now)
                tracked.stream.put(out)
                if out.finished:
                    del self._tracked[out.request_id]

    def _observe(self, tracked: _Tracked, out: RequestOutput, now: float) -> None:
        req = tracked.request
        gap = None if tracked.last_token_time is None else now - tracked.last_token_time
        if tracked.last_token_time is None:
            queue_s = None
            if req.first_scheduled_time is not None:
                queue_s = req.first_scheduled_time - req.arrival_time
            self.metrics.on_first_token(now - req.arrival_time, queue_s)
        self.metrics.on_tokens(len(out.new_token_ids), gap)
        tracked.last_token_time = now
        if out.finished:
            first = req.first_token_time or now
            n = len(out.output_token_ids)
            tpot = (now - first) / (n - 1) if n > 1 else None
            reason = out.finish_reason or "stop"
            self.metrics.on_finish(reason, now - req.arrival_time, first - req.arrival_time, tpot)

    def _fail_all(self, message: str) -> None:
        for request_id, tracked in list(self._tracked.items()):
            try:
                self.engine.abort_request(request_id)
            except Exception:  # keep failing the others
                logger.exception("could not abort %s", request_id)
            tracked.stream.put(APIError(500, message))
        self._tracked.clear()

    def _after_step(self) -> None:
        scheduler = self.engine.scheduler
        self.num_running, self.num_waiting = len(scheduler.running), len(scheduler.waiting)
        self.metrics.set_queues(self.num_running, self.num_waiting)
        now = time.monotonic()
        if now >= self._next_stats_time:
            self._next_stats_time = now + EXPERT_STATS_EVERY_S
            stats = getattr(self.engine.experts, "stats", None)
            if callable(stats):
                try:
                    self.metrics.set_expert_stats(stats())
                except Exception:  # metrics must never take the server down
                    logger.exception("expert runtime stats() failed")
        self.metrics.maybe_log(self.num_running, self.num_waiting, now)
