"""A minimal NBD *client* for tests: a sans-IO codec plus an async trio client.

The codec is written from proto.md (and QEMU's extended-header layout) with
its own ``struct`` formats: it deliberately shares no layout code with
``nbdserve.protocol.wire``, so a wrong layout on the server side shows up as
a disagreement instead of being echoed back.  Only the numeric constants are
imported (they are checked against the spec by tests/unit/protocol/test_wire.py).

The codec is strict: anything the server sends that the spec forbids raises
:class:`ServerOutputError` (tests want to fail loudly, not to be lenient).

Design notes
------------
* Builders are plain functions returning bytes (``option(...)``,
  ``request(...)``), so tests can also send them raw, truncated or mangled.
* :class:`ClientCodec` parses server output in the phase the test says it is
  in: ``greeting()``, ``option_reply()``, ``export_name_reply()`` and
  ``reply()``; each returns ``None`` while the bytes are incomplete.
* In transmission the codec remembers each request (command, offset,
  length) by handle, because a simple reply to READ can only be framed with
  that knowledge, and it assembles structured chunks into one
  :class:`Reply` per handle when the DONE chunk arrives.
* :class:`NbdClient` drives the codec over a trio stream (TCP or Unix).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import trio

from nbdserve.protocol.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    Info,
    Opt,
    Rep,
    ReplyType,
)

DEFAULT_CLIENT_FLAGS = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)

_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_EXT_REQUEST = struct.Struct(">IHHQQQ")
_SIMPLE = struct.Struct(">IIQ")
_STRUCTURED = struct.Struct(">IHHQI")
_EXTENDED = struct.Struct(">IHHQQQ")


class ServerOutputError(AssertionError):
    """The server sent something the NBD spec does not allow."""


# ---- builders: client -> server -------------------------------------------


def client_flags(flags: int = DEFAULT_CLIENT_FLAGS) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, payload: bytes = b"", *, magic: int = IHAVEOPT) -> bytes:
    return _OPTION.pack(magic, opt, len(payload)) + payload


def _string32(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(">I", len(raw)) + raw


def opt_export_name(name: str | bytes) -> bytes:
    return option(Opt.EXPORT_NAME, name.encode() if isinstance(name, str) else name)


def opt_abort() -> bytes:
    return option(Opt.ABORT)


def opt_list() -> bytes:
    return option(Opt.LIST)


def opt_starttls() -> bytes:
    return option(Opt.STARTTLS)


def opt_structured_reply() -> bytes:
    return option(Opt.STRUCTURED_REPLY)


def opt_extended_headers() -> bytes:
    return option(Opt.EXTENDED_HEADERS)


def info_payload(name: str | bytes, infos: Sequence[int] = ()) -> bytes:
    return _string32(name) + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def opt_info(name: str | bytes, infos: Sequence[int] = ()) -> bytes:
    return option(Opt.INFO, info_payload(name, infos))


def opt_go(name: str | bytes, infos: Sequence[int] = ()) -> bytes:
    return option(Opt.GO, info_payload(name, infos))


def meta_payload(export: str | bytes, queries: Sequence[str | bytes]) -> bytes:
    return (
        _string32(export)
        + struct.pack(">I", len(queries))
        + b"".join(_string32(q) for q in queries)
    )


def opt_list_meta_context(export: str | bytes, queries: Sequence[str | bytes] = ()) -> bytes:
    return option(Opt.LIST_META_CONTEXT, meta_payload(export, queries))


def opt_set_meta_context(export: str | bytes, queries: Sequence[str | bytes]) -> bytes:
    return option(Opt.SET_META_CONTEXT, meta_payload(export, queries))


def request(
    cmd: int,
    handle: int,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
    payload: bytes = b"",
    *,
    extended: bool = False,
    magic: int | None = None,
) -> bytes:
    """One request header (compact 28 bytes or extended 32 bytes) + payload."""
    if extended:
        m = EXTENDED_REQUEST_MAGIC if magic is None else magic
        return _EXT_REQUEST.pack(m, flags, cmd, handle, offset, length) + payload
    m = REQUEST_MAGIC if magic is None else magic
    return _REQUEST.pack(m, flags, cmd, handle, offset, length) + payload


# ---- parsed server output -------------------------------------------------


@dataclass(frozen=True)
class Greeting:
    flags: int


@dataclass(frozen=True)
class OptionReply:
    option: int
    reply_type: int
    payload: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.reply_type & (1 << 31))

    @property
    def is_final(self) -> bool:
        return self.is_error or self.reply_type == Rep.ACK

    def message(self) -> str:
        if not self.is_error:
            raise ServerOutputError(f"{self!r} is not an error reply")
        return _decode(self.payload, "error message")

    def server(self) -> tuple[str, str]:
        """NBD_REP_SERVER: (name, description)."""
        self._expect(Rep.SERVER)
        if len(self.payload) < 4:
            raise ServerOutputError("NBD_REP_SERVER too short")
        (n,) = struct.unpack_from(">I", self.payload)
        if 4 + n > len(self.payload):
            raise ServerOutputError("NBD_REP_SERVER name overruns the reply")
        return (
            _decode(self.payload[4 : 4 + n], "export name"),
            _decode(self.payload[4 + n :], "description"),
        )

    def meta_context(self) -> tuple[int, str]:
        self._expect(Rep.META_CONTEXT)
        if len(self.payload) < 4:
            raise ServerOutputError("NBD_REP_META_CONTEXT too short")
        (cid,) = struct.unpack_from(">I", self.payload)
        return cid, _decode(self.payload[4:], "context name")

    def info(self) -> InfoItem:
        self._expect(Rep.INFO)
        return parse_info(self.payload)

    def _expect(self, rtype: int) -> None:
        if self.reply_type != rtype:
            raise ServerOutputError(f"expected reply type {rtype}, got {self!r}")


@dataclass(frozen=True)
class InfoExport:
    size: int
    flags: int


@dataclass(frozen=True)
class InfoName:
    name: str


@dataclass(frozen=True)
class InfoDescription:
    description: str


@dataclass(frozen=True)
class InfoBlockSize:
    minimum: int
    preferred: int
    maximum: int


InfoItem = InfoExport | InfoName | InfoDescription | InfoBlockSize


def parse_info(payload: bytes) -> InfoItem:
    if len(payload) < 2:
        raise ServerOutputError("NBD_REP_INFO without an info type")
    (kind,) = struct.unpack_from(">H", payload)
    body = payload[2:]
    if kind == Info.EXPORT:
        if len(body) != 10:
            raise ServerOutputError(f"NBD_INFO_EXPORT of {len(payload)} bytes")
        return InfoExport(*struct.unpack(">QH", body))
    if kind == Info.NAME:
        return InfoName(_decode(body, "NBD_INFO_NAME"))
    if kind == Info.DESCRIPTION:
        return InfoDescription(_decode(body, "NBD_INFO_DESCRIPTION"))
    if kind == Info.BLOCK_SIZE:
        if len(body) != 12:
            raise ServerOutputError(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes")
        return InfoBlockSize(*struct.unpack(">III", body))
    raise ServerOutputError(f"unknown NBD_INFO type {kind}")


def _decode(raw: bytes, what: str) -> str:
    if len(raw) > 4096:
        raise ServerOutputError(f"{what} longer than 4096 bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ServerOutputError(f"{what} is not UTF-8: {raw!r}") from None
    if "\0" in text:
        raise ServerOutputError(f"{what} contains NUL")
    return text


# transmission ---------------------------------------------------------------


@dataclass(frozen=True)
class OffsetData:
    offset: int
    data: bytes


@dataclass(frozen=True)
class OffsetHole:
    offset: int
    length: int


@dataclass(frozen=True)
class BlockStatus:
    context_id: int
    descriptors: tuple[tuple[int, int], ...]
    extended: bool = False


@dataclass(frozen=True)
class ErrorPayload:
    error: int
    message: str
    offset: int | None = None


@dataclass(frozen=True)
class NoneChunk:
    pass


ChunkBody = OffsetData | OffsetHole | BlockStatus | ErrorPayload | NoneChunk


@dataclass(frozen=True)
class Chunk:
    """One structured or extended reply chunk."""

    handle: int
    flags: int
    reply_type: int
    body: ChunkBody
    extended: bool = False
    request_offset: int | None = None  # the extended header's offset field

    @property
    def done(self) -> bool:
        return bool(self.flags & 1)


@dataclass
class Reply:
    """A complete reply to one request (simple, or all chunks up to DONE)."""

    handle: int
    cmd: int
    error: int = 0
    data: bytes | None = None  # READ: the assembled data
    simple: bool = False
    chunks: list[Chunk] = field(default_factory=list)
    message: str = ""

    @property
    def block_status(self) -> dict[int, BlockStatus]:
        return {c.body.context_id: c.body for c in self.chunks if isinstance(c.body, BlockStatus)}


@dataclass
class _Pending:
    cmd: int
    offset: int
    length: int
    chunks: list[Chunk] = field(default_factory=list)


class ClientCodec:
    """Parses server output; see the module's design notes."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.eof = False
        self.structured = False
        self.extended = False
        self.no_zeroes = True
        self._pending: dict[int, _Pending] = {}

    # ---- input ---------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            self.eof = True
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _have(self, n: int, what: str) -> bool:
        if len(self._buf) >= n:
            return True
        if self.eof:
            raise ServerOutputError(f"EOF inside {what} ({len(self._buf)} of {n} bytes)")
        return False

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    # ---- handshake -----------------------------------------------------

    def greeting(self) -> Greeting | None:
        if not self._have(_GREETING.size, "the greeting"):
            return None
        magic, ihaveopt, flags = _GREETING.unpack(self._take(_GREETING.size))
        if magic != NBDMAGIC or ihaveopt != IHAVEOPT:
            raise ServerOutputError(f"bad greeting magics {magic:#x} {ihaveopt:#x}")
        return Greeting(flags)

    def option_reply(self) -> OptionReply | None:
        if not self._have(_OPTION_REPLY.size, "an option reply header"):
            return None
        magic, opt, rtype, length = _OPTION_REPLY.unpack_from(self._buf)
        if magic != OPT_REPLY_MAGIC:
            raise ServerOutputError(f"bad option reply magic {magic:#x}")
        if not self._have(_OPTION_REPLY.size + length, "an option reply payload"):
            return None
        raw = self._take(_OPTION_REPLY.size + length)
        return OptionReply(opt, rtype, raw[_OPTION_REPLY.size :])

    def export_name_reply(self) -> InfoExport | None:
        n = 10 if self.no_zeroes else 134
        if not self._have(n, "the NBD_OPT_EXPORT_NAME reply"):
            return None
        raw = self._take(n)
        if any(raw[10:]):
            raise ServerOutputError("reserved bytes of the EXPORT_NAME reply are not zero")
        return InfoExport(*struct.unpack_from(">QH", raw))

    # ---- transmission --------------------------------------------------

    def request(
        self,
        cmd: int,
        handle: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
    ) -> bytes:
        """Encode a request in the negotiated header style and remember it."""
        if handle in self._pending:
            raise AssertionError(f"handle {handle} is still in flight")
        if cmd != Cmd.DISC:
            self._pending[handle] = _Pending(cmd, offset, length)
        return request(cmd, handle, offset, length, flags, payload, extended=self.extended)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def chunk(self) -> Chunk | SimpleReplyMsg | None:
        """The next reply message, unassembled."""
        if not self._have(4, "a reply magic"):
            return None
        (magic,) = struct.unpack_from(">I", self._buf)
        if magic == SIMPLE_REPLY_MAGIC:
            return self._simple()
        if magic == STRUCTURED_REPLY_MAGIC:
            if not self.structured or self.extended:
                raise ServerOutputError("structured reply chunk without (only) structured replies")
            return self._structured()
        if magic == EXTENDED_REPLY_MAGIC:
            if not self.extended:
                raise ServerOutputError("extended reply without extended headers")
            return self._extended_chunk()
        raise ServerOutputError(f"bad reply magic {magic:#x}")

    def reply(self) -> Reply | None:
        """The next *complete* reply, or None when more bytes are needed."""
        while True:
            msg = self.chunk()
            if msg is None:
                return None
            if isinstance(msg, SimpleReplyMsg):
                return msg.reply
            pending = self._pending[msg.handle]
            pending.chunks.append(msg)
            if msg.done:
                del self._pending[msg.handle]
                return _assemble(msg.handle, pending)

    def _simple(self) -> SimpleReplyMsg | None:
        if self.extended:
            raise ServerOutputError("simple reply under extended headers")
        if not self._have(_SIMPLE.size, "a simple reply"):
            return None
        _, error, handle = _SIMPLE.unpack_from(self._buf)
        pending = self._pending.get(handle)
        if pending is None:
            raise ServerOutputError(f"simple reply to unknown handle {handle:#x}")
        if pending.cmd == Cmd.READ and self.structured:
            raise ServerOutputError("simple reply to READ under structured replies")
        with_data = pending.cmd == Cmd.READ and error == 0
        n = _SIMPLE.size + (pending.length if with_data else 0)
        if not self._have(n, "a simple read reply"):
            return None
        raw = self._take(n)
        del self._pending[handle]
        data = raw[_SIMPLE.size :] if with_data else None
        return SimpleReplyMsg(Reply(handle, pending.cmd, error, data, simple=True))

    def _structured(self) -> Chunk | None:
        if not self._have(_STRUCTURED.size, "a structured reply header"):
            return None
        _, flags, rtype, handle, length = _STRUCTURED.unpack_from(self._buf)
        if not self._have(_STRUCTURED.size + length, "a structured reply payload"):
            return None
        payload = self._take(_STRUCTURED.size + length)[_STRUCTURED.size :]
        return self._make_chunk(handle, flags, rtype, payload, extended=False, req_offset=None)

    def _extended_chunk(self) -> Chunk | None:
        if not self._have(_EXTENDED.size, "an extended reply header"):
            return None
        _, flags, rtype, handle, req_offset, length = _EXTENDED.unpack_from(self._buf)
        if not self._have(_EXTENDED.size + length, "an extended reply payload"):
            return None
        payload = self._take(_EXTENDED.size + length)[_EXTENDED.size :]
        return self._make_chunk(handle, flags, rtype, payload, extended=True, req_offset=req_offset)

    def _make_chunk(
        self,
        handle: int,
        flags: int,
        rtype: int,
        payload: bytes,
        *,
        extended: bool,
        req_offset: int | None,
    ) -> Chunk:
        pending = self._pending.get(handle)
        if pending is None:
            raise ServerOutputError(f"chunk for unknown handle {handle:#x}")
        if flags & ~1:
            raise ServerOutputError(f"unknown reply flags {flags:#x}")
        if extended and req_offset != pending.offset:
            raise ServerOutputError(
                f"extended reply offset {req_offset} does not echo request offset {pending.offset}"
            )
        body = parse_chunk_body(rtype, payload, extended=extended)
        _check_chunk_fits(pending, body)
        return Chunk(handle, flags, rtype, body, extended, req_offset)


