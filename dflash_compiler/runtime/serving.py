"""Concurrent requests from several threads or asyncio tasks: a background thread serves them, and each request is a
`RequestHandle` that streams its tokens as steps commit them.

`submit` only checks a request and puts it in a thread-safe inbox; the serving thread drains the inbox between
scheduler iterations, so no caller ever waits for a step. A step that raises fails the requests in it (their
handles raise) and the loop goes on serving the others and later ones.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence

from ..errors import DFlashError
from .batch import BatchRunner, StepEvent
from .sampling import SamplingParams
from .speculative import GenerationStats, SpeculativeDecoder, check_request

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The engine already holds max_queue requests that wait for a row; retry later."""


class StepFailedError(RuntimeError):
    """The step that ran a request raised; the request is dropped (the engine keeps serving)."""


def _wake_all(wakers: Iterable[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
    """Sets the `async for` consumers' events with one call per event loop: each call_soon_threadsafe writes to
    the loop's self-pipe, and a step can finish dozens of chunks."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for loop, event in wakers:
        by_loop.setdefault(loop, []).append(event)
    for loop, events in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that event loop is closed
            loop.call_soon_threadsafe(_set_events, events)


def _set_events(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


class RequestHandle:
    """One submitted request. Iterate it (or `async for`) for token chunks; `result()` waits for all of them."""

    def __init__(self, loop: ServingLoop | EagerLoop, stats: GenerationStats):
        self._loop, self.stats = loop, stats
        self.request_id: int | None = None
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []  # `async for` consumers

    def _push(self, event: StepEvent) -> None:
        """Queues the event's tokens without waking the consumers (the loop wakes them once per step)."""
        self.token_ids.extend(event.tokens)
        if event.tokens:
            self._chunks.put(list(event.tokens))
        if event.finished:
            self.finish_reason = event.finish_reason
            self._done.set()
            self._chunks.put(None)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._close()

    def _close(self) -> None:
        self._done.set()
        self._chunks.put(None)
        self._wake()

    def _wake(self) -> None:
        _wake_all(list(self._wakers))

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def cancel(self) -> None:
        """Stops the request; its stream ends with finish_reason "cancelled"."""
        if not self.done:
            self._loop.cancel(self)

    def result(self, timeout: float | None = None) -> list[int]:
        """All generated token ids, once the request has finished."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        return self.token_ids

    def __iter__(self) -> Iterator[list[int]]:
        while (chunk := self._chunks.get()) is not None:
            yield chunk
        if self._error is not None:
            raise self._error

    async def __aiter__(self) -> AsyncIterator[list[int]]:
        # The serving thread wakes this task through its event loop: no thread waits per chunk.
        waker = (asyncio.get_running_loop(), asyncio.Event())
        self._wakers.append(waker)
        try:
            while True:
                try:
                    chunk = self._chunks.get_nowait()
                except queue.Empty:
                    waker[1].clear()
                    if self._chunks.empty():  # checked after clear: a chunk put since is never missed
                        await waker[1].wait()
                    continue
                if chunk is None:
                    break
                yield chunk
        finally:
            self._wakers.remove(waker)
        if self._error is not None:
            raise self._error


class _Loop:
    """The inbox, the queue bound and the serving thread shared by both runtimes' loops."""

    def __init__(self, max_queue: int | None):
        if max_queue is not None and max_queue < 1:
            raise DFlashError(f"parameter 'max_queue' must be >= 1, got {max_queue}")
        self.max_queue = max_queue
        self.step_observers: list[Callable[[float], None]] = []  # called on the serving thread with each step's time
        self.failed_steps = 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[int, RequestHandle] = {}  # the serving thread's only
        self._submitted = 0
        self._count_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self._failure: BaseException | None = None

    @property
    def queued(self) -> int:
        """Requests submitted that wait for a row."""
        return self._submitted - self._left_waiting()

    def _left_waiting(self) -> int:
        """Requests that stopped waiting (given a row, or cancelled first) since start."""
        raise NotImplementedError

    @property
    def failure(self) -> BaseException | None:
        """The fault that stopped the serving thread, if one did (a failed step does not)."""
        return self._failure

    def _check_open(self) -> None:
        if self._failure is not None:
            raise DFlashError(f"the serving loop stopped after an error: {self._failure}")
        if self._closed:
            raise DFlashError("the engine is closed")

    def _post(self, request_id: int, item, handle: RequestHandle) -> RequestHandle:
        with self._count_lock:
            if self.max_queue is not None and self.queued >= self.max_queue:
                raise QueueFullError(f"the engine's queue is full ({self.max_queue} requests wait for a row)")
            self._submitted += 1
        handle.request_id = request_id
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._guarded_run, name="dflash-serving", daemon=True)
                self._thread.start()
                # an engine left open stops its thread before the interpreter tears down (a thread killed inside a
                # torch op aborts the process)
                atexit.register(_close_at_exit, weakref.ref(self))
        self._inbox.put(("submit", item, handle))
        if self._closed:  # close() ran meanwhile and may have drained the inbox before this request arrived
            self._fail_all(DFlashError("the engine was closed before the request finished"))
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        if handle.request_id is not None:
            self._inbox.put(("cancel", handle.request_id, None))

    def close(self) -> None:
        """Stops the serving thread; unfinished requests fail."""
        if self._closed and (self._thread is None or not self._thread.is_alive()):
            return
        self._closed = True
        self._inbox.put(("close", None, None))
        if self._thread is not None:
            self._thread.join()
        self._fail_all(DFlashError("the engine was closed before the request finished"))

    def _fail_all(self, error: BaseException) -> None:
        pending = list(self._handles.values())
        self._handles.clear()
        while True:  # submits that raced close
            try:
                kind, _, handle = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                pending.append(handle)
        for h in pending:
            h._fail(error)

    def _guarded_run(self) -> None:
        try:
            self._run()
        except BaseException as error:  # a fault outside any step: nothing can be served any more
            log.exception("the serving loop stopped")
            self._failure = error
            self._fail_all(error)

    def _deliver(self, events: list[StepEvent]) -> None:
        wakers = []
        for event in events:
            handle = self._handles.get(event.request_id)
            if handle is None:
                continue
            handle._push(event)
            wakers.extend(handle._wakers)
            if event.finished:
                del self._handles[event.request_id]
        _wake_all(wakers)

    def _observe(self, step_s: float) -> None:
        for observe in self.step_observers:
            observe(step_s)

    def _fail_requests(self, request_ids: Sequence[int], error: BaseException) -> None:
        self.failed_steps += 1
        log.error("a step failed (%s: %s); %d requests dropped", type(error).__name__, error, len(request_ids))
        for rid in request_ids:
            handle = self._handles.pop(rid, None)
            if handle is not None:
                failure = StepFailedError(f"request {rid}: the step failed ({type(error).__name__}: {error})")
                failure.__cause__ = error
                handle._fail(failure)

    def _run(self) -> None:
        raise NotImplementedError


class ServingLoop(_Loop):
    """Owns a BatchRunner and steps it on a background thread while any request is unfinished."""

    def __init__(self, runner: BatchRunner, max_queue: int | None = None):
        super().__init__(max_queue)
        self.runner = runner

    @property
    def running(self) -> int:
        """Requests holding a row (decoding or prefilling)."""
        return len(self.runner.running) + (self.runner.prefilling is not None)

    def _left_waiting(self) -> int:
        return self.runner.left_waiting

    def submit(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        params: SamplingParams,
        stop_token_ids: Sequence[int] = (),
        stats: GenerationStats | None = None,
    ) -> RequestHandle:
        """Queues a request (bad input raises DFlashError, a full queue QueueFullError, in the caller's thread)."""
        self._check_open()
        req = self.runner.prepare_request(prompt_ids, max_new_tokens, params, stop_token_ids, stats)
        return self._post(req.id, req, RequestHandle(self, req.stats))

    def _run(self) -> None:
        runner = self.runner
        while True:
            items = [self._inbox.get()] if not runner.has_work else []
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for kind, item, handle in items:
                if kind == "submit":
                    self._handles[item.id] = handle
                    runner.enqueue(item)
                elif kind == "cancel":
                    runner.cancel(item)
                else:
                    return
            if not runner.has_work:
                continue
            start = time.perf_counter()
            try:
                events = runner.step()
            except Exception as error:
                failed, events = runner.abort_active()
                self._fail_requests(failed, error)
            self._deliver(events)
            self._observe(time.perf_counter() - start)


class EagerLoop(_Loop):
    """Serves submitted requests one at a time through the eager loop, on a background thread (the eager
    decoder holds one request's state at a time)."""

    def __init__(self, decoder: SpeculativeDecoder, max_queue: int | None = None):
        super().__init__(max_queue)
        self.decoder = decoder
        self._next_id = 0
        self._id_lock = threading.Lock()
        self._cancelled: set[int] = set()
        self._current: int | None = None
        self._started = 0

    @property
    def running(self) -> int:
        return int(self._current is not None)

    def _left_waiting(self) -> int:
        return self._started

    def submit(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        params: SamplingParams,
        stop_token_ids: Sequence[int] = (),
        stats: GenerationStats | None = None,
        seed: int | None = None,
    ) -> RequestHandle:
        self._check_open()
        target = self.decoder.target
        max_pos = target.cfg.max_position_embeddings
        prompt = check_request(prompt_ids, max_new_tokens, target.cfg.vocab_size, max_pos, "the model's context")
        with self._id_lock:
            rid, self._next_id = self._next_id, self._next_id + 1
        stats = stats if stats is not None else GenerationStats()
        item = (prompt, max_new_tokens, params, tuple(stop_token_ids), seed)
        return self._post(rid, item, RequestHandle(self, stats))

    def cancel(self, handle: RequestHandle) -> None:
        if handle.request_id is not None:
            self._cancelled.add(handle.request_id)

    def _run(self) -> None:
        waiting: list[tuple[tuple, RequestHandle]] = []
        while True:
            items = [self._inbox.get()] if not waiting else []
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for kind, item, handle in items:
                if kind != "submit":
                    return
                waiting.append((item, handle))
            if waiting:
                item, handle = waiting.pop(0)
                self._handles[handle.request_id] = handle
                self._started += 1
                self._serve_one(handle.request_id, item)

    def _serve_one(self, rid: int, item: tuple) -> None:
        prompt, max_new_tokens, params, stops, seed = item
        self._current = rid
        tokens: list[int] = []
        try:
            if rid not in self._cancelled:
                stream = self.decoder.stream(prompt, max_new_tokens, params, stops, seed, self._handles[rid].stats)
                start = time.perf_counter()
                for chunk in stream:
                    tokens.extend(chunk)
                    self._deliver([StepEvent(rid, chunk)])
                    self._observe(time.perf_counter() - start)
                    if rid in self._cancelled or self._closed:
                        stream.close()
                        break
                    start = time.perf_counter()
            if rid in self._cancelled or self._closed:
                reason = "cancelled"
            else:
                reason = "stop" if tokens and tokens[-1] in stops else "length"
            self._deliver([StepEvent(rid, [], True, reason)])
        except Exception as error:
            self._fail_requests([rid], error)
        finally:
            self._current = None
            self._cancelled.discard(rid)


def _close_at_exit(loop_ref: weakref.ref) -> None:
    loop = loop_ref()
    if loop is not None:
        loop.close()
