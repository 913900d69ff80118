"""The handshake side of ServerConnection: greeting, client flags, every option."""

from __future__ import annotations

import struct

import pytest

from nbdserve.errors import LocalProtocolError, RemoteProtocolError
from nbdserve.protocol import events as ev
from nbdserve.protocol.connection import ServerConnection
from nbdserve.protocol.constants import IHAVEOPT, Info, Opt, Rep, TxFlag
from nbdserve.protocol.state import Phase
from tests.helpers import client as cl
from tests.helpers.pair import ProtocolPair, reading_modes


def greeted(**kwargs: object) -> ProtocolPair:
    pair = ProtocolPair(**kwargs)
    pair.greet()
    return pair


def structured(**kwargs: object) -> ProtocolPair:
    pair = greeted(**kwargs)
    pair.option(cl.opt_structured_reply())
    pair.answer(ev.OptionAck())
    return pair


def feed(conn: ServerConnection, pieces: list[bytes]) -> list[object]:
    events: list[object] = []
    for piece in pieces:
        conn.receive_data(piece)
        while True:
            e = conn.next_event()
            if e is ev.NEED_DATA or e is ev.PAUSED:
                break
            events.append(e)
    return events


# ---- greeting and client flags ---------------------------------------------


def test_greeting_bytes() -> None:
    conn = ServerConnection()
    raw = conn.initiate()
    assert raw == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    codec = cl.ClientCodec()
    codec.receive_data(raw)
    assert codec.greeting() == cl.Greeting(3)
    with pytest.raises(LocalProtocolError):
        conn.initiate()


@pytest.mark.parametrize("flags", [0, 1, 2, 3])
def test_known_client_flags(flags: int) -> None:
    for mode, pieces in reading_modes(cl.client_flags(flags), trailing=b"IHAV"):
        conn = ServerConnection()
        conn.initiate()
        assert feed(conn, pieces) == [ev.ClientFlagsReceived(flags)], mode
        assert conn.phase is Phase.OPTIONS
        assert conn.client_no_zeroes == bool(flags & 2)


@pytest.mark.parametrize("flags", [4, 1 << 31, 0xFFFFFFFF, 3 | 8])
def test_unknown_client_flags_drop_the_connection(flags: int) -> None:
    conn = ServerConnection()
    conn.initiate()
    conn.receive_data(cl.client_flags(flags))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.phase is Phase.ERROR
    with pytest.raises(RemoteProtocolError):  # ERROR is sticky
        conn.next_event()


def test_eof_before_client_flags() -> None:
    conn = ServerConnection()
    conn.receive_data(b"")
    assert conn.next_event() == ev.ConnectionClosed()
    assert conn.phase is Phase.CLOSED
    conn = ServerConnection()
    conn.receive_data(b"\0\0")
    assert conn.next_event() is ev.NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_data_after_eof_is_a_local_error() -> None:
    conn = ServerConnection()
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")


# ---- every option, in every reading mode ------------------------------------

OPTIONS: list[tuple[bytes, object]] = [
    (cl.opt_export_name("disk"), ev.OptExportName("disk")),
    (cl.opt_export_name(""), ev.OptExportName("")),
    (cl.opt_export_name("dïsk/ü"), ev.OptExportName("dïsk/ü")),
    (cl.opt_abort(), ev.OptAbort()),
    # proto.md: the server SHOULD ignore data sent with NBD_OPT_ABORT
    (cl.option(Opt.ABORT, b"junk"), ev.OptAbort()),
    (cl.opt_list(), ev.OptList()),
    (cl.opt_starttls(), ev.OptStartTls()),
    (cl.opt_info("a", []), ev.OptInfo("a", ())),
    (cl.opt_info("", [Info.NAME, Info.BLOCK_SIZE]), ev.OptInfo("", (1, 3))),
    (cl.opt_go("disk", [Info.DESCRIPTION]), ev.OptGo("disk", (2,))),
    (cl.opt_go("x", [7, 7, 65535]), ev.OptGo("x", (7, 7, 65535))),
    (cl.opt_structured_reply(), ev.OptStructuredReply()),
    (cl.opt_extended_headers(), ev.OptExtendedHeaders()),
    (cl.opt_list_meta_context("disk", []), ev.OptListMetaContext("disk", ())),
    (
        cl.opt_list_meta_context("", ["base:", "qemu:allocation-depth"]),
        ev.OptListMetaContext("", ("base:", "qemu:allocation-depth")),
    ),
    (cl.option(Opt.PEEK_EXPORT), ev.OptUnknown(Opt.PEEK_EXPORT)),
    (cl.option(12), ev.OptUnknown(12)),
    (cl.option(0x7FFFFFFF, b"whatever payload"), ev.OptUnknown(0x7FFFFFFF)),
    (cl.option(0, b"\0" * 9), ev.OptUnknown(0)),
]


