"""BlockDevice: the generic front end over a driver stack (nbdkit backend.c).

It guarantees the driver preconditions (ranges, alignment, transfer size,
capabilities), emulates what a driver lacks (zeroing, FUA) and composes block
status over the backing chain.  Callers (the server) have already checked
requests against the export size; this layer checks again with exceptions
because it is also the API for tools and tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from nbdserve.block.align import align_down, align_up, is_aligned
from nbdserve.block.base import (
    ZERO_CHUNK,
    BlockDriver,
    ChainExtent,
    Status,
    Support,
    ZeroCopy,
)
from nbdserve.block.extents import clip_chain_extents, merge_chain_extents
from nbdserve.block.file import CACHE_MISSES, CacheMisses
from nbdserve.errors import (
    InvalidRequestError,
    NotSupportedError,
    OutOfRangeError,
    ReadOnlyError,
)

if TYPE_CHECKING:
    from nbdserve.block.base import Buffer
# NBD caps a block status reply at 2^20 extents; we stop far earlier because a
# shorter answer is always legal and keeps one reply's memory small.
MAX_STATUS_EXTENTS = 128 * 1024
_ALLOCATED, _ZERO, _DATA = int(Status.ALLOCATED), int(Status.ZERO), int(Status.DATA)
# queries for this few extents (REQ_ONE) map a growing prefix of the range, from this long
FEW_EXTENTS = 16
FIRST_PROBE = 16 * 1024 * 1024


@dataclass(slots=True)
class DeviceStatistics:
    reads: int = 0
    writes: int = 0
    zeroes: int = 0
    discards: int = 0
    flushes: int = 0
    block_status: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    inflight: int = 0


class BlockDevice:
    """The front end the server and tools talk to.

    ``_rmw_lock`` serialises read-modify-write cycles of unaligned writes, the
    only case where this layer itself must order requests.
    """

    def __init__(self, top: BlockDriver, *, read_only: bool = False) -> None:
        self.top = top
        self.size = top.size
        self.limits = top.limits
        self.caps = top.caps
        self.read_only = read_only or not top.caps.writable
        self.stats = DeviceStatistics()
        self._rmw_lock = trio.Lock()
        self._idle = trio.Event()
        self._idle.set()
        self._align = top.limits.request_alignment
        self._max = top.limits.max_transfer
        self.on_activity: Callable[[], None] | None = None

    # ---- checks -------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(
                f"request {offset}+{length} is outside the export (size {self.size})"
            )

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("export is read-only")

    # ---- in-flight accounting (for the prefetcher: guests come first) -------

    def _begin(self) -> None:
        self.stats.inflight += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        if self.on_activity is not None:
            self.on_activity()

    def _end(self) -> None:
        self.stats.inflight -= 1
        if self.stats.inflight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no guest request is in flight."""
        await self._idle.wait()

    # ---- reads --------------------------------------------------------------

    def try_readinto(self, offset: int, view: memoryview) -> bool:
        """Synchronous fast path: True when the read completed without blocking."""
        n = len(view)
        if n > self._max or (self._align > 1 and (offset | n) % self._align):
            return False
        if not self.top.try_readinto(offset, view):
            return False
        self.stats.reads += 1
        self.stats.bytes_read += n
        return True

    def inline_reader(self, max_length: int) -> Callable[[int, memoryview], bool] | None:
        """A function that answers reads of up to ``max_length`` bytes without
        blocking (True) or declines (False); None when this device never can.

        For the server's per-request path: it skips this front end's checks,
        so callers must have validated the range and respect ``max_length``.
        Reads done through it are not counted in ``stats``.
        """
        if self._align > 1 or max_length > self._max:
            return None
        return self.top.fast_reader()

    @property
    def cache_misses(self) -> CacheMisses:
        """Page cache misses of non-blocking reads: an ``inline_reader`` call that
        declined while this count moved is being read in by the kernel."""
        return CACHE_MISSES

    def inline_writer(self, max_length: int) -> Callable[[int, Buffer], bool] | None:
        """A function that writes up to ``max_length`` bytes without blocking
        (True) or declines (False); None when this device never can.

        The write side of ``inline_reader``, for writes without FUA, with the
        same terms: callers validate the range, and writes are not counted.
        """
        if self.read_only or self._align > 1 or max_length > self._max:
            return None
        return self.top.fast_writer()

    def zero_copy_region(self, offset: int, length: int) -> ZeroCopy | None:
        """See BlockDriver.zero_copy_region; None for devices that transform data."""
        if self._align > 1 or length > self._max:
            return None
        return self.top.zero_copy_region(offset, length)

    async def readinto(self, offset: int, view: memoryview) -> None:
        n = len(view)
        self._check_range(offset, n)
        self._begin()
        try:
            if n == 0:
                await trio.lowlevel.checkpoint()
            elif self._align > 1 and (offset | n) % self._align:
                await self._read_unaligned(offset, view)
            else:
                await self._read_aligned(offset, view)
            self.stats.reads += 1
            self.stats.bytes_read += n
        finally:
            self._end()

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.readinto(offset, memoryview(buf))
        return bytes(buf)

    async def _read_aligned(self, offset: int, view: memoryview) -> None:
        pos, n = 0, len(view)
        while pos < n:
            step = min(self._max, n - pos)
            await self.top.readinto(offset + pos, view[pos : pos + step])
            pos += step

    async def _read_unaligned(self, offset: int, view: memoryview) -> None:
        lo = align_down(offset, self._align)
        hi = min(align_up(offset + len(view), self._align), align_up(self.size, self._align))
        bounce = bytearray(hi - lo)
        await self._read_aligned(lo, memoryview(bounce))
        view[:] = memoryview(bounce)[offset - lo : offset - lo + len(view)]

    # ---- writes -------------------------------------------------------------

    def try_write(self, offset: int, data: Buffer, *, fua: bool = False) -> bool:
        n = memoryview(data).nbytes
        if self.read_only or n > self._max or (self._align > 1 and (offset | n) % self._align):
            return False
        if not self.top.try_write(offset, data, fua=fua):
            return False
        self.stats.writes += 1
        self.stats.bytes_written += n
        return True

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset``.  Not atomic across the range."""
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        self._check_writable()
        self._check_range(offset, n)
        self._begin()
        try:
            if n == 0:
                await trio.lowlevel.checkpoint()
            elif self._align > 1 and (offset | n) % self._align:
                await self._write_unaligned(offset, mv)
            else:
                await self._write_aligned(offset, mv, fua)
            if fua and self.caps.fua is not Support.NATIVE:
                await self.top.flush()
            self.stats.writes += 1
            self.stats.bytes_written += n
        finally:
            self._end()

    async def _write_aligned(self, offset: int, mv: memoryview, fua: bool) -> None:
        native_fua = fua and self.caps.fua is Support.NATIVE
        pos, n = 0, mv.nbytes
        while pos < n:
            step = min(self._max, n - pos)
            await self.top.write(offset + pos, mv[pos : pos + step], fua=native_fua)
            pos += step

    async def _write_unaligned(self, offset: int, mv: memoryview) -> None:
        lo = align_down(offset, self._align)
        hi = align_up(offset + mv.nbytes, self._align)
        async with self._rmw_lock:
            bounce = bytearray(hi - lo)
            await self._read_aligned(lo, memoryview(bounce))
            bounce[offset - lo : offset - lo + mv.nbytes] = mv
            await self._write_aligned(lo, memoryview(bounce), False)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        """After success the range reads as zeros.

        With ``fast`` this raises NotSupportedError rather than fall back to
        writing zeros (NBD_CMD_FLAG_FAST_ZERO).
        """
        self._check_writable()
        self._check_range(offset, length)
        self._begin()
        try:
            if length == 0:
                await trio.lowlevel.checkpoint()
                return
            await self._zero(offset, length, may_unmap, fast)
            if fua:
                await self.top.flush()
            self.stats.zeroes += 1
        finally:
            self._end()

    async def _zero(self, offset: int, length: int, may_unmap: bool, fast: bool) -> None:
        if self.caps.zero is Support.NATIVE and is_aligned(offset | length, self._align):
            try:
                await self.top.write_zeroes(offset, length, may_unmap=may_unmap, fast=fast)
                return
            except NotSupportedError:
                if fast:
                    raise
        elif fast:
            raise NotSupportedError("zeroing would be emulated by writing data")
        await self._write_zero_data(offset, length)

    async def _write_zero_data(self, offset: int, length: int) -> None:
        pos = 0
        chunk = memoryview(ZERO_CHUNK)
        while pos < length:
            step = min(len(chunk), length - pos)
            if (self._align > 1 and (offset + pos) % self._align) or step % self._align:
                await self._write_unaligned(offset + pos, chunk[:step])
            else:
                await self._write_aligned(offset + pos, chunk[:step], False)
            pos += step

    async def discard(self, offset: int, length: int) -> None:
        """Advisory deallocation (NBD_CMD_TRIM)."""
        self._check_writable()
        self._check_range(offset, length)
        self._begin()
        try:
            align = max(self._align, self.limits.discard_alignment or 1)
            lo, hi = align_up(offset, align), align_down(offset + length, align)
            if self.caps.discard and hi > lo:
                pos = lo
                while pos < hi:
                    step = min(hi - pos, 1 << 30)
                    await self.top.discard(pos, step)
                    pos += step
            else:
                await trio.lowlevel.checkpoint()
            self.stats.discards += 1
        finally:
            self._end()

    async def flush(self) -> None:
        self._begin()
        try:
            await self.top.flush()
            self.stats.flushes += 1
        finally:
            self._end()

    async def cache(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        await self.top.cache(offset, length)

    # ---- block status -------------------------------------------------------

    async def block_status(
        self, offset: int, length: int, *, max_extents: int = MAX_STATUS_EXTENTS
    ) -> list[ChainExtent]:
        """The chain's status from ``offset``: at least one extent, at most ``length``.

        The answer may cover less than ``length`` (NBD allows a short reply).
        """
        self._check_range(offset, length)
        if length == 0:
            raise InvalidRequestError("block status of an empty range")
        self.stats.block_status += 1
        if max_extents <= FEW_EXTENTS and length > FIRST_PROBE:
            return await self._first_extents(offset, length, max_extents)
        extents = try_chain_status(self.top, offset, length, max_extents=max_extents)
        if extents is None:
            extents = await chain_status(self.top, offset, length, max_extents=max_extents)
        else:
            await trio.lowlevel.checkpoint()
        return merge_chain_extents(extents)

    async def _first_extents(self, offset: int, length: int, wanted: int) -> list[ChainExtent]:
        """The first ``wanted`` extents, mapping growing prefixes of the range.

        A client that wants one extent (NBD_CMD_FLAG_REQ_ONE; QEMU's NBD client
        always asks so, from its position to the end of the disk) then costs
        the mapping of about that extent, not of the whole range; the probe
        grows 16-fold per round, so a long extent takes few rounds.
        """
        end = offset + length
        out: list[ChainExtent] = []
        probe = FIRST_PROBE
        while True:
            pos = out[-1].end if out else offset
            n = min(probe, end - pos)
            got = try_chain_status(self.top, pos, n, max_extents=wanted + 1)
            if got is None:
                got = await chain_status(self.top, pos, n, max_extents=wanted + 1)
            else:
                await trio.lowlevel.checkpoint()
            out = merge_chain_extents([*out, *got])
            # all but the last extent are complete; the last may go on past the probe
            if len(out) > wanted or out[-1].end >= end:
                return out[:wanted]
            probe *= 16

    def try_block_status(
        self, offset: int, length: int, *, max_extents: int = MAX_STATUS_EXTENTS
    ) -> list[ChainExtent] | None:
        """``block_status`` if every layer can answer without blocking, else None.

        For callers that want to answer inline (no task, no checkpoint); it
        raises only for a bad range, like the async version.
        """
        self._check_range(offset, length)
        if length == 0:
            raise InvalidRequestError("block status of an empty range")
        if max_extents <= FEW_EXTENTS and length > FIRST_PROBE:
            return self._try_first_extents(offset, length, max_extents)
        extents = try_chain_status(self.top, offset, length, max_extents=max_extents)
        if extents is None:
            return None
        self.stats.block_status += 1
        return merge_chain_extents(extents)

    def _try_first_extents(self, offset: int, length: int, wanted: int) -> list[ChainExtent] | None:
        """``_first_extents`` without blocking, or None."""
        end = offset + length
        out: list[ChainExtent] = []
        probe = FIRST_PROBE
        while True:
            pos = out[-1].end if out else offset
            got = try_chain_status(self.top, pos, min(probe, end - pos), max_extents=wanted + 1)
            if got is None:
                return None
            out = merge_chain_extents([*out, *got])
            if len(out) > wanted or out[-1].end >= end:
                self.stats.block_status += 1
                return out[:wanted]
            probe *= 16

    async def aclose(self) -> None:
        await self.top.aclose()


async def chain_status(
    top: BlockDriver | None,
    offset: int,
    length: int,
    *,
    max_extents: int = MAX_STATUS_EXTENTS,
    depth: int = 1,
) -> list[ChainExtent]:
    """Compose per-layer status down a backing chain.

    Ranges a layer leaves unallocated are asked of its backing, which answers
    with depth + 1; past a backing's end, and below the last layer, the data
    reads as zeros at depth 0 (unallocated everywhere).
    """
    end = offset + length
    if top is None or offset >= top.size:
        return [ChainExtent(offset, length, True, False, 0)]
    out: list[ChainExtent] = []
    inside_end = min(end, top.size)
    pos = offset
    while pos < inside_end and len(out) < max_extents:
        layer = await top.block_status(pos, inside_end - pos)
        if not layer or layer[0].offset != pos:
            raise AssertionError(f"{top.format_name} block_status broke the contract at {pos}")
        for e in layer:
            lo, hi = max(e.offset, pos), min(e.end, inside_end)
            if hi <= lo:
                break
            if e.status & Status.ALLOCATED:
                out.append(
                    ChainExtent(
                        lo,
                        hi - lo,
                        bool(e.status & Status.ZERO),
                        bool(e.status & Status.DATA),
                        depth,
                    )
                )
            else:
                out.extend(
                    await chain_status(
                        top.backing,
                        lo,
                        hi - lo,
                        max_extents=max_extents - len(out),
                        depth=depth + 1,
                    )
                )
            pos = hi
            if len(out) >= max_extents:
                break
    if pos >= inside_end and inside_end < end:
        out.append(ChainExtent(inside_end, end - inside_end, True, False, 0))
    return clip_chain_extents(out, offset, end)


def try_chain_status(
    top: BlockDriver | None,
    offset: int,
    length: int,
    *,
    max_extents: int = MAX_STATUS_EXTENTS,
    depth: int = 1,
) -> list[ChainExtent] | None:
    """``chain_status`` from what every layer knows without blocking, or None.

    The same composition, synchronous: each layer answers through
    ``try_block_status`` and a None anywhere gives up (the caller then runs
    ``chain_status``).  Layers are asked only about the ranges the layers
    above leave unallocated, so the cost follows the depth at which data is
    found, not the chain's length.  This is the per-request path of block
    status, hence plain int flag tests rather than enum operations.
    """
    end = offset + length
    if top is None or offset >= top.size:
        return [ChainExtent(offset, length, True, False, 0)]
    out: list[ChainExtent] = []
    inside_end = min(end, top.size)
    backing = top.backing
    pos = offset
    while pos < inside_end and len(out) < max_extents:
        layer = top.try_block_status(pos, inside_end - pos)
        if layer is None:
            return None
        if not layer or layer[0].offset != pos:
            raise AssertionError(f"{top.format_name} try_block_status broke the contract at {pos}")
        for e in layer:
            hi = min(e.offset + e.length, inside_end)
            if hi <= pos:
                break
            status = int(e.status)
            if status & _ALLOCATED:
                out.append(
                    ChainExtent(pos, hi - pos, bool(status & _ZERO), bool(status & _DATA), depth)
                )
            elif backing is None:
                out.append(ChainExtent(pos, hi - pos, True, False, 0))
            else:
                below = try_chain_status(
                    backing, pos, hi - pos, max_extents=max_extents - len(out), depth=depth + 1
                )
                if below is None:
                    return None
                out.extend(below)
            pos = hi
            if len(out) >= max_extents:
                break
    if pos >= inside_end and inside_end < end:
        out.append(ChainExtent(inside_end, end - inside_end, True, False, 0))
    return out
