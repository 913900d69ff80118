"""NBD_OPT_EXTENDED_HEADERS against the running server, with the test client.

The installed libnbd (1.14) and qemu (7.2) predate extended headers, so the
test client (tests/helpers/client.py, written from QEMU's layout: 32-byte
requests with 64-bit lengths, 32-byte replies echoing the request offset,
BLOCK_STATUS_EXT) is the peer here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbdserve.errors import NbdErrno
from nbdserve.protocol.constants import Cmd, CmdFlag, Opt, Rep, ReplyType, StateFlag
from tests.helpers import client as cl
from tests.helpers.client import NbdClient, NbdError
from tests.helpers.server import export, running_server

MiB = 1 << 20
GiB = 1 << 30
SIZE = 16 * GiB
# sparse image: data only here; the holes between are far longer than 4 GiB
DATA_RUNS = [(1 * MiB, 64 * 1024), (5 * GiB, 2 * MiB), (11 * GiB + 4096, 4096)]
HOLE = int(StateFlag.HOLE | StateFlag.ZERO)


def fill(offset: int, n: int) -> bytes:
    """Non-zero bytes; each 4 KiB block of the result has its own value."""
    first = offset // 4096
    blocks = (bytes([(first + i) % 251 + 1]) * 4096 for i in range(n // 4096 + 1))
    return b"".join(blocks)[:n]


@pytest.fixture
def big_sparse(tmp_path: Path) -> Path:
    path = tmp_path / "big.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off, n in DATA_RUNS:
            f.seek(off)
            f.write(fill(off, n))
    return path


def host_map(path: Path) -> list[tuple[int, int, int]]:
    """(offset, length, base:allocation flags) from SEEK_DATA/SEEK_HOLE."""
    out: list[tuple[int, int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < SIZE:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                data = SIZE
            if data > pos:
                out.append((pos, data - pos, HOLE))
                pos = data
                continue
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            out.append((pos, hole - pos, 0))
            pos = hole
    finally:
        os.close(fd)
    return out


def merge(extents: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for off, n, flags in extents:
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, flags)
        else:
            out.append((off, n, flags))
    return out


async def extended_client(port: int, name: str = "big", meta: tuple[str, ...] = ()) -> NbdClient:
    c = await NbdClient.connect_tcp("127.0.0.1", port)
    await c.go(name, extended=True, meta=meta)
    return c


async def test_extended_reads_and_writes(big_sparse: Path) -> None:
    async with (
        running_server(export(big_sparse, "big")) as srv,
        await extended_client(srv.port) as c,
    ):
        # 64-bit offsets beyond 4 GiB, small and big reads
        off, n = DATA_RUNS[1]
        assert await c.read(off, 4096) == fill(off, 4096)
        r = await c.call(Cmd.READ, off - MiB, 4 * MiB)  # hole + data + hole
        assert r.error == 0
        assert r.data == bytes(MiB) + fill(off, n) + bytes(MiB)
        assert all(ch.extended for ch in r.chunks)
        assert {ch.request_offset for ch in r.chunks} == {off - MiB}
        kinds = {ch.reply_type for ch in r.chunks}
        assert ReplyType.OFFSET_HOLE in kinds
        assert ReplyType.OFFSET_DATA in kinds
        # DF: exactly one content chunk
        r = await c.call(Cmd.READ, off - 4096, 64 * 1024, CmdFlag.DF)
        content = [ch for ch in r.chunks if ch.reply_type != ReplyType.NONE]
        assert len(content) == 1
        assert r.data == bytes(4096) + fill(off, 60 * 1024)
        # writes above 4 GiB, with FUA
        await c.write(9 * GiB, b"extended!" * 100, CmdFlag.FUA)
        assert await c.read(9 * GiB, 900) == b"extended!" * 100
        await c.flush()
        # the reply to a successful write is an extended NONE chunk
        r = await c.call(Cmd.WRITE, 9 * GiB + 4096, 4, payload=b"abcd")
        assert [(ch.reply_type, ch.extended, ch.done) for ch in r.chunks] == [
            (ReplyType.NONE, True, True)
        ]
        await c.disconnect()
    with open(big_sparse, "rb") as f:
        f.seek(9 * GiB)
        assert f.read(900) == b"extended!" * 100


async def test_block_status_ext_over_more_than_4_gib(big_sparse: Path) -> None:
    async with running_server(export(big_sparse, "big")) as srv:
        meta = ("base:allocation", "qemu:allocation-depth")
        async with await extended_client(srv.port, meta=meta) as c:
            ids = {name: cid for cid, name in c.meta_contexts.items()}
            seen: list[tuple[int, int, int]] = []
            pos = 0
            while pos < SIZE:
                reply = await c.checked(Cmd.BLOCK_STATUS, pos, SIZE - pos)
                types = {ch.reply_type for ch in reply.chunks}
                assert types == {ReplyType.BLOCK_STATUS_EXT}
                status = reply.block_status
                assert set(status) == set(ids.values())
                alloc = cl.decode_descriptors(status[ids["base:allocation"]], pos)
                depth = cl.decode_descriptors(status[ids["qemu:allocation-depth"]], pos)
                assert {d for _, _, d in depth} == {1}
                seen += alloc
                pos += sum(n for _, n, _ in alloc)
            got = merge(seen)
            assert got == merge(host_map(big_sparse))
            # the point of 64-bit descriptors: holes longer than 4 GiB in one piece
            assert max(n for _, n, f in got if f == HOLE) > 4 * GiB
            # REQ_ONE: one descriptor per context, even when it is > 4 GiB
            status = await c.block_status(2 * MiB, SIZE - 2 * MiB, CmdFlag.REQ_ONE)
            first = status[ids["base:allocation"]].descriptors
            assert len(first) == 1
            assert first[0] == (5 * GiB - 2 * MiB, HOLE)


async def test_write_zeroes_and_trim_over_more_than_4_gib(big_sparse: Path) -> None:
    async with (
        running_server(export(big_sparse, "big")) as srv,
        await extended_client(srv.port, meta=("base:allocation",)) as c,
    ):
        # zero 6 GiB starting below the data at 5 GiB (punches the data)
        await c.write_zeroes(4 * GiB, 6 * GiB)
        off, n = DATA_RUNS[1]
        assert await c.read(off, n) == bytes(n)
        (st,) = (await c.block_status(4 * GiB, 6 * GiB)).values()
        assert st.descriptors == ((6 * GiB, HOLE),)
        # TRIM of 10 GiB covering the run at 11 GiB
        await c.trim(6 * GiB, 10 * GiB, CmdFlag.FUA)
        (st,) = (await c.block_status(6 * GiB, 10 * GiB)).values()
        assert st.descriptors == ((10 * GiB, HOLE),)
        # the first run, outside both ranges, is intact
        off, n = DATA_RUNS[0]
        assert await c.read(off, n) == fill(off, n)
        # > 4 GiB past the end: ENOSPC for write-type, EINVAL for status
        r = await c.call(Cmd.WRITE_ZEROES, 12 * GiB, 5 * GiB)
        assert r.error == NbdErrno.ENOSPC
        r = await c.call(Cmd.BLOCK_STATUS, 12 * GiB, 5 * GiB)
        assert r.error == NbdErrno.EINVAL
        # a > 4 GiB READ is above the maximum payload: refused, not attempted
        r = await c.call(Cmd.READ, 0, 5 * GiB)
        assert r.error == NbdErrno.EINVAL
        assert all(ch.extended for ch in r.chunks)
        assert await c.read(0, 4096) == bytes(4096)  # still in sync


async def test_structured_reply_after_extended_headers(big_sparse: Path) -> None:
    async with (
        running_server(export(big_sparse, "big")) as srv,
        await NbdClient.connect_tcp("127.0.0.1", srv.port) as c,
    ):
        await c.handshake()
        await c.extended_headers()
        (r,) = await c.option(cl.opt_structured_reply())
        assert (r.option, r.reply_type) == (Opt.STRUCTURED_REPLY, Rep.ERR_EXT_HEADER_REQD)
        (r,) = await c.option(cl.opt_extended_headers())
        assert r.reply_type == Rep.ERR_INVALID
        # negotiation carries on in extended mode
        await c.info("big", go=True)
        assert await c.read(DATA_RUNS[0][0], 16) == fill(DATA_RUNS[0][0], 16)


async def test_extended_headers_after_structured_replies(big_sparse: Path) -> None:
    async with (
        running_server(export(big_sparse, "big")) as srv,
        await NbdClient.connect_tcp("127.0.0.1", srv.port) as c,
    ):
        await c.handshake()
        await c.structured_reply()
        await c.extended_headers()  # an upgrade is allowed
        await c.info("big", go=True)
        r = await c.call(Cmd.READ, 0, 512)
        assert r.chunks[0].extended


async def test_export_name_after_extended_headers_hangs_up(big_sparse: Path) -> None:
    async with (
        running_server(export(big_sparse, "big")) as srv,
        await NbdClient.connect_tcp("127.0.0.1", srv.port) as c,
    ):
        await c.handshake()
        await c.extended_headers()
        await c.send(cl.opt_export_name("big"))
        assert await c.receive_eof() == b""


async def test_compact_request_after_extended_headers_hangs_up(big_sparse: Path) -> None:
    async with running_server(export(big_sparse, "big")) as srv:
        async with await extended_client(srv.port) as c:
            await c.send(cl.request(Cmd.READ, 1, 0, 512))  # 28-byte header
            await c.send(bytes(4))  # make it 32 bytes so a header is complete
            assert await c.receive_eof() == b""
        async with await extended_client(srv.port) as c:  # the server carries on
            assert await c.read(0, 512) == bytes(512)


async def test_extended_error_replies(big_sparse: Path) -> None:
    async with (
        running_server(export(big_sparse, "big", read_only=True)) as srv,
        await extended_client(srv.port) as c,
    ):
        r = await c.call(Cmd.WRITE, 6 * GiB, 4, payload=b"nope")
        assert r.error == NbdErrno.EPERM
        (chunk,) = r.chunks
        assert chunk.extended
        assert chunk.request_offset == 6 * GiB
        assert chunk.reply_type in (ReplyType.ERROR, ReplyType.ERROR_OFFSET)
        r = await c.call(Cmd.READ, SIZE - 1, 2)
        assert r.error == NbdErrno.EINVAL
        with pytest.raises(NbdError):
            await c.block_status(0, 4096)  # no contexts negotiated
