"""A ``flowstone`` command run as a real process, whose log lines (stderr) a test
waits for: synchronising on what the process says it did, never on time."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

LINE_SECONDS = 60.0
"""How long a test waits for a process to say something (generous: a loaded machine)."""


class Followed:
    """``python -m flowstone *args`` in ``folder``; its stderr lines read as they come."""

    def __init__(self, folder: Path, env: dict[str, str], *args: str, stdout: int = subprocess.DEVNULL) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "flowstone", *args], cwd=folder, env=env,
                                        stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        """The next ``count`` lines matching ``pattern`` (lines before them are kept in ``seen``)."""
        found: list[re.Match[str]] = []
        while len(found) < count:
            try:
                line = self.lines.get(timeout=LINE_SECONDS)
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in {LINE_SECONDS:g}s; seen: {self.seen}") from None
            if line is None:
                raise AssertionError(f"the process ended before saying {pattern!r}; seen: {self.seen}")
            self.seen.append(line)
            if match := re.search(pattern, line):
                found.append(match)
        return found

    def wait_for_all(self, *patterns: str) -> dict[str, re.Match[str]]:
        """The first line matching each of ``patterns``, in whatever order they come."""
        found: dict[str, re.Match[str]] = {}
        while len(found) < len(patterns):
            [line] = [m.string for m in self.wait_for(r".")]
            for pattern in patterns:
                if pattern not in found and (match := re.search(pattern, line)):
                    found[pattern] = match
        return found

    def rest(self) -> list[str]:
        """Every line until the process ends."""
        lines = []
        while (line := self.lines.get(timeout=LINE_SECONDS)) is not None:
            lines.append(line)
        self.seen += lines
        return lines

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` if it still runs; its exit code once its pipes are read to the end."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=LINE_SECONDS)
        self.reader.join(timeout=LINE_SECONDS)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        return code
