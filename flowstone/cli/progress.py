"""Progress of a backfill or a run, driven by the runtime's events.

On a terminal it is a live bar (rich): done out of total, failed, skipped, rate
and time left. Anywhere else (a pipe, a log file, CI) it is a plain line at most
every ``LINE_SECONDS`` and one at the end, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["LINE_SECONDS", "ProgressView"]

LINE_SECONDS = 2.0


class ProgressView:
    """One task's counts, shown as a bar on a terminal or as lines otherwise."""

    def __init__(self, title: str, total: int, unit: str, *, quiet: bool = False) -> None:
        self.title = title
        self.total = total
        self.unit = unit
        self.done = self.failed = self.skipped = 0
        self.started = time.monotonic()
        self._quiet = quiet
        self._last_line = 0.0
        self._bar: Any = None
        self._task: Any = None
        if not quiet and sys.stdout.isatty():
            self._start_bar()

    def _start_bar(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed[/] {task.fields[skipped]} skipped"),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )
        self._bar.start()
        self._task = self._bar.add_task(self.title, total=self.total, failed=0, skipped=0, rate="")

    def update(self, *, done: int, failed: int, skipped: int | None = None) -> None:
        self.done, self.failed = done, failed
        if skipped is not None:
            self.skipped = skipped
        if self._quiet:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=done + failed, failed=failed, skipped=self.skipped,
                             rate=f"{self.rate():,.1f}/s")
        elif time.monotonic() - self._last_line >= LINE_SECONDS:
            self._line()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.done + self.failed) / elapsed if elapsed > 0 else 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif not self._quiet:
            self._line()

    def _line(self) -> None:
        self._last_line = time.monotonic()
        finished = self.done + self.failed
        rate = self.rate()
        left = (self.total - finished) / rate if rate > 0 and finished < self.total else 0.0
        print(
            f"{self.title}: {finished}/{self.total} {self.unit} ({self.skipped} skipped), {self.failed} failed, "
            f"{rate:,.1f}/s, ETA {_clock(left)}",
            flush=True,
        )


def _clock(seconds: float) -> str:
    whole = int(seconds + 0.5)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
