"""The transmission side of ServerConnection: requests in, replies out."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdserve.errors import LocalProtocolError, NbdErrno, RemoteProtocolError
from nbdserve.protocol import events as ev
from nbdserve.protocol.connection import PayloadPool
from nbdserve.protocol.constants import (
    EXTENDED_REQUEST_MAGIC,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    ReplyType,
    TxFlag,
)
from nbdserve.protocol.state import Phase
from tests.helpers import client as cl
from tests.helpers.pair import DEFAULT_FLAGS, ProtocolPair, join, reading_modes

MODES = ["simple", "structured", "extended"]
META = [(1, "base:allocation"), (2, "qemu:allocation-depth")]


def make_pair(mode: str, **kwargs: object) -> ProtocolPair:
    server_kwargs = {k: kwargs.pop(k) for k in ("max_payload",) if k in kwargs}
    pair = ProtocolPair(**server_kwargs)
    if mode != "simple":
        kwargs.setdefault("meta", META)
    pair.negotiate(structured=mode != "simple", extended=mode == "extended", **kwargs)  # type: ignore[arg-type]
    return pair


def feed(pair: ProtocolPair, pieces: list[bytes]) -> list[object]:
    events: list[object] = []
    for p in pieces:
        events += pair.to_server(p)
    return events


# ---- request decoding --------------------------------------------------------

REQUESTS = [
    (Cmd.READ, 0, 0, 4096),
    (Cmd.READ, int(CmdFlag.DF), (1 << 20) - 512, 512),
    (Cmd.WRITE, int(CmdFlag.FUA), 8192, 5),
    (Cmd.FLUSH, 0, 0, 0),
    (Cmd.TRIM, int(CmdFlag.FUA), 0, 1 << 20),
    (Cmd.CACHE, 0, 4096, 4096),
    (Cmd.WRITE_ZEROES, int(CmdFlag.NO_HOLE | CmdFlag.FUA), 100, 1000),
    (Cmd.WRITE_ZEROES, int(CmdFlag.FAST_ZERO), 0, 1 << 20),
    (Cmd.BLOCK_STATUS, int(CmdFlag.REQ_ONE), 0, 1 << 20),
]


@pytest.mark.parametrize("mode", ["structured", "extended"])
@pytest.mark.parametrize(("cmd", "flags", "offset", "length"), REQUESTS)
def test_request_decoding(mode: str, cmd: int, flags: int, offset: int, length: int) -> None:
    payload = bytes(range(length)) if cmd == Cmd.WRITE else b""
    handle = 0xFEDCBA9876543210
    raw = cl.request(cmd, handle, offset, length, flags, payload, extended=mode == "extended")
    assert len(raw) == (32 if mode == "extended" else 28) + len(payload)
    following = cl.request(Cmd.FLUSH, 7, extended=mode == "extended")
    for rmode, pieces in reading_modes(raw, trailing=following[:11]):
        pair = make_pair(mode)
        expected = ev.Request(handle, cmd, flags, offset, length, payload or None)
        assert feed(pair, pieces) == [expected], rmode
        if rmode == "trailing":
            assert pair.to_server(following[11:]) == [ev.Request(7, Cmd.FLUSH, 0, 0, 0)]


def test_simple_mode_requests() -> None:
    pair = make_pair("simple")
    raw = b"".join(
        [
            cl.request(Cmd.READ, 1, 0, 512),
            cl.request(Cmd.WRITE, 2, 512, 3, payload=b"abc"),
            cl.request(Cmd.FLUSH, 3),
        ]
    )
    assert pair.to_server(raw) == [
        ev.Request(1, Cmd.READ, 0, 0, 512),
        ev.Request(2, Cmd.WRITE, 0, 512, 3, b"abc"),
        ev.Request(3, Cmd.FLUSH, 0, 0, 0),
    ]


def test_flush_ignores_offset_and_length() -> None:
    pair = make_pair("structured")
    assert pair.request(Cmd.FLUSH, 1, 123, 456) == [ev.Request(1, Cmd.FLUSH, 0, 123, 456)]


@pytest.mark.parametrize("mode", MODES)
def test_disconnect(mode: str) -> None:
    pair = make_pair(mode)
    raw = cl.request(Cmd.DISC, 9, extended=mode == "extended")
    assert pair.to_server(raw + b"ignored trailing bytes") == [ev.Disconnect()]
    assert pair.server.phase is Phase.CLOSED
    assert pair.server.next_event() == ev.ConnectionClosed()


@pytest.mark.parametrize("mode", MODES)
def test_eof_between_requests(mode: str) -> None:
    pair = make_pair(mode)
    pair.request(Cmd.FLUSH, 1)
    pair.server.receive_data(b"")
    assert pair.server.next_event() == ev.ConnectionClosed()
    # in-flight replies may still be sent after the client half-closed
    assert join(pair.server.send(ev.SimpleReply(1)))


@pytest.mark.parametrize("mode", ["simple", "extended"])
@pytest.mark.parametrize("cut", [1, 4, 27, 28, 29, 40])
def test_eof_inside_a_request(mode: str, cut: int) -> None:
    pair = make_pair(mode)
    raw = cl.request(Cmd.WRITE, 1, 0, 16, payload=b"x" * 16, extended=mode == "extended")
    assert pair.to_server(raw[:cut]) == []
    pair.server.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()
    assert pair.server.phase is Phase.ERROR


@pytest.mark.parametrize(
    ("mode", "magic"),
    [
        ("simple", 0xDEADBEEF),
        ("simple", EXTENDED_REQUEST_MAGIC),
        ("structured", EXTENDED_REQUEST_MAGIC),
        ("extended", REQUEST_MAGIC),
        ("extended", 0),
    ],
)
def test_bad_request_magic(mode: str, magic: int) -> None:
    pair = make_pair(mode)
    raw = cl.request(Cmd.READ, 1, 0, 512, magic=magic, extended=mode == "extended")
    with pytest.raises(RemoteProtocolError):
        pair.to_server(raw)
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()


def test_garbage_in_transmission() -> None:
    pair = make_pair("structured")
    with pytest.raises(RemoteProtocolError):
        pair.to_server(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")


# ---- oversized and invalid writes --------------------------------------------


@pytest.mark.parametrize("mode", ["simple", "extended"])
def test_oversized_write_is_skipped_without_buffering(mode: str) -> None:
    pair = make_pair(mode, size=1 << 30, max_payload=32 << 20)
    size = 100 << 20
    head = cl.request(Cmd.WRITE, 5, 0, size, extended=mode == "extended")
    events = pair.to_server(head)
    assert len(events) == 1
    bad = events[0]
    assert isinstance(bad, ev.InvalidRequest)
    assert (bad.handle, bad.cmd, bad.length, bad.errno) == (5, Cmd.WRITE, size, NbdErrno.EINVAL)
    piece = bytes(1 << 20)
    for _ in range(size // len(piece) - 1):
        assert pair.to_server(piece) == []
        assert pair.server.buffered == 0
    # the rest of the payload and a whole request behind it, in one piece
    tail = piece + cl.request(Cmd.FLUSH, 6, extended=mode == "extended")
    assert pair.to_server(tail) == [ev.Request(6, Cmd.FLUSH, 0, 0, 0)]
    assert pair.server.buffered == 0


def test_huge_extended_write_header_then_eof() -> None:
    pair = make_pair("extended", size=1 << 40)
    events = pair.to_server(cl.request(Cmd.WRITE, 1, 0, 1 << 40, extended=True) + b"x" * 100)
    assert isinstance(events[0], ev.InvalidRequest)
    assert pair.server.buffered == 0
    pair.server.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()


@pytest.mark.parametrize("receive", ["receive_data", "receive_buffer"])
def test_large_write_memory_grows_with_the_data_not_the_header(receive: str) -> None:
    """A header announcing 32 MiB must not make the server hold 32 MiB."""
    import tracemalloc

    length = 32 << 20
    pair = make_pair("structured", size=1 << 30, max_payload=length)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        assert pair.to_server(cl.request(Cmd.WRITE, 9, 0, length) + b"a" * 1000) == []
        held = tracemalloc.get_traced_memory()[0] - base
        assert held < 8 << 20, f"{held} bytes held for a header and 1000 bytes"
        conn = pair.server
        sent = 1000
        piece = bytes(range(256)) * 4096  # 1 MiB
        while sent < length:
            n = min(len(piece), length - sent)
            if receive == "receive_data":
                conn.receive_data(piece[:n])
            else:
                view = conn.receive_buffer()
                assert view is not None
                k = min(n, len(view))
                view[:k] = piece[:k]
                del view
                conn.commit_received(k)
                n = k
            sent += n
    finally:
        tracemalloc.stop()
    (event,) = conn.next_events()
    assert isinstance(event, ev.Request)
    assert event.length == length
    assert event.payload is not None
    assert len(event.payload) == length
    assert bytes(event.payload[:1000]) == b"a" * 1000


def test_invalid_write_consumes_its_payload() -> None:
    pair = make_pair("structured", flags=int(TxFlag.READ_ONLY))
    raw = cl.request(Cmd.WRITE, 1, 0, 4, payload=b"abcd") + cl.request(Cmd.READ, 2, 0, 4)
    events = pair.to_server(raw)
    assert events[0] == ev.InvalidRequest(
        1, Cmd.WRITE, 0, 0, 4, NbdErrno.EPERM, "export is read-only"
    )
    assert events[1] == ev.Request(2, Cmd.READ, 0, 0, 4)


# ---- reply encoding ------------------------------------------------------------


def test_simple_replies() -> None:
    pair = make_pair("simple")
    pair.request(Cmd.READ, 1, 0, 4)
    pair.request(Cmd.READ, 2, 0, 4)
    pair.request(Cmd.WRITE, 3, 0, 1, payload=b"x")
    raw = pair.send(ev.SimpleReply(1, data=b"abcd"))
    assert raw == struct.pack(">IIQ", 0x67446698, 0, 1) + b"abcd"
    pair.send(ev.SimpleReply(2, NbdErrno.EIO, data=b"ignored"))
    pair.send(ev.SimpleReply(3, NbdErrno.ENOSPC))
    got = list(pair.replies())
    assert [(r.handle, r.error, r.data, r.simple) for r in got] == [
        (1, 0, b"abcd", True),
        (2, NbdErrno.EIO, None, True),
        (3, NbdErrno.ENOSPC, None, True),
    ]


@pytest.mark.parametrize(
    "event",
    [
        ev.ReadChunk(1, 0, b"x"),
        ev.HoleChunk(1, 0, 1),
        ev.BlockStatusChunk(1, 1, ((1, 0),)),
        ev.ErrorChunk(1, NbdErrno.EIO),
        ev.ReplyDone(1),
    ],
)
def test_structured_events_need_structured_replies(event: object) -> None:
    pair = make_pair("simple")
    with pytest.raises(LocalProtocolError):
        pair.server.send(event)
    assert pair.server.phase is Phase.ERROR


def test_simple_reply_with_data_under_structured_replies() -> None:
    pair = make_pair("structured")
    with pytest.raises(LocalProtocolError):
        pair.server.send(ev.SimpleReply(1, data=b"abc"))


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_structured_read_reply(mode: str) -> None:
    pair = make_pair(mode)
    pair.request(Cmd.READ, 7, 4096, 8192)
    pair.send(ev.ReadChunk(7, 8192, b"B" * 4096, done=False, request_offset=4096))
    pair.send(ev.HoleChunk(7, 4096, 2048, request_offset=4096))
    pair.send(ev.ReadChunk(7, 6144, b"A" * 2048, done=False, request_offset=4096))
    assert list(pair.replies()) == []
    pair.send(ev.ReplyDone(7, request_offset=4096))
    (r,) = pair.replies()
    assert r.error == 0
    assert r.data == bytes(2048) + b"A" * 2048 + b"B" * 4096
    kinds = [c.reply_type for c in r.chunks]
    assert kinds == [ReplyType.OFFSET_DATA, ReplyType.OFFSET_HOLE, ReplyType.OFFSET_DATA, 0]
    assert all(c.extended == (mode == "extended") for c in r.chunks)
    if mode == "extended":
        assert {c.request_offset for c in r.chunks} == {4096}


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_error_chunks(mode: str) -> None:
    pair = make_pair(mode)
    pair.request(Cmd.READ, 1, 0, 8192)
    pair.request(Cmd.WRITE, 2, 0, 1, payload=b"x")
    pair.send(ev.ReadChunk(1, 0, b"x" * 4096, done=False))
    pair.send(ev.ErrorChunk(1, NbdErrno.EIO, "bad sector", offset=4096, done=False))
    pair.send(ev.ReplyDone(1))
    pair.send(ev.ErrorChunk(2, NbdErrno.ENOSPC, "full"))
    r1, r2 = pair.replies()
    assert (r1.error, r1.message, r1.data) == (NbdErrno.EIO, "bad sector", None)
    body = r1.chunks[1].body
    assert isinstance(body, cl.ErrorPayload)
    assert body.offset == 4096
    assert r1.chunks[1].reply_type == ReplyType.ERROR_OFFSET
    assert (r2.error, r2.message) == (NbdErrno.ENOSPC, "full")
    assert r2.chunks[0].reply_type == ReplyType.ERROR


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_simple_reply_event_under_structured_replies(mode: str) -> None:
    pair = make_pair(mode)
    pair.request(Cmd.FLUSH, 1)
    pair.request(Cmd.FLUSH, 2)
    pair.send(ev.SimpleReply(1), ev.SimpleReply(2, NbdErrno.EIO))
    r1, r2 = pair.replies()
    assert (r1.error, r1.simple, r1.chunks[0].reply_type) == (0, False, ReplyType.NONE)
    assert (r2.error, r2.chunks[0].reply_type) == (NbdErrno.EIO, ReplyType.ERROR)


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_block_status_chunks(mode: str) -> None:
    pair = make_pair(mode)
    pair.request(Cmd.BLOCK_STATUS, 3, 0, 1 << 20)
    pair.send(ev.BlockStatusChunk(3, 1, ((4096, 0), ((1 << 20) - 4096, 3))))
    pair.send(ev.BlockStatusChunk(3, 2, ((1 << 20, 1),), done=True))
    (r,) = pair.replies()
    bs = r.block_status
    assert bs[1].descriptors == ((4096, 0), ((1 << 20) - 4096, 3))
    assert bs[2].descriptors == ((1 << 20, 1),)
    expected = ReplyType.BLOCK_STATUS_EXT if mode == "extended" else ReplyType.BLOCK_STATUS
    assert {c.reply_type for c in r.chunks} == {expected}


def test_64_bit_descriptors_need_extended_headers() -> None:
    big = ((5 << 32, 3),)
    pair = make_pair("structured")
    with pytest.raises(LocalProtocolError):
        pair.server.send(ev.BlockStatusChunk(1, 1, big, done=True))
    pair = make_pair("extended", size=1 << 40)
    pair.request(Cmd.BLOCK_STATUS, 1, 0, 6 << 32)
    pair.send(ev.BlockStatusChunk(1, 1, big, done=True))
    (r,) = pair.replies()
    assert r.block_status[1].descriptors == big


def test_replies_after_disconnect_are_allowed() -> None:
    pair = make_pair("structured")
    pair.request(Cmd.READ, 1, 0, 4)
    assert pair.request(Cmd.DISC, 2) == [ev.Disconnect()]
    pair.send(ev.ReadChunk(1, 0, b"abcd"))
    (r,) = pair.replies()
    assert r.data == b"abcd"


def test_send_failed_poisons_the_connection() -> None:
    pair = make_pair("structured")
    pair.server.send_failed()
    assert pair.server.phase is Phase.ERROR
    with pytest.raises(LocalProtocolError):
        pair.server.send(ev.ReplyDone(1))
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()


def test_event_field_checks() -> None:
    with pytest.raises(ValueError):
        ev.ErrorChunk(1, NbdErrno.OK)
    with pytest.raises(ValueError):
        ev.HoleChunk(1, 0, 0)
    with pytest.raises(ValueError):
        ev.HoleChunk(1, 0, 1 << 32)
    with pytest.raises(ValueError):
        ev.BlockStatusChunk(1, 1, ())
    with pytest.raises(ValueError):
        ev.ExportReply(1 << 63, 0)
    with pytest.raises(ValueError):
        ev.ExportReply(1, 0, minimum_block=4096, preferred_block=512)
    with pytest.raises(ValueError):
        ev.ServerListReply("a\0b")


# ---- fast helpers == events ------------------------------------------------------

handles = st.integers(0, 2**64 - 1)
offsets = st.integers(0, (1 << 40) - 1)
errors = st.sampled_from([e for e in NbdErrno if e != NbdErrno.OK])


@pytest.mark.parametrize("mode", MODES)
@given(handle=handles, offset=offsets, data=st.binary(min_size=1, max_size=64))
def test_reply_read_header_equals_events(mode: str, handle: int, offset: int, data: bytes) -> None:
    pair = make_pair(mode, size=1 << 41)
    conn = pair.server
    fast = conn.reply_read_header(handle, offset, len(data))
    assert len(fast) == conn.reply_read_header_size()
    event: ev.SimpleReply | ev.ReadChunk
    if mode == "simple":
        event = ev.SimpleReply(handle, data=data)
    else:
        event = ev.ReadChunk(handle, offset, data, done=True, request_offset=offset)
    assert fast + data == join(conn.send(event))


@pytest.mark.parametrize("mode", MODES)
@given(handle=handles, offset=offsets)
def test_reply_ok_equals_events(mode: str, handle: int, offset: int) -> None:
    pair = make_pair(mode)
    conn = pair.server
    event = ev.SimpleReply(handle) if mode == "simple" else ev.ReplyDone(handle, offset)
    assert conn.reply_ok(handle, offset) == join(conn.send(event))
    assert conn.reply_ok(handle, offset) == join(
        conn.send(ev.SimpleReply(handle, request_offset=offset))
    )


@pytest.mark.parametrize("mode", MODES)
@given(
    handle=handles,
    offset=offsets,
    error=errors,
    message=st.text(max_size=30).filter(lambda s: "\0" not in s),
    error_offset=st.none() | offsets,
    done=st.booleans(),
)
def test_reply_error_equals_events(
    mode: str,
    handle: int,
    offset: int,
    error: NbdErrno,
    message: str,
    error_offset: int | None,
    done: bool,
) -> None:
    pair = make_pair(mode)
    conn = pair.server
    fast = conn.reply_error(handle, error, message, offset, error_offset=error_offset, done=done)
    if mode == "simple":
        assert fast == join(conn.send(ev.SimpleReply(handle, error)))
        return
    chunk = ev.ErrorChunk(handle, error, message, error_offset, done, offset)
    assert fast == join(conn.send(chunk))
    simple = join(conn.send(ev.SimpleReply(handle, error, request_offset=offset)))
    assert simple == conn.reply_error(handle, error, "", offset)


@pytest.mark.parametrize("mode", ["structured", "extended"])
@given(
    handle=handles,
    offset=offsets,
    cid=st.integers(0, 2**32 - 1),
    descs=st.lists(
        st.tuples(st.integers(1, 2**32 - 1), st.integers(0, 2**32 - 1)), min_size=1, max_size=5
    ),
    done=st.booleans(),
)
def test_reply_block_status_equals_events(
    mode: str, handle: int, offset: int, cid: int, descs: list[tuple[int, int]], done: bool
) -> None:
    pair = make_pair(mode)
    conn = pair.server
    fast = conn.reply_block_status(handle, cid, descs, done=done, req_offset=offset)
    event = ev.BlockStatusChunk(handle, cid, tuple(descs), done, offset)
    assert fast == join(conn.send(event))


def test_fast_helpers_refuse_nonsense() -> None:
    pair = make_pair("simple")
    with pytest.raises(LocalProtocolError):
        pair.server.reply_block_status(1, 1, [(1, 0)], done=True)
    with pytest.raises(LocalProtocolError):
        pair.server.reply_error(1, NbdErrno.OK)


def test_error_message_is_capped() -> None:
    pair = make_pair("structured")
    pair.request(Cmd.FLUSH, 1)
    raw = pair.server.reply_error(1, NbdErrno.EIO, "m" * 5000)
    pair.client.receive_data(raw)
    (r,) = pair.replies()
    assert r.message == "m" * 4096


@pytest.mark.parametrize("mode", MODES)
def test_pipelined_replies_out_of_order(mode: str) -> None:
    pair = make_pair(mode)
    raw = b"".join(pair.client.request(Cmd.READ, h, h * 512, 512) for h in range(1, 33))
    events = pair.to_server(raw)
    assert [e.handle for e in events] == list(range(1, 33))  # type: ignore[attr-defined]
    out = b"".join(
        pair.server.reply_read_header(h, h * 512, 512) + bytes([h]) * 512
        for h in reversed(range(1, 33))
    )
    pair.client.receive_data(out)
    got = {r.handle: r.data for r in pair.replies()}
    assert got == {h: bytes([h]) * 512 for h in range(1, 33)}


def test_default_flags_constant_is_sane() -> None:
    assert DEFAULT_FLAGS & TxFlag.HAS_FLAGS


# ---- batch API (next_events) and reply_read_header_into ----------------------------


@pytest.mark.parametrize("mode", MODES)
@given(handle=handles, offset=offsets, n=st.integers(0, 64))
def test_reply_read_header_into_equals_reply_read_header(
    mode: str, handle: int, offset: int, n: int
) -> None:
    conn = make_pair(mode).server
    buf = bytearray(b"\xee" * (conn.reply_read_header_size() + n))
    conn.reply_read_header_into(buf, handle, offset, n)
    head = conn.reply_read_header(handle, offset, n)
    assert bytes(buf[: len(head)]) == head
    assert buf[len(head) :] == b"\xee" * n  # the data area is left alone


def batch_stream(extended: bool) -> bytes:
    return b"".join(
        [
            cl.request(Cmd.READ, 1, 0, 512, extended=extended),
            cl.request(Cmd.WRITE, 2, 512, 4, 0, b"abcd", extended=extended),
            cl.request(Cmd.READ, 3, 1 << 20, 1, extended=extended),  # past the end
            cl.request(Cmd.WRITE, 4, 0, 70000, 0, b"w" * 70000, extended=extended),  # too big
            cl.request(Cmd.FLUSH, 5, extended=extended),
            cl.request(Cmd.DISC, 6, extended=extended),
            b"ignored after DISC",
        ]
    )


@pytest.mark.parametrize("mode", ["simple", "extended"])
@given(cuts=st.lists(st.integers(0, 80000), max_size=10), limit=st.integers(1, 5))
def test_next_events_matches_next_event(mode: str, cuts: list[int], limit: int) -> None:
    data = batch_stream(mode == "extended")
    one = make_pair(mode, max_payload=65536)
    one.server.receive_data(data)
    expected = []
    while True:
        e = one.server.next_event()
        expected.append(e)
        if isinstance(e, ev.Disconnect):
            break
    batched = make_pair(mode, max_payload=65536)
    got: list[object] = []
    points = [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    last = 0
    for p in points:
        if p > last:
            batched.server.receive_data(data[last:p])
            last = p
        while True:
            events = batched.server.next_events(limit)
            assert len(events) <= limit
            if not events:
                break
            got += events
            if isinstance(events[-1], ev.Disconnect):
                break
    assert got[: len(expected)] == expected
    kinds = [type(e).__name__ for e in expected]
    assert kinds == [
        "Request",
        "Request",
        "InvalidRequest",
        "InvalidRequest",
        "Request",
        "Disconnect",
    ]


def test_next_events_raises_remote_error_on_garbage() -> None:
    pair = make_pair("structured")
    pair.server.receive_data(cl.request(Cmd.FLUSH, 1) + b"\0" * 28)
    with pytest.raises(RemoteProtocolError):
        pair.server.next_events()
    assert pair.server.phase is Phase.ERROR


def test_next_events_at_eof() -> None:
    pair = make_pair("structured")
    pair.server.receive_data(cl.request(Cmd.FLUSH, 1))
    pair.server.receive_data(b"")
    assert pair.server.next_events() == [ev.Request(1, Cmd.FLUSH, 0, 0, 0), ev.ConnectionClosed()]
    pair = make_pair("structured")
    pair.server.receive_data(cl.request(Cmd.FLUSH, 1)[:10])
    pair.server.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        pair.server.next_events()


# ---- large payloads received in place (receive_buffer / commit_received) -------


@pytest.mark.parametrize("mode", ["simple", "extended"])
@given(cuts=st.lists(st.integers(0, 300_000), max_size=6), use_buffer=st.booleans())
def test_large_write_payload_received_in_place(
    mode: str, cuts: list[int], use_buffer: bool
) -> None:
    pair = make_pair(mode, size=1 << 30)
    conn = pair.server
    payload = bytes(range(256)) * 1024  # 256 KiB: above the in-place threshold
    ext = mode == "extended"
    data = cl.request(Cmd.WRITE, 9, 4096, len(payload), 0, payload, extended=ext)
    data += cl.request(Cmd.FLUSH, 10, extended=ext)
    points = [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    events: list[object] = []
    pos = 0
    for p in points:
        while pos < p:
            target = conn.receive_buffer() if use_buffer else None
            if target is not None:
                n = min(len(target), p - pos)
                target[:n] = data[pos : pos + n]
                conn.commit_received(n)
            else:
                n = p - pos
                conn.receive_data(data[pos:p])
            pos += n
            events += conn.next_events()
    assert events == [
        ev.Request(9, Cmd.WRITE, 0, 4096, len(payload), payload),
        ev.Request(10, Cmd.FLUSH, 0, 0, 0),
    ]
    assert conn.receive_buffer() is None


def test_eof_while_receiving_in_place() -> None:
    pair = make_pair("structured", size=1 << 30)
    conn = pair.server
    conn.receive_data(cl.request(Cmd.WRITE, 1, 0, 1 << 20) + b"x" * 1000)
    assert conn.next_events() == []
    target = conn.receive_buffer()
    assert target is not None
    assert len(target) == (1 << 20) - 1000
    conn.commit_received(0)  # EOF
    with pytest.raises(RemoteProtocolError):
        conn.next_events()


def test_commit_received_must_match_receive_buffer() -> None:
    pair = make_pair("structured")
    with pytest.raises(LocalProtocolError):
        pair.server.commit_received(10)
    pair.server.receive_data(cl.request(Cmd.WRITE, 1, 0, 1 << 19))
    assert pair.server.next_events() == []
    with pytest.raises(LocalProtocolError):
        pair.server.commit_received((1 << 19) + 1)


def test_invalid_large_write_is_not_received_in_place() -> None:
    pair = make_pair("structured", flags=int(TxFlag.READ_ONLY), size=1 << 30)
    conn = pair.server
    conn.receive_data(cl.request(Cmd.WRITE, 1, 0, 1 << 20))
    assert conn.next_events() == []
    assert conn.receive_buffer() is None  # refused writes are not given a buffer
    conn.receive_data(bytes(1 << 20))
    (event,) = conn.next_events()
    assert isinstance(event, ev.InvalidRequest)
    assert event.errno == NbdErrno.EPERM


def _large_write(pair: ProtocolPair, handle: int, length: int) -> ev.Request:
    conn = pair.server
    conn.receive_data(cl.request(Cmd.WRITE, handle, 0, length))
    assert conn.next_events() == []
    conn.receive_data(bytes([handle]) * length)
    (event,) = conn.next_events()
    assert isinstance(event, ev.Request)
    return event


def test_recycled_payload_buffers_serve_the_next_write() -> None:
    pair = make_pair("structured", size=1 << 30)
    first = _large_write(pair, 1, 1 << 20)
    # an id, not a reference: holding the buffer would (rightly) stop its reuse;
    # the pool keeps the object alive, so the id cannot be taken by another one
    buf_id = id(first.payload)
    pair.server.recycle(first.payload)
    del first
    second = _large_write(pair, 2, 1 << 20)
    assert id(second.payload) == buf_id, "the recycled buffer was not reused"
    assert second.payload == bytes([2]) * (1 << 20)


def test_a_payload_still_referenced_elsewhere_is_never_reused() -> None:
    pair = make_pair("structured", size=1 << 30)
    first = _large_write(pair, 1, 1 << 20)
    assert first.payload is not None
    kept = memoryview(first.payload)  # a driver holding on to the data
    pair.server.recycle(first.payload)
    second = _large_write(pair, 2, 1 << 20)
    assert second.payload is not first.payload
    assert bytes(kept[:4]) == b"\x01" * 4


def test_payload_pool_is_bounded_in_bytes() -> None:
    pool = PayloadPool(max_bytes=2 << 20)
    bufs = [bytearray(1 << 20) for _ in range(3)]
    for buf in bufs:
        pool.give(buf)
    assert pool.held == 2 << 20, "the pool kept more than its bound"
    assert pool.take(1 << 20) is bufs[1]
    assert pool.take(1 << 20) is bufs[0]
    assert pool.take(1 << 20) is None
    assert pool.held == 0
    pool.give(bytearray(4096))  # small payloads are never pooled
    assert pool.held == 0
