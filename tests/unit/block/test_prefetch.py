"""Prefetcher: pacing, slots, guests first, errors advisory, completion.

All timing runs on trio's ``autojump_clock``: nothing sleeps in real time.
The first group drives the loop with a fake target; the second runs the FVD
driver over a base slowed by a filter that models a shared link.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import trio
import trio.testing

from nbdserve.block.base import BlockDriver
from nbdserve.block.fvd import FvdDriver
from nbdserve.block.prefetch import Prefetcher, PrefetchSettings, PrefetchState
from nbdserve.errors import HostIOError

from .fvd.helpers import KIB, MIB, make_base, make_image, open_image


class FakeTarget:
    """A disk of ``size`` bytes whose base reads take ``read_time`` each."""

    def __init__(self, size: int, read_time: float = 0.01, fail_at: int | None = None) -> None:
        self.size = size
        self.read_time = read_time
        self.fail_at = fail_at
        self.missing = set(range(0, size, 64 * KIB))
        self.in_flight = 0
        self.max_in_flight = 0
        self.reads = 0
        self.complete = False
        self.checkpoints = 0
        self.guest_idle = trio.Event()
        self.guest_idle.set()

    async def prefetch_next(self, start: int, max_length: int) -> tuple[int, int] | None:
        await trio.lowlevel.checkpoint()
        left = sorted(o for o in self.missing if o >= start)
        if not left:
            return None
        return left[0], min(max_length, 64 * KIB)

    async def prefetch_read(self, offset: int, buf: memoryview) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.fail_at is not None and offset >= self.fail_at:
                raise HostIOError("base went away")
            await trio.sleep(self.read_time)
            self.reads += 1
        finally:
            self.in_flight -= 1

    async def prefetch_store(self, offset: int, data: memoryview) -> int:
        await trio.lowlevel.checkpoint()
        self.missing.discard(offset)
        return len(data)

    async def wait_guest_idle(self) -> None:
        await self.guest_idle.wait()

    async def prefetch_checkpoint(self) -> None:
        self.checkpoints += 1
        await trio.lowlevel.checkpoint()

    async def prefetch_complete(self) -> None:
        self.complete = True
        await trio.lowlevel.checkpoint()

    def prefetch_progress(self) -> tuple[int, int]:
        return self.size - 64 * KIB * len(self.missing), self.size


def knobs(**kw: object) -> PrefetchSettings:
    base: dict[str, object] = {
        "start_delay": 5.0,
        "slots": 3,
        "bytes_per_prefetch": 64 * KIB,
        "min_read_throughput": 0,
        "min_write_throughput": 0,
    }
    base.update(kw)
    return PrefetchSettings(**base)  # type: ignore[arg-type]


async def test_waits_for_the_start_delay_then_completes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    target = FakeTarget(MIB)
    p = Prefetcher(target, knobs())
    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        await trio.sleep(4.9)
        assert target.reads == 0
        assert p.state is PrefetchState.WAITING
        await p.done.wait()
    assert target.complete
    # the cast undoes mypy's narrowing to WAITING above: run() changed the state since
    assert cast(PrefetchState, p.state) is PrefetchState.DONE
    assert p.statistics().bytes_copied == MIB
    assert target.max_in_flight == 3  # num_prefetch_slots requests in flight, no more
    assert trio.current_time() == pytest.approx(5.0 + 16 * 0.01 / 3, abs=0.02)


async def test_negative_delay_never_starts(autojump_clock: trio.testing.MockClock) -> None:
    target = FakeTarget(MIB)
    p = Prefetcher(target, knobs(start_delay=-1))
    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        await trio.sleep(3600)
        nursery.cancel_scope.cancel()
    assert target.reads == 0
    assert p.state is PrefetchState.DISABLED


async def test_guest_requests_come_first(autojump_clock: trio.testing.MockClock) -> None:
    target = FakeTarget(MIB)
    p = Prefetcher(target, knobs(start_delay=0, slots=1))
    target.guest_idle = trio.Event()  # a guest request is in flight
    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        await trio.sleep(100)
        assert target.reads == 0
        target.guest_idle.set()
        await p.done.wait()
    assert target.complete


async def test_errors_are_advisory(autojump_clock: trio.testing.MockClock) -> None:
    target = FakeTarget(MIB, fail_at=512 * KIB)
    p = Prefetcher(target, knobs(start_delay=0))
    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        await p.done.wait()
    assert p.state is PrefetchState.DISABLED
    assert not target.complete
    assert 0 < p.bytes_copied <= 512 * KIB


async def test_low_throughput_backs_off(autojump_clock: trio.testing.MockClock) -> None:
    # 64 KiB per 0.1 s is 640 KiB/s per request, below a 1024 KiB/s minimum
    slow = FakeTarget(MIB, read_time=0.1)
    p = Prefetcher(
        slow, knobs(start_delay=0, slots=1, min_read_throughput=1024, throttle_time=1000)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        await p.done.wait()
    assert p.pauses >= 10
    assert trio.current_time() > 16 * 0.1 + 3  # the random pauses added seconds
    assert slow.complete


async def test_max_throughput_caps_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    target = FakeTarget(4 * MIB, read_time=0.001)
    p = Prefetcher(target, knobs(start_delay=0, max_read_throughput=1024))  # 1 MiB/s
    async with trio.open_nursery() as nursery:
        await nursery.start(p.run)
        await p.done.wait()
    assert 3.8 <= trio.current_time() <= 4.2


# ---- the FVD driver over a slow base -------------------------------------------


@pytest.fixture
def inline_file_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run FileBackend's thread hops inline.

    With the autojump clock, a task waiting on a worker thread counts as
    blocked, so the clock would leap to the next timer while a sync runs;
    inline calls keep virtual time meaning what the slow base says.
    """

    async def run_sync(fn: object, *args: object, **kwargs: object) -> object:
        await trio.lowlevel.checkpoint()
        return fn(*args)  # type: ignore[operator]

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)


