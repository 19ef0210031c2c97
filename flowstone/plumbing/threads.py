"""Plain functions run in daemon threads of FlowStone's own.

A thread cannot be killed. When a run is cancelled or times out while a plain
function is still running, the runtime stops waiting for it and records the
outcome, and the thread goes on until the function returns. anyio's worker
threads on asyncio are not daemons: the interpreter joins them at exit, so a
function that never returns would keep a finished program from exiting. These
threads are daemons: exit never waits for them (a function still running then is
stopped with the process, as any daemon thread is).

Idle threads are reused and end after ``IDLE_SECONDS`` without work.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import queue
import threading
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import anyio

__all__ = ["IDLE_SECONDS", "run_sync"]

IDLE_SECONDS = 10.0

_lock = threading.Lock()
_idle: list[_Worker] = []


class _Worker(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="flowstone worker", daemon=True)
        self.jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with _lock:
                    if self in _idle:
                        _idle.remove(self)
                        return
                continue  # taken for a job just now: it is on its way
            job()
            del job  # hold nothing of a finished call while idle
            with _lock:
                _idle.append(self)


def _worker() -> _Worker:
    with _lock:
        if _idle:
            return _idle.pop()
    worker = _Worker()
    worker.start()
    return worker


os.register_at_fork(after_in_child=_idle.clear)  # a forked child has none of these threads


def _waker() -> Callable[[Callable[[], object]], object]:
    """How another thread schedules a callback on the running event loop, without waiting."""
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:  # not asyncio: trio
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon


async def run_sync(fn: Callable[..., Any], *args: Any, limiter: anyio.CapacityLimiter | None = None) -> Any:
    """``fn(*args)`` in a daemon worker thread, in a copy of the caller's context
    (so the tenant scope holds there). Cancelling the caller abandons the call: it
    returns at once and the thread finishes the function on its own."""
    async with limiter if limiter is not None else nullcontext():
        done = anyio.Event()
        wake = _waker()
        outcome: list[Any] = []
        context = contextvars.copy_context()

        def job() -> None:
            try:
                outcome.append((True, context.run(fn, *args)))
            except BaseException as error:
                outcome.append((False, error))
            try:
                wake(done.set)
            except Exception:  # the caller's event loop is gone: nobody waits any more
                pass

        _worker().jobs.put(job)
        await done.wait()
    ok, value = outcome[0]
    if ok:
        return value
    try:
        raise value
    finally:
        del value