@dataclass(frozen=True)
class SimpleReplyMsg:
    reply: Reply


def parse_chunk_body(rtype: int, payload: bytes, *, extended: bool = False) -> ChunkBody:
    n = len(payload)
    if rtype == ReplyType.NONE:
        if n:
            raise ServerOutputError("NBD_REPLY_TYPE_NONE with a payload")
        return NoneChunk()
    if rtype == ReplyType.OFFSET_DATA:
        if n < 9:
            raise ServerOutputError("OFFSET_DATA needs an offset and at least one byte")
        (off,) = struct.unpack_from(">Q", payload)
        return OffsetData(off, payload[8:])
    if rtype == ReplyType.OFFSET_HOLE:
        if n != 12:
            raise ServerOutputError(f"OFFSET_HOLE payload of {n} bytes")
        off, length = struct.unpack(">QI", payload)
        if length == 0:
            raise ServerOutputError("OFFSET_HOLE of zero length")
        return OffsetHole(off, length)
    if rtype == ReplyType.BLOCK_STATUS:
        if extended:
            raise ServerOutputError("BLOCK_STATUS (32-bit) under extended headers")
        if n < 12 or (n - 4) % 8:
            raise ServerOutputError(f"BLOCK_STATUS payload of {n} bytes")
        (cid,) = struct.unpack_from(">I", payload)
        descs = tuple(struct.iter_unpack(">II", payload[4:]))
        return BlockStatus(cid, descs)
    if rtype == ReplyType.BLOCK_STATUS_EXT:
        if not extended:
            raise ServerOutputError("BLOCK_STATUS_EXT without extended headers")
        if n < 24 or (n - 8) % 16:
            raise ServerOutputError(f"BLOCK_STATUS_EXT payload of {n} bytes")
        cid, count = struct.unpack_from(">II", payload)
        descs = tuple(struct.iter_unpack(">QQ", payload[8:]))
        if count != len(descs):
            raise ServerOutputError(f"BLOCK_STATUS_EXT count {count} != {len(descs)} descriptors")
        return BlockStatus(cid, descs, extended=True)
    if rtype in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
        if n < 6:
            raise ServerOutputError("error chunk too short")
        error, mlen = struct.unpack_from(">IH", payload)
        tail = 8 if rtype == ReplyType.ERROR_OFFSET else 0
        if 6 + mlen + tail != n:
            raise ServerOutputError(f"error chunk length {n} does not match message {mlen}")
        if error == 0:
            raise ServerOutputError("error chunk with error 0")
        msg = _decode(payload[6 : 6 + mlen], "error message")
        off = struct.unpack_from(">Q", payload, 6 + mlen)[0] if tail else None
        return ErrorPayload(error, msg, off)
    raise ServerOutputError(f"unknown reply type {rtype}")


