"""wire.py: construct declarations vs the struct twins, and vs the spec.

Each twin is packed with random field values and parsed with its construct
declaration (and the other way round); the constants are checked against the
numbers written in proto.md / QEMU's nbd.h.
"""

from __future__ import annotations

import struct

import pytest
from construct import ConstError, StreamError
from hypothesis import given
from hypothesis import strategies as st

from nbdserve.protocol import constants as c
from nbdserve.protocol import wire as w

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def test_magics_match_the_spec() -> None:
    assert c.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert c.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert c.OPT_REPLY_MAGIC == 0x3E889045565A9
    assert c.REQUEST_MAGIC == 0x25609513
    assert c.SIMPLE_REPLY_MAGIC == 0x67446698
    assert c.STRUCTURED_REPLY_MAGIC == 0x668E33EF
    assert c.EXTENDED_REQUEST_MAGIC == 0x21E41C71
    assert c.EXTENDED_REPLY_MAGIC == 0x6E8A278C


def test_enum_values_match_the_spec() -> None:
    assert [int(o) for o in c.Opt] == list(range(1, 12))
    assert c.Rep.ERR_UNSUP == 2**31 + 1
    assert c.Rep.ERR_EXT_HEADER_REQD == 2**31 + 10
    assert c.Rep.ERR_TOO_BIG == 2**31 + 9
    assert c.Rep.ERR_SHUTDOWN == 2**31 + 7
    assert not c.Rep.ACK.is_error
    assert c.Rep.ERR_POLICY.is_error
    assert [int(x) for x in c.Cmd] == list(range(9))
    assert int(c.ReplyType.BLOCK_STATUS) == 5
    assert int(c.ReplyType.BLOCK_STATUS_EXT) == 6
    assert int(c.ReplyType.ERROR) == 32769
    assert int(c.ReplyType.ERROR_OFFSET) == 32770
    assert int(c.CmdFlag.FAST_ZERO) == 16
    assert int(c.CmdFlag.REQ_ONE) == 8
    assert int(c.CmdFlag.DF) == 4
    assert c.TxFlag.SEND_FAST_ZERO == 1 << 11
    assert c.TxFlag.SEND_CACHE == 1 << 10
    assert c.TxFlag.CAN_MULTI_CONN == 1 << 8
    assert c.TxFlag.SEND_DF == 1 << 7


@pytest.mark.parametrize(
    ("twin", "decl", "size"),
    [
        (w.REQUEST_STRUCT, w.REQUEST, 28),
        (w.EXTENDED_REQUEST_STRUCT, w.EXTENDED_REQUEST, 32),
        (w.SIMPLE_REPLY_STRUCT, w.SIMPLE_REPLY, 16),
        (w.STRUCTURED_REPLY_STRUCT, w.STRUCTURED_REPLY, 20),
        (w.EXTENDED_REPLY_STRUCT, w.EXTENDED_REPLY, 32),
        (w.OPTION_HEADER_STRUCT, w.OPTION_HEADER, 16),
        (w.OPTION_REPLY_STRUCT, w.OPTION_REPLY_HEADER, 20),
    ],
)
def test_twin_sizes(twin: struct.Struct, decl: object, size: int) -> None:
    assert twin.size == size
    assert decl.sizeof() == size  # type: ignore[attr-defined]


@given(flags=u16, cmd=u16, handle=u64, offset=u64, length=u32)
def test_request_twin(flags: int, cmd: int, handle: int, offset: int, length: int) -> None:
    raw = w.REQUEST_STRUCT.pack(c.REQUEST_MAGIC, flags, cmd, handle, offset, length)
    obj = w.REQUEST.parse(raw)
    assert (obj.flags, obj.type, obj.handle, obj.offset, obj.length) == (
        flags,
        cmd,
        handle,
        offset,
        length,
    )
    built = w.REQUEST.build(
        {"flags": flags, "type": cmd, "handle": handle, "offset": offset, "length": length}
    )
    assert built == raw