@pytest.mark.parametrize(("raw", "expected"), OPTIONS)
def test_option_decoding(raw: bytes, expected: object) -> None:
    for mode, pieces in reading_modes(raw, trailing=cl.opt_list()):
        pair = greeted()
        assert feed(pair.server, pieces) == [expected], mode
        assert pair.server.pending_option == expected
        # a second option waits (PAUSED) until the first is answered
        assert pair.server.next_event() is ev.PAUSED


def test_set_meta_context_decoding() -> None:
    raw = cl.opt_set_meta_context("disk", ["base:allocation", "qemu:allocation-depth"])
    for mode, pieces in reading_modes(raw, trailing=b"\0"):
        pair = structured()
        assert feed(pair.server, pieces) == [
            ev.OptSetMetaContext("disk", ("base:allocation", "qemu:allocation-depth"))
        ], mode


def test_options_are_answered_in_turn() -> None:
    pair = greeted()
    events = pair.to_server(cl.opt_list() + cl.opt_structured_reply() + cl.opt_abort())
    assert events == [ev.OptList()]
    assert pair.events() == []  # PAUSED
    pair.send(ev.ServerListReply("a"))
    assert pair.events() == []  # still pending: SERVER replies are not final
    pair.send(ev.OptionAck())
    assert pair.events() == [ev.OptStructuredReply()]
    pair.send(ev.OptionAck())
    assert pair.server.structured_replies
    assert pair.events() == [ev.OptAbort()]
    pair.send(ev.OptionAck())
    assert pair.server.phase is Phase.CLOSED
    assert pair.events() == [ev.ConnectionClosed()]


# ---- option replies on the wire --------------------------------------------


def test_ack_and_error_replies() -> None:
    pair = greeted()
    pair.option(cl.opt_starttls())
    (r,) = pair.answer(ev.OptionError(Rep.ERR_POLICY, "no TLS here"))
    assert (r.option, r.reply_type, r.message()) == (Opt.STARTTLS, Rep.ERR_POLICY, "no TLS here")
    pair.option(cl.option(99))
    (r,) = pair.answer(ev.OptionError(Rep.ERR_UNSUP))
    assert (r.option, r.reply_type, r.payload) == (99, Rep.ERR_UNSUP, b"")
    pair.option(cl.opt_abort())
    (r,) = pair.answer(ev.OptionAck())
    assert (r.option, r.reply_type, r.payload) == (Opt.ABORT, Rep.ACK, b"")


def test_list_replies() -> None:
    pair = greeted()
    pair.option(cl.opt_list())
    replies = pair.answer(
        ev.ServerListReply("disk", "the main disk"), ev.ServerListReply("ü"), ev.OptionAck()
    )
    assert [r.server() for r in replies[:2]] == [("disk", "the main disk"), ("ü", "")]
    assert replies[2].reply_type == Rep.ACK
    assert all(r.option == Opt.LIST for r in replies)


