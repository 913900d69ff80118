"""What the fuzzers do with a mutated image, and which outcomes are allowed.

``exercise`` opens the image the way the server does (``open_chain``), reads
the whole disk (capped for absurd sizes) through both the async path and the
server's synchronous fast paths (they must agree), walks ``block_status``
over the whole disk, and, when opened read-write, writes and flushes a
little.  ``exercise_check`` runs the format's checker (a parser of untrusted
input too), optionally repairing.

Allowed: success, or an ``ImageError``/``BlockError`` (raised anywhere,
including while closing).  Anything else fails the test, as does a hang
(``trio.fail_after``), a peak of traced allocations above ``MEMORY_LIMIT``
while handling a tiny image (tracemalloc sees Python objects and numpy
arrays, which is where an attacker-sized allocation would land), or disk
growth an attacker chose: no file may pass ``FILE_SIZE_LIMIT`` (RLIMIT_FSIZE,
so a NoSpaceError/EFBIG here means a driver tried) and the image may not end
up taking more than ``DISK_USE_LIMIT`` of disk.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import resource
import signal
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from nbdserve.block import formats
from nbdserve.block.chain import ChainOptions, open_chain
from nbdserve.block.device import BlockDevice
from nbdserve.errors import BlockError, ImageError

MEMORY_LIMIT = 64 * 1024 * 1024
ADDRESS_SPACE_SLACK = 2 * 1024 * 1024 * 1024
FILE_SIZE_LIMIT = 1024 * 1024 * 1024  # no file may grow past this (RLIMIT_FSIZE)
DISK_USE_LIMIT = 256 * 1024 * 1024  # allocated blocks of the image afterwards
TIMEOUT = 20.0
READ_CAP = 8 * 1024 * 1024  # bytes read from the start (and the end) of the disk
READ_CHUNK = 256 * 1024
STATUS_CALLS = 2048

ALLOWED = (ImageError, BlockError)

# Open bugs outside this area, each reproduced by an xfail(strict) corpus entry
# (tests/fuzz/corpus/*/regress-*.json): the fuzzers count a match as
# "known-bug" instead of failing on it again; the corpus replay does not.
# (exception class name, message regex, where it is described)
KNOWN_BUGS: list[tuple[str, str, str]] = []


class FuzzFailure(AssertionError):
    """A disallowed outcome: wrong exception type, hang, huge allocation, disagreement."""


@dataclass
class Outcome:
    kind: str  # "ok" or the allowed exception's class name
    message: str
    peak: int
    read_errors: int = 0
    virtual_size: int = 0  # of the opened disk (0: not opened)

    def signature(self) -> str:
        """Outcome class and message shape, for deciding whether an input is new."""
        return f"{self.kind}:{re.sub(r'[0-9a-fx]{2,}|[0-9]+', '#', self.message)[:60]}"


async def _read_and_compare(dev: BlockDevice, offset: int, length: int) -> None:
    buf = bytearray(length)
    await dev.readinto(offset, memoryview(buf))
    fast = bytearray(length)
    if dev.try_readinto(offset, memoryview(fast)) and fast != buf:
        raise FuzzFailure(f"try_readinto disagrees with readinto at {offset}+{length}")
    region = dev.zero_copy_region(offset, length)
    if region is not None:
        fd, pieces = region
        if b"".join(os.pread(fd, n, host) for host, n in pieces) != bytes(buf):
            raise FuzzFailure(f"zero_copy_region({offset}, {length}) -> {region} is wrong data")


def _read_ranges(size: int) -> list[tuple[int, int]]:
    ranges = [
        (start, min(READ_CHUNK, size - start))
        for start in range(0, min(size, READ_CAP), READ_CHUNK)
    ]
    tail = max(min(size, READ_CAP), size - READ_CHUNK)
    if tail < size:
        ranges.append((tail, size - tail))
    return ranges


async def _read_everything(dev: BlockDevice) -> tuple[int, str]:
    """Read every range; a failing range is allowed (and counted), the next is tried."""
    errors, first = 0, ""
    align = dev.limits.request_alignment
    for offset, length in _read_ranges(dev.size):
        if offset % align or length % align:
            continue
        try:
            await _read_and_compare(dev, offset, length)
        except ALLOWED as exc:
            errors += 1
            first = first or f"{type(exc).__name__}: {exc}"
    return errors, first


async def _map_everything(dev: BlockDevice) -> None:
    pos = 0
    for _ in range(STATUS_CALLS):
        if pos >= dev.size:
            return
        extents = await dev.block_status(pos, min(dev.size - pos, 1 << 31))
        if not extents or extents[0].offset != pos:
            raise FuzzFailure(f"block_status at {pos} does not start there: {extents[:3]}")
        for a, b in itertools.pairwise(extents):
            if a.offset + a.length != b.offset or a.length <= 0:
                raise FuzzFailure(f"block_status at {pos} has a gap or empty extent")
        pos = extents[-1].offset + extents[-1].length


async def _write_a_little(dev: BlockDevice) -> None:
    align = max(dev.limits.request_alignment, 512)
    if dev.size < align:
        return
    for offset in (0, (dev.size // 2) // align * align, dev.size - align):
        await dev.write(offset, b"\xa5" * align)
    await dev.write_zeroes(0, align, may_unmap=True)
    await dev.flush()


async def _open_read_map(path: Path, fmt: str | None, read_only: bool, write: bool) -> Outcome:
    chain = await open_chain(str(path), ChainOptions(fmt=fmt, read_only=read_only))
    try:
        dev = BlockDevice(chain.top, read_only=read_only)
        errors, first = await _read_everything(dev)
        try:
            await _map_everything(dev)
            if write and not dev.read_only:
                await _write_a_little(dev)
        except ALLOWED as exc:
            errors += 1
            first = first or f"{type(exc).__name__}: {exc}"
    finally:
        await chain.aclose()
    return Outcome("ok" if not errors else "read-error", first, 0, errors, dev.size)


@contextlib.contextmanager
def _file_size_cap() -> Iterator[None]:
    """Files cannot grow past ``FILE_SIZE_LIMIT`` (RLIMIT_FSIZE; SIGXFSZ ignored, so such
    a write or fallocate fails with EFBIG): a driver that tries is caught before it
    fills the disk, which a seed of a few MiB never needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    cap = FILE_SIZE_LIMIT if hard == resource.RLIM_INFINITY else min(FILE_SIZE_LIMIT, hard)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _check_growth(path: Path, outcome: Outcome, what: str) -> None:
    """The file-size cap was hit, or the image took much more disk than a seed needs.

    Hitting the cap is legitimate only for a disk so large that a client write
    near its end may land past the cap (raw-like layouts: FVD without a table
    stores virtual offset v at data_offset + v, sparsely).
    """
    hit = "NoSpaceError" in (outcome.kind, outcome.message.split(":", 1)[0])
    hit |= "File too large" in outcome.message
    if hit and outcome.virtual_size < FILE_SIZE_LIMIT // 2:
        raise FuzzFailure(f"{what}: tried to grow a file past {FILE_SIZE_LIMIT}: {outcome}")
    st = path.stat()
    if st.st_blocks * 512 > DISK_USE_LIMIT:
        raise FuzzFailure(f"{what}: the image now takes {st.st_blocks * 512} bytes of disk")