class SharedLinkBase(BlockDriver):
    """A test-only filter: the base behind a link of ``rate`` bytes/s shared by all readers."""

    def __init__(self, inner: BlockDriver, rate: float) -> None:
        self.inner = inner
        self.size = inner.size
        self.limits = inner.limits
        self.caps = inner.caps
        self.rate = rate
        self._link = trio.Lock()  # FIFO: a waiting guest is served in turn
        self.busy = 0.0

    async def readinto(self, offset: int, buf: memoryview) -> None:
        async with self._link:
            await trio.sleep(len(buf) / self.rate)
            self.busy += len(buf) / self.rate
        await self.inner.readinto(offset, buf)


async def prefetch_over_slow_base(
    tmp_path: Path, *, rate: float, guest_reads: bool, **options: str
) -> tuple[float, FvdDriver, list[float]]:
    size = 8 * MIB
    base = make_base(tmp_path / "base.raw", size)
    await make_image(
        tmp_path / "img.fvd",
        size,
        "base.raw",
        copy_on_read="off",
        block_size="64k",
        bytes_per_prefetch="256k",
        prefetch_start_delay="0",
        prefetch_min_write_throughput="0",
        **options,
    )
    chain, dev = await open_image(tmp_path / "img.fvd")
    top = chain.top
    assert isinstance(top, FvdDriver)
    assert top.backing is not None
    top.set_backing(SharedLinkBase(top.backing, rate))
    latencies: list[float] = []

    async def guest() -> None:
        block = 0
        while True:
            await trio.sleep(0.05)
            t0 = trio.current_time()
            offset = (size - 64 * KIB - block * 64 * KIB) % size
            assert await dev.read(offset, 64 * KIB) == base[offset : offset + 64 * KIB]
            latencies.append(trio.current_time() - t0)
            block += 1

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(top.run_background)
        if guest_reads:
            nursery.start_soon(guest)
        assert top.prefetcher is not None
        with trio.fail_after(3600):
            await top.prefetcher.done.wait()
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert await dev.read(0, size) == base
    await chain.aclose()
    return elapsed, top, latencies


async def test_prefetch_runs_near_the_base_speed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_file_io: None
) -> None:
    rate = 10 * MIB  # the base delivers 10 MiB/s, well above the 1 MiB/s minimum
    elapsed, top, _ = await prefetch_over_slow_base(tmp_path, rate=rate, guest_reads=False)
    assert top.prefetcher is not None
    assert top.prefetcher.state is PrefetchState.DONE
    assert top.prefetcher.pauses == 0
    ideal = 8 * MIB / rate
    assert ideal <= elapsed <= 1.1 * ideal


async def test_prefetch_backs_off_on_a_contended_base_and_guests_stay_fast(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_file_io: None
) -> None:
    rate = 10 * MIB
    # the base is slower than the minimum: prefetch reads it as contention
    elapsed, top, latencies = await prefetch_over_slow_base(
        tmp_path, rate=rate, guest_reads=True, prefetch_min_read_throughput="16384"
    )
    assert top.prefetcher is not None
    assert top.prefetcher.state is PrefetchState.DONE
    assert top.prefetcher.pauses > 10
    ideal = 8 * MIB / rate
    assert elapsed > 3 * ideal  # measurably slower than the unthrottled run
    # a guest read waits at most for the prefetch reads already on the link
    per_request = 256 * KIB / rate
    assert latencies
    assert max(latencies) <= 2 * per_request + 64 * KIB / rate + 0.001