def _check_chunk_fits(pending: _Pending, body: ChunkBody) -> None:
    lo, hi = pending.offset, pending.offset + pending.length
    if isinstance(body, OffsetData | OffsetHole):
        if pending.cmd != Cmd.READ:
            raise ServerOutputError(f"read chunk in reply to command {pending.cmd}")
        n = len(body.data) if isinstance(body, OffsetData) else body.length
        if not (lo <= body.offset and body.offset + n <= hi):
            raise ServerOutputError(f"chunk {body.offset}+{n} outside request {lo}+{hi - lo}")
    if isinstance(body, BlockStatus) and pending.cmd != Cmd.BLOCK_STATUS:
        raise ServerOutputError("block status chunk in reply to another command")
    if isinstance(body, ErrorPayload) and body.offset is not None and not lo <= body.offset < hi:
        raise ServerOutputError(f"error offset {body.offset} outside the request")


def _assemble(handle: int, pending: _Pending) -> Reply:
    reply = Reply(handle, pending.cmd, chunks=pending.chunks)
    for c in pending.chunks:
        if isinstance(c.body, ErrorPayload):
            reply.error = reply.error or c.body.error
            reply.message = reply.message or c.body.message
    if pending.cmd == Cmd.READ and not reply.error:
        reply.data = _assemble_read(pending)
    return reply