def test_info_replies_with_name_description_block_size() -> None:
    pair = greeted()
    pair.option(cl.opt_info("", [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE]))
    reply = ev.ExportReply(
        12345,
        TxFlag.SEND_FLUSH,
        name="disk",
        description="desc",
        minimum_block=512,
        preferred_block=4096,
        maximum_block=1 << 20,
    )
    info = cl.export_info(pair.answer(reply))
    assert (info.size, info.name, info.description) == (12345, "disk", "desc")
    assert info.flags == TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH
    assert info.block_size == cl.InfoBlockSize(512, 4096, 1 << 20)
    assert all(r.option == Opt.INFO for r in info.replies)
    assert pair.server.phase is Phase.OPTIONS  # INFO does not enter transmission
    assert pair.server.export_size == 0


def test_info_replies_only_what_was_asked() -> None:
    pair = greeted()
    pair.option(cl.opt_go("disk", []))
    info = cl.export_info(pair.answer(ev.ExportReply(4096, 0, name="disk", description="d")))
    assert (info.name, info.description, info.block_size) == (None, None, None)
    assert len(info.replies) == 2
    assert pair.server.phase is Phase.TRANSMISSION
    assert pair.server.export_size == 4096


def test_block_size_is_sent_unasked_when_minimum_exceeds_one() -> None:
    pair = greeted()
    pair.option(cl.opt_go("disk", []))
    info = cl.export_info(pair.answer(ev.ExportReply(4096, 0, minimum_block=512)))
    assert info.block_size == cl.InfoBlockSize(512, 4096, 32 << 20)


def test_go_error_stays_in_options() -> None:
    pair = greeted()
    pair.option(cl.opt_go("nope"))
    (r,) = pair.answer(ev.OptionError(Rep.ERR_UNKNOWN, "unknown export"))
    assert r.reply_type == Rep.ERR_UNKNOWN
    assert pair.server.phase is Phase.OPTIONS
    assert pair.to_server(cl.opt_go("disk")) == [ev.OptGo("disk", ())]


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_reply(no_zeroes: bool) -> None:
    pair = ProtocolPair()
    pair.greet(flags=1 | (2 if no_zeroes else 0))
    assert pair.option(cl.opt_export_name("d")) == ev.OptExportName("d")
    raw = pair.send(ev.ExportReply(1 << 40, TxFlag.SEND_FLUSH | TxFlag.SEND_DF))
    assert len(raw) == (10 if no_zeroes else 134)
    # DF is only advertised with structured replies; HAS_FLAGS always
    assert pair.client.export_name_reply() == cl.InfoExport(
        1 << 40, TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH
    )
    assert pair.server.phase is Phase.TRANSMISSION
    assert pair.server.transmission_flags == TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH


def test_df_is_kept_with_structured_replies() -> None:
    pair = structured()
    pair.option(cl.opt_go("d"))
    info = cl.export_info(pair.answer(ev.ExportReply(1, TxFlag.SEND_DF)))
    assert info.flags == TxFlag.HAS_FLAGS | TxFlag.SEND_DF


def test_meta_context_replies_and_selection() -> None:
    pair = structured()
    pair.option(cl.opt_list_meta_context("disk", []))
    replies = pair.answer(ev.MetaContextReply(1, "base:allocation"), ev.OptionAck())
    assert replies[0].meta_context() == (1, "base:allocation")
    assert pair.server.meta_contexts == {}  # listing selects nothing
    pair.option(cl.opt_set_meta_context("disk", ["base:allocation", "x:y"]))
    pair.send(ev.MetaContextReply(1, "base:allocation"))
    assert pair.server.meta_contexts == {}  # not before the ACK
    pair.send(ev.OptionAck())
    assert pair.server.meta_contexts == {1: "base:allocation"}
    # a failed SET leaves the previous selection alone
    pair.option(cl.opt_set_meta_context("other", ["base:allocation"]))
    pair.send(ev.OptionError(Rep.ERR_UNKNOWN))
    assert pair.server.meta_contexts == {1: "base:allocation"}