@contextlib.contextmanager
def _address_space_cap() -> Iterator[None]:
    """Make a runaway allocation fail with MemoryError instead of taking the machine.

    tracemalloc only reports the peak afterwards; an attacker-sized allocation
    of many GiB must fail while it happens.  The cap is the process's current
    address space plus ``ADDRESS_SPACE_SLACK`` (threads' stacks fit easily).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * resource.getpagesize()
    cap = current + ADDRESS_SPACE_SLACK
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _known_bug(exc: BaseException) -> str | None:
    for name, pattern, where in KNOWN_BUGS:
        if type(exc).__name__ == name and re.search(pattern, str(exc)):
            return where
    return None


async def _bounded(
    fn: Callable[[], Awaitable[Outcome]], path: Path, what: str, *, allow_known: bool
) -> Outcome:
    with _address_space_cap(), _file_size_cap():
        outcome = await _bounded_traced(fn, what, allow_known)
    _check_growth(path, outcome, what)
    return outcome


async def _bounded_traced(
    fn: Callable[[], Awaitable[Outcome]], what: str, allow_known: bool
) -> Outcome:
    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        with trio.fail_after(TIMEOUT):
            try:
                outcome = await fn()
            except ALLOWED as exc:
                outcome = Outcome(type(exc).__name__, str(exc), 0)
    except trio.TooSlowError:
        raise FuzzFailure(f"{what}: no answer within {TIMEOUT} s (hang)") from None
    except FuzzFailure:
        raise
    except Exception as exc:  # ExceptionGroups included: groups only carry bugs
        known = _known_bug(exc) if allow_known else None
        if known is not None:
            return Outcome("known-bug", known, 0)
        raise FuzzFailure(f"{what}: disallowed {type(exc).__name__}: {exc}") from exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        if not started:
            tracemalloc.stop()
    outcome.peak = peak
    if peak > MEMORY_LIMIT:
        raise FuzzFailure(f"{what}: peak allocation {peak} bytes > {MEMORY_LIMIT}")
    return outcome


async def exercise(
    path: Path,
    *,
    fmt: str | None,
    read_only: bool = True,
    write: bool = False,
    allow_known: bool = False,
) -> Outcome:
    """Open + read + map (+ write) under the allowed-outcome rules."""
    return await _bounded(
        lambda: _open_read_map(path, fmt, read_only, write),
        path,
        f"open/read/map {path} (fmt={fmt}, read_only={read_only}, write={write})",
        allow_known=allow_known,
    )


async def exercise_check(
    path: Path, fmt: str, repair: str | None, *, allow_known: bool = False
) -> Outcome:
    """The format's checker (and repairer) under the same rules."""

    async def run() -> Outcome:
        report = await formats.load(fmt).check_image(str(path), repair)  # type: ignore[attr-defined]
        return Outcome("ok", f"corruptions={report.corruptions} leaks={report.leaks}", 0)

    return await _bounded(
        run, path, f"check {path} (fmt={fmt}, repair={repair})", allow_known=allow_known
    )
