"""The server's gate: calls in flight counted, refused once closing; and its memory budget:
requests admitted while their estimated peak memory fits, with freed memory given back to
the system at once so that the process's RSS follows what is admitted.

``Gate`` is a gRPC interceptor in front of every service but health and reflection. Stopping
closes it (new calls get UNAVAILABLE, so a client retries another replica) and waits for the
calls in flight to finish (``wait_settled``). (A model reload needs no gate: each call
borrows its batcher from the repository, ``camserve.server.repository``.)
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import threading
import time
from collections.abc import Iterator

import grpc

from camserve.errors import LimitError
from camserve.explain.budget import Estimate
from camserve.server.security import is_open, refusal

log = logging.getLogger("camserve.server")
MIB = 1024 * 1024

SETTLE_SECONDS = 0.1  # on stop: quiet time that proves no admitted call is still queued


class Gate(grpc.ServerInterceptor):
    """Counts the calls in flight and, once closed, answers new ones UNAVAILABLE. Health and reflection pass untouched, so probes see NOT_SERVING."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._hurry = False
        self._active = 0  # calls in flight
        self._started = 0  # calls that reached a worker, ever

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or is_open(handler_call_details.method):
            return handler
        with self._cond:
            refuse = not self._open
        if refuse:
            return refusal(handler, grpc.StatusCode.UNAVAILABLE,
                           "the server is shutting down; retry with another replica")
        return self._counted(handler)

    def _enter(self) -> None:
        with self._cond:
            self._started += 1
            self._active += 1

    def _leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def _counted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.response_streaming:
            inner = handler.unary_stream or handler.stream_stream

            def behavior(request, context):
                self._enter()
                try:
                    yield from inner(request, context)
                finally:
                    self._leave()
        else:
            inner = handler.unary_unary or handler.stream_unary

            def behavior(request, context):
                self._enter()
                try:
                    return inner(request, context)
                finally:
                    self._leave()

        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return make(behavior, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._active

    def close(self) -> None:
        """Refuse every new call from now on."""
        with self._cond:
            self._open = False

    def drain(self, seconds: float) -> None:
        """Keep taking calls for ``seconds`` (or until ``hurry``): health already says
        NOT_SERVING, and a load balancer stops sending calls before ``close`` refuses them."""
        with self._cond:
            self._cond.wait_for(lambda: self._hurry, max(0.0, seconds))

    def hurry(self) -> None:
        """Stop waiting for calls in flight (a second stop signal)."""
        with self._cond:
            self._hurry = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight; False when ``timeout`` seconds passed first or
        ``hurry`` was called."""
        with self._cond:
            return self._cond.wait_for(lambda: self._hurry or not self._active,
                                       timeout) and not self._hurry

    def wait_settled(self, timeout: float, settle: float = SETTLE_SECONDS) -> bool:
        """``wait_idle``, and then idle for ``settle`` seconds on end: a call that passed the
        gate before it closed but still waited for a worker thread is not counted yet, and
        stopping the gRPC server under it would cancel it (CANCELLED). False as for
        ``wait_idle``."""
        deadline = time.monotonic() + timeout
        while self.wait_idle(max(0.0, deadline - time.monotonic())):
            with self._cond:
                started = self._started
            time.sleep(max(0.0, min(settle, deadline - time.monotonic())))
            with self._cond:
                if self._started == started:
                    return True
        return False


def physical_memory() -> int | None:
    """Bytes of physical memory (os.sysconf), None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


# with onnxruntime's CPU arena, the most of the budget the arena may come to hold: the rest
# stays for what requests hold themselves (decoded frames, NumPy copies, messages)
ARENA_SHARE = 0.5


class MemoryBudget:
    """Admits requests while their estimated peak memory (``budget.Estimate``) fits in
    ``limit`` bytes (None: no budget); ``admit`` raises LimitError (RESOURCE_EXHAUSTED) at
    once, with the numbers, for one that does not fit now.

    With ``arena_kept`` (onnxruntime's CPU arena on), the graph part of an estimate is not
    given back when the request ends: the arena keeps it for later runs. The budget then
    counts the arena's high-water mark (the most graph memory ever in flight at once) as
    held for good, and lets it grow to ``ARENA_SHARE`` of the limit at most, so that
    requests needing host memory (large frames) always keep the other part. Without the
    arena both parts go back when the request ends."""

    def __init__(self, limit: int | None, arena_kept: bool = False) -> None:
        self.limit = limit
        self.arena_kept = arena_kept
        self._lock = threading.Lock()
        self.host_in_flight = 0  # bytes admitted and not yet released, by part
        self.graph_in_flight = 0
        self.arena_held = 0  # with arena_kept: the most graph memory ever in flight at once

    @property
    def in_flight(self) -> int:
        """Bytes admitted and not yet released (both parts)."""
        return self.host_in_flight + self.graph_in_flight

    @classmethod
    def from_mb(cls, mb: float | None, arena_kept: bool = False) -> MemoryBudget:
        """``--max-inflight-mb``: None -> a quarter of physical memory, 0 -> no budget. With
        a budget, freed memory goes back to the system at once (``return_freed_memory``)."""
        if mb is None:
            memory = physical_memory()
            budget = cls(memory // 4 if memory else None, arena_kept)
        else:
            budget = cls(round(mb * MIB) if mb > 0 else None, arena_kept)
        if budget.limit is not None:
            return_freed_memory()
        return budget

    @contextlib.contextmanager
    def admit(self, estimate: Estimate) -> Iterator[None]:
        if self.limit is None:
            yield
            return
        with self._lock:
            graph = self.graph_in_flight + estimate.graph
            held = max(self.arena_held, graph) if self.arena_kept else graph
            arena_limit = self.limit * ARENA_SHARE if self.arena_kept else self.limit
            if self.host_in_flight + estimate.host + held > self.limit or held > arena_limit:
                raise LimitError(self._refusal(estimate))
            self.host_in_flight += estimate.host
            self.graph_in_flight = graph
            self.arena_held = held if self.arena_kept else 0
        try:
            yield
        finally:
            with self._lock:
                self.host_in_flight -= estimate.host
                self.graph_in_flight -= estimate.graph

    def _refusal(self, estimate: Estimate) -> str:
        """Why ``estimate`` does not fit now (or ever), with the numbers."""
        assert self.limit is not None
        message = (f"the request needs about {estimate.total / MIB:.1f} MiB (estimated) and "
                   f"{self.in_flight / MIB:.1f} MiB are in use by requests in flight")
        if self.arena_kept:
            message += (f", {self.arena_held / MIB:.1f} MiB held by onnxruntime's CPU arena "
                        f"(at most {ARENA_SHARE:.0%} of the budget)")
        message += f"; the server's budget is {self.limit / MIB:.1f} MiB (--max-inflight-mb)"
        never = estimate.total > self.limit or (
            self.arena_kept and estimate.graph > self.limit * ARENA_SHARE)
        if never:
            message += (": this request never fits; send a smaller image or fewer smoothing "
                        "samples or targets" + (", or serve with --no-cpu-arena"
                                                if self.arena_kept else ""))
        return message


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
RETURN_ABOVE_BYTES = 1024 * 1024  # blocks from this size on are mapped, and unmapped on free


def return_freed_memory() -> bool:
    """Make glibc's malloc give memory back to the system as soon as it is freed: blocks of
    ``RETURN_ABOVE_BYTES`` and more are mapped on their own, and a heap's free top beyond
    that is trimmed. glibc's own thresholds rise with the blocks a program frees (up to
    32 MiB mapped, 64 MiB kept untrimmed), per worker thread's arena: under a burst of large
    requests the server then kept hundreds of MiB it no longer used, beyond what the budget
    admits. False where the C library has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, RETURN_ABOVE_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, RETURN_ABOVE_BYTES))


TRIM_DELAY_S = 0.5  # long enough for the call that dropped the last reference to return
_trim_lock = threading.Condition()
_trim_at: float | None = None  # when the trimming thread trims next (None: nothing asked)


def trim_freed_memory_soon() -> None:
    """``trim_freed_memory`` on a thread of its own, ``TRIM_DELAY_S`` after the last of the
    calls to this made in a row: the thread that releases a swapped-out model still holds
    it until its call returns, and only then is the model's memory free."""
    global _trim_at
    with _trim_lock:
        start = _trim_at is None
        _trim_at = time.monotonic() + TRIM_DELAY_S
        _trim_lock.notify_all()
    if start:
        threading.Thread(target=_trim_when_due, daemon=True, name="trim-freed-memory").start()


def _trim_when_due() -> None:
    global _trim_at
    with _trim_lock:
        while _trim_at is not None and (wait := _trim_at - time.monotonic()) > 0:
            _trim_lock.wait(wait)
        _trim_at = None
    trim_freed_memory()


def trim_freed_memory() -> bool:
    """Give the pages malloc holds free back to the system now (glibc's ``malloc_trim``),
    in every thread's heap, not only at its top: after a model set is swapped out its
    sessions' many small blocks leave free pages in the middle of the heaps, which trimming
    at the top (``return_freed_memory``) does not reach. False where there is no
    ``malloc_trim`` (not glibc)."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    gc.collect()  # sessions held in reference cycles go now, not at the next collection
    return bool(malloc_trim(0))