def test_meta_contexts_dropped_when_go_picks_another_export() -> None:
    pair = structured()
    pair.option(cl.opt_set_meta_context("a", ["base:allocation"]))
    pair.answer(ev.MetaContextReply(1, "base:allocation"), ev.OptionAck())
    pair.option(cl.opt_go("b"))
    pair.answer(ev.ExportReply(1 << 20, 0))
    assert pair.server.meta_contexts == {}


def test_meta_contexts_kept_for_the_same_export() -> None:
    pair = structured()
    pair.option(cl.opt_set_meta_context("a", ["base:allocation"]))
    pair.answer(ev.MetaContextReply(1, "base:allocation"), ev.OptionAck())
    pair.option(cl.opt_go("a"))
    pair.answer(ev.ExportReply(1 << 20, 0))
    assert pair.server.meta_contexts == {1: "base:allocation"}


# ---- state errors ------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        ev.OptionAck(),
        ev.OptionError(Rep.ERR_UNSUP),
        ev.ServerListReply("x"),
        ev.ExportReply(1, 0),
        ev.MetaContextReply(1, "base:allocation"),
        ev.SimpleReply(1),
        ev.ReadChunk(1, 0, b"x"),
        ev.ReplyDone(1),
    ],
)
def test_replies_without_a_pending_option_are_local_errors(event: object) -> None:
    pair = greeted()
    with pytest.raises(LocalProtocolError):
        pair.server.send(event)
    assert pair.server.phase is Phase.ERROR


@pytest.mark.parametrize(
    ("opt", "reply"),
    [
        (cl.opt_go("d"), ev.ServerListReply("d")),
        (cl.opt_go("d"), ev.OptionAck()),
        (cl.opt_info("d"), ev.MetaContextReply(1, "x")),
        (cl.opt_list(), ev.ExportReply(1, 0)),
        (cl.opt_list(), ev.MetaContextReply(1, "x")),
        (cl.opt_abort(), ev.ExportReply(1, 0)),
        (cl.opt_structured_reply(), ev.ServerListReply("d")),
        (cl.opt_export_name("d"), ev.OptionAck()),
        (cl.opt_export_name("d"), ev.OptionError(Rep.ERR_UNKNOWN)),
        (cl.option(77), ev.OptionAck()),
        (cl.opt_list_meta_context("d"), ev.ExportReply(1, 0)),
        (cl.opt_starttls(), ev.SimpleReply(1)),
    ],
)
def test_wrong_reply_for_the_pending_option(opt: bytes, reply: object) -> None:
    pair = greeted()
    pair.option(opt)
    with pytest.raises(LocalProtocolError):
        pair.server.send(reply)


def test_transmission_replies_after_abort_are_local_errors() -> None:
    pair = greeted()
    pair.option(cl.opt_abort())
    pair.answer(ev.OptionAck())
    assert pair.server.phase is Phase.CLOSED
    with pytest.raises(LocalProtocolError):
        pair.server.send(ev.SimpleReply(1))


def test_export_name_after_extended_headers_drops_the_connection() -> None:
    pair = greeted()
    pair.option(cl.opt_extended_headers())
    pair.answer(ev.OptionAck())
    assert pair.server.extended_headers
    assert pair.server.structured_replies
    with pytest.raises(RemoteProtocolError):
        pair.to_server(cl.opt_export_name("disk"))
    assert pair.server.phase is Phase.ERROR


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe", b"a\0b", b"x" * 4097],
    ids=["not-utf8", "nul", "too-long"],
)
def test_malformed_export_name_drops_the_connection(payload: bytes) -> None:
    # EXPORT_NAME has no error reply (proto.md: the server MUST terminate)
    pair = greeted()
    with pytest.raises(RemoteProtocolError):
        pair.to_server(cl.opt_export_name(payload))


def test_oversized_export_name_drops_the_connection() -> None:
    pair = greeted(max_option_size=1024)
    with pytest.raises(RemoteProtocolError):
        pair.to_server(cl.option(Opt.EXPORT_NAME, b"x" * 2000))


