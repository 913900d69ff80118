"""Clients that break the protocol, over raw sockets.

Each test: a well-behaved client writes data and gets it acknowledged; a bad
client misbehaves; then the server must have dropped the bad client, must
still serve a new client (which reads everything back intact), and must not
have buffered what the bad client sent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from nbdserve.protocol.constants import IHAVEOPT, Cmd, CmdFlag, Opt, Rep
from nbdserve.server import session as session_module
from nbdserve.server.serve import ServerHandle
from tests.conftest import require_tools
from tests.helpers import client as cl
from tests.helpers.client import NbdClient
from tests.helpers.server import export, free_port, run, running_server, server_process, uri

MiB = 1 << 20
SIZE = 4 * MiB


def rss() -> int:
    """Resident memory of this process (server and clients share it)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Setup:
    def __init__(self, srv: ServerHandle, path: Path, model: bytearray) -> None:
        self.srv = srv
        self.path = path
        self.model = model

    async def good_client(self) -> NbdClient:
        c = await NbdClient.connect_tcp("127.0.0.1", self.srv.port)
        await c.go("disk")
        return c

    async def acknowledged_write(self, offset: int, data: bytes) -> None:
        async with await self.good_client() as c:
            await c.write(offset, data)
            self.model[offset : offset + len(data)] = data

    async def raw(self) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.srv.port)

    async def assert_still_serving(self, *, qemu: bool = False) -> None:
        async with await self.good_client() as c:
            assert await c.read(0, SIZE) == self.model
            await c.write(SIZE - 4096, b"after" * 100)
            self.model[SIZE - 4096 : SIZE - 3596] = b"after" * 100
            assert await c.read(SIZE - 4096, 500) == b"after" * 100
            await c.flush()
        if qemu:
            require_tools("qemu-img")
            copy = self.path.with_suffix(".model")
            copy.write_bytes(self.model)
            out = await run(
                "qemu-img", "compare", "-f", "raw", "-F", "raw", copy, uri(self.srv, "disk")
            )
            assert "identical" in out


@contextlib.asynccontextmanager
async def setup(tmp_path: Path, **server_kwargs: object) -> AsyncIterator[Setup]:
    path = tmp_path / "disk.raw"
    model = bytearray(os.urandom(SIZE))
    path.write_bytes(model)
    async with running_server(export(path, "disk"), **server_kwargs) as srv:  # type: ignore[arg-type]
        s = Setup(srv, path, model)
        await s.acknowledged_write(MiB, b"acknowledged" * 1000)
        yield s


async def closed_by_server(stream: trio.SocketStream, timeout: float = 5) -> bytes:
    """Read until EOF (or reset); the server must hang up within ``timeout``."""
    got = bytearray()
    with trio.fail_after(timeout):
        while True:
            try:
                data = await stream.receive_some(1 << 20)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            got += data
    await stream.aclose()
    return bytes(got)


async def handshake_raw(stream: trio.SocketStream) -> cl.ClientCodec:
    codec = cl.ClientCodec()
    while codec.greeting() is None:
        codec.receive_data(await stream.receive_some(4096))
    await stream.send_all(cl.client_flags())
    return codec


async def go_raw(stream: trio.SocketStream, *, structured: bool = True) -> cl.ClientCodec:
    codec = await handshake_raw(stream)
    raw = (cl.opt_structured_reply() if structured else b"") + cl.opt_go("disk")
    await stream.send_all(raw)
    finals = 0
    while finals < (2 if structured else 1):
        r = codec.option_reply()
        if r is None:
            codec.receive_data(await stream.receive_some(4096))
            continue
        assert not r.is_error, r
        finals += r.is_final
    codec.structured = structured
    return codec


# ---- handshake --------------------------------------------------------------------


