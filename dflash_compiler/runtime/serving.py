"""Concurrent requests from several threads or asyncio tasks: a background thread drives a BatchRunner, and each
request is a `RequestHandle` that streams its tokens as steps commit them."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence

from ..errors import DFlashError
from .batch import BatchRunner, StepEvent
from .sampling import SamplingParams
from .speculative import GenerationStats


class RequestHandle:
    """One submitted request. Iterate it (or `async for`) for token chunks; `result()` waits for all of them."""

    def __init__(self, loop: ServingLoop, stats: GenerationStats):
        self._loop, self.stats = loop, stats
        self.request_id: int | None = None
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._chunks: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._error: BaseException | None = None

    def _push(self, event: StepEvent) -> None:
        self.token_ids.extend(event.tokens)
        if event.tokens:
            self._chunks.put(list(event.tokens))
        if event.finished:
            self.finish_reason = event.finish_reason
            self._close()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._close()

    def _close(self) -> None:
        self._done.set()
        self._chunks.put(None)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stops the request; its stream ends with finish_reason "cancelled"."""
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
        while (chunk := await asyncio.to_thread(self._chunks.get)) is not None:
            yield chunk
        if self._error is not None:
            raise self._error


class ServingLoop:
    """Owns a BatchRunner and steps it on a background thread while any request is unfinished."""

    def __init__(self, runner: BatchRunner):
        self.runner = runner
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._handles: dict[int, RequestHandle] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failure: BaseException | None = None

    def submit(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        params: SamplingParams,
        stop_token_ids: Sequence[int] = (),
        stats: GenerationStats | None = None,
    ) -> RequestHandle:
        """Queues a request (bad input raises DFlashError here, in the caller's thread)."""
        handle = RequestHandle(self, stats if stats is not None else GenerationStats())
        with self._lock:
            if self._failure is not None:
                raise DFlashError(f"the serving loop stopped after an error: {self._failure}")
            if self._closed:
                raise DFlashError("the engine is closed")
            handle.request_id = self.runner.add_request(
                prompt_ids, max_new_tokens, params, stop_token_ids, handle.stats
            )
            self._handles[handle.request_id] = handle
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dflash-serving", daemon=True)
                self._thread.start()
            self._wake.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            if handle.request_id is not None:
                self.runner.cancel(handle.request_id)
                self._wake.notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self.runner.has_work and not self._closed:
                    self._wake.wait()
                if self._closed:
                    pending = list(self._handles.values())
                    self._handles.clear()
                    for h in pending:
                        h._fail(DFlashError("the engine was closed before the request finished"))
                    return
                try:
                    events = self.runner.step()
                except Exception as error:  # a failing step fails every request it held, and later submits
                    self._failure = error
                    for h in self._handles.values():
                        h._fail(error)
                    self._handles.clear()
                    raise
                for event in events:
                    handle = self._handles.get(event.request_id)
                    if handle is None:
                        continue
                    handle._push(event)
                    if event.finished:
                        del self._handles[event.request_id]