def test_set_meta_context_needs_structured_replies() -> None:
    pair = greeted()
    got = pair.option(cl.opt_set_meta_context("d", ["base:allocation"]))
    assert isinstance(got, ev.OptionRejected)
    assert (got.option, got.reply) == (Opt.SET_META_CONTEXT, Rep.ERR_INVALID)
    (r,) = pair.answer(ev.OptionError(got.reply, got.message))
    assert r.reply_type == Rep.ERR_INVALID
    assert r.option == Opt.SET_META_CONTEXT
    assert pair.server.phase is Phase.OPTIONS


def test_structured_reply_twice() -> None:
    pair = structured()
    got = pair.option(cl.opt_structured_reply())
    assert isinstance(got, ev.OptionRejected)
    assert got.reply == Rep.ERR_INVALID


def test_structured_reply_after_extended_headers() -> None:
    pair = greeted()
    pair.option(cl.opt_extended_headers())
    pair.answer(ev.OptionAck())
    got = pair.option(cl.opt_structured_reply())
    assert isinstance(got, ev.OptionRejected)
    assert got.reply == Rep.ERR_EXT_HEADER_REQD


def test_extended_headers_twice() -> None:
    pair = greeted()
    pair.option(cl.opt_extended_headers())
    pair.answer(ev.OptionAck())
    got = pair.option(cl.opt_extended_headers())
    assert isinstance(got, ev.OptionRejected)
    assert got.reply == Rep.ERR_INVALID


def test_extended_headers_after_structured_replies_upgrade() -> None:
    pair = structured()
    assert pair.option(cl.opt_extended_headers()) == ev.OptExtendedHeaders()
    pair.answer(ev.OptionAck())
    assert pair.server.extended_headers


def test_disallowed_reply_modes() -> None:
    pair = greeted(allow_structured=False)
    got = pair.option(cl.opt_structured_reply())
    assert isinstance(got, ev.OptionRejected)
    assert got.reply == Rep.ERR_UNSUP
    pair.answer(ev.OptionError(got.reply))
    got = pair.option(cl.opt_extended_headers())
    assert isinstance(got, ev.OptionRejected)
    assert got.reply == Rep.ERR_UNSUP
    pair = greeted(allow_extended=False)
    got = pair.option(cl.opt_extended_headers())
    assert isinstance(got, ev.OptionRejected)
    assert got.reply == Rep.ERR_UNSUP


def test_refused_structured_reply_is_not_negotiated() -> None:
    pair = greeted()
    pair.option(cl.opt_structured_reply())
    pair.answer(ev.OptionError(Rep.ERR_POLICY))
    assert not pair.server.structured_replies
    pair.option(cl.opt_extended_headers())
    pair.answer(ev.OptionError(Rep.ERR_POLICY))
    assert not pair.server.extended_headers


def test_option_error_must_be_an_error() -> None:
    with pytest.raises(ValueError):
        ev.OptionError(Rep.ACK)
    with pytest.raises(ValueError):
        ev.OptionError(Rep.ERR_UNSUP, "x" * 5000)


# ---- payload lengths -------------------------------------------------------------

BAD_PAYLOADS = [
    (Opt.LIST, b"\0\0\0\0"),
    (Opt.STARTTLS, b"x"),
    (Opt.STRUCTURED_REPLY, b"\0"),
    (Opt.EXTENDED_HEADERS, b"\0" * 8),
    (Opt.INFO, b""),
    (Opt.GO, b"\0\0\0\0\0"),  # name length but no info count
    (Opt.GO, struct.pack(">I", 10) + b"abc" + b"\0\0"),  # name overruns
    (Opt.GO, cl.info_payload("d", [1])[:-1]),  # count says 1, half a request
    (Opt.INFO, cl.info_payload("d", [1]) + b"\0"),  # trailing byte
    (Opt.GO, cl.info_payload(b"\xc3", [])),  # truncated UTF-8
    (Opt.GO, cl.info_payload(b"a\0", [])),
    (Opt.GO, cl.info_payload(b"n" * 4097, [])),
    (Opt.LIST_META_CONTEXT, b"\0\0\0\0"),
    (Opt.LIST_META_CONTEXT, cl.meta_payload("d", ["base:"]) + b"\0"),
    (Opt.LIST_META_CONTEXT, cl.meta_payload("d", ["base:"])[:-1]),
    (Opt.LIST_META_CONTEXT, cl.meta_payload("d", [])[:-4] + struct.pack(">I", 2)),
    (Opt.LIST_META_CONTEXT, struct.pack(">I", 99) + b"d" + b"\0\0\0\0"),
    (Opt.LIST_META_CONTEXT, cl.meta_payload("d", [b"\xff"])),
]