@given(flags=u16, cmd=u16, handle=u64, offset=u64, length=u64)
def test_extended_request_twin(flags: int, cmd: int, handle: int, offset: int, length: int) -> None:
    raw = w.EXTENDED_REQUEST_STRUCT.pack(
        c.EXTENDED_REQUEST_MAGIC, flags, cmd, handle, offset, length
    )
    built = w.EXTENDED_REQUEST.build(
        {"flags": flags, "type": cmd, "handle": handle, "offset": offset, "length": length}
    )
    assert built == raw
    assert w.EXTENDED_REQUEST.parse(raw).length == length


@given(error=u32, handle=u64)
def test_simple_reply_twin(error: int, handle: int) -> None:
    raw = w.SIMPLE_REPLY_STRUCT.pack(c.SIMPLE_REPLY_MAGIC, error, handle)
    assert w.SIMPLE_REPLY.build({"error": error, "handle": handle}) == raw
    obj = w.SIMPLE_REPLY.parse(raw)
    assert (obj.error, obj.handle) == (error, handle)


@given(flags=u16, rtype=u16, handle=u64, length=u32)
def test_structured_reply_twin(flags: int, rtype: int, handle: int, length: int) -> None:
    raw = w.STRUCTURED_REPLY_STRUCT.pack(c.STRUCTURED_REPLY_MAGIC, flags, rtype, handle, length)
    d = {"flags": flags, "type": rtype, "handle": handle, "length": length}
    assert w.STRUCTURED_REPLY.build(d) == raw
    obj = w.STRUCTURED_REPLY.parse(raw)
    assert (obj.flags, obj.type, obj.handle, obj.length) == (flags, rtype, handle, length)


@given(flags=u16, rtype=u16, handle=u64, offset=u64, length=u64)
def test_extended_reply_twin(flags: int, rtype: int, handle: int, offset: int, length: int) -> None:
    raw = w.EXTENDED_REPLY_STRUCT.pack(c.EXTENDED_REPLY_MAGIC, flags, rtype, handle, offset, length)
    d = {"flags": flags, "type": rtype, "handle": handle, "offset": offset, "length": length}
    assert w.EXTENDED_REPLY.build(d) == raw
    assert w.EXTENDED_REPLY.parse(raw).offset == offset


@given(magic=u64, opt=u32, length=u32)
def test_option_header_twin(magic: int, opt: int, length: int) -> None:
    raw = w.OPTION_HEADER_STRUCT.pack(magic, opt, length)
    assert w.OPTION_HEADER.build({"magic": magic, "option": opt, "length": length}) == raw
    obj = w.OPTION_HEADER.parse(raw)
    assert (obj.magic, obj.option, obj.length) == (magic, opt, length)


@given(opt=u32, rtype=u32, length=u32)
def test_option_reply_twin(opt: int, rtype: int, length: int) -> None:
    raw = w.OPTION_REPLY_STRUCT.pack(c.OPT_REPLY_MAGIC, opt, rtype, length)
    assert (
        w.OPTION_REPLY_HEADER.build({"option": opt, "reply_type": rtype, "length": length}) == raw
    )
    assert w.OPTION_REPLY_HEADER.parse(raw).reply_type == rtype


@given(flags=u16, rtype=u16, handle=u64, length=u32, offset=u64)
def test_read_chunk_twin_is_header_plus_offset(
    flags: int, rtype: int, handle: int, length: int, offset: int
) -> None:
    raw = w.READ_CHUNK_STRUCT.pack(c.STRUCTURED_REPLY_MAGIC, flags, rtype, handle, length, offset)
    head = w.STRUCTURED_REPLY.build(
        {"flags": flags, "type": rtype, "handle": handle, "length": length}
    )
    assert raw == head + offset.to_bytes(8, "big")


