"""Prefetcher: copy a backing image into the top layer in the background.

Design notes
------------
One loop, not a web of callbacks (architecture 2.5; the behaviour of QEMU's
``block/fvd-prefetch.c``).  The loop walks the disk in ascending order,
``bytes_per_prefetch`` at a time, asking the target for the next range that
is still missing (:meth:`PrefetchTarget.prefetch_next`).  Each range is
copied by a worker task: read from the base, then a *soft* store that the
target re-checks under its range lock, so a client write that landed in the
meantime always wins.  At most ``num_prefetch_slots`` workers run at once
(a ``Semaphore``: a slot is taken by the loop and given back by the worker).

Guests come first.  The target counts in-flight guest requests (the driver,
not the ``BlockDevice``, sees every request, including those of prefetch
itself, which it does not count); before every request the loop waits until
no guest request is in flight.

Adaptive speed.  Every completed request yields a read sample (bytes, time
to read from the base) and a write sample (bytes, time to store).  The
moving averages are time-weighted over the measure windows: the bytes of
the samples completed in the window divided by the time those requests
took.  That is the speed one request gets, which is what falls when the
base's network or disk or the image's disk is contended, and it does not
fall just because prefetch itself paused.  When either average is below its
minimum, the loop sleeps a random time in ``[0, throttle_time]``.  The
maximums cap the aggregate rate with a token bucket: a request is not
started before ``bytes_issued / max_rate`` seconds after the start.

Errors are advisory (nbdkit readahead): an expected ``BlockError`` is logged,
the state becomes ``DISABLED`` and the loop ends; guests never see it.
Anything else is a bug and propagates into the owner's nursery.

Progress is made durable through :meth:`PrefetchTarget.prefetch_checkpoint`
at least every ``checkpoint_interval`` seconds while copying (and every
``checkpoint_bytes``, and at the end), so ``img info`` run next to the server
shows it and a restart does not copy again.  The checkpoint is the target's
commit: data synced first, then the metadata that points at it.  On
completion the target marks itself complete (FVD ``base_img_fully_prefetched``).
"""

from __future__ import annotations

import enum
import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import trio

from nbdserve.errors import BlockError

LOGGER = logging.getLogger(__name__)

KIB = 1024
# seconds of copying the exported copy rate averages over: long enough to smooth
# out pauses and bursts of slots, short enough to follow a change of pace
RATE_WINDOW = 5.0


class PrefetchState(enum.Enum):
    WAITING = "waiting"  # before the start delay has passed
    RUNNING = "running"
    PAUSED = "paused"  # throttled: contention detected
    DONE = "done"
    DISABLED = "disabled"  # never started, or stopped by an error


_COPYING = frozenset({PrefetchState.RUNNING, PrefetchState.PAUSED})


@dataclass(frozen=True, slots=True)
class PrefetchSettings:
    """The knobs, in the FVD header's units (seconds, KiB/s, ms)."""

    start_delay: float = -1.0  # negative: never
    slots: int = 2
    bytes_per_prefetch: int = 1024 * 1024
    min_read_throughput: int = 1024  # KiB/s; 0 disables the check
    max_read_throughput: int = 0  # KiB/s; 0: no cap
    min_write_throughput: int = 1024
    max_write_throughput: int = 0
    throttle_time: int = 1000  # ms
    read_measure_time: int = 1000  # ms
    write_measure_time: int = 1000  # ms
    report_interval: float = 10.0  # s between progress log lines
    checkpoint_bytes: int = 64 * 1024 * 1024
    # an fsync a second costs little next to the copy; longer leaves img info stale
    checkpoint_interval: float = 1.0  # s


@dataclass(frozen=True, slots=True)
class PrefetchStatistics:
    state: str
    bytes_copied: int
    bytes_skipped: int
    bytes_done: int  # in the image now (copied by anyone)
    bytes_total: int
    read_throughput: float  # KiB/s, moving average
    write_throughput: float
    pauses: int
    requests: int
    copy_rate: float = 0.0  # bytes/s stored over the last RATE_WINDOW (pauses included)


class PrefetchTarget(Protocol):
    """What the prefetcher needs from the layer it fills."""

    async def prefetch_next(self, start: int, max_length: int) -> tuple[int, int] | None:
        """The next missing range at or after ``start`` (offset, length), or None."""

    async def prefetch_read(self, offset: int, buf: memoryview) -> None:
        """Read base data for ``[offset, offset + len(buf))``."""

    async def prefetch_store(self, offset: int, data: memoryview) -> int:
        """Store what is still missing of the range; return the bytes stored."""

    async def wait_guest_idle(self) -> None:
        """Return once no guest request is in flight."""

    async def prefetch_checkpoint(self) -> None:
        """Make the progress so far durable."""

    async def prefetch_complete(self) -> None:
        """Everything is copied: record that the base is no longer needed."""

    def prefetch_progress(self) -> tuple[int, int]:
        """(bytes in the image, bytes of base to copy in total)."""