@pytest.mark.parametrize(("opt", "payload"), BAD_PAYLOADS)
def test_bad_option_payloads_are_rejected_invalid(opt: int, payload: bytes) -> None:
    for mode, pieces in reading_modes(cl.option(opt, payload)):
        pair = structured()
        events = feed(pair.server, pieces)
        assert len(events) == 1, mode
        got = events[0]
        assert isinstance(got, ev.OptionRejected), (mode, got)
        assert (got.option, got.reply) == (opt, Rep.ERR_INVALID)
        (r,) = pair.answer(ev.OptionError(got.reply, got.message))
        assert r.option == opt
        assert pair.server.phase is Phase.OPTIONS
        # the stream stays in sync: the next option parses
        assert pair.to_server(cl.opt_list()) == [ev.OptList()]


def test_oversized_option_is_skipped_without_buffering() -> None:
    pair = greeted(max_option_size=64 * 1024)
    size = 8 << 20
    got = pair.to_server(struct.pack(">QII", IHAVEOPT, Opt.INFO, size))
    assert len(got) == 1
    assert isinstance(got[0], ev.OptionRejected)
    assert got[0].reply == Rep.ERR_TOO_BIG
    assert got[0].option == Opt.INFO
    (r,) = pair.answer(ev.OptionError(Rep.ERR_TOO_BIG, got[0].message))
    assert r.reply_type == Rep.ERR_TOO_BIG
    piece = b"\xaa" * (256 * 1024)
    for _ in range(size // len(piece) - 1):
        assert pair.to_server(piece) == []
        assert pair.server.buffered == 0
    # the end of the payload and the next option arrive together
    assert pair.to_server(piece + cl.opt_list()) == [ev.OptList()]


def test_oversized_option_then_eof_is_a_framing_error() -> None:
    pair = greeted(max_option_size=16)
    got = pair.to_server(cl.option(99, b"x" * 100)[:50])
    assert isinstance(got[0], ev.OptionRejected)
    pair.send(ev.OptionError(Rep.ERR_TOO_BIG))
    pair.server.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()


# ---- framing errors ---------------------------------------------------------


def test_bad_option_magic() -> None:
    pair = greeted()
    with pytest.raises(RemoteProtocolError):
        pair.to_server(cl.option(Opt.LIST, magic=IHAVEOPT ^ 1))
    assert pair.server.phase is Phase.ERROR


@pytest.mark.parametrize("cut", [1, 8, 15, 16, 17, 20])
def test_eof_inside_an_option(cut: int) -> None:
    raw = cl.opt_go("disk", [1, 2])
    pair = greeted()
    assert pair.to_server(raw[:cut]) == []
    pair.server.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()


def test_eof_between_options_is_a_clean_close() -> None:
    pair = greeted()
    pair.option(cl.opt_list())
    pair.answer(ev.OptionAck())
    pair.server.receive_data(b"")
    assert pair.server.next_event() == ev.ConnectionClosed()
    assert pair.server.phase is Phase.CLOSED


def test_starttls_ack_with_data_behind_it() -> None:
    # a client that pipelines plaintext behind STARTTLS cannot be trusted
    pair = greeted()
    pair.to_server(cl.opt_starttls() + cl.opt_list())
    with pytest.raises(LocalProtocolError):
        pair.server.send(ev.OptionAck())
