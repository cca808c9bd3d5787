"""One generation at a time, in arrival order, on one thread (one model per process).

``Worker.submit`` refuses with QueueFull (HTTP 429) when ``max_queue`` requests already wait
behind the running one. A ``Job`` carries its generation's events (text pieces, then the result
or an error) from the worker thread to the request's event loop, and can be cancelled from there:
before it starts it is skipped; while it runs, the generation stops before its next decode step.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from .errors import QueueFull

DONE, PIECE, ERROR = "done", "piece", "error"


class Job:
    def __init__(self, start: Callable[[], Any], loop: asyncio.AbstractEventLoop,
                 on_done: Callable[[Any], None] = lambda result: None, logprobs: bool = False):
        self._start = start  # () -> a Stream (runtime.generate.Stream)
        self._logprobs = logprobs  # PIECE events carry (text, the tokens' TokenLogprob entries or None)
        self._loop = loop
        self._on_done = on_done  # called on the worker thread with the GenerationResult
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._stream = None

    def cancel(self) -> None:
        self._cancelled.set()
        if self._stream is not None:
            self._stream.cancel()

    def run(self) -> None:
        """On the worker thread: generate, posting (kind, value) events to the request's loop."""
        if self._cancelled.is_set():
            return self._post(ERROR, asyncio.CancelledError())
        try:
            self._stream = self._start()
            if self._cancelled.is_set():
                self._stream.cancel()
            for piece in self._stream:
                self._post(PIECE, (piece, self._take_logprobs()))
            rest = self._take_logprobs()  # tokens whose text was held back (a stop string's start)
            if rest:
                self._post(PIECE, ("", rest))
            self._on_done(self._stream.result)  # even when nobody reads the events any more
            self._post(DONE, self._stream.result)
        except Exception as e:  # user errors become 4xx, anything else 500, in the app
            self._post(ERROR, e)

    def _take_logprobs(self):
        return self._stream.take_logprobs() if self._logprobs else None

    def _post(self, kind: str, value: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


class Worker:
    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgevlm-generate")
        self._lock = threading.Lock()
        self._pending = 0  # running + waiting
        self._jobs: set[Job] = set()

    @property
    def queue_depth(self) -> int:
        """Requests waiting behind the running one."""
        return max(self._pending - 1, 0)

    @property
    def busy(self) -> int:
        return min(self._pending, 1)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._pending > self.max_queue:
                raise QueueFull(f"the server is busy: {self.queue_depth} request(s) already wait "
                                f"(--max-queue {self.max_queue}); retry later", None, "queue_full")
            self._pending += 1
            self._jobs.add(job)
        self._pool.submit(self._run, job)

    def _run(self, job: Job) -> None:
        try:
            job.run()
        finally:
            with self._lock:
                self._pending -= 1
                self._jobs.discard(job)

    def close(self) -> None:
        """Cancel what is queued or running and wait for the thread to finish."""
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        self._pool.shutdown(wait=True, cancel_futures=False)
