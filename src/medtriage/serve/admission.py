"""Bounded work for the HTTP service: at most `workers` requests decode and score at once, at most `queue`
more wait (their bodies already streamed to temporary files); beyond that a request is answered
`503 Service Unavailable` with `Retry-After` at once, before its body is read. Memory and latency then
stay bounded whatever the clients do.

Also where the service gives memory back: glibc keeps freed heap pages of large decodes in per-thread
arenas; `release_memory` returns them to the system after a large request (malloc_trim), and
`tune_allocator` caps the arenas and fixes the mmap threshold so buffers of many MB are mapped and
unmapped instead of fragmenting the heap. Both are no-ops off glibc.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import threading
from collections import deque
from contextlib import asynccontextmanager

log = logging.getLogger(__name__)
DEFAULT_QUEUE = 64
RETRY_AFTER_S = 2
LARGE_REQUEST = 4 * 1024 * 1024  # bytes: a request this large is followed by a malloc_trim
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # mallopt parameters (glibc malloc.h)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class Admission:
    """Counts requests in the system (waiting or working) and hands out `workers` working slots."""

    def __init__(self, workers: int | None = None, queue: int = DEFAULT_QUEUE):
        self.workers = workers or default_workers()
        self.capacity = self.workers + max(0, queue)
        self.in_system = 0
        self.refused = 0
        self._slots = Slots(self.workers)
        self._lock = threading.Lock()  # the app may be served by more than one event loop, each in its thread

    def try_enter(self) -> bool:
        with self._lock:
            if self.in_system >= self.capacity:
                self.refused += 1
                return False
            self.in_system += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.in_system -= 1

    @asynccontextmanager
    async def slot(self):
        """One of the `workers` working slots, waited for in arrival order."""
        await self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()

    def retry_after(self) -> str:
        return str(RETRY_AFTER_S)


class Slots:
    """`count` slots handed out in arrival order to tasks of any event loop. An asyncio.Semaphore binds itself to the
    first loop that waits on it, and the same app is served on a new loop after a server restart (or in each test)."""

    def __init__(self, count: int):
        self._free = count
        self._waiting: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._lock = threading.Lock()

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return
            turn = loop.create_future()
            self._waiting.append((loop, turn))
        try:
            await turn
        except asyncio.CancelledError:
            with self._lock:
                queued = (loop, turn) in self._waiting
                if queued:
                    self._waiting.remove((loop, turn))
            if not queued and not turn.cancelled():  # the slot was handed to it already: pass it on
                self.release()
            raise

    def release(self) -> None:
        with self._lock:
            while self._waiting:
                loop, turn = self._waiting.popleft()
                try:  # the future is its loop's: only that loop may resolve it
                    loop.call_soon_threadsafe(self._hand_over, turn)
                    return
                except RuntimeError:  # its loop is closed, and the waiter with it
                    continue
            self._free += 1

    def _hand_over(self, turn: asyncio.Future) -> None:
        if turn.cancelled():  # its task was cancelled meanwhile: the slot goes to the next in line
            self.release()
        else:
            turn.set_result(None)


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def tune_allocator(arenas: int = 2, mmap_threshold: int = 1 << 20) -> bool:
    """Cap glibc's malloc arenas and fix the mmap threshold (the dynamic one climbs to 32 MB after the first
    large free, after which every decode buffer lands in a fragmenting heap). True when applied."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_ARENA_MAX, arenas)) and bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))


def release_memory() -> None:
    """Give freed heap pages back to the system (glibc malloc_trim)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