class _Throughput:
    """Time-weighted moving average over a window of completed requests.

    Running sums keep each query O(expired samples), not O(window).
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self._samples: deque[tuple[float, int, float]] = deque()
        self._bytes = 0
        self._duration = 0.0

    def add(self, now: float, nbytes: int, duration: float) -> None:
        self._samples.append((now, nbytes, duration))
        self._bytes += nbytes
        self._duration += duration
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window:
            _, nbytes, duration = self._samples.popleft()
            self._bytes -= nbytes
            self._duration -= duration
        if not self._samples:
            self._bytes, self._duration = 0, 0.0

    def kib_per_s(self, now: float) -> float | None:
        """The average, or None with no sample in the window."""
        self._expire(now)
        if not self._samples:
            return None
        if self._duration <= 1e-12:
            return float("inf")
        return self._bytes / self._duration / KIB


class _Rate:
    """Bytes per second of wall-clock time over the last ``window`` seconds.

    Unlike ``_Throughput`` (the speed one request gets, which the pacing
    compares with the minimums), this counts pauses and idle slots: it is the
    rate an operator divides the remaining bytes by.
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self.started: float | None = None
        self._samples: deque[tuple[float, int]] = deque()
        self._bytes = 0

    def add(self, now: float, nbytes: int) -> None:
        self._samples.append((now, nbytes))
        self._bytes += nbytes
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window:
            self._bytes -= self._samples.popleft()[1]

    def per_second(self, now: float) -> float:
        if self.started is None:
            return 0.0
        self._expire(now)
        # right after the start the window is not full yet: divide by what passed,
        # but by a second at least (one quick first request is no rate)
        span = min(self.window, max(1.0, now - self.started))
        return self._bytes / span


