"""Request -> BlockDevice call -> reply bytes.  The only module that sees both.

It is also the only place that catches broad exceptions: a ``BlockError``
becomes an error reply through ``to_nbd_errno``; any other ``Exception`` is a
bug, logged with its traceback and answered with EIO (or re-raised when
``strict``, as the tests run it).  Cancellation is never caught.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nbdserve.block.device import MAX_STATUS_EXTENTS
from nbdserve.block.extents import allocation_descriptors, depth_descriptors
from nbdserve.errors import BlockError, NbdErrno, to_nbd_errno
from nbdserve.protocol.constants import Cmd, CmdFlag
from nbdserve.protocol.events import HoleChunk, ReadChunk
from nbdserve.server.exports import ALLOCATION_DEPTH, BASE_ALLOCATION

if TYPE_CHECKING:
    from nbdserve.block.base import ChainExtent
    from nbdserve.block.device import BlockDevice
    from nbdserve.protocol.connection import ServerConnection
    from nbdserve.protocol.events import Request
    from nbdserve.server.stats import ExportStats

LOGGER = logging.getLogger(__name__)

Chunks = list[bytes | bytearray | memoryview]

# Reads at least this large ask block status first and send holes as
# OFFSET_HOLE chunks instead of reading and sending zeros.
SPARSE_READ_MIN = 1024 * 1024

# Plain ints: IntFlag arithmetic costs a microsecond per operation on the
# per-request path.
_REQ_ONE = int(CmdFlag.REQ_ONE)


async def dispatch(
    conn: ServerConnection,
    device: BlockDevice,
    req: Request,
    *,
    strict: bool = False,
    stats: ExportStats | None = None,
    origin: str = "client=- export=-",
) -> Chunks:
    """Run one request and return the reply chunks to send.

    ``origin`` (``client=... export=...``, made once per connection) goes into
    the log lines of failed requests; the successful path never touches it.
    """
    try:
        return await _run(conn, device, req)
    except BlockError as exc:
        if stats is not None:
            stats.errors += 1
        errno = to_nbd_errno(
            exc,
            fast_zero=bool(req.flags & CmdFlag.FAST_ZERO),
            df=bool(req.flags & CmdFlag.DF),
        )
        # EIO is the server's failure (a broken image, a full disk); the other
        # errors answer the client's own request and are routine for it
        level = logging.WARNING if errno == NbdErrno.EIO else logging.DEBUG
        LOGGER.log(
            level,
            "event=request-failed %s %s errno=%s error=%r",
            origin,
            describe_request(req.cmd, req.offset, req.length, req.flags),
            errno.name,
            str(exc),
        )
        return [
            conn.reply_error(
                req.handle, errno, str(exc), req.offset, error_offset=read_error_offset(req, exc)
            )
        ]
    except Exception:
        if stats is not None:
            stats.errors += 1
        if strict:
            raise
        LOGGER.exception(
            "event=request-crash %s %s",
            origin,
            describe_request(req.cmd, req.offset, req.length, req.flags),
        )
        return [conn.reply_error(req.handle, NbdErrno.EIO, "internal server error", req.offset)]


def read_error_offset(req: Request, exc: BlockError) -> int | None:
    """Where a READ failed, for NBD_REPLY_TYPE_ERROR_OFFSET; None: a plain ERROR.

    Only when the driver knows the place and it lies inside the request (an
    aligned read-around may fail before it: then the request's first byte is
    where it fails); proto.md wants the offset within the request's range.
    """
    if req.cmd != Cmd.READ or exc.offset is None or exc.offset >= req.offset + req.length:
        return None
    return max(exc.offset, req.offset)


def describe_request(cmd: int, offset: int, length: int, flags: int) -> str:
    """The key=value fields that identify a request in a log line."""
    try:
        name = Cmd(cmd).name
    except ValueError:
        name = str(cmd)
    return f"cmd={name} offset={offset} length={length} flags={flags:#x}"


async def _run(conn: ServerConnection, device: BlockDevice, req: Request) -> Chunks:
    cmd = req.cmd
    flags = req.flags
    if cmd == Cmd.READ:
        return await _read(conn, device, req)
    if cmd == Cmd.WRITE:
        assert req.payload is not None
        await device.write(req.offset, req.payload, fua=bool(flags & CmdFlag.FUA))
    elif cmd == Cmd.FLUSH:
        await device.flush()
    elif cmd == Cmd.TRIM:
        await device.discard(req.offset, req.length)
        if flags & CmdFlag.FUA:
            await device.flush()
    elif cmd == Cmd.WRITE_ZEROES:
        await device.write_zeroes(
            req.offset,
            req.length,
            may_unmap=not flags & CmdFlag.NO_HOLE,
            fua=bool(flags & CmdFlag.FUA),
            fast=bool(flags & CmdFlag.FAST_ZERO),
        )
    elif cmd == Cmd.CACHE:
        await device.cache(req.offset, req.length)
    elif cmd == Cmd.BLOCK_STATUS:
        return await _block_status(conn, device, req)
    else:  # validate.py refuses everything else before it gets here
        raise AssertionError(f"unexpected command {cmd}")
    return [conn.reply_ok(req.handle, req.offset)]


async def _read(conn: ServerConnection, device: BlockDevice, req: Request) -> Chunks:
    if conn.structured_replies and req.length >= SPARSE_READ_MIN and not req.flags & CmdFlag.DF:
        return await _read_sparse(conn, device, req)
    return [await read_reply(conn, device, req)]


async def read_reply(conn: ServerConnection, device: BlockDevice, req: Request) -> bytearray:
    """One buffer holding the reply header followed by the data."""
    hsize = conn.reply_read_header_size()
    buf = conn.reply_buffer(hsize + req.length)
    conn.reply_read_header_into(buf, req.handle, req.offset, req.length)
    await device.readinto(req.offset, memoryview(buf)[hsize:])
    return buf


async def _read_sparse(conn: ServerConnection, device: BlockDevice, req: Request) -> Chunks:
    """Structured read: data chunks for data, OFFSET_HOLE chunks for zeros."""
    extents = await _status_covering(device, req.offset, req.length)
    if all(not e.zero for e in extents):
        return [await read_reply(conn, device, req)]
    out: Chunks = []
    handle = req.handle
    for e in extents:
        if e.zero:
            out.extend(conn.send(HoleChunk(handle, e.offset, e.length, request_offset=req.offset)))
        else:
            data = conn.reply_buffer(e.length)
            await device.readinto(e.offset, memoryview(data))
            out.extend(
                conn.send(ReadChunk(handle, e.offset, data, done=False, request_offset=req.offset))
            )
    out.append(conn.reply_ok(handle, req.offset))
    return out


async def _status_covering(device: BlockDevice, offset: int, length: int) -> list[ChainExtent]:
    out: list[ChainExtent] = []
    pos, end = offset, offset + length
    while pos < end:
        got = await device.block_status(pos, end - pos)
        out.extend(got)
        pos = got[-1].end
    return out


async def _block_status(conn: ServerConnection, device: BlockDevice, req: Request) -> Chunks:
    extents = await device.block_status(
        req.offset, req.length, max_extents=status_extents_wanted(req)
    )
    return block_status_reply(conn, req, extents)


def status_extents_wanted(req: Request) -> int:
    """REQ_ONE wants one extent: asking the chain for more maps ranges for nothing
    (QEMU's client always sets it, asking from its position to the end of disk)."""
    return 1 if req.flags & _REQ_ONE else MAX_STATUS_EXTENTS


def block_status_reply(
    conn: ServerConnection, req: Request, extents: Sequence[ChainExtent]
) -> Chunks:
    """One chunk per negotiated meta context, the last one marked done."""
    one = req.flags & _REQ_ONE
    if one:
        extents = extents[:1]
    out: Chunks = []
    items = conn.meta_context_items
    last = len(items) - 1
    for i, (cid, name) in enumerate(items):
        descs = _descriptors(name, extents)
        if one:
            descs = descs[:1]
        done = i == last
        out.append(
            conn.reply_block_status(req.handle, cid, descs, done=done, req_offset=req.offset)
        )
    return out


def _descriptors(name: str, extents: Sequence[ChainExtent]) -> list[tuple[int, int]]:
    if name == BASE_ALLOCATION:
        return allocation_descriptors(extents)
    if name == ALLOCATION_DEPTH:
        return depth_descriptors(extents)
    raise AssertionError(f"unknown meta context {name}")
