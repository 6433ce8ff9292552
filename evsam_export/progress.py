"""Progress for long work: rich bars on a terminal, plain timestamped lines in CI or when piped.

Every long command ends with one summary line per artifact: status, time, path, size.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def human_size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


@dataclass
class SummaryLine:
    status: str  # ok | warn | fail | skip | kit | reused
    seconds: float
    path: str
    size_bytes: int | None
    note: str = ""

    def render(self) -> str:
        size = human_size(self.size_bytes) if self.size_bytes is not None else "-"
        text = f"{self.status.upper():<6} {self.seconds:7.1f}s  {self.path}  {size}"
        return f"{text}  {self.note}" if self.note else text


class Reporter:
    """Steps with progress; `interactive` picks rich bars (a terminal, not CI) or plain lines."""

    def __init__(self, interactive: bool | None = None, stream=None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        if interactive is None:
            interactive = self.stream.isatty() and not os.environ.get("CI")
        self.interactive = interactive
        self.quiet = quiet
        self.summary: list[SummaryLine] = []
        self._start = time.perf_counter()

    def line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    @contextmanager
    def step(self, description: str):
        """A unit of work with a spinner (terminal) or start/done lines (CI)."""
        started = time.perf_counter()
        if self.interactive and not self.quiet:
            from rich.console import Console

            console = Console(file=self.stream)
            with console.status(description):
                yield
            console.print(f"[green]✓[/] {description} ({time.perf_counter() - started:.1f}s)")
        else:
            self.line(f"[{time.perf_counter() - self._start:6.1f}s] {description} ...")
            yield
            self.line(f"[{time.perf_counter() - self._start:6.1f}s] {description}: done in {time.perf_counter() - started:.1f}s")

    def track(self, items, description: str, total: int | None = None):
        """Iterate with a progress bar with ETA (terminal) or one line per 10 % with ETA (CI); a generator streams
        when `total` is given."""
        items = list(items) if total is None else items
        total = len(items) if total is None else total
        if self.interactive and not self.quiet:
            from rich.progress import track

            yield from track(items, description=description, total=total, console=None, transient=True)
            return
        every = max(1, total // 10)
        started = time.perf_counter()
        for index, item in enumerate(items, 1):
            yield item
            if index % every == 0 or index == total:
                now = time.perf_counter()
                eta = f", ETA {(now - started) / index * (total - index):.0f}s" if index < total else ""
                self.line(f"[{now - self._start:6.1f}s] {description}: {index}/{total}{eta}")

    def artifact(self, status: str, seconds: float, path: Path | str, note: str = "", size_bytes: int | None = None) -> None:
        path = Path(path)
        size = size_bytes
        if size is None and path.is_file():
            size = path.stat().st_size
        elif size is None and path.is_dir():
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        self.summary.append(SummaryLine(status, seconds, str(path), size, note))

    def print_summary(self) -> None:
        for entry in self.summary:
            self.line(entry.render())
