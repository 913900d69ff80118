"""A terminal progress bar for long image operations; silent when not a TTY."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO


class Progress:
    """``with Progress(total, "converting") as p: p.advance(n)``.

    Draws at most once per ``interval`` seconds (ten times a second), only on
    a terminal, so scripts and logs see nothing.
    """

    def __init__(
        self,
        total: int,
        label: str,
        stream: TextIO | None = None,
        *,
        enabled: bool | None = None,
        interval: float = 0.1,
    ) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.interval = interval
        self.done = 0
        self._last = 0.0

    def __enter__(self) -> Progress:
        self._draw(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            if exc[0] is None:
                self.done = self.total
                self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()

    def advance(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        self._draw()

    def _draw(self, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        fraction = self.done / self.total
        width = 30
        filled = int(fraction * width)
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {fraction * 100:5.1f}%")
        self.stream.flush()


# The bar of the command running now, if any: long operations deep in a driver
# (qcow2's check walking its L2 tables) report through it without a parameter
# threaded through every call.
_current: ContextVar[Progress | None] = ContextVar("nbdserve_progress", default=None)


@contextmanager
def reporting(progress: Progress) -> Iterator[Progress]:
    """Make ``progress`` the bar that ``report`` updates, inside the block."""
    token = _current.set(progress)
    try:
        with progress:
            yield progress
    finally:
        _current.reset(token)


def report(done: int, total: int) -> None:
    """A long operation is ``done`` of ``total`` through; cheap when nobody shows it."""
    bar = _current.get()
    if bar is not None and total > 0:
        bar.done = min(bar.total, done * bar.total // total)
        bar._draw()


def part(start: int, span: int, total: int) -> Callable[[int, int], None]:
    """A ``(done, of)`` callback for one stage of a longer operation.

    The stage covers ``[start, start + span)`` of ``total`` units, so an
    operation made of several walks (FVD's bitmap, then its table) shows one
    bar that only moves forward.
    """

    def stage(done: int, of: int) -> None:
        report(start + span * min(done, of) // max(of, 1), total)

    return stage
