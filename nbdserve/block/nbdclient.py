"""NbdClientDriver: a read-only layer served by another NBD server.

Lets an image's base be ``nbd://host:port/name`` or
``nbd+unix:///name?socket=PATH`` (NBD doc/uri.md).  ``block/chain.py`` opens
it only when the export's settings allow it (``allow_nbd_backing``): an image
is untrusted and must not make the server connect anywhere by default.

The client speaks fixed newstyle negotiation with ``NBD_OPT_GO``, structured
replies when the server offers them, ``NBD_CMD_READ`` and
``NBD_CMD_BLOCK_STATUS`` with ``base:allocation``.  There is no TLS and no
reconnect: a broken connection fails its request with EIO and is dropped from
the pool.  Requests run on a small pool of connections (one request at a
time on each), which gives concurrency without a receiver task.

This module speaks the wire format itself (``block`` must not import
``protocol``, architecture 2.1); the few constants it needs are below.
The connection also knows WRITE and FLUSH, for tests that drive a server.
"""

from __future__ import annotations

import contextlib
import struct
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import trio

from nbdserve.block.base import (
    Capabilities,
    Extent,
    FormatDriver,
    Limits,
    Status,
    Support,
    fill_zeros,
)
from nbdserve.errors import BackingChainError, HostIOError, NbdServeError

DEFAULT_PORT = 10809
_NBDMAGIC = 0x4E42444D41474943
_IHAVEOPT = 0x49484156454F5054
_OPT_REPLY_MAGIC = 0x3E889045565A9
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY_MAGIC = 0x67446698
_STRUCTURED_REPLY_MAGIC = 0x668E33EF
_FLAG_FIXED_NEWSTYLE = 1
_FLAG_NO_ZEROES = 2
_OPT_GO = 7
_OPT_STRUCTURED_REPLY = 8
_OPT_SET_META_CONTEXT = 10
_REP_ACK = 1
_REP_INFO = 3
_REP_META_CONTEXT = 4
_REP_ERR_BIT = 1 << 31
_INFO_EXPORT = 0
_INFO_BLOCK_SIZE = 3
_CMD_READ = 0
_CMD_WRITE = 1
_CMD_DISC = 2
_CMD_FLUSH = 3
_CMD_BLOCK_STATUS = 7
_REPLY_FLAG_DONE = 1
_REPLY_NONE = 0
_REPLY_OFFSET_DATA = 1
_REPLY_OFFSET_HOLE = 2
_REPLY_BLOCK_STATUS = 5
_REPLY_ERROR_BIT = 1 << 15
_STATE_HOLE = 1
_STATE_ZERO = 2
_BASE_ALLOCATION = b"base:allocation"
_MAX_OPTION_REPLY = 64 * 1024
_MAX_STRUCTURED_CHUNK = 64 * 1024 * 1024
_REQUEST = struct.Struct(">IHHQQI")

DEFAULT_TIMEOUT = 120.0
DEFAULT_CONNECTIONS = 4


@dataclass(frozen=True, slots=True)
class NbdAddress:
    """Where an export lives, parsed from an NBD URI."""

    export: str
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None

    def __str__(self) -> str:
        if self.socket is not None:
            return f"nbd+unix:///{urllib.parse.quote(self.export)}?socket={self.socket}"
        return f"nbd://{self.host}:{self.port}/{urllib.parse.quote(self.export)}"


def is_nbd_uri(ref: str) -> bool:
    return ref.split(":", 1)[0].lower() in ("nbd", "nbds", "nbd+unix", "nbds+unix")