class Prefetcher:
    """Copies every missing range of ``target`` from its base, adaptively."""

    def __init__(
        self, target: PrefetchTarget, settings: PrefetchSettings, *, name: str = ""
    ) -> None:
        self.target = target
        self.settings = settings
        self.name = name
        self.state = PrefetchState.WAITING if settings.start_delay >= 0 else PrefetchState.DISABLED
        self.bytes_copied = 0
        self.bytes_skipped = 0
        self.pauses = 0
        self.requests = 0
        self._read_tp = _Throughput(max(settings.read_measure_time, 1) / 1000)
        self._write_tp = _Throughput(max(settings.write_measure_time, 1) / 1000)
        self._rate = _Rate(RATE_WINDOW)
        self._bucket_start = 0.0
        self._bytes_issued = 0
        self._since_checkpoint = 0
        self._last_checkpoint = 0.0
        self._random = random.Random()
        self.done = trio.Event()

    # ---- statistics -------------------------------------------------------------

    def statistics(self) -> PrefetchStatistics:
        now = trio.current_time()
        done, total = self.target.prefetch_progress()
        return PrefetchStatistics(
            state=self.state.value,
            bytes_copied=self.bytes_copied,
            bytes_skipped=self.bytes_skipped,
            bytes_done=done,
            bytes_total=total,
            read_throughput=self._read_tp.kib_per_s(now) or 0.0,
            write_throughput=self._write_tp.kib_per_s(now) or 0.0,
            pauses=self.pauses,
            requests=self.requests,
            # once stopped nothing is being copied, whatever the last window held
            copy_rate=self._rate.per_second(now) if self.state in _COPYING else 0.0,
        )

    def _log_progress(self, event: str) -> None:
        s = self.statistics()
        LOGGER.info(
            "event=%s export=%s state=%s copied=%d done=%d total=%d "
            "read_kib_s=%.0f write_kib_s=%.0f pauses=%d",
            event,
            self.name,
            s.state,
            s.bytes_copied,
            s.bytes_done,
            s.bytes_total,
            s.read_throughput,
            s.write_throughput,
            s.pauses,
        )

    # ---- the task -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wait for the start delay, copy everything, mark the target complete."""
        task_status.started()
        try:
            if self.settings.start_delay < 0:
                self.state = PrefetchState.DISABLED
                return
            await trio.sleep(self.settings.start_delay)
            self.state = PrefetchState.RUNNING
            self._rate.started = trio.current_time()
            self._log_progress("prefetch-start")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._report_loop)
                try:
                    await self._copy_all()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.done.set()

    async def _report_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.report_interval)
            self._log_progress("prefetch-progress")

    async def _copy_all(self) -> None:
        self._bucket_start = self._last_checkpoint = trio.current_time()
        while True:
            before = self.target.prefetch_progress()[0]
            try:
                finished = await self._one_pass()
            except BlockError as exc:
                self.state = PrefetchState.DISABLED
                LOGGER.warning("event=prefetch-error export=%s error=%r", self.name, str(exc))
                return
            if not finished:
                return
            done, total = self.target.prefetch_progress()
            if done >= total:
                break
            if done <= before:
                self.state = PrefetchState.DISABLED
                LOGGER.warning(
                    "event=prefetch-stalled export=%s done=%d total=%d", self.name, done, total
                )
                return
        try:
            await self.target.prefetch_checkpoint()
            await self.target.prefetch_complete()
        except BlockError as exc:
            self.state = PrefetchState.DISABLED
            LOGGER.warning("event=prefetch-error export=%s error=%r", self.name, str(exc))
            return
        self.state = PrefetchState.DONE
        self._log_progress("prefetch-complete")

    async def _one_pass(self) -> bool:
        """Copy every missing range once, in ascending order; False if stopped."""
        limiter = trio.Semaphore(max(1, self.settings.slots))
        failure: list[BlockError] = []
        cursor = 0
        async with trio.open_nursery() as workers:
            while not failure:
                await self._pace()
                await self.target.wait_guest_idle()
                await limiter.acquire()
                if failure:
                    limiter.release()
                    break
                found = await self.target.prefetch_next(cursor, self.settings.bytes_per_prefetch)
                if found is None:
                    limiter.release()
                    break
                offset, length = found
                cursor = offset + length
                self._bytes_issued += length
                workers.start_soon(self._copy_one, offset, length, limiter, failure)
        if failure:
            raise failure[0]
        await self._maybe_checkpoint(force=True)
        return True

    async def _copy_one(
        self, offset: int, length: int, limiter: trio.Semaphore, failure: list[BlockError]
    ) -> None:
        try:
            buf = bytearray(length)
            t0 = trio.current_time()
            await self.target.prefetch_read(offset, memoryview(buf))
            t1 = trio.current_time()
            stored = await self.target.prefetch_store(offset, memoryview(buf))
            t2 = trio.current_time()
            self.requests += 1
            self._read_tp.add(t1, length, t1 - t0)
            self._write_tp.add(t2, max(stored, 1), t2 - t1)
            self._rate.add(t2, stored)
            self.bytes_copied += stored
            self.bytes_skipped += length - stored
            self._since_checkpoint += stored
            await self._maybe_checkpoint()
        except BlockError as exc:
            failure.append(exc)
        except trio.ClosedResourceError as exc:  # the image closed under us
            failure.append(BlockError(f"image closed: {exc}"))
        finally:
            limiter.release()

    async def _maybe_checkpoint(self, *, force: bool = False) -> None:
        if not self._since_checkpoint:
            return
        now = trio.current_time()
        due = (
            force
            or self._since_checkpoint >= self.settings.checkpoint_bytes
            or now - self._last_checkpoint >= self.settings.checkpoint_interval
        )
        if due:
            self._since_checkpoint = 0
            self._last_checkpoint = now
            await self.target.prefetch_checkpoint()

    async def _pace(self) -> None:
        """Back off under contention; keep under the maximum rates."""
        s = self.settings
        now = trio.current_time()
        read = self._read_tp.kib_per_s(now)
        write = self._write_tp.kib_per_s(now)
        slow = bool(
            (read is not None and s.min_read_throughput and read < s.min_read_throughput)
            or (write is not None and s.min_write_throughput and write < s.min_write_throughput)
        )
        if slow:
            # one random pause per request while the average stays low; the
            # next request measures again (QEMU fvd-prefetch's back-off)
            self.pauses += 1
            self.state = PrefetchState.PAUSED
            pause = self._random.uniform(0, s.throttle_time / 1000)
            LOGGER.debug(
                "event=prefetch-pause export=%s read_kib_s=%s write_kib_s=%s pause_s=%.3f",
                self.name,
                read,
                write,
                pause,
            )
            await trio.sleep(pause)
        self.state = PrefetchState.RUNNING
        caps = [c for c in (s.max_read_throughput, s.max_write_throughput) if c]
        if caps:
            rate = min(caps) * KIB
            not_before = self._bucket_start + self._bytes_issued / rate
            delay = not_before - trio.current_time()
            if delay > 0:
                await trio.sleep(delay)
