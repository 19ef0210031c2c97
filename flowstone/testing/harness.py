"""``ConcurrentHarness``: run an operation many times at once and report how it went.

    harness = ConcurrentHarness(threads=50, operations=lambda i: rt.materialize("daily", days[i]))
    report = await harness.run()
    assert report.metrics.failure_count == 0, report

``operations(i)`` is called for ``i`` in ``range(threads * repeat)``, at most
``threads`` at a time, on the running anyio backend (asyncio or trio). An ``async
def`` (or a function returning an awaitable) runs as a task; a plain function runs
in a worker thread, so ``threads`` real threads hammer it. Every call is timed; a
call that raises is a failure, counted by error type, and never stops the others.
"""

from __future__ import annotations

import inspect
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import anyio
import attrs

__all__ = ["ConcurrentHarness", "HarnessReport", "Latency", "Metrics"]

MAX_SAMPLES_PER_ERROR = 3


@attrs.frozen
class Latency:
    """Per-operation wall time in milliseconds (nearest-rank percentiles)."""

    p50: float
    p95: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, samples: list[float]) -> Latency:
        if not samples:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0)
        ordered = sorted(samples)

        def rank(p: float) -> float:
            return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

        return cls(rank(50), rank(95), rank(99), ordered[-1], sum(ordered) / len(ordered))


@attrs.frozen
class Metrics:
    success_count: int
    failure_count: int
    total_operations: int
    elapsed_s: float
    latency_ms: Latency

    @property
    def operations_per_second(self) -> float:
        return self.total_operations / self.elapsed_s if self.elapsed_s > 0 else 0.0


@attrs.frozen
class HarnessReport:
    """What a harness run did. ``errors``: count per error type name;
    ``error_samples``: the first few messages of each type."""

    metrics: Metrics
    errors: Mapping[str, int]
    error_samples: Mapping[str, tuple[str, ...]]

    @property
    def ok(self) -> bool:
        return self.metrics.failure_count == 0

    def __str__(self) -> str:
        m, lat = self.metrics, self.metrics.latency_ms
        lines = [
            f"{m.total_operations} operations in {m.elapsed_s:.3f}s ({m.operations_per_second:,.0f}/s): "
            f"{m.success_count} succeeded, {m.failure_count} failed",
            f"latency ms: p50 {lat.p50:.3f}  p95 {lat.p95:.3f}  p99 {lat.p99:.3f}  max {lat.max:.3f}",
        ]
        for name, count in sorted(self.errors.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {count} x {name}: {' | '.join(self.error_samples.get(name, ()))}")
        return "\n".join(lines)


class ConcurrentHarness:
    """``ConcurrentHarness(threads=N, operations=fn, repeat=1)``; ``await harness.run()``."""

    def __init__(
        self, threads: int, operations: Callable[[int], Any], *, repeat: int = 1, timeout: float | None = None
    ) -> None:
        if type(threads) is not int or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        if type(repeat) is not int or repeat < 1:
            raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
        if not callable(operations):
            raise TypeError(f"operations must be callable, got {operations!r}")
        self.threads = threads
        self.operations = operations
        self.repeat = repeat
        self.timeout = timeout
        """Seconds for the whole run; on expiry the operations still running are
        cancelled and counted as failures (``TimeoutError``)."""

    async def run(self) -> HarnessReport:
        total = self.threads * self.repeat
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        samples: dict[str, list[str]] = {}
        is_async = inspect.iscoroutinefunction(self.operations)
        limiter = anyio.CapacityLimiter(self.threads)
        pending = iter(range(total))
        finished = 0

        def failed(error: BaseException) -> None:
            name = type(error).__name__
            errors[name] += 1
            if len(samples.setdefault(name, [])) < MAX_SAMPLES_PER_ERROR:
                samples[name].append(str(error) or name)

        async def one(index: int) -> None:
            nonlocal finished
            began = time.perf_counter()
            try:
                if is_async:
                    await self.operations(index)
                else:
                    result = await anyio.to_thread.run_sync(self.operations, index, limiter=limiter)
                    if inspect.isawaitable(result):
                        await result
            except Exception as error:
                failed(error)
            # Cancelled (the timeout): not finished; counted below with those never started.
            latencies.append((time.perf_counter() - began) * 1000)
            finished += 1

        async def worker() -> None:
            for index in pending:  # the workers share one iterator: at most `threads` at once
                await one(index)

        start = time.perf_counter()
        with anyio.move_on_after(self.timeout) if self.timeout is not None else nullcontext() as scope:
            async with anyio.create_task_group() as tasks:
                for _ in range(min(self.threads, total)):
                    tasks.start_soon(worker)
        elapsed = time.perf_counter() - start
        if scope is not None and scope.cancelled_caught:
            late = total - finished
            errors["TimeoutError"] += late
            samples.setdefault("TimeoutError", [f"{late} operations did not finish within {self.timeout}s"])
            finished = total
        failures = sum(errors.values())
        return HarnessReport(
            metrics=Metrics(
                success_count=total - failures,
                failure_count=failures,
                total_operations=total,
                elapsed_s=elapsed,
                latency_ms=Latency.of(latencies),
            ),
            errors=dict(errors),
            error_samples={name: tuple(found) for name, found in samples.items()},
        )

