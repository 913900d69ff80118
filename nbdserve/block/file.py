"""FileBackend: a host file, addressed in host bytes.

Theory of operation: the event loop must never wait on a disk, yet a thread
hop per request costs 30x on page-cached I/O (shared/bench).  So each call
decides for itself: reads first try ``preadv(..., RWF_NOWAIT)``, which the
kernel answers only from the page cache and otherwise fails with EAGAIN, and
fall back to a worker thread; small buffered writes go straight to the page
cache, large ones and every sync go to a thread.

This is the only module that catches ``OSError`` around file I/O; it converts
each one once with :func:`~nbdserve.errors.from_os_error`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading
from time import perf_counter
from typing import TYPE_CHECKING

import trio

from nbdserve.block.base import fill_zeros
from nbdserve.errors import HostIOError, ImageLockedError, NotSupportedError, from_os_error
from nbdserve.logformat import quote

if TYPE_CHECKING:
    from collections.abc import Sequence

    from nbdserve.block.base import Buffer, ZeroCopy

LOGGER = logging.getLogger(__name__)

# Writes up to this size go to the page cache inline; larger ones use a thread.
# A 1 MiB write into the page cache takes ~0.2 ms; what can make any inline
# write long is the kernel throttling a writer (too many dirty pages), and
# buffered writes cannot be asked not to wait (RWF_NOWAIT: EOPNOTSUPP on ext4
# here).  So an inline write that took longer than SLOW_INLINE_WRITE sends
# every write to threads for INLINE_PAUSE: under throttling the loop stalls
# once, not on every write.
INLINE_WRITE_MAX = 1024 * 1024
SLOW_INLINE_WRITE = 2e-3
INLINE_PAUSE = 1.0

# O_DIRECT transfers are aligned to this (safe for 512-byte and 4 KiB devices)
DIRECT_ALIGNMENT = 4096
_STRIPES = 64  # striped locks for O_DIRECT read-modify-write
_STRIPE_BLOCKS = 16  # aligned blocks per stripe

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
# off_t is signed 64-bit: past this, os.preadv/pwritev raise OverflowError (not an OSError)
_MAX_HOST_OFFSET = (1 << 63) - 1

# cachestat(2) (Linux 6.5+) tells how much of a file range is in the page cache
_SYS_CACHESTAT = {"x86_64": 451, "aarch64": 451}.get(os.uname().machine)
_libc.syscall.restype = ctypes.c_long


class _CachestatRange(ctypes.Structure):
    _fields_ = (("off", ctypes.c_uint64), ("len", ctypes.c_uint64))  # type: ignore[mutable-override]


class _Cachestat(ctypes.Structure):
    _fields_ = (  # type: ignore[mutable-override]
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    )


def _fallocate_or_raise(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


# QEMU's image locking (block/file-posix.c): one byte per permission in two
# ranges of open-file-description locks.  A shared lock at PERM_BASE + bit
# says "I use this permission"; one at SHARED_BASE + bit says "I don't let
# others have it".  Taking the same bytes QEMU takes makes QEMU and nbdserve
# refuse each other exactly as two QEMUs would.
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_RESIZE = 3
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("hhxxxxqqixxxx")  # struct flock on LP64 Linux
_PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write", PERM_RESIZE: "resize"}


class CacheMisses:
    """How many non-blocking reads found pages outside the page cache.

    One count for every file of the process: the loop thread compares it
    before and after an inline read to tell "not in the page cache" (the
    kernel started reading the pages in before it answered EAGAIN, so trying
    again soon succeeds) from the other reasons a read is declined.
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


CACHE_MISSES = CacheMisses()


