"""RawDriver: the guest sees the host file's bytes, optionally a window of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

from nbdserve.block.base import (
    Capabilities,
    Extent,
    FormatDriver,
    Limits,
    Status,
    Support,
    ZeroCopy,
    fill_zeros,
)
from nbdserve.block.formats import PROBE_SIZE, probe
from nbdserve.errors import NotSupportedError, ProbedHeaderError

if TYPE_CHECKING:
    from nbdserve.block.base import Buffer
    from nbdserve.block.file import FileBackend


class RawDriver(FormatDriver):
    format_name = "raw"

    def __init__(
        self,
        file: FileBackend,
        *,
        read_only: bool,
        window_offset: int = 0,
        window_size: int | None = None,
        probed: bool = False,
    ) -> None:
        super().__init__(file, read_only=read_only or file.read_only)
        self._base = window_offset
        # the format was guessed from the file's first bytes: like QEMU, refuse
        # writes that would make the next probe guess another format (a guest
        # writing a qcow2 header naming a host file as its backing file)
        self._guard_header = probed and window_offset < PROBE_SIZE
        self.size = (file.size - window_offset) if window_size is None else window_size
        if self.size < 0:
            raise ValueError("raw window starts past the end of the file")
        self.limits = Limits()
        writable = not self.read_only
        self.caps = Capabilities(
            writable=writable,
            flush=True,
            discard=writable,
            zero=Support.NATIVE if writable else Support.NONE,
            fast_zero=writable,
            fua=Support.EMULATE,
            cache=True,
            multi_conn=True,
        )

    # The raw layer holds no state between requests, so concurrent requests
    # need no lock: the page cache orders them, as NBD permits.

    def try_readinto(self, offset: int, buf: memoryview) -> bool:
        return self.file.try_pread_into(self._base + offset, buf)  # type: ignore[union-attr]

    def fast_reader(self) -> Callable[[int, memoryview], bool]:
        if self._base == 0:
            return self._file.try_pread_into
        return self.try_readinto

    def zero_copy_region(self, offset: int, length: int) -> ZeroCopy | None:
        return self._file.sendfile_region(self._base + offset, length)

    async def readinto(self, offset: int, buf: memoryview) -> None:
        await self._file.pread_into(self._base + offset, buf)

    def try_write(self, offset: int, data: Buffer, *, fua: bool = False) -> bool:
        if fua or (self._guard_header and self._base + offset < PROBE_SIZE):
            return False
        return self._file.try_pwrite(self._base + offset, data)

    def fast_writer(self) -> Callable[[int, Buffer], bool]:
        if self._base == 0 and not self._guard_header:
            return self._file.try_pwrite
        return self.try_write

    async def write(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        host = self._base + offset
        if self._guard_header and host < PROBE_SIZE:
            await self._check_header_write(host, data)
        await self._file.pwrite(host, data)
        if fua:
            await self._file.sync()

    async def _check_header_write(self, host: int, data: Buffer) -> None:
        """Raise ProbedHeaderError if the probe would read the written header as a format.

        Zeroing and trimming need no check: no format's magic is all zeros.
        """
        header = await self._file.pread(0, PROBE_SIZE)
        view = memoryview(data).cast("B")
        n = min(len(view), PROBE_SIZE - host)
        header[host : host + n] = view[:n]
        fmt = probe(bytes(header), allow_raw=True)
        if fmt != "raw":
            raise ProbedHeaderError(
                f"write refused: the image was probed as raw and this write would make "
                f"it read as {fmt} (give the format explicitly to allow it)"
            ).at(host - self._base)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        host = self._base + offset
        done = False
        if may_unmap:
            try:
                await self._file.punch_hole(host, length)
                done = True
            except NotSupportedError:
                pass
        if not done:
            try:
                await self._file.zero_range(host, length)
            except NotSupportedError:
                if fast:
                    raise
                await self._file.write_zeroes(host, length)
        if fua:
            await self._file.sync()

    async def discard(self, offset: int, length: int) -> None:
        try:
            await self._file.punch_hole(self._base + offset, length)
        except NotSupportedError:
            pass  # discard is advisory

    async def flush(self) -> None:
        await self._file.sync()

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        await trio.lowlevel.checkpoint()
        return self._status(offset, length)

    def try_block_status(self, offset: int, length: int) -> Sequence[Extent] | None:
        # SEEK_DATA/SEEK_HOLE answer from the file system's extent tree, in
        # memory for a file in use: cheap enough to answer inline (and
        # data_extents turns lseek errors into "all data" itself)
        return self._status(offset, length)

    def _status(self, offset: int, length: int) -> list[Extent]:
        runs = self._file.data_extents(self._base + offset, length)
        return [
            Extent(
                host - self._base,
                n,
                Status.ALLOCATED | (Status.DATA if is_data else Status.ZERO),
            )
            for host, n, is_data in runs
        ]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._file.aclose()

    @property
    def _file(self) -> FileBackend:
        assert self.file is not None
        return self.file

    def describe(self) -> dict[str, object]:
        return {"format": "raw", "virtual-size": self.size}


__all__ = ["RawDriver", "fill_zeros"]
