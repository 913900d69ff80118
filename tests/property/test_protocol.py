"""Property tests of the sans-IO core.

* Any chunking of a valid client stream gives the same events and the same
  server output as the whole stream at once.
* Random bytes, and valid streams with random mutations, only ever produce
  events or RemoteProtocolError: never another exception, never unbounded
  buffering, and a well-behaved application's answers are always legal.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserve.errors import NbdErrno, RemoteProtocolError
from nbdserve.protocol import events as ev
from nbdserve.protocol.connection import ServerConnection
from nbdserve.protocol.constants import Cmd, CmdFlag, Info, Rep, TxFlag
from nbdserve.protocol.state import Phase
from tests.helpers import client as cl
from tests.helpers.pair import DEFAULT_FLAGS, join

SIZE = 1 << 20
MAX_OPTION = 4096
MAX_PAYLOAD = 64 * 1024


class ScriptedServer:
    """A ServerConnection plus a canned application that answers every event."""

    def __init__(self) -> None:
        self.conn = ServerConnection(max_option_size=MAX_OPTION, max_payload=MAX_PAYLOAD)
        self.out = bytearray(self.conn.initiate())
        self.events: list[object] = []
        self.peak_buffered = 0

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self.peak_buffered = max(self.peak_buffered, self.conn.buffered)
        while True:
            event = self.conn.next_event()
            if event is ev.NEED_DATA:
                return
            assert event is not ev.PAUSED  # every option is answered at once
            self.events.append(event)
            if isinstance(event, ev.ConnectionClosed):
                return
            for reply in answer(event, self.conn):
                self.out += join(self.conn.send(reply))


def answer(event: object, conn: ServerConnection) -> list[object]:
    """What a correct application replies to ``event``."""
    match event:
        case ev.ClientFlagsReceived() | ev.Disconnect() | ev.ConnectionClosed():
            return []
        case ev.OptAbort() | ev.OptStructuredReply() | ev.OptExtendedHeaders():
            return [ev.OptionAck()]
        case ev.OptList():
            return [ev.ServerListReply("disk", "a disk"), ev.OptionAck()]
        case ev.OptListMetaContext() | ev.OptSetMetaContext():
            return [ev.MetaContextReply(1, "base:allocation"), ev.OptionAck()]
        case ev.OptGo() | ev.OptInfo() | ev.OptExportName():
            return [ev.ExportReply(SIZE, DEFAULT_FLAGS, name="disk")]
        case ev.OptStartTls() | ev.OptUnknown():
            return [ev.OptionError(Rep.ERR_UNSUP)]
        case ev.OptionRejected(reply=rep, message=msg):
            return [ev.OptionError(rep, msg)]
        case ev.Request(handle=h, cmd=cmd, offset=off, length=n):
            if cmd == Cmd.READ:
                if conn.structured_replies:
                    return [ev.ReadChunk(h, off, bytes(n), request_offset=off)]
                return [ev.SimpleReply(h, data=bytes(n))]
            if cmd == Cmd.BLOCK_STATUS:
                return [ev.BlockStatusChunk(h, 1, ((n, 0),), done=True, request_offset=off)]
            return [ev.SimpleReply(h, request_offset=off)]
        case ev.InvalidRequest(handle=h, errno=errno, offset=off):
            if conn.structured_replies:
                return [ev.ErrorChunk(h, errno, "refused", request_offset=off)]
            return [ev.SimpleReply(h, errno)]
    raise AssertionError(f"unexpected event {event!r}")


def valid_stream(extended: bool) -> list[bytes]:
    """A complete, valid client conversation, message by message."""
    codec = cl.ClientCodec()
    codec.structured = True
    codec.extended = extended
    parts = [
        cl.client_flags(),
        cl.opt_list(),
        cl.option(42, b"unknown option payload"),
        cl.opt_info("disk", [Info.NAME, Info.BLOCK_SIZE]),
        cl.opt_extended_headers() if extended else cl.opt_structured_reply(),
        cl.opt_list_meta_context("disk", []),
        cl.opt_set_meta_context("disk", ["base:allocation"]),
        cl.option(0, b"x" * (MAX_OPTION + 10)),  # unknown and too big: ERR_TOO_BIG
        cl.opt_go("disk", [Info.DESCRIPTION]),
        codec.request(Cmd.WRITE, 1, 0, 5, CmdFlag.FUA, b"hello"),
        codec.request(Cmd.READ, 2, 0, 4096),
        codec.request(Cmd.WRITE, 3, 0, MAX_PAYLOAD + 1, 0, b"\xee" * (MAX_PAYLOAD + 1)),
        codec.request(Cmd.BLOCK_STATUS, 4, 0, SIZE, CmdFlag.REQ_ONE),
        codec.request(Cmd.WRITE_ZEROES, 5, 512, 512, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO),
        codec.request(Cmd.READ, 6, SIZE, 1),  # past the end
        codec.request(Cmd.TRIM, 7, 0, 4096),
        codec.request(Cmd.FLUSH, 8),
        codec.request(Cmd.DISC, 9),
    ]
    return parts


def _boundaries(parts: list[bytes]) -> list[int]:
    out, pos = [], 0
    for p in parts:
        out.append(pos)
        pos += len(p)
    return out


STREAMS = {e: b"".join(valid_stream(e)) for e in (False, True)}
# where each message starts: mutations aim near these, not into big payloads
BOUNDARIES = _boundaries(valid_stream(False)) + _boundaries(valid_stream(True))


def run_whole(data: bytes) -> ScriptedServer:
    server = ScriptedServer()
    server.feed(data)
    return server


REFERENCE = {k: run_whole(v) for k, v in STREAMS.items()}


def test_reference_conversation_is_complete() -> None:
    for extended, server in REFERENCE.items():
        kinds = [type(e).__name__ for e in server.events]
        assert kinds[-2:] == ["Disconnect", "ConnectionClosed"]
        assert kinds.count("Request") == 6
        assert kinds.count("InvalidRequest") == 2
        assert server.conn.extended_headers == extended
        assert server.conn.phase is Phase.CLOSED


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        if p > last:
            pieces.append(data[last:p])
            last = p
    return pieces


@settings(max_examples=40)
@given(extended=st.booleans(), cuts=st.lists(st.integers(0, 1 << 20), max_size=40))
def test_any_chunking_gives_the_same_conversation(extended: bool, cuts: list[int]) -> None:
    data = STREAMS[extended]
    server = ScriptedServer()
    for piece in split(data, cuts):
        server.feed(piece)
    ref = REFERENCE[extended]
    assert server.events == ref.events
    assert server.out == ref.out
    # never more than one message (the over-long write is skipped, not kept)
    assert server.peak_buffered <= max(len(p) for p in split(data, cuts)) + MAX_OPTION + 64


def test_byte_by_byte_conversation() -> None:
    for extended, data in STREAMS.items():
        server = ScriptedServer()
        for i in range(len(data)):
            server.feed(data[i : i + 1])
            assert server.conn.buffered <= MAX_OPTION + 64
        assert server.events == REFERENCE[extended].events


def survive(pieces: Sequence[bytes], *, eof: bool) -> ScriptedServer:
    """Feed pieces; only RemoteProtocolError may escape (it is swallowed here)."""
    server = ScriptedServer()
    try:
        for piece in pieces:
            server.feed(piece)
            assert server.conn.buffered <= max(len(piece), MAX_PAYLOAD + 64) + MAX_PAYLOAD
        if eof:
            server.feed(b"")
    except RemoteProtocolError:
        assert server.conn.phase is Phase.ERROR
        with pytest.raises(RemoteProtocolError):
            server.conn.next_event()
    return server


@given(data=st.binary(max_size=300), eof=st.booleans())
def test_garbage_from_the_start(data: bytes, eof: bool) -> None:
    survive([data], eof=eof)


@given(data=st.binary(max_size=300), eof=st.booleans(), extended=st.booleans())
def test_garbage_after_negotiation(data: bytes, eof: bool, extended: bool) -> None:
    prefix = STREAMS[extended].split(cl.opt_go("disk", [Info.DESCRIPTION]))[0]
    prefix += cl.opt_go("disk", [Info.DESCRIPTION])
    server = survive([prefix, data], eof=eof)
    assert server.conn.phase in (Phase.TRANSMISSION, Phase.CLOSED, Phase.ERROR)


@given(data=st.binary(min_size=4, max_size=200), eof=st.booleans())
def test_garbage_after_client_flags(data: bytes, eof: bool) -> None:
    survive([cl.client_flags(), data], eof=eof)


mutation = st.tuples(
    st.sampled_from(["flip", "insert", "delete", "set"]),
    st.one_of(
        st.builds(lambda b, d: b + d, st.sampled_from(BOUNDARIES), st.integers(0, 40)),
        st.integers(0, 1 << 20),
    ),
    st.integers(0, 255),
)


def mutate(data: bytes, mutations: Sequence[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, where, value in mutations:
        i = where % (len(buf) + 1)
        if kind == "insert":
            buf[i:i] = bytes([value])
        elif i < len(buf):
            if kind == "flip":
                buf[i] ^= 1 << (value % 8)
            elif kind == "delete":
                del buf[i]
            else:
                buf[i] = value
    return bytes(buf)


@settings(max_examples=150)
@given(
    extended=st.booleans(),
    mutations=st.lists(mutation, min_size=1, max_size=4),
    truncate=st.none() | st.integers(0, 1 << 20),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=8),
)
def test_mutated_streams(
    extended: bool,
    mutations: list[tuple[str, int, int]],
    truncate: int | None,
    cuts: list[int],
) -> None:
    data = mutate(STREAMS[extended], mutations)
    if truncate is not None:
        data = data[: truncate % (len(data) + 1)]
    survive(split(data, cuts), eof=True)


@given(
    header=st.tuples(
        st.integers(0, 2**16 - 1),
        st.integers(0, 2**16 - 1),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**32 - 1),
    ),
    extended=st.booleans(),
)
def test_random_request_headers(header: tuple[int, int, int, int, int], extended: bool) -> None:
    """Any well-framed header is an event (or a Disconnect), never a crash."""
    flags, cmd, handle, offset, length = header
    prefix = STREAMS[extended].split(cl.opt_go("disk", [Info.DESCRIPTION]))[0]
    prefix += cl.opt_go("disk", [Info.DESCRIPTION])
    raw = cl.request(cmd, handle, offset, length, flags, extended=extended)
    server = ScriptedServer()
    server.feed(prefix)
    server.conn.receive_data(raw)
    event = server.conn.next_event()
    if cmd == Cmd.WRITE and length <= MAX_PAYLOAD and event is ev.NEED_DATA:
        server.conn.receive_data(bytes(length))
        event = server.conn.next_event()
    assert isinstance(event, ev.Request | ev.InvalidRequest | ev.Disconnect)
    if isinstance(event, ev.Request) and cmd != Cmd.FLUSH:
        # FLUSH ignores its offset and length (test_flush_ignores_offset_and_length)
        assert event.offset + event.length <= SIZE
        assert event.length > 0
    if isinstance(event, ev.InvalidRequest):
        assert event.errno in (NbdErrno.EINVAL, NbdErrno.EPERM, NbdErrno.ENOSPC)
        answer(event, server.conn)


def test_every_tx_flag_combination_round_trips() -> None:
    for bits in range(0, 1 << 12, 7):
        server = ScriptedServer()
        server.feed(cl.client_flags() + cl.opt_structured_reply())
        server.conn.receive_data(cl.opt_go("disk"))
        got = server.conn.next_event()
        assert isinstance(got, ev.OptGo)
        raw = join(server.conn.send(ev.ExportReply(SIZE, bits)))
        codec = cl.ClientCodec()
        codec.receive_data(raw)
        info = cl.export_info([codec.option_reply(), codec.option_reply()])  # type: ignore[list-item]
        assert info.flags == bits | TxFlag.HAS_FLAGS
