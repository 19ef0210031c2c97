"""``assert_performance``: fail a test when a piece of code gets slower or hungrier.

    assert_performance(lambda: plan(graph), max_time_ms=5)
    await assert_performance(lambda: rt.materialize("report"), max_time_ms=50, max_memory_bytes=2_000_000)

Wall time is ``time.perf_counter``; memory is the peak of what Python allocated
while ``fn`` ran, traced with ``tracemalloc`` (C libraries that allocate outside
Python's allocator, such as Arrow's buffers, are not seen). Tracing slows the
code it watches, so time is measured on a separate, untraced call when both are
asked for. With ``repeat`` > 1 the best time counts (the least disturbed run).
A function that returns an awaitable (an ``async def``) makes this return one:
``await`` it.
"""

from __future__ import annotations

import inspect
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs

__all__ = ["Measurement", "PerformanceError", "assert_performance"]


class PerformanceError(AssertionError):
    """A measured time or memory went over its limit (the message says by how much)."""


@attrs.frozen
class Measurement:
    time_ms: float
    peak_memory_bytes: int | None


def assert_performance(
    fn: Callable[[], Any],
    *,
    max_time_ms: float | None = None,
    max_memory_bytes: int | None = None,
    repeat: int = 1,
    label: str | None = None,
) -> Any:
    """Run ``fn`` and raise ``PerformanceError`` if it was over a limit; the ``Measurement``."""
    if max_time_ms is None and max_memory_bytes is None:
        raise ValueError("give max_time_ms, max_memory_bytes, or both")
    if type(repeat) is not int or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
    name: str = label or getattr(fn, "__qualname__", None) or repr(fn)
    if inspect.iscoroutinefunction(fn):
        return _measure_async(fn, max_time_ms, max_memory_bytes, repeat, name)
    best, peak = None, None
    for _ in range(repeat if max_time_ms is not None else 0):
        began = time.perf_counter()
        result = fn()
        if inspect.isawaitable(result):
            raise TypeError(f"{name} returned an awaitable: pass an async def (and await assert_performance)")
        best = _fastest(best, (time.perf_counter() - began) * 1000)
    if max_memory_bytes is not None:
        with _traced() as traced:
            fn()
        peak = traced[0]
    return _verdict(name, best, peak, max_time_ms, max_memory_bytes)


async def _measure_async(
    fn: Callable[[], Any], max_time_ms: float | None, max_memory_bytes: int | None, repeat: int, name: str
) -> Measurement:
    best, peak = None, None
    for _ in range(repeat if max_time_ms is not None else 0):
        began = time.perf_counter()
        await fn()
        best = _fastest(best, (time.perf_counter() - began) * 1000)
    if max_memory_bytes is not None:
        with _traced() as traced:
            await fn()
        peak = traced[0]
    return _verdict(name, best, peak, max_time_ms, max_memory_bytes)


@contextmanager
def _traced() -> Iterator[list[int]]:
    """Trace allocations in the block; afterwards the list holds the peak above the start."""
    already = tracemalloc.is_tracing()
    if not already:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    peak: list[int] = []
    try:
        yield peak
        peak.append(tracemalloc.get_traced_memory()[1] - base)
    finally:
        if not already:
            tracemalloc.stop()


def _fastest(best: float | None, sample: float) -> float:
    return sample if best is None else min(best, sample)


def _verdict(
    name: str, time_ms: float | None, peak: int | None, max_time_ms: float | None, max_memory_bytes: int | None
) -> Measurement:
    problems = []
    if max_time_ms is not None and time_ms is not None and time_ms > max_time_ms:
        over = time_ms - max_time_ms
        problems.append(f"took {time_ms:.3f} ms, over the limit of {max_time_ms:g} ms by {over:.3f} ms")
    if max_memory_bytes is not None and peak is not None and peak > max_memory_bytes:
        problems.append(
            f"peaked at {peak:,} bytes of traced memory, over the limit of {max_memory_bytes:,} "
            f"by {peak - max_memory_bytes:,}"
        )
    if problems:
        raise PerformanceError(f"{name} " + "; and ".join(problems))
    return Measurement(time_ms=time_ms if time_ms is not None else 0.0, peak_memory_bytes=peak)