@given(flags=u16, rtype=u16, handle=u64, roff=u64, length=u64, offset=u64)
def test_extended_read_chunk_twin_is_header_plus_offset(
    flags: int, rtype: int, handle: int, roff: int, length: int, offset: int
) -> None:
    raw = w.EXTENDED_READ_CHUNK_STRUCT.pack(
        c.EXTENDED_REPLY_MAGIC, flags, rtype, handle, roff, length, offset
    )
    head = w.EXTENDED_REPLY.build(
        {"flags": flags, "type": rtype, "handle": handle, "offset": roff, "length": length}
    )
    assert raw == head + offset.to_bytes(8, "big")


@given(cid=u32, count=u32)
def test_block_status_header_twins(cid: int, count: int) -> None:
    assert w.BLOCK_STATUS_HEADER_STRUCT.pack(cid) == cid.to_bytes(4, "big")
    assert w.BLOCK_STATUS_EXT_HEADER_STRUCT.pack(cid, count) == struct.pack(">II", cid, count)


@given(a=u32, b=u32, x=u64, y=u64)
def test_descriptor_and_hole_layouts(a: int, b: int, x: int, y: int) -> None:
    assert w.BLOCK_DESCRIPTOR.build({"length": a, "status": b}) == struct.pack(">II", a, b)
    assert w.BLOCK_DESCRIPTOR_EXT.build({"length": x, "status": y}) == struct.pack(">QQ", x, y)
    assert w.OFFSET_HOLE.build({"offset": x, "length": a}) == struct.pack(">QI", x, a)
    assert w.ERROR_HEADER.build({"error": a, "message_length": b & 0xFFFF}) == struct.pack(
        ">IH", a, b & 0xFFFF
    )


@given(size=u64, flags=u16, mn=u32, pref=u32, mx=u32)
def test_info_layouts(size: int, flags: int, mn: int, pref: int, mx: int) -> None:
    raw = w.INFO_EXPORT.build({"size": size, "transmission_flags": flags})
    assert raw == struct.pack(">HQH", 0, size, flags)
    assert w.INFO_EXPORT.parse(raw).size == size
    raw = w.INFO_BLOCK_SIZE.build({"minimum": mn, "preferred": pref, "maximum": mx})
    assert raw == struct.pack(">HIII", 3, mn, pref, mx)
    assert w.EXPORT_NAME_REPLY.build({"size": size, "transmission_flags": flags}) == struct.pack(
        ">QH", size, flags
    )


def test_greeting_layout_matches_initiate() -> None:
    from nbdserve.protocol.connection import ServerConnection

    raw = ServerConnection().initiate()
    assert w.GREETING.parse(raw).handshake_flags == 3
    assert w.GREETING.build({"handshake_flags": 3}) == raw
    assert len(raw) == w.GREETING.sizeof() == 18


@pytest.mark.parametrize(
    ("decl", "raw"),
    [
        (w.REQUEST, struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 0, 0, 0)),
        (w.SIMPLE_REPLY, struct.pack(">IIQ", c.STRUCTURED_REPLY_MAGIC, 0, 0)),
        (w.EXTENDED_REQUEST, struct.pack(">IHHQQQ", c.REQUEST_MAGIC, 0, 0, 0, 0, 0)),
    ],
)
def test_declarations_reject_wrong_magic(decl: object, raw: bytes) -> None:
    with pytest.raises(ConstError):
        decl.parse(raw)  # type: ignore[attr-defined]


def test_declarations_reject_truncation() -> None:
    raw = w.REQUEST.build({"flags": 0, "type": 0, "handle": 1, "offset": 2, "length": 3})
    with pytest.raises(StreamError):
        w.REQUEST.parse(raw[:-1])


@given(st.text(max_size=50))
def test_name32_round_trip(text: str) -> None:
    raw = w.NAME32.build(text)
    assert raw[:4] == len(text.encode()).to_bytes(4, "big")
    assert w.NAME32.parse(raw) == text


@given(cid=u32, name=st.binary(max_size=40))
def test_meta_context_reply_layout(cid: int, name: bytes) -> None:
    raw = struct.pack(">I", cid) + name
    obj = w.META_CONTEXT_REPLY.parse(raw, length=len(raw))
    assert (obj.context_id, obj.name) == (cid, name)
