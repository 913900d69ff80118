"""Transports: the byte pipe under a session, with non-blocking fast paths.

Why not just a trio Stream: every ``send_all``/``receive_some`` on a trio
socket stream passes through the scheduler even when the kernel could take or
give the bytes at once, and at 100k requests per second a scheduler pass per
call is most of the cost.  A session therefore first tries the kernel
directly (``try_send``/``try_receive_into``) and only awaits when the socket would
block, which keeps the loop at about one scheduler pass per batch of
requests.  ``StreamTransport`` wraps any trio Stream (TLS, in-memory streams
in tests) and simply has no fast path.
"""

from __future__ import annotations

import os
import socket as stdsocket
from typing import TYPE_CHECKING, Protocol

import trio

if TYPE_CHECKING:
    from nbdserve.block.base import Buffer


class Transport(Protocol):
    def try_send(self, data: Buffer) -> int:
        """Send what the kernel takes now, without blocking; returns bytes sent."""
        ...

    async def send_all(self, data: Buffer) -> None: ...

    def try_send_many(self, chunks: list[Buffer]) -> int:
        """Like try_send for a list of buffers (sendmsg); returns bytes sent."""
        ...

    def try_receive_into(self, buf: memoryview) -> int | None:
        """recv_into ``buf`` now (0 at EOF), or None when a read would block."""
        ...

    async def receive_into(self, buf: memoryview) -> int: ...

    def try_send_file(
        self, header: bytes, fd: int, offset: int, count: int
    ) -> tuple[bytes, int, int, int] | None:
        """Like send_file as far as the socket takes it now: None when all of it
        went, else the arguments that send the rest."""
        ...

    async def send_file(self, header: bytes, fd: int, offset: int, count: int) -> None:
        """``header``, then ``count`` bytes of file ``fd`` from ``offset``."""
        ...

    async def aclose(self) -> None: ...

    @property
    def peer(self) -> str: ...

    @property
    def peer_address(self) -> str | None: ...


_BROKEN = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class SocketTransport:
    """A connected, non-blocking stdlib socket owned by one session."""

    def __init__(self, sock: stdsocket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (stdsocket.AF_INET, stdsocket.AF_INET6):
            sock.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
        self.sock = sock
        self._closed = False

    @classmethod
    def from_stream(cls, stream: trio.SocketStream) -> SocketTransport:
        """Take over the socket of an accepted trio stream."""
        sock = stream.socket
        fd = sock.detach()
        return cls(stdsocket.socket(sock.family, sock.type, sock.proto, fileno=fd))

    @property
    def peer(self) -> str:
        try:
            peer = self.sock.getpeername()
        except OSError:
            return "?"
        if isinstance(peer, tuple):
            return f"{peer[0]}:{peer[1]}"
        return "unix"

    @property
    def peer_address(self) -> str | None:
        """The client's IP address, or None for a Unix-socket client."""
        if self.sock.family not in (stdsocket.AF_INET, stdsocket.AF_INET6):
            return None
        try:
            return str(self.sock.getpeername()[0])
        except OSError:
            return None

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("transport is closed")

    def try_send(self, data: Buffer) -> int:
        self._check()
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except _BROKEN as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    def try_send_many(self, chunks: list[Buffer]) -> int:
        self._check()
        try:
            return self.sock.sendmsg(chunks)
        except BlockingIOError:
            return 0
        except _BROKEN as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def send_all(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        pos = 0
        n = view.nbytes
        while pos < n:
            sent = self.try_send(view[pos:])
            pos += sent
            if pos < n:
                await trio.lowlevel.wait_writable(self.sock)
        await trio.lowlevel.checkpoint_if_cancelled()

    def try_send_file(
        self, header: bytes, fd: int, offset: int, count: int
    ) -> tuple[bytes, int, int, int] | None:
        """Zero-copy: the header with MSG_MORE, then sendfile(2) from the page cache,
        without waiting; what the socket did not take is returned."""
        self._check()
        try:
            sent = self.sock.send(header, stdsocket.MSG_MORE) if header else 0
        except BlockingIOError:
            sent = 0
        except _BROKEN as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        if sent < len(header):
            return header[sent:], fd, offset, count
        out_fd = self.sock.fileno()
        end = offset + count
        while offset < end:
            try:
                sent = os.sendfile(out_fd, fd, offset, end - offset)
            except BlockingIOError:
                return b"", fd, offset, end - offset
            except _BROKEN as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            if sent == 0:
                # the file got shorter under us: the reply cannot be finished, and a
                # cut reply ends the connection (rather than spinning here forever)
                raise trio.BrokenResourceError("the image file ended in the middle of a reply")
            offset += sent
        return None

    async def send_file(self, header: bytes, fd: int, offset: int, count: int) -> None:
        rest = self.try_send_file(header, fd, offset, count)
        while rest is not None:
            await trio.lowlevel.wait_writable(self.sock)
            rest = self.try_send_file(*rest)

    def try_receive_into(self, buf: memoryview) -> int | None:
        self._check()
        try:
            return self.sock.recv_into(buf)
        except BlockingIOError:
            return None
        except _BROKEN as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def receive_into(self, buf: memoryview) -> int:
        while True:
            n = self.try_receive_into(buf)
            if n is not None:
                return n
            await trio.lowlevel.wait_readable(self.sock)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
        await trio.lowlevel.checkpoint()


class StreamTransport:
    """Any trio Stream (TLS, in-memory); no fast path."""

    def __init__(
        self, stream: trio.abc.Stream, peer: str = "?", peer_address: str | None = None
    ) -> None:
        self.stream = stream
        self._peer = peer
        self._peer_address = peer_address

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def peer_address(self) -> str | None:
        return self._peer_address

    def try_send(self, data: Buffer) -> int:
        return 0

    def try_send_many(self, chunks: list[Buffer]) -> int:
        return 0

    async def send_all(self, data: Buffer) -> None:
        await self.stream.send_all(data)

    def try_receive_into(self, buf: memoryview) -> int | None:
        return None

    async def receive_into(self, buf: memoryview) -> int:
        data = await self.stream.receive_some(len(buf))
        buf[: len(data)] = data
        return len(data)

    def try_send_file(
        self, header: bytes, fd: int, offset: int, count: int
    ) -> tuple[bytes, int, int, int] | None:
        return header, fd, offset, count

    async def send_file(self, header: bytes, fd: int, offset: int, count: int) -> None:
        data = await trio.to_thread.run_sync(os.pread, fd, count, offset)
        if len(data) < count:
            # as SocketTransport: a reply that cannot be completed is not begun
            raise trio.BrokenResourceError("the image file ended in the middle of a reply")
        await self.stream.send_all(header + data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