def _assemble_read(pending: _Pending) -> bytes:
    data = bytearray(pending.length)
    covered = bytearray(pending.length)  # 1 per byte covered, to detect gaps/overlaps
    for c in pending.chunks:
        body = c.body
        if isinstance(body, OffsetData):
            start, n = body.offset - pending.offset, len(body.data)
            data[start : start + n] = body.data
        elif isinstance(body, OffsetHole):
            start, n = body.offset - pending.offset, body.length
        else:
            continue
        if any(covered[start : start + n]):
            raise ServerOutputError("read chunks overlap")
        covered[start : start + n] = b"\1" * n
    if covered.count(0):
        raise ServerOutputError("successful read reply does not cover the whole request")
    return bytes(data)


# ---- async client over a trio stream ---------------------------------------


class NbdError(Exception):
    """An option or request failed (an orderly error reply, not a bug)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(f"{code:#x}: {message}")
        self.code = code
        self.message = message


@dataclass
class ExportInfo:
    size: int
    flags: int
    name: str | None = None
    description: str | None = None
    block_size: InfoBlockSize | None = None
    replies: list[OptionReply] = field(default_factory=list)


class NbdClient:
    """A small async client: handshake helpers plus pipelined requests."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.codec = ClientCodec()
        self.greeting: Greeting | None = None
        self.meta_contexts: dict[int, str] = {}
        self._next_handle = 1

    @classmethod
    async def connect_tcp(cls, host: str, port: int) -> NbdClient:
        return cls(await trio.open_tcp_stream(host, port))

    @classmethod
    async def connect_unix(cls, path: str) -> NbdClient:
        return cls(await trio.open_unix_socket(path))

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(1 << 20)
        self.codec.receive_data(data)

    async def receive_eof(self) -> bytes:
        """Read until the server closes; returns whatever came before EOF."""
        chunks = []
        while True:
            try:
                data = await self.stream.receive_some(1 << 20)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    # ---- handshake -----------------------------------------------------

    async def handshake(self, flags: int = DEFAULT_CLIENT_FLAGS) -> Greeting:
        while (g := self.codec.greeting()) is None:
            await self._fill()
        self.greeting = g
        self.codec.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
        await self.send(client_flags(flags))
        return g

    async def option(self, raw: bytes) -> list[OptionReply]:
        """Send one option and collect its replies up to the final one."""
        await self.send(raw)
        return await self.option_replies()

    async def option_replies(self) -> list[OptionReply]:
        replies = []
        while True:
            while (r := self.codec.option_reply()) is None:
                await self._fill()
            replies.append(r)
            if r.is_final:
                return replies

    async def structured_reply(self) -> None:
        final = (await self.option(opt_structured_reply()))[-1]
        _raise_option_error(final)
        self.codec.structured = True

    async def extended_headers(self) -> None:
        final = (await self.option(opt_extended_headers()))[-1]
        _raise_option_error(final)
        self.codec.extended = True
        self.codec.structured = True

    async def list_exports(self) -> list[tuple[str, str]]:
        replies = await self.option(opt_list())
        _raise_option_error(replies[-1])
        return [r.server() for r in replies[:-1]]

    async def meta_context(
        self, export: str, queries: Sequence[str], *, set_: bool = True
    ) -> dict[int, str]:
        raw = (
            opt_set_meta_context(export, queries)
            if set_
            else opt_list_meta_context(export, queries)
        )
        replies = await self.option(raw)
        _raise_option_error(replies[-1])
        contexts = dict(r.meta_context() for r in replies[:-1])
        if set_:
            self.meta_contexts = contexts
        return contexts

    async def info(self, name: str, infos: Sequence[int] = (), *, go: bool = False) -> ExportInfo:
        raw = opt_go(name, infos) if go else opt_info(name, infos)
        replies = await self.option(raw)
        _raise_option_error(replies[-1])
        return export_info(replies)

    async def go(
        self,
        name: str = "",
        infos: Sequence[int] = (),
        *,
        structured: bool = True,
        extended: bool = False,
        meta: Sequence[str] = (),
    ) -> ExportInfo:
        """The usual client sequence: handshake, reply mode, contexts, GO."""
        if self.greeting is None:
            await self.handshake()
        if extended:
            await self.extended_headers()
        elif structured:
            await self.structured_reply()
        if meta:
            await self.meta_context(name, meta)
        return await self.info(name, infos, go=True)

    async def export_name(self, name: str) -> InfoExport:
        await self.send(opt_export_name(name))
        while (r := self.codec.export_name_reply()) is None:
            await self._fill()
        return r

    # ---- transmission --------------------------------------------------

    def new_handle(self) -> int:
        h = self._next_handle
        self._next_handle += 1
        return h

    async def submit(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
    ) -> int:
        """Send a request without waiting; returns its handle."""
        handle = self.new_handle()
        if cmd == Cmd.WRITE and not length:
            length = len(payload)
        await self.send(self.codec.request(cmd, handle, offset, length, flags, payload))
        return handle

    async def next_reply(self) -> Reply:
        while (r := self.codec.reply()) is None:
            await self._fill()
        return r

    async def replies(self, count: int) -> dict[int, Reply]:
        out = {}
        for _ in range(count):
            r = await self.next_reply()
            if r.handle in out:
                raise ServerOutputError(f"two replies for handle {r.handle}")
            out[r.handle] = r
        return out

    async def call(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
    ) -> Reply:
        handle = await self.submit(cmd, offset, length, flags, payload)
        reply = await self.next_reply()
        if reply.handle != handle:
            raise ServerOutputError(f"reply for {reply.handle} while waiting for {handle}")
        return reply

    async def checked(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
    ) -> Reply:
        reply = await self.call(cmd, offset, length, flags, payload)
        if reply.error:
            raise NbdError(reply.error, reply.message)
        return reply

    async def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        reply = await self.checked(Cmd.READ, offset, length, flags)
        assert reply.data is not None
        return reply.data

    async def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        await self.checked(Cmd.WRITE, offset, len(data), flags, data)

    async def flush(self) -> None:
        await self.checked(Cmd.FLUSH)

    async def trim(self, offset: int, length: int, flags: int = 0) -> None:
        await self.checked(Cmd.TRIM, offset, length, flags)

    async def write_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        await self.checked(Cmd.WRITE_ZEROES, offset, length, flags)

    async def cache(self, offset: int, length: int) -> None:
        await self.checked(Cmd.CACHE, offset, length)

    async def block_status(
        self, offset: int, length: int, flags: int = 0
    ) -> dict[int, BlockStatus]:
        return (await self.checked(Cmd.BLOCK_STATUS, offset, length, flags)).block_status

    async def disconnect(self) -> None:
        await self.send(self.codec.request(Cmd.DISC, self.new_handle()))


