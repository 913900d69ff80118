"""The session and serve(): the real server in-process, driven by the test client."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from time import perf_counter
from typing import Any

import pytest
import trio
import trio.testing

from nbdserve.config import ExportConfig
from nbdserve.errors import NbdErrno
from nbdserve.protocol import connection as connection_module
from nbdserve.protocol.constants import Cmd, CmdFlag, Info, Opt, Rep, StateFlag, TxFlag
from nbdserve.server import session as session_module
from nbdserve.server.serve import ServerHandle
from tests.helpers import client as cl
from tests.helpers.client import NbdClient, NbdError
from tests.helpers.server import export, running_server

MiB = 1 << 20
SIZE = 8 * MiB
# (offset, length) of the data runs of the sparse image; everything else is a hole
DATA_RUNS = [(1 * MiB, 64 * 1024), (4 * MiB, MiB), (SIZE - 4096, 4096)]
BOTH = ["base:allocation", "qemu:allocation-depth"]


def pattern(offset: int, length: int) -> bytes:
    """Bytes that differ at every 4-byte position of the image (non-zero)."""
    first = offset // 4
    words = [(first + i) | 0x01000000 for i in range(length // 4 + 2)]
    raw = b"".join(w.to_bytes(4, "big") for w in words)
    skip = offset % 4
    return raw[skip : skip + length]


def make_sparse(path: Path, size: int = SIZE) -> bytearray:
    """Create the sparse image; return its contents as a model."""
    model = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in DATA_RUNS:
            if off + n > size:
                continue
            f.seek(off)
            data = pattern(off, n)
            f.write(data)
            model[off : off + n] = data
    return model


def host_extents(path: Path, offset: int, length: int) -> list[tuple[int, int, bool]]:
    """(offset, length, is_data) straight from SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos, end = offset, offset + length
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                data = end
            data = min(data, end)
            if data > pos:
                out.append((pos, data - pos, False))
                pos = data
                continue
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
            out.append((pos, hole - pos, True))
            pos = hole
    finally:
        os.close(fd)
    return out


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory for Unix sockets (sun_path is limited to 108 bytes)."""
    d = tempfile.mkdtemp(prefix="nbds")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["tcp", "unix"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def serving(
    *exports: ExportConfig, unix_dir: Path | None = None, **kwargs: Any
) -> AsyncIterator[ServerHandle]:
    sock = unix_dir / "nbd.sock" if unix_dir else None
    async with running_server(
        *exports,
        socket_path=sock,
        tcp=sock is None,
        **kwargs,
    ) as srv:
        yield srv


async def connect(srv: ServerHandle) -> NbdClient:
    if srv.unix_paths:
        return await NbdClient.connect_unix(srv.unix_paths[0])
    host, port = srv.tcp_addresses[0]
    return await NbdClient.connect_tcp(host, port)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytearray]:
    path = tmp_path / "disk.raw"
    return path, make_sparse(path)


def unix_dir(transport: str, short_tmp: Path) -> Path | None:
    return short_tmp if transport == "unix" else None


# ---- handshake variants --------------------------------------------------------


@pytest.mark.parametrize("client_flags", [0, 1, 3])
async def test_export_name_handshake(
    transport: str, short_tmp: Path, image: tuple[Path, bytearray], client_flags: int
) -> None:
    path, model = image
    async with (
        serving(export(path, "disk"), unix_dir=unix_dir(transport, short_tmp)) as srv,
        await connect(srv) as c,
    ):
        g = await c.handshake(client_flags)
        assert g.flags == 3  # FIXED_NEWSTYLE | NO_ZEROES
        info = await c.export_name("disk")
        assert info.size == SIZE
        assert info.flags & TxFlag.HAS_FLAGS
        assert not info.flags & TxFlag.SEND_DF  # no structured replies negotiated
        assert await c.read(MiB, 4096) == model[MiB : MiB + 4096]
        reply = await c.call(Cmd.READ, 0, 512)
        assert reply.simple
        await c.disconnect()
        assert await c.receive_eof() == b""


async def test_go_without_structured_replies(image: tuple[Path, bytearray]) -> None:
    path, model = image
    async with serving(export(path, "disk")) as srv, await connect(srv) as c:
        info = await c.go("disk", structured=False)
        assert info.size == SIZE
        reply = await c.call(Cmd.READ, 4 * MiB, 2 * MiB)  # sparse path needs structured
        assert reply.simple
        assert reply.data == bytes(model[4 * MiB : 6 * MiB])
        bad = await c.call(Cmd.READ, 0, 512, CmdFlag.DF)
        assert (bad.simple, bad.error, bad.data) == (True, NbdErrno.EINVAL, None)
        # the stream stays in sync after the refused read
        assert await c.read(SIZE - 4096, 4096) == model[-4096:]


async def test_abort(image: tuple[Path, bytearray]) -> None:
    async with serving(export(image[0], "disk")) as srv, await connect(srv) as c:
        await c.handshake()
        (r,) = await c.option(cl.opt_abort())
        assert (r.option, r.reply_type) == (Opt.ABORT, Rep.ACK)
        assert await c.receive_eof() == b""


async def test_unknown_options_and_starttls(image: tuple[Path, bytearray]) -> None:
    async with serving(export(image[0], "disk")) as srv, await connect(srv) as c:
        await c.handshake()
        (r,) = await c.option(cl.option(99, b"some payload"))
        assert (r.option, r.reply_type) == (99, Rep.ERR_UNSUP)
        (r,) = await c.option(cl.option(Opt.PEEK_EXPORT))
        assert r.reply_type == Rep.ERR_UNSUP
        (r,) = await c.option(cl.opt_starttls())
        assert r.reply_type == Rep.ERR_POLICY  # NOTLS mode: POLICY or UNSUP, never ACK
        (r,) = await c.option(cl.opt_go("disk", [])[:-2] + b"\0\1")  # count 1, no request
        assert r.reply_type == Rep.ERR_INVALID
        info = await c.go("disk")
        assert info.size == SIZE


async def test_unknown_export(image: tuple[Path, bytearray]) -> None:
    async with serving(export(image[0], "disk")) as srv:
        async with await connect(srv) as c:
            await c.handshake()
            with pytest.raises(NbdError) as err:
                await c.info("nope")
            assert err.value.code == Rep.ERR_UNKNOWN
            with pytest.raises(NbdError) as err:
                await c.info("nope", go=True)
            assert err.value.code == Rep.ERR_UNKNOWN
            # EXPORT_NAME cannot fail politely: the server closes
            await c.send(cl.opt_export_name("nope"))
            assert await c.receive_eof() == b""
        async with await connect(srv) as c:  # and keeps serving
            assert (await c.go("disk")).size == SIZE


async def test_structured_reply_twice_is_invalid(image: tuple[Path, bytearray]) -> None:
    async with serving(export(image[0], "disk")) as srv, await connect(srv) as c:
        await c.handshake()
        await c.structured_reply()
        (r,) = await c.option(cl.opt_structured_reply())
        assert r.reply_type == Rep.ERR_INVALID


async def test_list_with_descriptions(tmp_path: Path) -> None:
    make_sparse(tmp_path / "a.raw", MiB)
    make_sparse(tmp_path / "b.raw", 2 * MiB)
    exports = [
        export(tmp_path / "a.raw", "a", description="the first disk"),
        export(tmp_path / "b.raw", "b"),
    ]
    async with serving(*exports) as srv, await connect(srv) as c:
        await c.handshake()
        assert sorted(await c.list_exports()) == [("a", "the first disk"), ("b", "")]


async def test_info_and_go_replies(tmp_path: Path) -> None:
    make_sparse(tmp_path / "a.raw", 2 * MiB)
    exp = export(tmp_path / "a.raw", "a", description="described")
    async with serving(exp) as srv, await connect(srv) as c:
        await c.handshake()
        info = await c.info("a", [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE])
        assert (info.size, info.name, info.description) == (2 * MiB, "a", "described")
        assert info.block_size is not None
        bs = info.block_size
        assert 1 <= bs.minimum <= bs.preferred <= bs.maximum <= 32 * MiB
        assert bs.maximum >= 64 * 1024  # proto.md: unfragmented reads up to 64 KiB
        for flag in (TxFlag.SEND_FLUSH, TxFlag.SEND_TRIM, TxFlag.SEND_WRITE_ZEROES):
            assert info.flags & flag
        assert not info.flags & TxFlag.READ_ONLY
        # INFO left us in option haggling: GO works, and without asking for
        # anything the server may still only send NBD_INFO_EXPORT (+ block size)
        info2 = await c.info("a", [], go=True)
        assert (info2.size, info2.flags) == (info.size, info.flags)
        assert info2.name is None
        assert info2.description is None
        assert await c.read(0, 512) == bytes(512)


async def test_default_export_answers_the_empty_name(tmp_path: Path) -> None:
    make_sparse(tmp_path / "a.raw", MiB)
    make_sparse(tmp_path / "b.raw", 2 * MiB)
    exports = [export(tmp_path / "a.raw", "a"), export(tmp_path / "b.raw", "b")]
    async with serving(*exports, default_export="b") as srv, await connect(srv) as c:
        assert (await c.go("")).size == 2 * MiB


# ---- meta contexts and block status -----------------------------------------------


async def test_list_meta_contexts(image: tuple[Path, bytearray]) -> None:
    async with serving(export(image[0], "disk")) as srv, await connect(srv) as c:
        await c.handshake()
        await c.structured_reply()
        all_ = await c.meta_context("disk", [], set_=False)
        assert sorted(all_.values()) == sorted(BOTH)
        assert list((await c.meta_context("disk", ["base:"], set_=False)).values()) == [
            "base:allocation"
        ]
        assert list((await c.meta_context("disk", ["qemu:"], set_=False)).values()) == [
            "qemu:allocation-depth"
        ]
        assert await c.meta_context("disk", ["nosuch:thing"], set_=False) == {}
        with pytest.raises(NbdError) as err:
            await c.meta_context("nope", [], set_=False)
        assert err.value.code == Rep.ERR_UNKNOWN


async def test_set_meta_context_needs_structured_replies(image: tuple[Path, bytearray]) -> None:
    async with serving(export(image[0], "disk")) as srv, await connect(srv) as c:
        await c.handshake()
        with pytest.raises(NbdError) as err:
            await c.meta_context("disk", ["base:allocation"])
        assert err.value.code == Rep.ERR_INVALID


async def test_set_meta_context_selects_exactly_what_was_asked(
    image: tuple[Path, bytearray],
) -> None:
    async with serving(export(image[0], "disk")) as srv, await connect(srv) as c:
        await c.handshake()
        await c.structured_reply()
        got = await c.meta_context("disk", ["base:allocation", "nosuch:x"])
        assert list(got.values()) == ["base:allocation"]
        await c.info("disk", go=True)
        status = await c.block_status(0, MiB)
        assert list(status) == list(got)


@pytest.mark.parametrize("transport_", ["tcp", "unix"])
async def test_block_status_matches_the_files_holes(
    short_tmp: Path, image: tuple[Path, bytearray], transport_: str
) -> None:
    path, _ = image
    async with (
        serving(export(path, "disk"), unix_dir=unix_dir(transport_, short_tmp)) as srv,
        await connect(srv) as c,
    ):
        await c.go("disk", meta=BOTH)
        ids = {name: cid for cid, name in c.meta_contexts.items()}
        assert set(ids) == set(BOTH)
        pos = 0
        seen: list[tuple[int, int, int]] = []
        while pos < SIZE:
            status = await c.block_status(pos, SIZE - pos)
            assert set(status) == set(ids.values())
            alloc = cl.decode_descriptors(status[ids["base:allocation"]], pos)
            depth = cl.decode_descriptors(status[ids["qemu:allocation-depth"]], pos)
            assert sum(n for _, n, _ in depth) <= SIZE - pos
            assert all(n > 0 for _, n, _ in alloc)
            assert {d for _, _, d in depth} == {1}  # a raw file decides every byte
            seen += alloc
            pos += sum(n for _, n, _ in alloc)
    expected = [
        (off, n, 0 if is_data else int(StateFlag.HOLE | StateFlag.ZERO))
        for off, n, is_data in host_extents(path, 0, SIZE)
    ]
    assert merge(seen) == merge(expected)
    assert [(o, n) for o, n, f in merge(seen) if f == 0] == DATA_RUNS


def merge(extents: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for off, n, flags in extents:
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, flags)
        else:
            out.append((off, n, flags))
    return out


async def test_block_status_req_one(image: tuple[Path, bytearray]) -> None:
    async with serving(export(image[0], "disk")) as srv, await connect(srv) as c:
        await c.go("disk", meta=BOTH)
        ids = {name: cid for cid, name in c.meta_contexts.items()}
        status = await c.block_status(0, SIZE, CmdFlag.REQ_ONE)
        for st in status.values():
            assert len(st.descriptors) == 1
        (length, flags) = status[ids["base:allocation"]].descriptors[0]
        assert (length, flags) == (MiB, StateFlag.HOLE | StateFlag.ZERO)
        status = await c.block_status(MiB, 4096, CmdFlag.REQ_ONE)
        assert status[ids["base:allocation"]].descriptors == ((4096, 0),)


async def test_block_status_errors(image: tuple[Path, bytearray]) -> None:
    async with serving(export(image[0], "disk")) as srv, await connect(srv) as c:
        await c.go("disk")  # structured, but no contexts selected
        r = await c.call(Cmd.BLOCK_STATUS, 0, 4096)
        assert r.error == NbdErrno.EINVAL
    async with serving(export(image[0], "disk")) as srv, await connect(srv) as c:
        await c.go("disk", meta=["base:allocation"])
        r = await c.call(Cmd.BLOCK_STATUS, SIZE - 512, 1024)
        assert r.error == NbdErrno.EINVAL
        r = await c.call(Cmd.BLOCK_STATUS, 0, 0)
        assert r.error == NbdErrno.EINVAL


# ---- concurrency -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["simple", "structured"])
async def test_pipelined_requests_replies_matched_by_handle(
    image: tuple[Path, bytearray], mode: str
) -> None:
    path, model = image
    rng = random.Random(1234)
    async with serving(export(path, "disk")) as srv, await connect(srv) as c:
        await c.go("disk", structured=mode == "structured")
        for _round in range(3):
            blocks = rng.sample(range(SIZE // 4096), 200)  # each block used once per round
            expect: dict[int, bytes] = {}
            writes: list[tuple[int, bytes]] = []
            raw = bytearray()
            for i, block in enumerate(blocks):
                off = block * 4096
                handle = c.new_handle()
                if i % 3 == 0:
                    data = rng.randbytes(4096)
                    raw += c.codec.request(Cmd.WRITE, handle, off, 4096, 0, data)
                    writes.append((off, data))
                    expect[handle] = b""
                else:
                    raw += c.codec.request(Cmd.READ, handle, off, 4096)
                    expect[handle] = bytes(model[off : off + 4096])
            # a few big reads through the sparse-read path, over untouched ranges
            for off in (0, 2 * MiB):
                handle = c.new_handle()
                raw += c.codec.request(Cmd.READ, handle, off, 2 * MiB)
                expect[handle] = bytes(model[off : off + 2 * MiB])
            written = {off for off, _ in writes}
            await c.send(bytes(raw))
            replies = await c.replies(len(expect))
            assert set(replies) == set(expect)
            for handle, want in expect.items():
                r = replies[handle]
                assert r.error == 0, (handle, r)
                if len(want) == 4096:
                    assert r.data == want, handle
                elif want:  # a big read: blocks written concurrently are undefined
                    assert r.data is not None
                    base = next(o for o in (0, 2 * MiB) if want == model[o : o + 2 * MiB])
                    for k in range(0, 2 * MiB, 4096):
                        if base + k not in written:
                            assert r.data[k : k + 4096] == want[k : k + 4096], base + k
            for off, data in writes:
                model[off : off + 4096] = data
        assert await c.read(0, SIZE) == model


def hold_flushes(srv: ServerHandle, export_name: str) -> trio.Event:
    """Make the export's FLUSHes wait for the returned event: a request held in flight."""
    assert srv.registry is not None
    device = srv.registry.lookup(export_name).device  # type: ignore[union-attr]
    real_flush = device.flush
    release = trio.Event()

    async def slow_flush() -> None:
        await release.wait()
        await real_flush()

    device.flush = slow_flush  # type: ignore[method-assign]
    return release