async def test_garbage_handshake(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        bad = await s.raw()
        await bad.send_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" * 10)
        got = await closed_by_server(bad)
        assert got.startswith(b"NBDMAGICIHAVEOPT")  # only the greeting, then EOF
        assert len(got) == 18
        await s.assert_still_serving(qemu=True)


@pytest.mark.parametrize("flags", [b"\xff\xff\xff\xff", b"\x00\x00\x00\x04", b"\x80\x00\x00\x01"])
async def test_garbage_instead_of_client_flags(tmp_path: Path, flags: bytes) -> None:
    async with setup(tmp_path) as s:
        bad = await s.raw()
        await bad.send_all(flags)
        assert len(await closed_by_server(bad)) == 18
        await s.assert_still_serving()


async def test_bad_option_magic(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        bad = await s.raw()
        await handshake_raw(bad)
        await bad.send_all(cl.option(Opt.LIST, magic=0x1122334455667788))
        assert await closed_by_server(bad) == b""
        await s.assert_still_serving()


async def test_disconnect_inside_an_option(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        bad = await s.raw()
        await handshake_raw(bad)
        await bad.send_all(cl.opt_go("disk")[:-3])
        await bad.aclose()
        await trio.testing.wait_all_tasks_blocked()
        await s.assert_still_serving()


async def test_oversized_option_is_not_buffered(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        bad = await s.raw()
        codec = await handshake_raw(bad)
        await bad.send_all(struct.pack(">QII", IHAVEOPT, Opt.LIST, 1 << 30))
        while (r := codec.option_reply()) is None:
            codec.receive_data(await bad.receive_some(4096))
        assert (r.option, r.reply_type) == (Opt.LIST, Rep.ERR_TOO_BIG)
        before = rss()
        piece = bytes(MiB)
        for _ in range(64):
            await bad.send_all(piece)
        await trio.testing.wait_all_tasks_blocked()
        assert rss() - before < 32 * MiB  # 64 MiB went by without being kept
        await bad.aclose()  # disconnect inside the skipped payload
        await trio.testing.wait_all_tasks_blocked()
        await s.assert_still_serving()


async def test_client_that_never_speaks(tmp_path: Path) -> None:
    async with setup(tmp_path, handshake_timeout=0.5) as s:
        silent = await s.raw()
        start = trio.current_time()
        # meanwhile another client is served normally
        await s.assert_still_serving()
        got = await closed_by_server(silent, timeout=5)
        assert got.startswith(b"NBDMAGIC")
        assert 0.4 <= trio.current_time() - start < 4
        # a client that stops half-way through option haggling is dropped too
        slow = await s.raw()
        await handshake_raw(slow)
        await slow.send_all(cl.opt_list()[:8])
        assert await closed_by_server(slow, timeout=5) == b""
        await s.assert_still_serving()


async def test_handshake_timeout_does_not_apply_to_transmission(tmp_path: Path) -> None:
    async with setup(tmp_path, handshake_timeout=0.3) as s:
        c = await s.good_client()
        await trio.sleep(0.6)
        assert await c.read(MiB, 12) == b"acknowledged"
        await c.aclose()


# ---- transmission -----------------------------------------------------------------


async def test_bad_request_magic(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        bad = await s.raw()
        await go_raw(bad)
        await bad.send_all(cl.request(Cmd.READ, 1, 0, 512, magic=0xDEADBEEF))
        assert await closed_by_server(bad) == b""
        await s.assert_still_serving()


async def test_garbage_after_negotiation(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        bad = await s.raw()
        await go_raw(bad, structured=False)
        await bad.send_all(os.urandom(4096))
        await closed_by_server(bad)
        await s.assert_still_serving()


async def test_oversized_write_then_disconnect(tmp_path: Path) -> None:
    async with setup(tmp_path, tcp=True) as s:
        bad = await s.raw()
        codec = await go_raw(bad)
        before = rss()
        await bad.send_all(codec.request(Cmd.WRITE, 7, 0, 1 << 30))  # a 1 GiB WRITE
        piece = bytes(MiB)
        for _ in range(48):
            await bad.send_all(piece)
        await trio.testing.wait_all_tasks_blocked()
        assert rss() - before < 32 * MiB
        # the server refuses the write at once (it may reply before the payload)
        codec.receive_data(await bad.receive_some(4096))
        r = codec.reply()
        assert r is not None
        assert r.error != 0
        await bad.aclose()  # EOF inside the skipped payload
        await trio.testing.wait_all_tasks_blocked()
        await s.assert_still_serving()


async def test_truncated_write_payload_then_disconnect(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        bad = await s.raw()
        codec = await go_raw(bad)
        raw = codec.request(Cmd.WRITE, 1, MiB, 65536, 0, b"X" * 65536)
        await bad.send_all(raw[: len(raw) // 2])
        await bad.aclose()
        await trio.testing.wait_all_tasks_blocked()
        await s.assert_still_serving()  # and the half write was not applied


async def test_abrupt_disconnect_with_replies_in_flight(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        bad = await s.raw()
        codec = await go_raw(bad)
        raw = b"".join(codec.request(Cmd.READ, h, (h % 4) * MiB, MiB) for h in range(64))
        await bad.send_all(raw)
        # reset instead of a clean FIN: the server's sends fail hard
        bad.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await bad.aclose()
        await trio.testing.wait_all_tasks_blocked()
        await s.assert_still_serving()


async def test_close_with_replies_unread(tmp_path: Path) -> None:
    async with setup(tmp_path) as s:
        bad = await s.raw()
        codec = await go_raw(bad, structured=False)
        raw = b"".join(codec.request(Cmd.READ, h, (h % 4) * MiB, MiB) for h in range(64))
        await bad.send_all(raw)
        await trio.testing.wait_all_tasks_blocked()
        await bad.aclose()
        await trio.testing.wait_all_tasks_blocked()
        await s.assert_still_serving()


async def test_nbdinfo_after_misbehaviour(tmp_path: Path) -> None:
    require_tools("nbdinfo")
    async with setup(tmp_path) as s:
        bad = await s.raw()
        await bad.send_all(b"\0" * 3)
        await bad.aclose()
        out = await run("nbdinfo", "--size", uri(s.srv, "disk"))
        assert int(out.strip()) == SIZE
        await s.assert_still_serving()


# ---- resource limits --------------------------------------------------------------


async def greeted_or_closed(stream: trio.SocketStream) -> bool:
    """True when the server greets this connection, False when it hangs up at once."""
    with trio.fail_after(5):
        try:
            data = await stream.receive_some(4096)
        except trio.BrokenResourceError:
            data = b""
    if data:
        assert data.startswith(b"NBDMAGICIHAVEOPT"), data
    return bool(data)


async def test_max_connections(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nbdserve.server.serve")
    async with setup(tmp_path, max_connections=2) as s:
        a = await s.good_client()
        b = await s.good_client()
        # the third is accepted and closed at once, with a warning naming the limit
        third = await s.raw()
        assert await closed_by_server(third) == b""
        refusals = [r for r in caplog.records if "reason=max_connections" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in caplog.records]
        assert refusals[0].levelno == logging.WARNING
        # the clients already in keep working
        assert await a.read(MiB, 12) == b"acknowledged"
        await b.write(0, b"still here")
        s.model[0:10] = b"still here"
        assert await a.read(0, 10) == b"still here"
        # once one leaves, a new client gets in
        await a.disconnect()
        assert await a.receive_eof() == b""
        await a.aclose()
        await trio.testing.wait_all_tasks_blocked()
        async with await s.good_client() as c:
            assert await c.read(0, 10) == b"still here"
        await b.aclose()
        await trio.testing.wait_all_tasks_blocked()
        # a burst of connections that arrive together (connected without letting the
        # server run in between, so it accepts them back to back): exactly the
        # limit gets in
        for _ in range(5):
            burst = [
                trio.SocketStream(
                    trio.socket.from_stdlib_socket(
                        socket.create_connection(("127.0.0.1", s.srv.port), timeout=5)
                    )
                )
                for _ in range(6)
            ]
            await trio.testing.wait_all_tasks_blocked()
            greeted = [await greeted_or_closed(x) for x in burst]
            assert sum(greeted) == 2, greeted
            for x in burst:
                await x.aclose()
            await trio.testing.wait_all_tasks_blocked()
        await s.assert_still_serving()


class Gate:
    """Wraps the server's request dispatch: counts requests inside it and holds
    them until opened (a slow driver, without a slow disk)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inside = 0
        self.most = 0
        self.started = 0
        self.opened = trio.Event()
        real = getattr(session_module, "dispatch")  # noqa: B009 - private to session.py

        async def dispatch(*args: Any, **kwargs: Any) -> Any:
            self.started += 1
            self.inside += 1
            self.most = max(self.most, self.inside)
            try:
                await self.opened.wait()
                await trio.sleep(0.001)
                return await real(*args, **kwargs)
            finally:
                self.inside -= 1

        monkeypatch.setattr(session_module, "dispatch", dispatch)


async def test_max_inflight_is_back_pressure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client pipelining 64 x 1 MiB FUA WRITEs (handled off the inline path) never
    has more than max_inflight of them inside the server; the server stops reading
    rather than queueing, so the client cannot even send them all; all get answered."""
    gate = Gate(monkeypatch)
    count, limit = 64, 4
    async with setup(tmp_path, max_inflight=limit) as s:
        gate.opened.set()  # setup's own write went through
        gate.opened = trio.Event()
        gate.most = gate.started = 0
        stats = s.srv.registry.lookup("disk").stats  # type: ignore[union-attr]
        c = await s.good_client()
        payloads = [bytes([h]) * MiB for h in range(count)]
        sent = 0

        async def pipeline() -> None:
            nonlocal sent
            for h, data in enumerate(payloads):
                await c.submit(Cmd.WRITE, (h % 4) * MiB, MiB, int(CmdFlag.FUA), data)
                sent += 1

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipeline)
                await trio.testing.wait_all_tasks_blocked(0.2)
                # held: exactly the limit is inside, the server counts as many in flight,
                # and the client is stuck sending (nothing more is read off its socket)
                assert gate.inside == gate.most == limit
                assert stats.inflight == limit
                assert sent < count
                gate.opened.set()
                replies = await c.replies(count)
        assert sent == count
        assert sorted(replies) == list(range(1, count + 1))  # every handle, once
        assert all(r.error == 0 for r in replies.values())
        assert gate.most == limit
        assert gate.started == count
        assert stats.inflight == 0
        for h in range(count - 4, count):  # the last write to each MiB wins
            s.model[(h % 4) * MiB : (h % 4 + 1) * MiB] = payloads[h]
        await c.aclose()
        await s.assert_still_serving()


def process_rss(pid: int) -> int:
    """Resident memory of another process (VmRSS), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


SEND_TIMEOUT = 2.0
STUCK_READS = 2000


@pytest.mark.parametrize(
    ("structured", "sparse"),
    # structured reads of holes are tiny OFFSET_HOLE chunks: they fit the socket
    # buffers, so such a client is never stuck; simple replies of holes are 1 MiB
    # buffers built off the inline path, the case where the budget matters
    [(True, False), (False, False), (False, True)],
    ids=["structured-data", "simple-data", "simple-holes"],
)
async def test_client_that_stops_reading_replies(
    tmp_path: Path, structured: bool, sparse: bool
) -> None:
    """2000 x 1 MiB READs, never read: the server (a real process) holds no more
    than the connection's max_inflight_bytes (32 MiB here) of replies, serves other
    clients meanwhile, and drops the stuck client after send_timeout instead of
    waiting for it forever."""
    path = tmp_path / "disk.raw"
    model = bytearray(SIZE) if sparse else bytearray(os.urandom(SIZE))
    if sparse:
        with open(path, "wb") as f:
            f.truncate(SIZE)  # all holes: replies come from no page at all
    else:
        path.write_bytes(model)
    port = free_port()
    cfg = tmp_path / "nbdserve.toml"
    cfg.write_text(
        f"[server]\nport = {port}\nsend_timeout = {SEND_TIMEOUT}\n"
        f"max_inflight_bytes = {32 * MiB}\n"
        f'[[export]]\nname = "disk"\npath = "{path}"\nformat = "raw"\n'
    )
    with server_process(["serve", "--config", str(cfg)], port=port) as proc:
        before = process_rss(proc.pid)
        s = Setup(_PortOnly(port), path, model)  # type: ignore[arg-type]
        async with await s.good_client() as c:
            assert await c.read(0, SIZE) == model  # the server has read the image once
        before = max(before, process_rss(proc.pid))
        stuck = await s.raw()
        codec = await go_raw(stuck, structured=structured)
        start = trio.current_time()
        await stuck.send_all(
            b"".join(codec.request(Cmd.READ, h, (h % 4) * MiB, MiB) for h in range(STUCK_READS))
        )
        peak = 0
        # meanwhile: other clients are served, and the server's memory stays bounded
        while trio.current_time() - start < SEND_TIMEOUT * 0.75:
            with trio.fail_after(SEND_TIMEOUT):
                async with await s.good_client() as c:
                    assert await c.read(MiB, MiB) == model[MiB : 2 * MiB]
            peak = max(peak, process_rss(proc.pid))
            await trio.sleep(0.05)
        assert peak - before < 64 * MiB, (before, peak)
        # after send_timeout the stuck client is dropped: reading now gets what the
        # socket buffers held, then EOF, never the 2000 MiB asked for
        await trio.sleep(SEND_TIMEOUT * 0.25 + 1.0)
        got = await closed_by_server(stuck, timeout=10)
        assert len(got) < 256 * MiB, len(got)
        assert trio.current_time() - start < SEND_TIMEOUT + 10
        assert process_rss(proc.pid) - before < 64 * MiB
        await s.assert_still_serving()
        assert proc.poll() is None


class _PortOnly:
    """What Setup needs of a ServerHandle when the server is another process."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.tcp_addresses = [("127.0.0.1", port)]
