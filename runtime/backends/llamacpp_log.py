"""llama.cpp's log, given to the backend instance whose call produced it.

llama.cpp and its mtmd library keep one log callback per process (``llama_log_set`` and
``mtmd_helper_log_set`` store a function pointer and a user-data pointer in globals), so a log
cannot be bound to a model. This module installs one callback, once, and routes every message to
the ``LlamaLog`` of the instance whose llama.cpp call is running: the backend makes each call into
llama.cpp inside ``with its_log.active():``. A message is routed by the thread it arrives on (the
calling thread, where llama.cpp and mtmd log); one arriving on a thread with no active log goes to
the only log active in the process when there is exactly one, and is dropped otherwise (as is
everything logged outside a backend call, e.g. while an exporter quantises).

So one model's ``verbose`` prints that model's messages only, and ``last_error()`` holds the errors
of this model's current call, never another's. Code that calls ``llama_log_set`` itself (a raw
llama-cpp-python peer) replaces the callback for the whole process.
"""
from __future__ import annotations

import collections
import ctypes
import sys
import threading

GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5  # continues the previous message


class LlamaLog:
    """One backend instance's share of llama.cpp's log: the errors of its current call, and
    whether its messages are printed (on stderr)."""

    def __init__(self, verbose: bool = False, keep: int = 5):
        self.verbose = bool(verbose)
        self.errors: collections.deque[str] = collections.deque(maxlen=keep)
        self._level = 0

    def active(self) -> "_Active":
        """Context manager around a llama.cpp call: its messages come here."""
        return _Active(self)

    def write(self, level: int, msg: str) -> None:
        cont = level == GGML_LOG_LEVEL_CONT
        level = self._level if cont else level
        self._level = level
        if level == GGML_LOG_LEVEL_ERROR and msg.strip():
            if cont and self.errors:
                self.errors[-1] += msg.strip()
            else:
                self.errors.append(msg.strip())
        if self.verbose:
            sys.stderr.write(msg)
            sys.stderr.flush()

    def last_error(self) -> str:
        return "; ".join(self.errors) or "no details"


class _Router:
    """The one process-wide callback and, per thread, the stack of logs whose calls are running."""

    def __init__(self):
        self._lock = threading.Lock()
        self._stacks: dict[int, list[LlamaLog]] = {}
        self._callback = None  # keep a reference: llama.cpp holds the raw function pointer

    def install(self, llama_cpp, mtmd) -> None:
        with self._lock:
            if self._callback is not None:
                return
            self._callback = llama_cpp.llama_log_callback(self._dispatch)
            llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
            mtmd.mtmd_helper_log_set(self._callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()

    def push(self, log: LlamaLog) -> None:
        with self._lock:
            self._stacks.setdefault(threading.get_ident(), []).append(log)

    def pop(self) -> None:
        ident = threading.get_ident()
        with self._lock:
            stack = self._stacks[ident]
            stack.pop()
            if not stack:
                del self._stacks[ident]

    def running(self, log: LlamaLog) -> bool:
        """True while a call of ``log`` is running on this thread."""
        return log in self._stacks.get(threading.get_ident(), ())

    def target(self) -> LlamaLog | None:
        stack = self._stacks.get(threading.get_ident())
        if stack:
            return stack[-1]
        with self._lock:
            active = {id(s[-1]): s[-1] for s in self._stacks.values()}
        return next(iter(active.values())) if len(active) == 1 else None

    def _dispatch(self, level: int, text: bytes, _user) -> None:
        log = self.target()
        if log is not None:
            log.write(level, text.decode("utf-8", "replace") if text else "")


ROUTER = _Router()


class _Active:
    __slots__ = ("log",)

    def __init__(self, log: LlamaLog):
        self.log = log

    def __enter__(self) -> LlamaLog:
        if not ROUTER.running(self.log):  # a new call (not nested): its errors are the ones to report
            self.log.errors.clear()
        ROUTER.push(self.log)
        return self.log

    def __exit__(self, *exc: object) -> None:
        ROUTER.pop()


def install(llama_cpp, mtmd) -> None:
    """Route llama.cpp's and mtmd's log through ``ROUTER`` (once per process; also initialises llama.cpp)."""
    ROUTER.install(llama_cpp, mtmd)
