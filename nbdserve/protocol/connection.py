"""ServerConnection: the NBD server side as a pure state machine.

Design notes
------------
Bytes go in with :meth:`receive_data` (``b""`` is EOF), events come out of
:meth:`next_event` (or ``NEED_DATA`` / ``PAUSED``), and :meth:`send` turns a
server event into the chunks to write.  Nothing here awaits, and nothing here
knows about images: option events carry names, and the application answers
with ``ExportReply`` / ``OptionError`` / ``MetaContextReply``.

Two kinds of bad input.  Broken framing (a bad magic, garbage, EOF inside a
message) raises :class:`RemoteProtocolError` and the session drops the
connection.  A well-framed but invalid option or request becomes an event
(``OptionRejected`` / ``InvalidRequest``) and the client gets an error reply.
Internally the core raises :class:`LocalProtocolError`; ``next_event``
re-raises it as remote (h11).

Memory is bounded: option payloads above ``max_option_size`` and write
payloads above ``max_payload`` are skipped as they arrive, never buffered,
and the buffer only grows while one incomplete message is being collected.

The per-request path (``next_event`` in TRANSMISSION and the ``reply_*``
helpers) uses the ``struct`` twins from wire.py.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence

from nbdserve.errors import LocalProtocolError, NbdErrno, RemoteProtocolError
from nbdserve.protocol import events as ev
from nbdserve.protocol.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    HsFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TxFlag,
)
from nbdserve.protocol.state import (
    FINAL_REPLIES,
    OPTION_REPLIES,
    OPTION_TRANSITIONS,
    STRUCTURED_ONLY,
    TRANSMISSION_REPLIES,
    Phase,
)
from nbdserve.protocol.validate import (
    TransmissionState,
    is_plain_read,
    is_plain_write,
    validate_request,
)
from nbdserve.protocol.wire import (
    EXPORT_NAME_ZEROES,
    EXTENDED_READ_CHUNK_STRUCT,
    EXTENDED_REPLY_STRUCT,
    EXTENDED_REQUEST_SIZE,
    EXTENDED_REQUEST_STRUCT,
    OPTION_HEADER_SIZE,
    OPTION_HEADER_STRUCT,
    OPTION_REPLY_STRUCT,
    READ_CHUNK_STRUCT,
    REQUEST_SIZE,
    REQUEST_STRUCT,
    SIMPLE_REPLY_STRUCT,
    STRUCTURED_REPLY_STRUCT,
)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_ERROR_HEAD = struct.Struct(">IH")
_HOLE = struct.Struct(">QI")
_DESC = struct.Struct(">II")
_DESC_EXT = struct.Struct(">QQ")
_BS_EXT_HEAD = struct.Struct(">II")

# a plain int: ``~`` of an IntFlag only complements the *defined* bits, which
# would make every unknown flag look known
_KNOWN_CLIENT_FLAGS = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
_DONE = int(ReplyFlag.DONE)
_WRITE = int(Cmd.WRITE)
_DISC = int(Cmd.DISC)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
_NO_PAYLOAD = int(ReplyType.NONE)
_BATCH_ENDERS = (ev.Disconnect, ev.ConnectionClosed)
# builds a Request without the Python-level __new__ NamedTuple generates:
# 0.14 against 0.31 us, once per request on the per-request path
_Request = ev.Request
_new_request = tuple.__new__

DEFAULT_MAX_OPTION_SIZE = 64 * 1024
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
# WRITE payloads at least this large are received into a buffer of their own
LARGE_PAYLOAD = 64 * 1024
PAYLOAD_GROW = 4 * 1024 * 1024


class ServerConnection:
    """One client connection, server side.  See the module's design notes."""

    def __init__(
        self,
        *,
        allow_structured: bool = True,
        allow_extended: bool = True,
        max_option_size: int = DEFAULT_MAX_OPTION_SIZE,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        payload_pool: PayloadPool | None = None,
    ) -> None:
        self.allow_structured = allow_structured
        self.allow_extended = allow_extended
        self.max_option_size = max_option_size
        self.max_payload = max_payload
        self._phase = Phase.AWAIT_CLIENT_FLAGS
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._skip = 0  # bytes of an over-long payload still to discard
        self._client_flags = 0
        self._pending: ev.OptionEvent | None = None
        self._pending_opt = 0
        self._pending_contexts: list[tuple[int, str]] = []
        self._structured = False
        self._extended = False
        self._meta_contexts: dict[int, str] = {}
        self._meta_items: tuple[tuple[int, str], ...] | None = None
        self._meta_export: str | None = None
        self._export_size = 0
        self._tx_flags = TxFlag(0)
        self._min_block = 1
        self._tstate: TransmissionState | None = None
        self._payload: _Payload | None = None
        self._pool = payload_pool if payload_pool is not None else PayloadPool()
        self._greeted = False
        self._transmitted = False  # TRANSMISSION was entered (CLOSED may follow it)

    # ---- read-only properties ---------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def structured_replies(self) -> bool:
        return self._structured

    @property
    def extended_headers(self) -> bool:
        return self._extended

    @property
    def meta_contexts(self) -> dict[int, str]:
        """Context id -> name, as last settled by SET_META_CONTEXT."""
        return dict(self._meta_contexts)

    @property
    def meta_context_items(self) -> tuple[tuple[int, str], ...]:
        """The settled contexts as (id, name) pairs in id order; cheap per request."""
        items = self._meta_items
        if items is None:
            items = self._meta_items = tuple(sorted(self._meta_contexts.items()))
        return items

    @property
    def export_size(self) -> int:
        return self._export_size

    @property
    def transmission_flags(self) -> TxFlag:
        return self._tx_flags

    @property
    def client_no_zeroes(self) -> bool:
        return bool(self._client_flags & ClientFlag.C_NO_ZEROES)

    @property
    def pending_option(self) -> ev.OptionEvent | None:
        return self._pending

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed."""
        return len(self._buf) - self._pos

    # ---- input --------------------------------------------------------------

    def initiate(self) -> bytes:
        """The greeting; the server speaks first."""
        if self._greeted:
            raise LocalProtocolError("greeting already sent")
        self._greeted = True
        flags = HsFlag.FIXED_NEWSTYLE | HsFlag.NO_ZEROES
        return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags)

    def receive_buffer(self) -> memoryview | None:
        """Where the next received bytes should land directly, or None.

        While a large WRITE payload is being collected this is the rest of
        that payload's own buffer, so the transport can ``recv_into`` it and
        the payload is never copied inside the process.  After writing ``n``
        bytes into it, call :meth:`commit_received`.  None: use receive_data.
        """
        target = self._payload
        if target is None:
            return None
        target.grow()
        return memoryview(target.data)[target.filled :]

    def commit_received(self, n: int) -> None:
        target = self._payload
        if target is None or n < 0 or target.filled + n > len(target.data):
            raise LocalProtocolError("commit_received without a matching receive_buffer")
        if n == 0:
            self._eof = True
        target.filled += n

    def recycle(self, payload: object) -> None:
        """The application is done with a WRITE payload: its buffer may serve again.

        Only a buffer that nothing else refers to is kept (a driver that held
        on to it would otherwise see it overwritten): the references are the
        caller's Request, this argument and getrefcount's own.
        """
        if (
            type(payload) is bytearray
            and len(payload) >= LARGE_PAYLOAD  # the pool keeps no small ones
            and sys.getrefcount(payload) <= 3
        ):
            self._pool.give(payload)

    def reply_buffer(self, length: int) -> bytearray:
        """A buffer for ``length`` bytes of reply (contents undefined) that the
        application fills, sends, then hands to ``recycle_replies``.

        Large ones come from the pool: a fresh 1 MiB bytearray costs a zero
        fill (~23 us here) on every read that cannot go out with sendfile.
        """
        if length >= LARGE_PAYLOAD:
            pooled = self._pool.take(length)
            if pooled is not None:
                return pooled
        return bytearray(length)

    def recycle_replies(self, chunks: list[bytes | bytearray | memoryview]) -> None:
        """``chunks`` have been sent: their large buffers may serve again.

        As in ``recycle``, only buffers nothing else refers to: the
        references left are the list's, the loop's and getrefcount's own.
        """
        give = self._pool.give
        for chunk in chunks:
            if type(chunk) is bytearray and sys.getrefcount(chunk) <= 3:
                give(chunk)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data received after EOF")
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = memoryview(data)[n:]
            if not data:
                return
        target = self._payload
        if target is not None:
            n = min(target.length - target.filled, len(data))
            target.append(memoryview(data)[:n])
            data = memoryview(data)[n:]
            if not data:
                return
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def next_event(self) -> object:
        """The next event, ``NEED_DATA`` or ``PAUSED``.

        Raises RemoteProtocolError on broken framing; the connection is then
        in ERROR for good.
        """
        if self._phase is Phase.ERROR:
            raise RemoteProtocolError("connection is in the ERROR phase")
        try:
            event = self._read_event()
        except LocalProtocolError as exc:
            self._phase = Phase.ERROR
            raise RemoteProtocolError(str(exc)) from None
        return event

    def next_events(self, limit: int = 4096) -> list[object]:
        """Every event the buffered bytes hold now, in order, at most ``limit``.

        The batch form of :meth:`next_event` for the per-request path: an empty
        list means NEED_DATA (or PAUSED during the handshake).  A batch ends
        after ``Disconnect`` or ``ConnectionClosed``.
        """
        if self._phase is not Phase.TRANSMISSION or self._skip:
            event = self.next_event()
            return [] if event is ev.NEED_DATA or event is ev.PAUSED else [event]
        out: list[object] = []
        read = self._read_request
        need = ev.NEED_DATA
        try:
            while len(out) < limit:
                event = read()
                if event is need:
                    break
                out.append(event)
                if self._skip or type(event) in _BATCH_ENDERS:
                    break
        except LocalProtocolError as exc:
            self._phase = Phase.ERROR
            raise RemoteProtocolError(str(exc)) from None
        return out

    def _read_event(self) -> object:
        if self._skip:
            return self._eof_or(ev.NEED_DATA, "inside a skipped payload")
        phase = self._phase
        if phase is Phase.TRANSMISSION:
            return self._read_request()
        if phase is Phase.OPTIONS:
            if self._pending is not None:
                return ev.PAUSED
            return self._read_option()
        if phase is Phase.AWAIT_CLIENT_FLAGS:
            return self._read_client_flags()
        if phase is Phase.CLOSED:
            return ev.ConnectionClosed()
        raise LocalProtocolError(f"no events in phase {phase}")

    def _eof_or(self, what: object, where: str) -> object:
        if self._eof:
            if self.buffered or self._skip or where != "between messages":
                raise LocalProtocolError(f"connection closed {where}")
            self._phase = Phase.CLOSED
            return ev.ConnectionClosed()
        return what

    def _take(self, n: int) -> memoryview:
        start = self._pos
        self._pos = start + n
        return memoryview(self._buf)[start : start + n]

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0

    # ---- handshake ----------------------------------------------------------

    def _read_client_flags(self) -> object:
        if self.buffered < 4:
            return self._eof_or(
                ev.NEED_DATA, "before sending client flags" if self.buffered else "between messages"
            )
        (flags,) = _U32.unpack_from(self._buf, self._pos)
        self._pos += 4
        if flags & ~_KNOWN_CLIENT_FLAGS:
            # proto.md: the server MUST close if it does not know the client's flags
            raise LocalProtocolError(f"unknown client flags {flags:#x} (not an NBD client?)")
        self._client_flags = flags
        self._phase = Phase.OPTIONS
        return ev.ClientFlagsReceived(flags)

    def _read_option(self) -> object:
        if self.buffered < OPTION_HEADER_SIZE:
            return self._eof_or(
                ev.NEED_DATA, "inside an option header" if self.buffered else "between messages"
            )
        magic, option, length = OPTION_HEADER_STRUCT.unpack_from(self._buf, self._pos)
        if magic != IHAVEOPT:
            raise LocalProtocolError(f"bad option magic {magic:#x}")
        if length > self.max_option_size:
            if option == Opt.EXPORT_NAME:
                # EXPORT_NAME has no error reply: refusing it means closing
                raise LocalProtocolError(f"NBD_OPT_EXPORT_NAME of {length} bytes")
            self._pos += OPTION_HEADER_SIZE
            self._skip_bytes(length)
            return self._pend(
                ev.OptionRejected(option, Rep.ERR_TOO_BIG, f"option payload of {length} bytes"),
                option,
            )
        if self.buffered < OPTION_HEADER_SIZE + length:
            return self._eof_or(ev.NEED_DATA, "inside an option payload")
        self._pos += OPTION_HEADER_SIZE
        payload = bytes(self._take(length))
        self._compact()
        return self._pend(self._parse_option(option, payload), option)

    def _skip_bytes(self, n: int) -> None:
        have = min(n, self.buffered)
        self._pos += have
        self._skip = n - have
        self._compact()

    def _pend(self, event: ev.OptionEvent, option: int) -> ev.OptionEvent:
        self._pending = event
        self._pending_opt = option
        self._pending_contexts = []
        return event

    def _parse_option(self, option: int, payload: bytes) -> ev.OptionEvent:
        try:
            opt = Opt(option)
        except ValueError:
            return ev.OptUnknown(option)
        try:
            return self._parse_known_option(opt, payload)
        except _BadOption as exc:
            if opt is Opt.EXPORT_NAME:
                # proto.md: a server unwilling to allow the export MUST
                # terminate the session; an option reply would be misread
                raise LocalProtocolError(f"NBD_OPT_EXPORT_NAME refused: {exc}") from None
            return ev.OptionRejected(option, exc.reply, str(exc))

    def _parse_known_option(self, opt: Opt, payload: bytes) -> ev.OptionEvent:
        if opt is Opt.EXPORT_NAME:
            if self._extended:
                raise LocalProtocolError("NBD_OPT_EXPORT_NAME after extended headers")
            return ev.OptExportName(_decode_string(payload, "export name"))
        if opt is Opt.ABORT:
            return ev.OptAbort()
        if opt in (Opt.INFO, Opt.GO):
            name, infos = _parse_info_payload(payload)
            return ev.OptGo(name, infos) if opt is Opt.GO else ev.OptInfo(name, infos)
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            if opt is Opt.SET_META_CONTEXT and not self._structured:
                raise _BadOption(Rep.ERR_INVALID, "structured replies not negotiated")
            export, queries = _parse_meta_payload(payload)
            if opt is Opt.SET_META_CONTEXT:
                return ev.OptSetMetaContext(export, queries)
            return ev.OptListMetaContext(export, queries)
        if payload:
            raise _BadOption(Rep.ERR_INVALID, f"{opt.name} takes no data")
        if opt is Opt.LIST:
            return ev.OptList()
        if opt is Opt.STARTTLS:
            return ev.OptStartTls()
        if opt is Opt.STRUCTURED_REPLY:
            if self._extended:
                raise _BadOption(Rep.ERR_EXT_HEADER_REQD, "extended headers already negotiated")
            if self._structured:
                raise _BadOption(Rep.ERR_INVALID, "structured replies already negotiated")
            if not self.allow_structured:
                raise _BadOption(Rep.ERR_UNSUP, "structured replies disabled")
            return ev.OptStructuredReply()
        if opt is Opt.EXTENDED_HEADERS:
            if self._extended:
                raise _BadOption(Rep.ERR_INVALID, "extended headers already negotiated")
            if not (self.allow_extended and self.allow_structured):
                raise _BadOption(Rep.ERR_UNSUP, "extended headers disabled")
            return ev.OptExtendedHeaders()
        return ev.OptUnknown(int(opt))  # PEEK_EXPORT and anything newer

    # ---- transmission -------------------------------------------------------

    def _transmission_state(self) -> TransmissionState:
        if self._tstate is None:
            self._tstate = TransmissionState.create(
                size=self._export_size,
                flags=self._tx_flags,
                structured=self._structured,
                extended=self._extended,
                has_meta_context=bool(self._meta_contexts),
                max_payload=self.max_payload,
                min_block=self._min_block,
            )
        return self._tstate

    def _read_request(self) -> object:
        if self._payload is not None:
            return self._finish_payload()
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if self._extended:
            if avail < EXTENDED_REQUEST_SIZE:
                return self._eof_or(
                    ev.NEED_DATA, "inside a request header" if avail else "between messages"
                )
            magic, flags, cmd, handle, offset, length = EXTENDED_REQUEST_STRUCT.unpack_from(
                buf, pos
            )
            hsize = EXTENDED_REQUEST_SIZE
            if magic != EXTENDED_REQUEST_MAGIC:
                raise LocalProtocolError(f"bad request magic {magic:#x}")
        else:
            if avail < REQUEST_SIZE:
                return self._eof_or(
                    ev.NEED_DATA, "inside a request header" if avail else "between messages"
                )
            magic, flags, cmd, handle, offset, length = REQUEST_STRUCT.unpack_from(buf, pos)
            hsize = REQUEST_SIZE
            if magic != REQUEST_MAGIC:
                raise LocalProtocolError(f"bad request magic {magic:#x}")
        if cmd == _WRITE:
            return self._read_write(hsize, flags, handle, offset, length)
        self._pos = pos + hsize
        st = self._tstate or self._transmission_state()
        if is_plain_read(st, cmd, flags, offset, length):
            return _new_request(_Request, (handle, cmd, flags, offset, length, None))
        if cmd == _DISC:
            self._phase = Phase.CLOSED
            return ev.Disconnect()
        bad = validate_request(st, cmd, flags, offset, length)
        if bad is not None:
            return ev.InvalidRequest(handle, cmd, flags, offset, length, bad[0], bad[1])
        return ev.Request(handle, cmd, flags, offset, length)

    def _read_write(self, hsize: int, flags: int, handle: int, offset: int, length: int) -> object:
        st = self._tstate or self._transmission_state()
        if is_plain_write(st, flags, offset, length):
            bad = None
        else:
            bad = validate_request(st, _WRITE, flags, offset, length)
        if length > self.max_payload:
            # never buffer an over-long payload: discard it as it streams in
            self._pos += hsize
            self._skip_bytes(length)
            reason = bad[1] if bad else f"write of {length} bytes is too large"
            return ev.InvalidRequest(handle, _WRITE, flags, offset, length, NbdErrno.EINVAL, reason)
        if len(self._buf) - self._pos < hsize + length:
            if length >= LARGE_PAYLOAD and bad is None:
                return self._start_payload(hsize, flags, handle, offset, length)
            return self._eof_or(ev.NEED_DATA, "inside a write payload")
        start = self._pos + hsize
        payload = self._buf[start : start + length]  # a copy: the buffer moves on
        self._pos = start + length
        if self._pos > 1 << 20:
            self._compact()
        if bad is not None:
            return ev.InvalidRequest(handle, _WRITE, flags, offset, length, bad[0], bad[1])
        return _new_request(_Request, (handle, _WRITE, flags, offset, length, payload))

    def _start_payload(
        self, hsize: int, flags: int, handle: int, offset: int, length: int
    ) -> object:
        """Collect a large payload in its own buffer (see receive_buffer)."""
        start = self._pos + hsize
        have = min(len(self._buf) - start, length)
        target = _Payload(length, handle, flags, offset)
        pooled = self._pool.take(length)
        if pooled is not None:
            target.data = pooled
        target.append(memoryview(self._buf)[start : start + have])
        self._pos = start + have
        self._compact()
        self._payload = target
        return self._eof_or(ev.NEED_DATA, "inside a write payload")

    def _finish_payload(self) -> object:
        target = self._payload
        assert target is not None
        if target.filled < target.length:
            return self._eof_or(ev.NEED_DATA, "inside a write payload")
        self._payload = None
        return ev.Request(
            target.handle, _WRITE, target.flags, target.offset, target.length, target.data
        )

    # ---- output ---------------------------------------------------------------

    def send(self, event: object) -> list[bytes | bytearray | memoryview]:
        """Encode a server event; raises LocalProtocolError if it is illegal now."""
        try:
            return self._send(event)
        except LocalProtocolError:
            self._phase = Phase.ERROR
            raise

    def send_failed(self) -> None:
        """The transport failed to send: nothing more can be trusted."""
        self._phase = Phase.ERROR

    def _send(self, event: object) -> list[bytes | bytearray | memoryview]:
        etype = type(event)
        if etype in TRANSMISSION_REPLIES:
            if not self._transmitted or self._phase is Phase.ERROR:
                raise LocalProtocolError(f"{etype.__name__} outside transmission")
            if etype in STRUCTURED_ONLY and not self._structured:
                raise LocalProtocolError(f"{etype.__name__} without structured replies")
            return self._encode_reply(event)
        pending = self._pending
        if self._phase is not Phase.OPTIONS or pending is None:
            raise LocalProtocolError(f"{etype.__name__} with no option pending")
        if etype not in OPTION_REPLIES[type(pending)]:
            raise LocalProtocolError(f"{etype.__name__} cannot answer {type(pending).__name__}")
        out = self._encode_option_reply(pending, event)
        if etype in FINAL_REPLIES:
            self._finish_option(pending, event)
        return out

    def _finish_option(self, pending: ev.OptionEvent, reply: object) -> None:
        self._pending = None
        ok = not isinstance(reply, ev.OptionError)
        if ok and isinstance(pending, ev.OptStructuredReply):
            self._structured = True
        elif ok and isinstance(pending, ev.OptExtendedHeaders):
            self._extended = True
            self._structured = True
        elif ok and isinstance(pending, ev.OptSetMetaContext):
            self._meta_contexts = dict(self._pending_contexts)
            self._meta_items = None
            self._meta_export = pending.export_name
        elif ok and isinstance(pending, ev.OptStartTls) and self.buffered:
            raise LocalProtocolError("client sent data before the TLS handshake")
        if isinstance(reply, ev.ExportReply) and isinstance(pending, ev.OptGo | ev.OptExportName):
            if self._meta_export is not None and self._meta_export != pending.name:
                self._meta_contexts = {}  # contexts were chosen for another export
                self._meta_items = None
            self._export_size = reply.size
            self._tx_flags = self._effective_flags(reply.transmission_flags)
            self._min_block = reply.minimum_block
            self._tstate = None
        new_phase = OPTION_TRANSITIONS.get((type(pending), type(reply)))
        if new_phase is not None:
            self._phase = new_phase
            self._transmitted = new_phase is Phase.TRANSMISSION

    def _effective_flags(self, flags: int) -> TxFlag:
        tx = TxFlag(flags) | TxFlag.HAS_FLAGS
        if not self._structured:
            tx &= ~TxFlag.SEND_DF
        return tx

    def _opt_reply(self, rtype: int, payload: bytes = b"") -> bytes:
        return OPTION_REPLY_STRUCT.pack(OPT_REPLY_MAGIC, self._pending_opt, rtype, len(payload)) + (
            payload
        )

    def _encode_option_reply(
        self, pending: ev.OptionEvent, event: object
    ) -> list[bytes | bytearray | memoryview]:
        match event:
            case ev.OptionAck():
                return [self._opt_reply(Rep.ACK)]
            case ev.OptionError(reply=reply, message=message):
                return [self._opt_reply(reply, message.encode())]
            case ev.ServerListReply(name=name, description=desc):
                raw = name.encode()
                return [self._opt_reply(Rep.SERVER, _U32.pack(len(raw)) + raw + desc.encode())]
            case ev.MetaContextReply(context_id=cid, name=name):
                if isinstance(pending, ev.OptSetMetaContext):
                    self._pending_contexts.append((cid, name))
                return [self._opt_reply(Rep.META_CONTEXT, _U32.pack(cid) + name.encode())]
            case ev.ExportReply():
                if isinstance(pending, ev.OptExportName):
                    return [self._export_name_reply(event)]
                assert isinstance(pending, ev.OptInfo | ev.OptGo)
                return [self._info_replies(event, pending.info_requests)]
        raise LocalProtocolError(f"cannot encode {event!r}")

    def _export_name_reply(self, reply: ev.ExportReply) -> bytes:
        flags = self._effective_flags(reply.transmission_flags)
        tail = b"" if self.client_no_zeroes else bytes(EXPORT_NAME_ZEROES)
        return struct.pack(">QH", reply.size, flags) + tail

    def _info_replies(self, reply: ev.ExportReply, requests: Sequence[int]) -> bytes:
        flags = self._effective_flags(reply.transmission_flags)
        parts = [self._opt_reply(Rep.INFO, _INFO_EXPORT.pack(Info.EXPORT, reply.size, flags))]
        if Info.NAME in requests and reply.name:
            parts.append(self._opt_reply(Rep.INFO, _U16.pack(Info.NAME) + reply.name.encode()))
        if Info.DESCRIPTION in requests and reply.description:
            parts.append(
                self._opt_reply(Rep.INFO, _U16.pack(Info.DESCRIPTION) + reply.description.encode())
            )
        if Info.BLOCK_SIZE in requests or reply.minimum_block > 1:
            parts.append(
                self._opt_reply(
                    Rep.INFO,
                    _INFO_BLOCK_SIZE.pack(
                        Info.BLOCK_SIZE,
                        reply.minimum_block,
                        reply.preferred_block,
                        reply.maximum_block,
                    ),
                )
            )
        parts.append(self._opt_reply(Rep.ACK))
        return b"".join(parts)

    # ---- transmission replies -----------------------------------------------

    def _chunk(self, handle: int, flags: int, rtype: int, length: int, req_offset: int) -> bytes:
        if self._extended:
            return EXTENDED_REPLY_STRUCT.pack(
                EXTENDED_REPLY_MAGIC, flags, rtype, handle, req_offset, length
            )
        return STRUCTURED_REPLY_STRUCT.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, handle, length)

    def _encode_reply(self, event: object) -> list[bytes | bytearray | memoryview]:
        match event:
            case ev.SimpleReply(handle=h, error=err, data=data, request_offset=ro):
                if self._structured:
                    if data is not None:
                        raise LocalProtocolError("simple reply with data under structured replies")
                    if err:
                        return [self.reply_error(h, err, "", ro)]
                    return [self.reply_ok(h, ro)]
                head = SIMPLE_REPLY_STRUCT.pack(SIMPLE_REPLY_MAGIC, int(err), h)
                return [head] if data is None or err else [head, data]
            case ev.ReadChunk(handle=h, offset=off, data=data, done=done, request_offset=ro):
                flags = _DONE if done else 0
                n = len(data)
                if self._extended:
                    head = EXTENDED_READ_CHUNK_STRUCT.pack(
                        EXTENDED_REPLY_MAGIC, flags, ReplyType.OFFSET_DATA, h, ro, n + 8, off
                    )
                else:
                    head = READ_CHUNK_STRUCT.pack(
                        STRUCTURED_REPLY_MAGIC, flags, ReplyType.OFFSET_DATA, h, n + 8, off
                    )
                return [head, data]
            case ev.HoleChunk(handle=h, offset=off, length=n, done=done, request_offset=ro):
                flags = _DONE if done else 0
                return [self._chunk(h, flags, ReplyType.OFFSET_HOLE, 12, ro) + _HOLE.pack(off, n)]
            case ev.BlockStatusChunk(
                handle=h, context_id=cid, descriptors=descs, done=done, request_offset=ro
            ):
                return [self._block_status(h, cid, descs, done, ro)]
            case ev.ErrorChunk(handle=h, error=err, message=msg, offset=off, request_offset=ro):
                return [self.reply_error(h, err, msg, ro, error_offset=off, done=event.done)]
            case ev.ReplyDone(handle=h, request_offset=ro):
                return [self.reply_ok(h, ro)]
        raise LocalProtocolError(f"cannot encode {event!r}")

    def _block_status(
        self,
        handle: int,
        cid: int,
        descs: Sequence[tuple[int, int]],
        done: bool,
        req_offset: int,
    ) -> bytes:
        flags = _DONE if done else 0
        if self._extended:
            body = _BS_EXT_HEAD.pack(cid, len(descs)) + b"".join(
                _DESC_EXT.pack(n, s) for n, s in descs
            )
            rtype = ReplyType.BLOCK_STATUS_EXT
        else:
            for n, s in descs:
                if n >= 1 << 32 or s >= 1 << 32:
                    raise LocalProtocolError("descriptor does not fit 32 bits")
            body = _U32.pack(cid) + b"".join(_DESC.pack(n, s) for n, s in descs)
            rtype = ReplyType.BLOCK_STATUS
        return self._chunk(handle, flags, rtype, len(body), req_offset) + body

    # Fast helpers for the session's per-request path.  They encode exactly
    # what the matching events would (the unit tests compare both ways).

    def reply_ok(self, handle: int, req_offset: int = 0) -> bytes:
        if self._structured:
            return self._chunk(handle, _DONE, _NO_PAYLOAD, 0, req_offset)
        return SIMPLE_REPLY_STRUCT.pack(SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_read_header(self, handle: int, offset: int, length: int) -> bytes:
        """Header preceding ``length`` bytes of successful READ data."""
        if self._extended:
            return EXTENDED_READ_CHUNK_STRUCT.pack(
                EXTENDED_REPLY_MAGIC,
                _DONE,
                _OFFSET_DATA,
                handle,
                offset,
                length + 8,
                offset,
            )
        if self._structured:
            return READ_CHUNK_STRUCT.pack(
                STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, handle, length + 8, offset
            )
        return SIMPLE_REPLY_STRUCT.pack(SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_read_header_into(self, buf: bytearray, handle: int, offset: int, length: int) -> None:
        """Pack :meth:`reply_read_header` into the front of ``buf``."""
        if self._extended:
            EXTENDED_READ_CHUNK_STRUCT.pack_into(
                buf,
                0,
                EXTENDED_REPLY_MAGIC,
                _DONE,
                _OFFSET_DATA,
                handle,
                offset,
                length + 8,
                offset,
            )
        elif self._structured:
            READ_CHUNK_STRUCT.pack_into(
                buf, 0, STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, handle, length + 8, offset
            )
        else:
            SIMPLE_REPLY_STRUCT.pack_into(buf, 0, SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_read_header_size(self) -> int:
        if self._extended:
            return EXTENDED_READ_CHUNK_STRUCT.size
        if self._structured:
            return READ_CHUNK_STRUCT.size
        return SIMPLE_REPLY_STRUCT.size

    def reply_error(
        self,
        handle: int,
        error: NbdErrno,
        message: str = "",
        req_offset: int = 0,
        *,
        error_offset: int | None = None,
        done: bool = True,
    ) -> bytes:
        if not error:
            raise LocalProtocolError("an error reply needs an error")
        if not self._structured:
            return SIMPLE_REPLY_STRUCT.pack(SIMPLE_REPLY_MAGIC, int(error), handle)
        msg = message.encode()[:MAX_STRING]
        body = _ERROR_HEAD.pack(int(error), len(msg)) + msg
        rtype = ReplyType.ERROR
        if error_offset is not None:
            body += struct.pack(">Q", error_offset)
            rtype = ReplyType.ERROR_OFFSET
        return self._chunk(handle, _DONE if done else 0, rtype, len(body), req_offset) + body

    def reply_block_status(
        self,
        handle: int,
        context_id: int,
        descriptors: Sequence[tuple[int, int]],
        *,
        done: bool,
        req_offset: int = 0,
    ) -> bytes:
        if not self._structured:
            raise LocalProtocolError("block status without structured replies")
        return self._block_status(handle, context_id, descriptors, done, req_offset)


class _Payload:
    """A large WRITE payload being received straight into its own buffer.

    The buffer grows as bytes arrive (``PAYLOAD_GROW`` at a time), never ahead
    of them: a header alone must not make the server allocate its length.
    """

    __slots__ = ("data", "filled", "flags", "handle", "length", "offset")

    def __init__(self, length: int, handle: int, flags: int, offset: int) -> None:
        self.data = bytearray()
        self.filled = 0
        self.length = length
        self.handle = handle
        self.flags = flags
        self.offset = offset

    def grow(self) -> None:
        """Make room for the next bytes (resizing needs no view to be alive)."""
        if self.filled == len(self.data) < self.length:
            more = min(PAYLOAD_GROW, self.length - self.filled)
            if self.data:
                self.data.extend(bytes(more))
            else:
                self.data = bytearray(more)

    def append(self, data: memoryview) -> None:
        n = len(data)
        end = self.filled + n
        if end > len(self.data):
            del self.data[self.filled :]
            self.data += data
        else:
            self.data[self.filled : end] = data
        self.filled = end


class PayloadPool:
    """Buffers of finished large payloads, reused for later ones of the same size.

    A fresh buffer per 1 MiB write costs a zero-fill or page faults every
    time; reuse costs nothing.  Bounded in bytes: a server shares one pool
    among all its connections (they run in one thread), so connections that
    once wrote and now sit idle do not each keep megabytes.
    """

    def __init__(self, max_bytes: int = 8 * 1024 * 1024) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self.held = 0  # bytes in the pool
        self.max_bytes = max_bytes

    def take(self, length: int) -> bytearray | None:
        bufs = self._free.get(length)
        if not bufs:
            return None
        self.held -= length
        return bufs.pop()

    def give(self, buf: bytearray) -> None:
        n = len(buf)
        if n < LARGE_PAYLOAD or self.held + n > self.max_bytes:
            return
        self._free.setdefault(n, []).append(buf)
        self.held += n

    def clear(self) -> None:
        """Let every pooled buffer go (when no connection is left to use them)."""
        self._free.clear()
        self.held = 0


class _BadOption(Exception):
    def __init__(self, reply: Rep, message: str) -> None:
        super().__init__(message)
        self.reply = reply


def _decode_string(raw: bytes | memoryview, what: str) -> str:
    if len(raw) > MAX_STRING:
        raise _BadOption(Rep.ERR_INVALID, f"{what} longer than {MAX_STRING} bytes")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise _BadOption(Rep.ERR_INVALID, f"{what} is not UTF-8") from None
    if "\0" in text:
        raise _BadOption(Rep.ERR_INVALID, f"{what} contains NUL")
    return text


def _parse_info_payload(payload: bytes) -> tuple[str, tuple[int, ...]]:
    """NBD_OPT_INFO/GO: u32 name length, name, u16 count, count x u16."""
    if len(payload) < 6:
        raise _BadOption(Rep.ERR_INVALID, "INFO/GO payload too short")
    (nlen,) = _U32.unpack_from(payload, 0)
    if 4 + nlen + 2 > len(payload):
        raise _BadOption(Rep.ERR_INVALID, "INFO/GO name length exceeds payload")
    name = _decode_string(payload[4 : 4 + nlen], "export name")
    (count,) = _U16.unpack_from(payload, 4 + nlen)
    rest = payload[6 + nlen :]
    if len(rest) != 2 * count:
        raise _BadOption(Rep.ERR_INVALID, "INFO/GO request count does not match payload")
    infos = struct.unpack(f">{count}H", rest)
    return name, tuple(infos)


def _parse_meta_payload(payload: bytes) -> tuple[str, tuple[str, ...]]:
    """LIST/SET_META_CONTEXT: u32 name length, name, u32 count, count x (u32 len, query)."""
    if len(payload) < 8:
        raise _BadOption(Rep.ERR_INVALID, "meta context payload too short")
    (nlen,) = _U32.unpack_from(payload, 0)
    if 4 + nlen + 4 > len(payload):
        raise _BadOption(Rep.ERR_INVALID, "meta context export name exceeds payload")
    export = _decode_string(payload[4 : 4 + nlen], "export name")
    pos = 4 + nlen
    (count,) = _U32.unpack_from(payload, pos)
    pos += 4
    queries: list[str] = []
    for _ in range(count):
        if pos + 4 > len(payload):
            raise _BadOption(Rep.ERR_INVALID, "meta context query count exceeds payload")
        (qlen,) = _U32.unpack_from(payload, pos)
        pos += 4
        if pos + qlen > len(payload):
            raise _BadOption(Rep.ERR_INVALID, "meta context query exceeds payload")
        queries.append(_decode_string(payload[pos : pos + qlen], "context query"))
        pos += qlen
    if pos != len(payload):
        raise _BadOption(Rep.ERR_INVALID, "trailing bytes in meta context payload")
    return export, tuple(queries)


__all__ = ["PayloadPool", "ServerConnection", "TransmissionState"]
