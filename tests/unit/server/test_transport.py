"""SocketTransport's zero-copy send over a real socket pair.

try_send_file must give back exactly what the socket did not take, so that
the session can finish a reply later without losing or repeating a byte.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from nbdserve.server.transport import SocketTransport, StreamTransport

KiB = 1024
MiB = 1024 * KiB


def _pattern(n: int) -> bytes:
    return bytes((i * 7 + i // 4096) & 0xFF for i in range(n))


class Pair:
    """Our transport on one end of a socket pair, the peer's socket on the other,
    and a file of known bytes to send from."""

    def __init__(self, tmp_path: Path, size: int, *, small_buffers: bool) -> None:
        self.data = _pattern(size)
        path = tmp_path / "data"
        path.write_bytes(self.data)
        self.fd = os.open(path, os.O_RDONLY)
        ours, self.peer = socket.socketpair()
        if small_buffers:
            for sock in (ours, self.peer):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * KiB)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)
        self.transport = SocketTransport(ours)

    def drain(self, n: int) -> bytes:
        self.peer.setblocking(True)
        out = bytearray()
        while len(out) < n:
            chunk = self.peer.recv(n - len(out))
            assert chunk, "peer closed early"
            out += chunk
        return bytes(out)

    def close(self) -> None:
        os.close(self.fd)
        self.transport.sock.close()
        self.peer.close()


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Pair]:
    pair = Pair(tmp_path, 2 * MiB, small_buffers=True)
    yield pair
    pair.close()


def test_try_send_file_returns_the_rest_when_the_socket_fills(small: Pair) -> None:
    header = b"H" * 16
    rest = small.transport.try_send_file(header, small.fd, 4096, MiB)
    assert rest is not None, "a 1 MiB reply cannot fit a 16 KiB socket buffer"
    got = b""
    while rest is not None:
        head, fd, offset, count = rest
        assert fd == small.fd
        taken = len(header) + MiB - len(head) - count
        got += small.peer.recv(256 * KiB)
        assert len(got) <= taken
        rest = small.transport.try_send_file(head, fd, offset, count)
    got += small.drain(len(header) + MiB - len(got))
    assert got == header + small.data[4096 : 4096 + MiB]


def test_try_send_file_whole_reply_at_once(tmp_path: Path) -> None:
    pair = Pair(tmp_path, 64 * KiB, small_buffers=False)
    try:
        assert pair.transport.try_send_file(b"hdr", pair.fd, 0, len(pair.data)) is None
        assert pair.drain(3 + len(pair.data)) == b"hdr" + pair.data
    finally:
        pair.close()


async def test_send_file_waits_for_a_slow_reader(small: Pair) -> None:
    received = bytearray()
    small.peer.setblocking(False)

    async def slow_reader() -> None:
        while len(received) < 5 + MiB:
            await trio.lowlevel.wait_readable(small.peer)
            received.extend(small.peer.recv(8 * KiB))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_reader)
        with trio.fail_after(10):
            await small.transport.send_file(b"head!", small.fd, 0, MiB)
    assert bytes(received) == b"head!" + small.data[:MiB]


def test_try_send_file_ends_the_reply_when_the_file_is_shorter(tmp_path: Path) -> None:
    """A file truncated under a reply must not make sendfile spin on 0 bytes."""
    pair = Pair(tmp_path, 64 * KiB, small_buffers=False)
    try:
        with pytest.raises(trio.BrokenResourceError, match="ended in the middle"):
            pair.transport.try_send_file(b"hdr", pair.fd, 0, 128 * KiB)
    finally:
        pair.close()


async def test_stream_send_file_refuses_a_reply_the_file_cannot_fill(tmp_path: Path) -> None:
    """The TLS path (no sendfile) must not send a header followed by too few bytes."""
    path = tmp_path / "data"
    path.write_bytes(_pattern(64 * KiB))
    fd = os.open(path, os.O_RDONLY)
    ours, theirs = trio.testing.memory_stream_pair()
    transport = StreamTransport(ours)
    try:
        with pytest.raises(trio.BrokenResourceError, match="ended in the middle"):
            await transport.send_file(b"hdr", fd, 0, 128 * KiB)
        await transport.send_file(b"hdr", fd, 4096, 4096)
        assert await theirs.receive_some(8192) == b"hdr" + _pattern(64 * KiB)[4096:8192]
    finally:
        os.close(fd)