class FileBackend:
    """An open host file.  All offsets are host offsets.

    Not a lock holder: callers (format drivers) order their own I/O.
    """

    def __init__(self, path: str, fd: int, *, read_only: bool, direct: bool = False) -> None:
        self.path = path
        self.fd = fd
        self.read_only = read_only
        # O_DIRECT (cache=none): every transfer goes through an aligned bounce
        # buffer in a worker thread; unaligned writes read-modify-write their
        # edge blocks under striped locks so concurrent writers stay serial
        self.direct = direct
        self.direct_alignment = DIRECT_ALIGNMENT
        self._stripes = [threading.Lock() for _ in range(_STRIPES)] if direct else []
        # O_DIRECT writes past the end pad to the alignment and truncate back; the end
        # they truncate to covers every write already started (_started_end), so one
        # thread's truncate never cuts off another's data (guarded by _end_lock)
        self._end_lock = threading.Lock()
        self._started_end = 0
        st = os.fstat(fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self._size = st.st_size if not self.is_block_device else _block_device_size(fd)
        self._nowait = _RWF_NOWAIT != 0 and not direct
        self._punch_ok = True
        self._zero_range_ok = True
        self._cachestat_ok = True
        # one cachestat argument pair per file, filled in place: building the
        # ctypes structures cost more than the syscall on the sendfile path
        self._cs_range = _CachestatRange()
        self._cs_out = _Cachestat()
        self._cs_args = (ctypes.byref(self._cs_range), ctypes.byref(self._cs_out))
        # a file seen without holes at open stays so until this process makes
        # one (punch, zero range, preallocation, a gap past the end); until
        # then all_data() need not ask the file system, whose SEEK_HOLE walks
        # every extent up to the next hole (the end of file)
        self._holes_possible = self.is_block_device or _has_hole(fd, self._size)
        self._closed = False
        self._inline_writes_from = 0.0  # perf_counter() time; see SLOW_INLINE_WRITE
        self._pause_logged_at = float("-inf")
        self.slow_inline_write = SLOW_INLINE_WRITE
        self.inline_pause = INLINE_PAUSE

    @classmethod
    def open(
        cls, path: str, *, read_only: bool, create: bool = False, direct: bool = False
    ) -> FileBackend:
        """Open ``path``; ``direct`` bypasses the page cache (O_DIRECT, cache=none)."""
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create:
            flags |= os.O_CREAT
        if direct:
            flags |= os.O_DIRECT
        flags |= os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                raise NotSupportedError(f"{path}: the file system does not allow O_DIRECT") from exc
            raise from_os_error(exc, f"cannot open {path}") from exc
        try:
            return cls(path, fd, read_only=read_only, direct=direct)
        except BaseException:
            os.close(fd)
            raise

    # ---- size ---------------------------------------------------------------

    @property
    def size(self) -> int:
        """Current length of the file as this process last made or saw it."""
        return self._size

    def refresh_size(self) -> int:
        size = os.fstat(self.fd).st_size
        if size != self._size:
            self._holes_possible = True  # changed by someone else: ask the file system
        self._size = size
        return self._size

    # ---- reads --------------------------------------------------------------

    def _check_host_range(self, offset: int, length: int, what: str) -> None:
        """An offset no file can have fails like a negative one does (EINVAL).

        Offsets come from image metadata, which is untrusted: a table entry
        of 2**63 or more must give a BlockError, not Python's OverflowError.
        """
        if offset < 0 or offset + length > _MAX_HOST_OFFSET:
            raise HostIOError(
                f"{what} {self.path}: offset {offset} length {length} is outside any file",
                errno.EINVAL,
            )

    def try_pread_into(self, offset: int, buf: memoryview) -> bool:
        """Read from the page cache without blocking, or return False."""
        if not self._nowait:
            return False
        n = len(buf)
        if offset < 0 or offset + n > _MAX_HOST_OFFSET:  # inline: this is the hot path
            self._check_host_range(offset, n, "read")
        try:
            got = os.preadv(self.fd, [buf], offset, _RWF_NOWAIT)
        except BlockingIOError:
            CACHE_MISSES.count += 1
            return False
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = False
                return False
            raise from_os_error(exc, f"read {self.path}") from exc
        if got == n:
            return True
        if offset + got >= self._size:
            fill_zeros(buf[got:])  # past end of file: zeros
            return True
        CACHE_MISSES.count += 1  # stopped at the first page not in the cache
        return False

    async def pread_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``; bytes past the end of file read as zeros."""
        self._check_host_range(offset, len(buf), "read")
        if self.try_pread_into(offset, buf):
            await trio.lowlevel.checkpoint()
            return
        await trio.to_thread.run_sync(self._pread_all, offset, buf)

    def try_pread_pieces_into(self, pieces: Sequence[tuple[int, int]], buf: memoryview) -> bool:
        """``try_pread_into`` for a range scattered over the file: the (offset, length)
        pieces in turn; False at the first one not in the page cache."""
        try_pread = self.try_pread_into
        pos = 0
        for offset, length in pieces:
            if not try_pread(offset, buf[pos : pos + length]):
                return False
            pos += length
        return True

    async def pread_pieces_into(self, pieces: Sequence[tuple[int, int]], buf: memoryview) -> None:
        """Fill ``buf`` from the (offset, length) pieces in turn: ``pread_into`` for a
        range scattered over the file, with one hand-off to a thread for all of
        them when the page cache cannot serve them at once."""
        for offset, length in pieces:
            self._check_host_range(offset, length, "read")
        await trio.to_thread.run_sync(self._pread_pieces, pieces, buf)

    def _pread_pieces(self, pieces: Sequence[tuple[int, int]], buf: memoryview) -> None:
        pos = 0
        for offset, length in pieces:
            self._pread_all(offset, buf[pos : pos + length])
            pos += length

    def _pread_all(self, offset: int, buf: memoryview) -> None:
        if self.direct:
            self._pread_direct(offset, buf)
            return
        pos = 0
        n = len(buf)
        try:
            while pos < n:
                got = os.preadv(self.fd, [buf[pos:]], offset + pos)
                if got == 0:
                    fill_zeros(buf[pos:])
                    return
                pos += got
        except OSError as exc:
            raise from_os_error(exc, f"read {self.path}") from exc

    def is_cached(self, offset: int, length: int) -> bool:
        """True when every page of the range is in the page cache (cachestat).

        False when unknown: callers use it to decide that a sendfile of the
        range cannot wait on the disk, so "don't know" must mean "might".
        Always False with O_DIRECT: reads of such a descriptor bypass the page
        cache, and a sendfile from it fails with EINVAL once a partial send
        leaves an unaligned offset.
        """
        if self.direct or _SYS_CACHESTAT is None or not self._cachestat_ok:
            return False
        rng = self._cs_range
        rng.off = offset
        rng.len = length
        if _libc.syscall(_SYS_CACHESTAT, self.fd, *self._cs_args, 0):
            self._cachestat_ok = False
            return False
        pages = (offset + length + _PAGE - 1) // _PAGE - offset // _PAGE
        return bool(self._cs_out.nr_cache >= pages)

    def sendfile_region(self, offset: int, length: int) -> ZeroCopy | None:
        """(fd, pieces) when [offset, +length) may go out with sendfile: inside the
        file, without holes, and in the page cache, so sendfile cannot wait on the
        disk; None otherwise (the caller then copies)."""
        return self.sendfile_pieces(((offset, length),))

    def sendfile_pieces(self, pieces: Sequence[tuple[int, int]]) -> ZeroCopy | None:
        """``sendfile_region`` for a range stored in several (offset, length) pieces."""
        for offset, length in pieces:
            if offset + length > self._size or not self.all_data(offset, length):
                return None
            if not self.is_cached(offset, length):
                return None
        return self.fd, pieces

    def all_data(self, offset: int, length: int) -> bool:
        """True when the range holds no hole (one SEEK_HOLE, unless the file has none)."""
        if not self._holes_possible:
            return offset + length <= self._size
        try:
            return os.lseek(self.fd, offset, os.SEEK_HOLE) >= offset + length
        except (OSError, OverflowError):
            return False

    async def pread(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        await self.pread_into(offset, memoryview(buf))
        return buf

    # ---- writes -------------------------------------------------------------

    def try_pwrite(self, offset: int, data: Buffer) -> bool:
        """Write up to INLINE_WRITE_MAX bytes straight into the page cache, unless
        a recent inline write was slow (see SLOW_INLINE_WRITE): then False."""
        mv = memoryview(data)
        n = mv.nbytes
        if n > INLINE_WRITE_MAX or self.direct:
            return False
        started = perf_counter()
        if started < self._inline_writes_from:
            return False
        if offset < 0 or offset + n > _MAX_HOST_OFFSET:  # inline: this is the hot path
            self._check_host_range(offset, n, "write")
        self._pwrite_all(offset, mv)
        if perf_counter() - started > self.slow_inline_write:
            self._pause_inline_writes(started)
        return True

    def try_pwrite_pieces(self, pieces: Sequence[tuple[int, int]], data: Buffer) -> bool:
        """``try_pwrite`` for data going to several places in the file: ``data`` in
        order over the (offset, length) pieces, all inline or none written."""
        mv = memoryview(data)
        if mv.nbytes > INLINE_WRITE_MAX or self.direct:
            return False
        started = perf_counter()
        if started < self._inline_writes_from:
            return False
        for offset, length in pieces:
            self._check_host_range(offset, length, "write")
        pos = 0
        for offset, length in pieces:
            self._pwrite_all(offset, mv[pos : pos + length])
            pos += length
        if perf_counter() - started > self.slow_inline_write:
            self._pause_inline_writes(started)
        return True

    def _pause_inline_writes(self, started: float) -> None:
        now = perf_counter()
        self._inline_writes_from = now + self.inline_pause
        # under lasting throttling this happens every pause: say so once a minute
        level = logging.INFO if now - self._pause_logged_at >= 60.0 else logging.DEBUG
        if level == logging.INFO:
            self._pause_logged_at = now
        LOGGER.log(
            level,
            "event=inline-writes-paused path=%s took_ms=%.1f pause_s=%.1f",
            quote(self.path),
            (now - started) * 1e3,
            self.inline_pause,
        )

    async def pwrite(self, offset: int, data: Buffer) -> None:
        self._check_host_range(offset, memoryview(data).nbytes, "write")
        if self.try_pwrite(offset, data):
            await trio.lowlevel.checkpoint()
            return
        await trio.to_thread.run_sync(self._pwrite_all, offset, memoryview(data))

    def _pwrite_all(self, offset: int, mv: memoryview) -> None:
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        if self.direct:
            self._pwrite_direct(offset, mv)
            return
        n = mv.nbytes
        try:
            # one call in the common case: this is also the inline write path
            pos = os.pwrite(self.fd, mv, offset)
            while pos < n:
                pos += os.pwrite(self.fd, mv[pos:], offset + pos)
        except OSError as exc:
            raise from_os_error(exc, f"write {self.path}") from exc
        if offset + n > self._size:
            if offset > self._size:
                self._holes_possible = True  # the gap before the write
            self._size = offset + n

    # ---- O_DIRECT helpers (run in worker threads) ----------------------------

    def _aligned_span(self, offset: int, length: int) -> tuple[int, int]:
        a = self.direct_alignment
        return offset - offset % a, -(-(offset + length) // a) * a

    def _stripes_for(self, lo: int, hi: int) -> list[int]:
        """Indexes of the stripe locks covering aligned blocks [lo, hi), in order."""
        per_group = self.direct_alignment * _STRIPE_BLOCKS
        first, last = lo // per_group, (hi - 1) // per_group
        if last - first + 1 >= _STRIPES:
            return list(range(_STRIPES))
        return sorted({group % _STRIPES for group in range(first, last + 1)})

    def _pread_direct(self, offset: int, buf: memoryview) -> None:
        lo, hi = self._aligned_span(offset, len(buf))
        with mmap.mmap(-1, hi - lo) as bounce:  # page-aligned memory
            got = self._direct_read(lo, bounce)
            start = offset - lo
            avail = max(0, min(len(buf), got - start))
            buf[:avail] = memoryview(bounce)[start : start + avail]
            if avail < len(buf):
                fill_zeros(buf[avail:])

    def _direct_read(self, offset: int, bounce: mmap.mmap) -> int:
        """Fill the bounce buffer from ``offset``; returns bytes read (short at EOF)."""
        view = memoryview(bounce)
        pos = 0
        try:
            while pos < len(view):
                got = os.preadv(self.fd, [view[pos:]], offset + pos)
                pos += got
                if got == 0 or pos % self.direct_alignment:
                    break  # end of file (retrying at an unaligned offset is EINVAL)
        except OSError as exc:
            raise from_os_error(exc, f"read {self.path}") from exc
        finally:
            view.release()
        return pos

    def _pwrite_direct(self, offset: int, mv: memoryview) -> None:
        n = mv.nbytes
        lo, hi = self._aligned_span(offset, n)
        with self._end_lock:
            self._started_end = max(self._started_end, offset + n)
        locks = self._stripes_for(lo, hi)
        for index in locks:
            self._stripes[index].acquire()
        try:
            with mmap.mmap(-1, hi - lo) as bounce:
                if lo != offset or hi != offset + n:
                    self._direct_read(lo, bounce)  # the edges keep their bytes
                view = memoryview(bounce)
                try:
                    view[offset - lo : offset - lo + n] = mv
                    pos = 0
                    while pos < hi - lo:
                        pos += os.pwritev(self.fd, [view[pos:]], lo + pos)
                except OSError as exc:
                    raise from_os_error(exc, f"write {self.path}") from exc
                finally:
                    view.release()
        finally:
            for index in reversed(locks):
                self._stripes[index].release()
        with self._end_lock:
            size = max(self._size, self._started_end)
            if hi > size:
                # the aligned write went past the data; put the end of file back
                try:
                    os.ftruncate(self.fd, size)
                except OSError as exc:
                    raise from_os_error(exc, f"truncate {self.path}") from exc
            self._size = size

    async def sync(self) -> None:
        await trio.to_thread.run_sync(self._sync)

    def _sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise from_os_error(exc, f"sync {self.path}") from exc

    async def truncate(self, size: int) -> None:
        self._check_host_range(size, 0, "truncate")

        def work() -> None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as exc:
                raise from_os_error(exc, f"truncate {self.path}") from exc

        await trio.to_thread.run_sync(work)
        if size > self._size:
            self._holes_possible = True
        self._size = size
        self._started_end = min(self._started_end, size)

    async def preallocate(self, offset: int, length: int, *, keep_size: bool = False) -> None:
        """Reserve host space (fallocate mode 0); extends the file unless keep_size."""
        mode = _FALLOC_FL_KEEP_SIZE if keep_size else 0
        self._holes_possible = True  # unwritten extents read as holes to SEEK_HOLE
        await trio.to_thread.run_sync(self._fallocate, mode, offset, length, "preallocate")
        if not keep_size and offset + length > self._size:
            self._size = offset + length

    async def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate; the range then reads as zeros.  NotSupportedError if impossible."""
        if not self._punch_ok or self.is_block_device:
            raise NotSupportedError("hole punching not supported")
        self._holes_possible = True
        try:
            await trio.to_thread.run_sync(
                self._fallocate,
                _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                offset,
                length,
                "punch hole",
            )
        except NotSupportedError:
            self._punch_ok = False
            raise

    async def zero_range(self, offset: int, length: int) -> None:
        """Zero without writing data (FALLOC_FL_ZERO_RANGE), keeping allocation."""
        if not self._zero_range_ok or self.is_block_device:
            raise NotSupportedError("zero range not supported")
        self._holes_possible = True  # unwritten extents read as holes to SEEK_HOLE
        try:
            await trio.to_thread.run_sync(
                self._fallocate, _FALLOC_FL_ZERO_RANGE, offset, length, "zero range"
            )
        except NotSupportedError:
            self._zero_range_ok = False
            raise
        if offset + length > self._size:
            self._size = offset + length

    def _fallocate(self, mode: int, offset: int, length: int, what: str) -> None:
        try:
            _fallocate_or_raise(self.fd, mode, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise NotSupportedError(f"{what} not supported on {self.path}") from exc
            raise from_os_error(exc, f"{what} {self.path}") from exc

    async def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros by whichever way works, without fallback to data
        writes beyond a bounded buffer."""
        try:
            await self.zero_range(offset, length)
            return
        except NotSupportedError:
            pass
        pos = 0
        while pos < length:
            n = min(1 << 20, length - pos)
            await self.pwrite(offset + pos, memoryview(_ZEROS)[:n])
            pos += n

    # ---- allocation map -----------------------------------------------------

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_data) runs from SEEK_DATA/SEEK_HOLE, covering the range.

        Past the end of file counts as a hole.  Files without SEEK_DATA support
        report everything as data.
        """
        end = offset + length
        out: list[tuple[int, int, bool]] = []
        pos = offset
        size = self._size
        while pos < end:
            if pos >= size:
                out.append((pos, end - pos, False))
                break
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    out.append((pos, end - pos, False))
                    break
                out.append((pos, end - pos, True))
                break
            if data > pos:
                n = min(data, end) - pos
                out.append((pos, n, False))
                pos += n
                continue
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            n = min(max(hole, pos + 1), end) - pos
            out.append((pos, n, True))
            pos += n
        return out

    # ---- locking ------------------------------------------------------------

    def lock(self, perms: list[int], unshared: list[int]) -> None:
        """Take QEMU-compatible locks: use ``perms``, refuse others ``unshared``.

        Raises ImageLockedError when another process holds a conflicting lock
        (it uses a permission we refuse to share, or refuses one we use).
        """
        for bit in perms:
            self._set_lock(LOCK_PERM_BASE + bit)
        for bit in unshared:
            self._set_lock(LOCK_SHARED_BASE + bit)
        for bit in perms:
            if self._locked_elsewhere(LOCK_SHARED_BASE + bit):
                raise ImageLockedError(
                    f"{self.path} is in use: another process does not share the "
                    f"{_PERM_NAMES[bit]!r} permission (is QEMU using it?)"
                )
        for bit in unshared:
            if self._locked_elsewhere(LOCK_PERM_BASE + bit):
                raise ImageLockedError(
                    f"{self.path} is in use: another process holds the "
                    f"{_PERM_NAMES[bit]!r} permission (is QEMU using it?)"
                )

    def write_held_elsewhere(self) -> bool:
        """Whether another open file description holds the write permission lock.

        Only openers that lock are seen (the server does by default; ``img``
        tools do not), so False means "no locking writer", not "no writer".
        """
        return self._locked_elsewhere(LOCK_PERM_BASE + PERM_WRITE)

    def _set_lock(self, byte: int) -> None:
        try:
            fcntl.fcntl(self.fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise ImageLockedError(f"{self.path} is locked by another process") from None
            raise from_os_error(exc, f"lock {self.path}") from exc

    def _locked_elsewhere(self, byte: int) -> bool:
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
        try:
            result = fcntl.fcntl(self.fd, _F_OFD_GETLK, probe)
        except OSError as exc:
            raise from_os_error(exc, f"lock {self.path}") from exc
        return bool(_FLOCK.unpack(result)[0] != fcntl.F_UNLCK)

    # ---- lifetime -----------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            os.close(self.fd)
        except OSError as exc:
            raise HostIOError(f"close {self.path}: {exc}", exc.errno or 0) from exc
        await trio.lowlevel.checkpoint()


_ZEROS = bytes(1 << 20)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _has_hole(fd: int, size: int) -> bool:
    """Whether the file has a hole before ``size`` (True when the system can't say)."""
    if size == 0:
        return False
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < size
    except (OSError, OverflowError):
        return True


def _block_device_size(fd: int) -> int:
    end = os.lseek(fd, 0, os.SEEK_END)
    os.lseek(fd, 0, os.SEEK_SET)
    return end