async def test_slow_request_does_not_hold_up_later_ones(image: tuple[Path, bytearray]) -> None:
    path, model = image
    async with serving(export(path, "disk")) as srv, await connect(srv) as c:
        release = hold_flushes(srv, "disk")
        await c.go("disk")
        flush = await c.submit(Cmd.FLUSH)
        reads = [await c.submit(Cmd.READ, MiB + i * 4096, 4096) for i in range(8)]
        got = [await c.next_reply() for _ in reads]  # before the flush's reply
        assert {r.handle for r in got} == set(reads)
        for r in got:
            off = MiB + (r.handle - reads[0]) * 4096
            assert r.data == bytes(model[off : off + 4096])
        release.set()
        r = await c.next_reply()
        assert (r.handle, r.error) == (flush, 0)


async def test_clients_between_requests_do_not_wait_behind_each_others_poll(
    image: tuple[Path, bytearray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session whose client is between two requests polls its socket for a
    while.  While another client is between requests too, it polls through the
    scheduler, so the other's requests are answered meanwhile; the poll that
    keeps the loop to itself is for a client alone, or beside busy sessions
    and idle connections only."""
    path, model = image
    monkeypatch.setattr(session_module, "WAITING_SECONDS", 0.2)
    own: list[bool] = []  # per private poll: was another client between requests?
    through: list[int] = []
    counters: list[session_module.WaitingClients] = []
    Session = session_module.Session
    own_poll, scheduler_poll = Session._spin_receive, Session._spin_through_scheduler

    def noting_own_poll(self: Any, view: memoryview) -> int | None:
        counters.append(self._waiting)
        busy = not self._nothing_in_flight()
        own.append(not busy and self._waiting.others_between_requests(self, perf_counter()))
        return own_poll(self, view)

    async def noting_scheduler_poll(self: Any, view: memoryview) -> int | None:
        counters.append(self._waiting)
        through.append(self._waiting.count)
        return await scheduler_poll(self, view)

    monkeypatch.setattr(Session, "_spin_receive", noting_own_poll)
    monkeypatch.setattr(Session, "_spin_through_scheduler", noting_scheduler_poll)

    async def read_back(c: NbdClient, base: int, n: int = 100) -> None:
        for i in range(n):
            offset = base + (i * 37 % 256) * 4096
            assert await c.read(offset, 4096) == model[offset : offset + 4096]

    async with serving(export(path, "disk")) as srv:
        release = hold_flushes(srv, "disk")
        async with await connect(srv) as a, await connect(srv) as b:
            await a.go("disk")
            await b.go("disk")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_back, a, 0)
                nursery.start_soon(read_back, b, 4 * MiB)
            assert through, "no session polled through the scheduler"
            assert all(count >= 1 for count in through), through
            assert not any(own), "a private poll while another client was between requests"
            (waiting,) = set(counters)  # the server's one counter
            await trio.testing.wait_all_tasks_blocked()
            assert waiting.count == 2  # both clients between requests
            flush = await a.submit(Cmd.FLUSH)  # held in flight by hold_flushes
            await trio.testing.wait_all_tasks_blocked()
            assert waiting.count == 1  # b only: a has a request in flight
            release.set()
            r = await a.next_reply()
            assert (r.handle, r.error) == (flush, 0)
            # b idles past WAITING_SECONDS: a alone goes back to its private poll
            await trio.sleep(0.3)
            own.clear()
            through.clear()
            await read_back(a, 0, 20)
            assert own, "a alone never polled its own socket"
            assert not through, through
        assert waiting.count == 0


# ---- write-type commands -----------------------------------------------------------


async def test_fua_write_and_flush_reach_the_file(image: tuple[Path, bytearray]) -> None:
    path, _ = image
    async with serving(export(path, "disk")) as srv, await connect(srv) as c:
        info = await c.go("disk")
        assert info.flags & TxFlag.SEND_FUA
        await c.write(3 * MiB, b"F" * 8192, CmdFlag.FUA)
        await c.write(3 * MiB + 8192, b"G" * 100)
        await c.flush()
        with open(path, "rb") as f:
            f.seek(3 * MiB)
            assert f.read(8292) == b"F" * 8192 + b"G" * 100
        # FUA on a read is accepted (proto.md: MUST, with SEND_FUA)
        assert await c.read(3 * MiB, 4, CmdFlag.FUA) == b"FFFF"


@pytest.fixture
def pool_takes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each PayloadPool.take found a buffer, in order."""
    taken: list[bool] = []
    original_take = connection_module.PayloadPool.take

    def counting_take(pool: Any, length: int) -> bytearray | None:
        buf = original_take(pool, length)
        taken.append(buf is not None)
        return buf

    monkeypatch.setattr(connection_module.PayloadPool, "take", counting_take)
    return taken


async def test_inline_writes_reuse_their_payload_buffers(
    image: tuple[Path, bytearray], pool_takes: list[bool]
) -> None:
    """Large writes answered inline hand their buffer back for the next one.

    One write at a time, so each is the last request of its batch: nothing in
    the read loop may keep that Request (and so its buffer) alive past recycle.
    """
    path, model = image
    length = 128 * 1024  # a large payload (own buffer), small enough to write inline
    async with serving(export(path, "disk")) as srv, await connect(srv) as c:
        await c.go("disk")
        for i in range(6):
            data = bytes([i + 1]) * length
            await c.write(2 * MiB + i * length, data)
            model[2 * MiB + i * length : 2 * MiB + (i + 1) * length] = data
        assert await c.read(2 * MiB, 6 * length) == model[2 * MiB : 2 * MiB + 6 * length]
    assert pool_takes == [False] + [True] * 5, pool_takes


async def test_copied_reads_reuse_pooled_reply_buffers(
    image: tuple[Path, bytearray], pool_takes: list[bool]
) -> None:
    """Reads that cannot go out with sendfile are copied into a buffer: large ones
    take it from the pool and give it back once sent, whether answered inline
    (128 KiB) or by a task (1 MiB).  A reused buffer must be overwritten whole:
    every read sees its own data, never the previous reply's."""
    path, model = image
    async with serving(export(path, "disk")) as srv, await connect(srv) as c:
        assert srv.registry is not None
        device = srv.registry.lookup("disk").device  # type: ignore[union-attr]
        device.zero_copy_region = lambda offset, length: None  # type: ignore[method-assign]
        await c.go("disk")
        for i in range(4):
            data = bytes([i + 1]) * MiB
            await c.write(2 * MiB + i * MiB // 2, data[: MiB // 2])
            model[2 * MiB + i * MiB // 2 : 2 * MiB + (i + 1) * MiB // 2] = data[: MiB // 2]
        for length in (128 * 1024, MiB):
            pool_takes.clear()
            for i in range(4):
                offset = 2 * MiB + i * MiB // 4
                got = await c.read(offset, length)
                assert got == model[offset : offset + length], (length, i)
            assert pool_takes == [False, True, True, True], (length, pool_takes)


async def test_small_writes_are_answered_inline_and_fua_writes_are_not(
    image: tuple[Path, bytearray],
) -> None:
    """A 4 KiB write goes from the read loop straight to the page cache; one with
    FUA goes through the device's write, which makes it durable before the reply,
    and so does a write to the first 4 KiB of this probed raw image (the slow path
    checks that it cannot turn the image into another format)."""
    path, model = image
    base = MiB
    async with serving(export(path, "disk")) as srv, await connect(srv) as c:
        assert srv.registry is not None
        device = srv.registry.lookup("disk").device  # type: ignore[union-attr]
        real_write = device.write
        through_device: list[tuple[int, bool]] = []

        async def noting_write(offset: int, data: Any, *, fua: bool = False) -> None:
            through_device.append((offset, fua))
            await real_write(offset, data, fua=fua)

        device.write = noting_write  # type: ignore[method-assign]
        await c.go("disk")
        for i in range(4):
            await c.write(base + i * 4096, bytes([i + 1]) * 4096)
            model[base + i * 4096 : base + (i + 1) * 4096] = bytes([i + 1]) * 4096
        assert through_device == []
        await c.write(base + 8 * 4096, b"\x77" * 4096, flags=CmdFlag.FUA)
        model[base + 8 * 4096 : base + 9 * 4096] = b"\x77" * 4096
        assert through_device == [(base + 8 * 4096, True)]
        await c.write(0, b"\x01" * 4096)
        model[:4096] = b"\x01" * 4096
        assert through_device[1:] == [(0, False)]
        assert await c.read(base, 9 * 4096) == model[base : base + 9 * 4096]
    assert path.read_bytes()[base : base + 9 * 4096] == model[base : base + 9 * 4096]


async def test_connections_share_one_payload_pool(
    image: tuple[Path, bytearray], pool_takes: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A buffer one connection's write gave back serves another connection's write,
    so idle connections do not each keep buffers of their own; once no connection
    is left the pool lets its buffers go."""
    path, _ = image
    cleared = trio.Event()
    original_clear = connection_module.PayloadPool.clear

    def noting_clear(pool: Any) -> None:
        original_clear(pool)
        cleared.set()

    monkeypatch.setattr(connection_module.PayloadPool, "clear", noting_clear)
    length = 128 * 1024
    async with serving(export(path, "disk")) as srv:
        async with await connect(srv) as first:
            await first.go("disk")
            await first.write(2 * MiB, b"a" * length)
            async with await connect(srv) as second:
                await second.go("disk")
                await second.write(3 * MiB, b"b" * length)
                assert await second.read(2 * MiB, 4) == b"aaaa"
                assert await second.read(3 * MiB, 4) == b"bbbb"
        assert not cleared.is_set(), "the pool was cleared while connections were open"
        with trio.fail_after(10):
            await cleared.wait()  # the server saw both connections end
        async with await connect(srv) as third:
            await third.go("disk")
            await third.write(4 * MiB, b"c" * length)
    assert pool_takes == [False, True, False], pool_takes


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


async def test_trim_and_write_zeroes(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\xab" * (4 * MiB))
    async with serving(export(path, "disk")) as srv, await connect(srv) as c:
        info = await c.go("disk", meta=["base:allocation"])
        assert info.flags & TxFlag.SEND_FAST_ZERO
        full = allocated(path)
        # WRITE_ZEROES with NO_HOLE: zeros, and the space stays allocated
        await c.write_zeroes(0, MiB, CmdFlag.NO_HOLE)
        assert await c.read(0, MiB) == bytes(MiB)
        await c.flush()
        assert allocated(path) >= full
        # WRITE_ZEROES without NO_HOLE may punch: it does for raw files
        await c.write_zeroes(MiB, MiB)
        assert await c.read(MiB, MiB) == bytes(MiB)
        await c.flush()
        assert allocated(path) <= full - MiB
        (status,) = (await c.block_status(MiB, MiB)).values()
        assert status.descriptors[0] == (MiB, StateFlag.HOLE | StateFlag.ZERO)
        # FAST_ZERO is advertised, so it must work cheaply here
        await c.write_zeroes(2 * MiB, 4096, CmdFlag.FAST_ZERO | CmdFlag.FUA)
        assert await c.read(2 * MiB, 4096) == bytes(4096)
        # TRIM: the contents are unspecified afterwards, but a raw file punches
        before = allocated(path)
        await c.trim(3 * MiB, MiB, CmdFlag.FUA)
        assert allocated(path) <= before - MiB
        assert await c.read(2 * MiB + 4096, 4096) == b"\xab" * 4096  # untouched
        # past the end: ENOSPC for write-type commands
        for cmd in (Cmd.WRITE_ZEROES, Cmd.TRIM):
            r = await c.call(cmd, 4 * MiB - 512, 1024)
            assert r.error == NbdErrno.ENOSPC
        r = await c.call(Cmd.WRITE, 4 * MiB - 1, 2, payload=b"xy")
        assert r.error == NbdErrno.ENOSPC
        r = await c.call(Cmd.READ, 4 * MiB, 1)
        assert r.error == NbdErrno.EINVAL


async def test_cache(image: tuple[Path, bytearray]) -> None:
    async with serving(export(image[0], "disk")) as srv, await connect(srv) as c:
        info = await c.go("disk")
        assert info.flags & TxFlag.SEND_CACHE
        await c.cache(0, SIZE)
        r = await c.call(Cmd.CACHE, SIZE - 512, 1024)
        assert r.error == NbdErrno.EINVAL


async def test_read_only_export(image: tuple[Path, bytearray]) -> None:
    path, model = image
    async with serving(export(path, "disk", read_only=True)) as srv, await connect(srv) as c:
        info = await c.go("disk")
        assert info.flags & TxFlag.READ_ONLY
        assert not info.flags & (TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES)
        r = await c.call(Cmd.WRITE, 0, 4, payload=b"nope")
        assert r.error == NbdErrno.EPERM
        for cmd in (Cmd.TRIM, Cmd.WRITE_ZEROES):
            r = await c.call(cmd, 0, 4096)
            assert r.error == NbdErrno.EPERM, Cmd(cmd).name
        assert await c.read(MiB, 16) == model[MiB : MiB + 16]
    with open(path, "rb") as f:
        assert f.read(4) == bytes(4)


# ---- connection limits -------------------------------------------------------------


async def test_shared_connection_limit(image: tuple[Path, bytearray]) -> None:
    async with serving(export(image[0], "disk", shared=1)) as srv:
        async with await connect(srv) as first:
            info = await first.go("disk")
            assert not info.flags & TxFlag.CAN_MULTI_CONN
            async with await connect(srv) as second:
                await second.handshake()
                with pytest.raises(NbdError) as err:
                    await second.info("disk", go=True)
                assert err.value.code == Rep.ERR_POLICY
                # INFO is refused as well, and the connection stays usable
                with pytest.raises(NbdError):
                    await second.info("disk")
            await first.read(0, 512)
            await first.disconnect()
            assert await first.receive_eof() == b""
        with trio.fail_after(5):
            while True:  # the first session may take a moment to detach
                async with await connect(srv) as third:
                    try:
                        await third.go("disk")
                    except NbdError:
                        await trio.sleep(0.01)
                        continue
                    assert await third.read(0, 512) == bytes(512)
                    break


async def raw_handshake_to_go(port: int) -> socket.socket:
    """A non-blocking stdlib socket that completed the handshake up to GO."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setblocking(False)
    codec = cl.ClientCodec()
    while codec.greeting() is None:
        await trio.lowlevel.wait_readable(s)
        codec.receive_data(s.recv(65536))
    s.send(cl.client_flags())
    return s


async def read_option_replies(s: socket.socket) -> list[cl.OptionReply]:
    codec = cl.ClientCodec()
    out: list[cl.OptionReply] = []
    with trio.fail_after(5):
        while not out or not out[-1].is_final:
            r = codec.option_reply()
            if r is None:
                await trio.lowlevel.wait_readable(s)
                codec.receive_data(s.recv(65536))
                continue
            out.append(r)
    return out


async def test_shared_limit_holds_for_simultaneous_go(image: tuple[Path, bytearray]) -> None:
    """Two GOs that arrive in the same scheduler pass: exactly one gets in.

    The limit is checked before the GO reply is sent and the connection is
    counted after it; this holds only while sending that reply does not
    yield (the transport's non-blocking fast path)."""
    async with serving(export(image[0], "disk", shared=1)) as srv:
        a = await raw_handshake_to_go(srv.port)
        b = await raw_handshake_to_go(srv.port)
        try:
            await trio.testing.wait_all_tasks_blocked()
            # both GOs are sent without a checkpoint in between
            a.send(cl.opt_go("disk"))
            b.send(cl.opt_go("disk"))
            ra = await read_option_replies(a)
            rb = await read_option_replies(b)
            ok = [r[-1].reply_type == Rep.ACK for r in (ra, rb)]
            assert sorted(ok) == [False, True]
        finally:
            a.close()
            b.close()


# ---- shutdown ----------------------------------------------------------------------


async def test_err_shutdown_during_handshake(image: tuple[Path, bytearray]) -> None:
    async with serving(export(image[0], "disk"), shutdown_grace=5) as srv:
        c = await connect(srv)
        await c.handshake()
        assert await c.list_exports() == [("disk", "")]
        srv.shutdown()
        await trio.testing.wait_all_tasks_blocked()
        for raw in (cl.opt_go("disk"), cl.opt_structured_reply(), cl.opt_list()):
            (r,) = await c.option(raw)
            assert r.reply_type == Rep.ERR_SHUTDOWN
        # proto.md: the client then MUST soft-disconnect, which still works
        (r,) = await c.option(cl.opt_abort())
        assert r.reply_type == Rep.ACK
        assert await c.receive_eof() == b""
        await c.aclose()


async def test_graceful_shutdown_finishes_in_flight_requests(
    image: tuple[Path, bytearray],
) -> None:
    path, _ = image
    release = trio.Event()
    async with serving(export(path, "disk"), shutdown_grace=10) as srv:
        assert srv.registry is not None
        device = srv.registry.lookup("disk").device  # type: ignore[union-attr]
        real_write = device.write

        async def slow_write(offset: int, data: object, *, fua: bool = False) -> None:
            await release.wait()
            await real_write(offset, data, fua=fua)  # type: ignore[arg-type]

        device.write = slow_write  # type: ignore[method-assign]
        device.try_write = lambda *args, **kwargs: False  # type: ignore[method-assign]
        c = await connect(srv)
        await c.go("disk")
        # big enough not to be answered inline: it goes to a task and waits
        big = await c.submit(Cmd.WRITE, 0, 1 * MiB, payload=b"S" * MiB)
        await trio.testing.wait_all_tasks_blocked()
        srv.shutdown()
        await trio.testing.wait_all_tasks_blocked()
        # a request sent during shutdown: refused with ESHUTDOWN or never read
        late = await c.submit(Cmd.WRITE, 2 * MiB, 4096, payload=b"L" * 4096)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        replies: dict[int, cl.Reply] = {}
        with trio.fail_after(5):
            while True:
                try:
                    r = await c.next_reply()
                except (cl.ServerOutputError, trio.BrokenResourceError):
                    break
                replies[r.handle] = r
        assert replies[big].error == 0
        if late in replies:
            assert replies[late].error == NbdErrno.ESHUTDOWN
        await c.aclose()
    with open(path, "rb") as f:
        assert f.read(MiB) == b"S" * MiB  # the in-flight write completed and was flushed
        f.seek(2 * MiB)
        assert f.read(4096) == bytes(4096)  # the late one was not executed


async def test_new_connections_are_refused_after_shutdown(image: tuple[Path, bytearray]) -> None:
    async with serving(export(image[0], "disk")) as srv:
        port = srv.port
        srv.shutdown()
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)


def parse_until_eof(codec: cl.ClientCodec, data: bytes) -> tuple[list[cl.Reply], bytes]:
    """Complete replies in ``data``, and the bytes of an unfinished one at the end."""
    codec.receive_data(data)
    replies: list[cl.Reply] = []
    while True:
        before = bytes(codec._buf)
        try:
            r = codec.reply()
        except cl.ServerOutputError:
            return replies, before
        if r is None:
            return replies, before
        replies.append(r)


async def test_shutdown_never_interleaves_a_reply_into_a_cut_one(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    size = 4 * MiB
    model = bytes(pattern(0, size))
    with open(path, "wb") as f:  # page-cached: 256 KiB reads are answered inline
        f.write(model)
        os.fsync(f.fileno())
    release = trio.Event()
    async with serving(export(path, "disk"), shutdown_grace=10) as srv:
        assert srv.registry is not None
        device = srv.registry.lookup("disk").device  # type: ignore[union-attr]

        async def slow_flush() -> None:
            await release.wait()

        device.flush = slow_flush  # type: ignore[method-assign]
        c = await connect(srv)
        await c.go("disk")
        flush = await c.submit(Cmd.FLUSH)  # in flight in a task
        await trio.testing.wait_all_tasks_blocked()
        n, step = 96, 256 * 1024  # 24 MiB of replies: more than the socket buffers
        raw = b"".join(
            c.codec.request(Cmd.READ, c.new_handle(), (i * step) % size, step) for i in range(n)
        )
        await c.send(raw)
        await trio.testing.wait_all_tasks_blocked()  # the reader is stuck sending
        srv.shutdown()
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(10):
            data = await c.receive_eof()
        await c.aclose()
    replies, tail = parse_until_eof(c.codec, data)
    for r in replies:
        assert r.error in (0, NbdErrno.ESHUTDOWN)
        if r.cmd == Cmd.READ and not r.error:
            body = r.chunks[0].body
            assert isinstance(body, (cl.OffsetData, cl.OffsetHole))
            off = body.offset
            assert r.data == model[off : off + step]
    if tail:
        # a cut reply is acceptable (a hard disconnect), garbage after it is not
        magic, _flags, _type, _handle, length, off = struct.unpack_from(">IHHQIQ", tail)
        assert magic == 0x668E33EF
        got = tail[28:]
        assert len(got) < length - 8
        assert got == model[off : off + len(got)], "another reply was written into a cut one"
    else:
        assert any(r.handle == flush for r in replies)


async def test_shutdown_answers_every_request_it_read(image: tuple[Path, bytearray]) -> None:
    release = trio.Event()
    async with serving(export(image[0], "disk"), shutdown_grace=10, max_inflight=1) as srv:
        assert srv.registry is not None
        device = srv.registry.lookup("disk").device  # type: ignore[union-attr]

        async def slow_flush() -> None:
            await release.wait()

        device.flush = slow_flush  # type: ignore[method-assign]
        c = await connect(srv)
        await c.go("disk")
        h1, h2 = c.new_handle(), c.new_handle()
        # both in one segment: the server reads both, runs the first and waits
        # for a slot for the second
        await c.send(c.codec.request(Cmd.FLUSH, h1) + c.codec.request(Cmd.FLUSH, h2))
        await trio.testing.wait_all_tasks_blocked()
        srv.shutdown()
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        with trio.fail_after(10):
            data = await c.receive_eof()
        await c.aclose()
    replies, tail = parse_until_eof(c.codec, data)
    assert tail == b""
    got = {r.handle: r.error for r in replies}
    assert got.get(h1) == 0
    assert got.get(h2) in (0, NbdErrno.ESHUTDOWN)


async def test_inflight_bytes_budget_bounds_what_a_connection_holds(
    image: tuple[Path, bytearray],
) -> None:
    """Deferred reads stop being started once their bytes exceed the budget."""
    release = trio.Event()
    active = 0
    peak = 0
    async with serving(
        export(image[0], "disk"), max_inflight=64, max_inflight_bytes=2 * MiB
    ) as srv:
        assert srv.registry is not None
        device = srv.registry.lookup("disk").device  # type: ignore[union-attr]
        real_readinto = device.readinto

        async def slow_readinto(offset: int, view: memoryview) -> None:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            await release.wait()
            await real_readinto(offset, view)
            active -= 1

        device.readinto = slow_readinto  # type: ignore[method-assign]
        device.inline_reader = lambda max_length: None  # type: ignore[method-assign]
        device.zero_copy_region = lambda offset, length: None  # type: ignore[method-assign]
        c = await connect(srv)
        await c.go("disk")
        handles = [c.new_handle() for _ in range(16)]
        half = MiB // 2
        await c.send(b"".join(c.codec.request(Cmd.READ, h, 0, half) for h in handles))
        await trio.testing.wait_all_tasks_blocked()
        assert active == 4, "a 2 MiB budget holds four 512 KiB reads"
        release.set()
        replies = await c.replies(len(handles))
        await c.aclose()
    assert peak == 4
    assert sorted(replies) == sorted(handles)
    assert all(r.error == 0 and r.data == bytes(image[1][: MiB // 2]) for r in replies.values())
