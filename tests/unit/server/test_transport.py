"""SocketTransport's zero-copy send over a real socket pair.

try_send_file must give back exactly what the socket did not take, so that
the session can finish a reply later without losing or repeating a byte.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import trio

from nbdserve.server.transport import SocketTransport

KiB = 1024
MiB = 1024 * KiB


def _pattern(n: int) -> bytes:
    return bytes((i * 7 + i // 4096) & 0xFF for i in range(n))


def _small_buffers(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * KiB)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)


def _drain(sock: socket.socket, n: int) -> bytes:
    sock.setblocking(True)
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "peer closed early"
        out += chunk
    return bytes(out)


def test_try_send_file_returns_the_rest_when_the_socket_fills(tmp_path: Path) -> None:
    data = _pattern(2 * MiB)
    path = tmp_path / "data"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    ours, peer = socket.socketpair()
    _small_buffers(ours)
    _small_buffers(peer)
    transport = SocketTransport(ours)
    try:
        header = b"H" * 16
        rest = transport.try_send_file(header, fd, 4096, MiB)
        assert rest is not None, "a 1 MiB reply cannot fit a 16 KiB socket buffer"
        got = b""
        while rest is not None:
            head, rfd, offset, count = rest
            assert rfd == fd
            taken = len(header) + MiB - len(head) - count
            got += peer.recv(256 * KiB)
            assert len(got) <= taken
            rest = transport.try_send_file(head, rfd, offset, count)
        got += _drain(peer, len(header) + MiB - len(got))
        assert got == header + data[4096 : 4096 + MiB]
    finally:
        os.close(fd)
        ours.close()
        peer.close()


def test_try_send_file_whole_reply_at_once(tmp_path: Path) -> None:
    data = _pattern(64 * KiB)
    path = tmp_path / "data"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    ours, peer = socket.socketpair()
    transport = SocketTransport(ours)
    try:
        assert transport.try_send_file(b"hdr", fd, 0, len(data)) is None
        assert _drain(peer, 3 + len(data)) == b"hdr" + data
    finally:
        os.close(fd)
        ours.close()
        peer.close()


async def test_send_file_waits_for_a_slow_reader(tmp_path: Path) -> None:
    data = _pattern(MiB)
    path = tmp_path / "data"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    ours, peer = socket.socketpair()
    _small_buffers(ours)
    _small_buffers(peer)
    transport = SocketTransport(ours)
    received = bytearray()
    peer.setblocking(False)

    async def slow_reader() -> None:
        while len(received) < 5 + len(data):
            await trio.lowlevel.wait_readable(peer)
            received.extend(peer.recv(8 * KiB))
            await trio.lowlevel.checkpoint()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_reader)
            with trio.fail_after(10):
                await transport.send_file(b"head!", fd, 0, len(data))
        assert bytes(received) == b"head!" + data
    finally:
        os.close(fd)
        ours.close()
        peer.close()