def parse_nbd_uri(uri: str) -> NbdAddress:
    """Parse per NBD doc/uri.md; TLS schemes and unknown parameters are refused."""
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("nbds", "nbds+unix"):
        raise BackingChainError(f"{uri}: TLS (nbds) is not supported")
    if scheme not in ("nbd", "nbd+unix"):
        raise BackingChainError(f"{uri}: not an NBD URI")
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    allowed = {"socket"} if scheme == "nbd+unix" else set()
    unknown = [k for k in query if k not in allowed and not k.startswith("tls-")]
    if unknown:
        raise BackingChainError(f"{uri}: unknown query parameter {unknown[0]!r}")
    if scheme == "nbd+unix":
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise BackingChainError(f"{uri}: nbd+unix needs exactly one socket= parameter")
        if parts.netloc:
            raise BackingChainError(f"{uri}: nbd+unix takes no host")
        return NbdAddress(export=export, socket=sockets[0])
    if not parts.hostname:
        raise BackingChainError(f"{uri}: nbd:// needs a host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise BackingChainError(f"{uri}: bad port") from None
    return NbdAddress(export=export, host=parts.hostname, port=port)


class NbdRemoteError(HostIOError):
    """The server answered a request with an error."""


@dataclass(frozen=True, slots=True)
class ExportInfo:
    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = 32 * 1024 * 1024


class NbdConnection:
    """One negotiated connection; one request at a time."""

    def __init__(self, stream: trio.abc.Stream, address: NbdAddress) -> None:
        self._stream = stream
        self.address = address
        self._buf = bytearray()
        self.structured = False
        self.meta_context_id: int | None = None
        self.info = ExportInfo(0, 0)
        self._cookie = 0

    @classmethod
    async def connect(
        cls, address: NbdAddress, *, timeout: float = DEFAULT_TIMEOUT
    ) -> NbdConnection:
        try:
            with trio.fail_after(timeout):
                if address.socket is not None:
                    stream: trio.abc.Stream = await trio.open_unix_socket(address.socket)
                else:
                    assert address.host is not None
                    stream = await trio.open_tcp_stream(address.host, address.port)
        except (OSError, trio.TooSlowError) as exc:
            raise BackingChainError(f"cannot connect to {address}: {exc}") from exc
        conn = cls(stream, address)
        try:
            with trio.fail_after(timeout):
                await conn._handshake()
        except BaseException as exc:
            await trio.aclose_forcefully(stream)
            if isinstance(exc, trio.TooSlowError | trio.BrokenResourceError | OSError):
                raise BackingChainError(f"NBD handshake with {address} failed: {exc}") from exc
            raise
        return conn

    # ---- bytes ----------------------------------------------------------------------

    async def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            try:
                data = await self._stream.receive_some(max(65536, n - len(self._buf)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise HostIOError(f"NBD connection to {self.address} broke: {exc}") from exc
            if not data:
                raise HostIOError(f"NBD server {self.address} closed the connection")
            self._buf += data

    async def _recv(self, n: int) -> bytes:
        await self._fill(n)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def _recv_into(self, view: memoryview) -> None:
        n = len(view)
        have = min(n, len(self._buf))
        view[:have] = self._buf[:have]
        del self._buf[:have]
        pos = have
        while pos < n:
            try:
                data = await self._stream.receive_some(min(n - pos, 1 << 20))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise HostIOError(f"NBD connection to {self.address} broke: {exc}") from exc
            if not data:
                raise HostIOError(f"NBD server {self.address} closed the connection")
            view[pos : pos + len(data)] = data
            pos += len(data)

    async def _send(self, *parts: bytes | memoryview) -> None:
        try:
            for part in parts:
                await self._stream.send_all(part)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise HostIOError(f"NBD connection to {self.address} broke: {exc}") from exc

    # ---- negotiation ------------------------------------------------------------------

    async def _handshake(self) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", await self._recv(18))
        if magic != _NBDMAGIC or opt_magic != _IHAVEOPT:
            raise BackingChainError(f"{self.address} is not a newstyle NBD server")
        if not flags & _FLAG_FIXED_NEWSTYLE:
            raise BackingChainError(f"{self.address} does not speak fixed newstyle")
        client = _FLAG_FIXED_NEWSTYLE | (flags & _FLAG_NO_ZEROES)
        await self._send(struct.pack(">I", client))
        self.structured = await self._negotiate_structured()
        if self.structured:
            self.meta_context_id = await self._negotiate_meta_context()
        await self._go()

    async def _option(self, opt: int, payload: bytes) -> None:
        await self._send(struct.pack(">QII", _IHAVEOPT, opt, len(payload)), payload)

    async def _option_reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, rtype, length = struct.unpack(">QIII", await self._recv(20))
        if magic != _OPT_REPLY_MAGIC or ropt != opt:
            raise BackingChainError(f"{self.address}: bad option reply")
        if length > _MAX_OPTION_REPLY:
            raise BackingChainError(f"{self.address}: option reply too large ({length})")
        return rtype, await self._recv(length)

    async def _negotiate_structured(self) -> bool:
        await self._option(_OPT_STRUCTURED_REPLY, b"")
        rtype, _ = await self._option_reply(_OPT_STRUCTURED_REPLY)
        return rtype == _REP_ACK

    async def _negotiate_meta_context(self) -> int | None:
        name = self.address.export.encode()
        payload = (
            struct.pack(">I", len(name))
            + name
            + struct.pack(">II", 1, len(_BASE_ALLOCATION))
            + _BASE_ALLOCATION
        )
        await self._option(_OPT_SET_META_CONTEXT, payload)
        context: int | None = None
        while True:
            rtype, data = await self._option_reply(_OPT_SET_META_CONTEXT)
            if rtype == _REP_META_CONTEXT and len(data) >= 4:
                if data[4:] == _BASE_ALLOCATION:
                    context = struct.unpack(">I", data[:4])[0]
            elif rtype == _REP_ACK or rtype & _REP_ERR_BIT:
                return context

    async def _go(self) -> None:
        name = self.address.export.encode()
        payload = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, _INFO_BLOCK_SIZE)
        await self._option(_OPT_GO, payload)
        size = flags = None
        min_block, preferred, max_block = 1, 4096, 32 * 1024 * 1024
        while True:
            rtype, data = await self._option_reply(_OPT_GO)
            if rtype == _REP_INFO and len(data) >= 2:
                (kind,) = struct.unpack(">H", data[:2])
                if kind == _INFO_EXPORT and len(data) >= 12:
                    size, flags = struct.unpack(">QH", data[2:12])
                elif kind == _INFO_BLOCK_SIZE and len(data) >= 14:
                    min_block, preferred, max_block = struct.unpack(">III", data[2:14])
            elif rtype == _REP_ACK:
                break
            elif rtype & _REP_ERR_BIT:
                message = data.decode(errors="replace")
                raise BackingChainError(
                    f"{self.address}: export {self.address.export!r} refused "
                    f"(error {rtype & ~_REP_ERR_BIT}){': ' + message if message else ''}"
                )
        if size is None or flags is None:
            raise BackingChainError(f"{self.address}: server sent no export information")
        self.info = ExportInfo(size, flags, max(1, min_block), preferred, max(max_block, 512))

    # ---- transmission -----------------------------------------------------------------

    async def _request(
        self, cmd: int, offset: int, length: int, payload: bytes | memoryview = b""
    ) -> int:
        self._cookie += 1
        header = _REQUEST.pack(_REQUEST_MAGIC, 0, cmd, self._cookie, offset, length)
        if payload:
            await self._send(header, payload)
        else:
            await self._send(header)
        return self._cookie

    async def read(self, offset: int, view: memoryview) -> None:
        cookie = await self._request(_CMD_READ, offset, len(view))
        await self._read_reply(cookie, offset, view)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        cookie = await self._request(_CMD_WRITE, offset, len(data), data)
        await self._plain_reply(cookie)

    async def flush(self) -> None:
        cookie = await self._request(_CMD_FLUSH, 0, 0)
        await self._plain_reply(cookie)

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) descriptors of ``base:allocation`` from ``offset``."""
        cookie = await self._request(_CMD_BLOCK_STATUS, offset, length)
        out: list[tuple[int, int]] = []
        error: str | None = None
        while True:
            flags, rtype, payload = await self._structured_chunk(cookie)
            if rtype == _REPLY_BLOCK_STATUS and len(payload) >= 4:
                (context,) = struct.unpack_from(">I", payload)
                if context == self.meta_context_id:
                    body = payload[4:]
                    out.extend(struct.iter_unpack(">II", body[: len(body) // 8 * 8]))
            elif rtype & _REPLY_ERROR_BIT:
                error = self._error_text(payload)
            if flags & _REPLY_FLAG_DONE:
                break
        if error is not None:
            raise NbdRemoteError(f"NBD block status at {offset} failed: {error}")
        return out

    async def _reply_magic(self) -> int:
        return int(struct.unpack(">I", await self._recv(4))[0])

    async def _plain_reply(self, cookie: int) -> None:
        magic = await self._reply_magic()
        if magic == _SIMPLE_REPLY_MAGIC:
            error, got = struct.unpack(">IQ", await self._recv(12))
            self._check_cookie(cookie, got)
            if error:
                raise NbdRemoteError(f"NBD server {self.address} answered error {error}")
            return
        self._buf[:0] = struct.pack(">I", magic)
        failure: str | None = None
        while True:
            flags, rtype, payload = await self._structured_chunk(cookie)
            if rtype & _REPLY_ERROR_BIT:
                failure = self._error_text(payload)
            if flags & _REPLY_FLAG_DONE:
                break
        if failure is not None:
            raise NbdRemoteError(f"NBD server {self.address}: {failure}")

    async def _structured_chunk(self, cookie: int) -> tuple[int, int, bytes]:
        magic, flags, rtype, got, length = struct.unpack(">IHHQI", await self._recv(20))
        if magic != _STRUCTURED_REPLY_MAGIC:
            raise HostIOError(f"NBD server {self.address} sent a bad reply magic {magic:#x}")
        self._check_cookie(cookie, got)
        if length > _MAX_STRUCTURED_CHUNK:
            raise HostIOError(f"NBD server {self.address} sent a {length}-byte chunk")
        return flags, rtype, await self._recv(length)

    async def _read_reply(self, cookie: int, offset: int, view: memoryview) -> None:
        magic = await self._reply_magic()
        if magic == _SIMPLE_REPLY_MAGIC:
            code, got = struct.unpack(">IQ", await self._recv(12))
            self._check_cookie(cookie, got)
            if code:
                raise NbdRemoteError(f"NBD read at {offset} failed with error {code}")
            await self._recv_into(view)
            return
        if magic != _STRUCTURED_REPLY_MAGIC:
            raise HostIOError(f"NBD server {self.address} sent a bad reply magic {magic:#x}")
        end = offset + len(view)
        covered = 0
        error: str | None = None
        first = True
        while True:
            if not first:
                magic = await self._reply_magic()
                if magic != _STRUCTURED_REPLY_MAGIC:
                    raise HostIOError(f"NBD server {self.address} sent a bad reply magic")
            first = False
            flags, rtype, got, length = struct.unpack(">HHQI", await self._recv(16))
            self._check_cookie(cookie, got)
            if rtype == _REPLY_OFFSET_DATA:
                if length < 8:
                    raise HostIOError(f"NBD server {self.address} sent a short data chunk")
                (at,) = struct.unpack(">Q", await self._recv(8))
                n = length - 8
                if at < offset or at + n > end:
                    raise HostIOError(f"NBD server {self.address} sent data outside the request")
                await self._recv_into(view[at - offset : at - offset + n])
                covered += n
            elif rtype == _REPLY_OFFSET_HOLE:
                at, n = struct.unpack(">QI", await self._recv(12))
                if at < offset or at + n > end:
                    raise HostIOError(f"NBD server {self.address} sent a hole outside the request")
                fill_zeros(view[at - offset : at - offset + n])
                covered += n
            else:
                if length > _MAX_OPTION_REPLY:
                    raise HostIOError(f"NBD server {self.address} sent a {length}-byte chunk")
                payload = await self._recv(length)
                if rtype & _REPLY_ERROR_BIT:
                    error = self._error_text(payload)
            if flags & _REPLY_FLAG_DONE:
                break
        if error is not None:
            raise NbdRemoteError(f"NBD read at {offset} failed: {error}")
        if covered < len(view):
            raise HostIOError(f"NBD server {self.address} left part of a read unanswered")

    def _check_cookie(self, expected: int, got: int) -> None:
        if got != expected:
            raise HostIOError(f"NBD server {self.address} answered the wrong request")

    @staticmethod
    def _error_text(payload: bytes) -> str:
        if len(payload) < 6:
            return "error"
        error, mlen = struct.unpack_from(">IH", payload)
        message = payload[6 : 6 + mlen].decode(errors="replace")
        return f"error {error}{': ' + message if message else ''}"

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self._stream.send_all(_REQUEST.pack(_REQUEST_MAGIC, 0, _CMD_DISC, 0, 0, 0))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await trio.aclose_forcefully(self._stream)


class NbdClientDriver(FormatDriver):
    """A read-only bottom layer whose bytes come from an NBD export."""

    format_name = "nbd"

    def __init__(self, address: NbdAddress, first: NbdConnection, *, max_connections: int) -> None:
        # no FileBackend: this layer's bytes live on another server
        self.file = None
        self.read_only = True
        self.backing = None
        self._closed = False
        self.address = address
        info = first.info
        self.size = info.size
        self._align = info.min_block if info.min_block & (info.min_block - 1) == 0 else 1
        self.limits = Limits(
            request_alignment=1,
            max_transfer=min(32 * 1024 * 1024, info.max_block),
            preferred=max(info.preferred_block, 512),
        )
        self.caps = Capabilities(
            writable=False,
            flush=False,
            discard=False,
            zero=Support.NONE,
            fast_zero=False,
            fua=Support.NONE,
            cache=False,
            multi_conn=True,
        )
        self._has_status = first.meta_context_id is not None
        self._idle: list[NbdConnection] = [first]
        self._limiter = trio.CapacityLimiter(max(1, max_connections))
        self._open_connections = 1

    @property
    def backing_reference(self) -> tuple[str, str | None] | None:
        return None

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[NbdConnection]:
        self._check_open()
        async with self._limiter:
            conn = self._idle.pop() if self._idle else await self._connect()
            healthy = False
            try:
                with trio.fail_after(DEFAULT_TIMEOUT):
                    yield conn
                healthy = True
            except trio.TooSlowError as exc:
                raise HostIOError(f"NBD request to {self.address} timed out") from exc
            finally:
                if healthy and not self._closed:
                    self._idle.append(conn)
                else:
                    self._open_connections -= 1
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(conn._stream)

    async def _connect(self) -> NbdConnection:
        try:
            conn = await NbdConnection.connect(self.address)
        except NbdServeError as exc:
            raise HostIOError(f"cannot reconnect to {self.address}: {exc}") from exc
        self._open_connections += 1
        return conn

    async def readinto(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        align = self._align
        lo = offset - offset % align
        hi = min(-(-(offset + n) // align) * align, max(self.size, offset + n))
        inside = max(0, min(hi, self.size) - lo)
        if lo == offset and inside == n:
            async with self._connection() as conn:
                await conn.read(offset, buf)
            return
        bounce = bytearray(hi - lo)
        if inside:
            async with self._connection() as conn:
                await conn.read(lo, memoryview(bounce)[:inside])
        else:
            await trio.lowlevel.checkpoint()
        buf[:] = memoryview(bounce)[offset - lo : offset - lo + n]

    async def block_status(self, offset: int, length: int) -> Sequence[Extent]:
        length = min(length, self.size - offset, 1 << 30)
        if not self._has_status or length <= 0:
            await trio.lowlevel.checkpoint()
            return [Extent(offset, max(length, 1), Status.ALLOCATED | Status.DATA)]
        async with self._connection() as conn:
            descriptors = await conn.block_status(offset, length)
        out: list[Extent] = []
        pos = offset
        for n, flags in descriptors:
            n = min(n, offset + length - pos)
            if n <= 0:
                break
            status = Status.ALLOCATED
            if flags & _STATE_ZERO:
                status |= Status.ZERO
            if not flags & _STATE_HOLE:
                status |= Status.DATA
            out.append(Extent(pos, n, status))
            pos += n
        if not out:
            raise HostIOError(f"NBD server {self.address} sent no block status")
        return out

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        idle, self._idle = self._idle, []
        with trio.CancelScope(shield=True):
            for conn in idle:
                await conn.aclose()

    def describe(self) -> dict[str, object]:
        return {"format": "nbd", "uri": str(self.address), "virtual-size": self.size}


async def open_nbd_uri(uri: str, *, max_connections: int = DEFAULT_CONNECTIONS) -> NbdClientDriver:
    """Connect to the export an NBD URI names and return a read-only layer."""
    address = parse_nbd_uri(uri)
    first = await NbdConnection.connect(address)
    return NbdClientDriver(address, first, max_connections=max_connections)


__all__ = [
    "NbdAddress",
    "NbdClientDriver",
    "NbdConnection",
    "is_nbd_uri",
    "open_nbd_uri",
    "parse_nbd_uri",
]