def _raise_option_error(reply: OptionReply) -> None:
    if reply.is_error:
        raise NbdError(reply.reply_type, reply.message())
    if reply.reply_type != Rep.ACK:
        raise ServerOutputError(f"final option reply is not ACK: {reply!r}")


def export_info(replies: Iterable[OptionReply]) -> ExportInfo:
    """Collect NBD_REP_INFO replies of INFO/GO into an ExportInfo."""
    replies = list(replies)
    info: ExportInfo | None = None
    name = desc = None
    block = None
    for r in replies[:-1]:
        item = r.info()
        if isinstance(item, InfoExport):
            info = ExportInfo(item.size, item.flags)
        elif isinstance(item, InfoName):
            name = item.name
        elif isinstance(item, InfoDescription):
            desc = item.description
        else:
            block = item
    if info is None:
        raise ServerOutputError("INFO/GO succeeded without NBD_INFO_EXPORT")
    info.name, info.description, info.block_size, info.replies = name, desc, block, replies
    return info


def decode_descriptors(status: BlockStatus, offset: int) -> list[tuple[int, int, int]]:
    """(offset, length, flags) for each descriptor starting at ``offset``."""
    out = []
    for length, flags in status.descriptors:
        out.append((offset, length, flags))
        offset += length
    return out
