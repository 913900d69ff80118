"""validate.py, per command and flag; and the same checks through ServerConnection."""

from __future__ import annotations

import pytest

from nbdserve.errors import NbdErrno
from nbdserve.protocol import events as ev
from nbdserve.protocol.constants import Cmd, CmdFlag, TxFlag
from tests.helpers.pair import DEFAULT_FLAGS, ProtocolPair

SIZE = 1 << 20
ALL = TxFlag(DEFAULT_FLAGS)
RANGE_CMDS = [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.BLOCK_STATUS]
WRITE_CMDS = [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES]


def check(
    cmd: int,
    cmd_flags: int = 0,
    offset: int = 0,
    length: int = 512,
    *,
    flags: int = ALL,
    structured: bool = True,
    has_meta_context: bool = True,
    size: int = SIZE,
    max_payload: int = 32 << 20,
    min_block: int = 1,
    extended: bool = False,
) -> int:
    """Negotiate a connection with these settings, send one request header,
    and return the errno the core decided on (OK for a valid request).

    Going through ServerConnection keeps these tests independent of how
    validate.py arranges its tables."""
    pair = ProtocolPair(max_payload=max_payload)
    meta = [(1, "base:allocation")] if has_meta_context and structured else []
    pair.negotiate(
        structured=structured,
        extended=extended,
        meta=meta,
        size=size,
        flags=int(flags),
        minimum_block=min_block,
    )
    head = pair.client.request(cmd, 1, offset, length, cmd_flags)
    if cmd == Cmd.WRITE:
        head = head[: 32 if extended else 28]  # the decision is made on the header alone
    events = pair.to_server(head)
    if cmd == Cmd.WRITE and not events:
        events = pair.to_server(bytes(length))
    (event,) = events
    if isinstance(event, ev.InvalidRequest):
        assert event.handle == 1
        assert event.reason
        return event.errno
    assert isinstance(event, ev.Request)
    return NbdErrno.OK


@pytest.mark.parametrize("cmd", [*RANGE_CMDS, Cmd.FLUSH])
def test_plain_requests_are_valid(cmd: int) -> None:
    assert check(cmd) == NbdErrno.OK


# ---- flags -------------------------------------------------------------------


@pytest.mark.parametrize("cmd", WRITE_CMDS)
def test_fua_only_when_advertised(cmd: int) -> None:
    assert check(cmd, CmdFlag.FUA) == NbdErrno.OK
    assert check(cmd, CmdFlag.FUA, flags=ALL & ~TxFlag.SEND_FUA) == NbdErrno.EINVAL


@pytest.mark.parametrize("cmd", [Cmd.READ, Cmd.FLUSH, Cmd.CACHE, Cmd.BLOCK_STATUS])
def test_fua_accepted_on_every_command_when_advertised(cmd: int) -> None:
    # proto.md: with NBD_FLAG_SEND_FUA the server MUST accept FUA on all
    # commands ("even by ignoring the bit")
    assert check(cmd, CmdFlag.FUA) == NbdErrno.OK
    assert check(cmd, CmdFlag.FUA, flags=ALL & ~TxFlag.SEND_FUA) == NbdErrno.EINVAL


def test_df_only_with_structured_replies_and_advertised() -> None:
    assert check(Cmd.READ, CmdFlag.DF) == NbdErrno.OK
    assert check(Cmd.READ, CmdFlag.DF, structured=False) == NbdErrno.EINVAL
    assert check(Cmd.READ, CmdFlag.DF, flags=ALL & ~TxFlag.SEND_DF) == NbdErrno.EINVAL
    assert check(Cmd.WRITE, CmdFlag.DF) == NbdErrno.EINVAL


def test_fast_zero_only_on_write_zeroes_when_advertised() -> None:
    assert check(Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO) == NbdErrno.OK
    no_fast = ALL & ~TxFlag.SEND_FAST_ZERO
    assert check(Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO, flags=no_fast) == NbdErrno.EINVAL
    assert check(Cmd.TRIM, CmdFlag.FAST_ZERO) == NbdErrno.EINVAL
    assert check(Cmd.WRITE, CmdFlag.FAST_ZERO) == NbdErrno.EINVAL


def test_no_hole_only_on_write_zeroes() -> None:
    assert check(Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE | CmdFlag.FUA) == NbdErrno.OK
    assert check(Cmd.WRITE, CmdFlag.NO_HOLE) == NbdErrno.EINVAL
    assert check(Cmd.TRIM, CmdFlag.NO_HOLE) == NbdErrno.EINVAL


def test_req_one_only_on_block_status() -> None:
    assert check(Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE) == NbdErrno.OK
    assert check(Cmd.READ, CmdFlag.REQ_ONE) == NbdErrno.EINVAL


@pytest.mark.parametrize("cmd", [*RANGE_CMDS, Cmd.FLUSH])
@pytest.mark.parametrize("bit", range(5, 16))
def test_undefined_flag_bits_are_refused(cmd: int, bit: int) -> None:
    assert check(cmd, 1 << bit) == NbdErrno.EINVAL


# ---- commands -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmd", "flag"),
    [
        (Cmd.FLUSH, TxFlag.SEND_FLUSH),
        (Cmd.TRIM, TxFlag.SEND_TRIM),
        (Cmd.WRITE_ZEROES, TxFlag.SEND_WRITE_ZEROES),
        (Cmd.CACHE, TxFlag.SEND_CACHE),
    ],
)
def test_commands_need_their_flag(cmd: int, flag: TxFlag) -> None:
    assert check(cmd, flags=ALL & ~flag) == NbdErrno.EINVAL


@pytest.mark.parametrize("cmd", [9, 100, 0xFFFF, Cmd.RESIZE])
def test_unknown_or_unsupported_commands(cmd: int) -> None:
    assert check(cmd) == NbdErrno.EINVAL


# what a read-only export advertises: no TRIM, WRITE_ZEROES, FUA or FAST_ZERO
READ_ONLY = (ALL | TxFlag.READ_ONLY) & ~(
    TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FUA | TxFlag.SEND_FAST_ZERO
)


@pytest.mark.parametrize("cmd", WRITE_CMDS)
@pytest.mark.parametrize("flags", [READ_ONLY, ALL | TxFlag.READ_ONLY])
def test_read_only_gives_eperm(cmd: int, flags: TxFlag) -> None:
    # proto.md: "SHOULD return EPERM if it receives a write or trim request
    # on a read-only export", even though TRIM itself is not advertised there
    assert check(cmd, flags=flags) == NbdErrno.EPERM
    # read-only wins over the range check, as in nbdkit
    assert check(cmd, flags=flags, offset=SIZE) == NbdErrno.EPERM


@pytest.mark.parametrize("cmd", [Cmd.READ, Cmd.CACHE, Cmd.BLOCK_STATUS, Cmd.FLUSH])
def test_read_only_allows_reads(cmd: int) -> None:
    assert check(cmd, flags=READ_ONLY) == NbdErrno.OK


@pytest.mark.parametrize("cmd", RANGE_CMDS)
def test_past_the_end(cmd: int) -> None:
    expected = NbdErrno.ENOSPC if cmd in WRITE_CMDS else NbdErrno.EINVAL
    assert check(cmd, offset=SIZE - 511, length=512) == expected
    assert check(cmd, offset=SIZE, length=1) == expected
    assert check(cmd, offset=2**64 - 1, length=512) == expected
    assert check(cmd, offset=SIZE - 512, length=512) == NbdErrno.OK


@pytest.mark.parametrize("cmd", RANGE_CMDS)
def test_zero_length(cmd: int) -> None:
    assert check(cmd, length=0) == NbdErrno.EINVAL


@pytest.mark.parametrize("cmd", [Cmd.READ, Cmd.WRITE])
def test_over_max_payload(cmd: int) -> None:
    size, max_payload = 1 << 30, 1 << 20
    assert check(cmd, length=1 << 20, size=size, max_payload=max_payload) == NbdErrno.OK
    assert check(cmd, length=(1 << 20) + 1, size=size, max_payload=max_payload) == NbdErrno.EINVAL


@pytest.mark.parametrize("cmd", [Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS, Cmd.CACHE])
def test_non_payload_commands_may_exceed_max_payload(cmd: int) -> None:
    assert (
        check(cmd, length=1 << 33, size=1 << 40, max_payload=1 << 20, extended=True) == NbdErrno.OK
    )


def test_block_status_needs_structured_replies_and_contexts() -> None:
    assert check(Cmd.BLOCK_STATUS, structured=False) == NbdErrno.EINVAL
    assert check(Cmd.BLOCK_STATUS, has_meta_context=False) == NbdErrno.EINVAL


@pytest.mark.parametrize("cmd", [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE])
def test_minimum_block_alignment(cmd: int) -> None:
    assert check(cmd, offset=512, length=512, min_block=512) == NbdErrno.OK
    assert check(cmd, offset=1, length=512, min_block=512) == NbdErrno.EINVAL
    assert check(cmd, offset=512, length=100, min_block=512) == NbdErrno.EINVAL


# ---- through the connection ---------------------------------------------------


def connection(**kwargs: object) -> ProtocolPair:
    pair = ProtocolPair()
    pair.negotiate(**kwargs)  # type: ignore[arg-type]
    return pair


def test_invalid_requests_become_events() -> None:
    pair = connection(structured=False, flags=DEFAULT_FLAGS | TxFlag.READ_ONLY)
    events = pair.to_server(
        b"".join(
            [
                pair.client.request(Cmd.READ, 1, 0, 512, CmdFlag.DF),  # DF without structured
                pair.client.request(Cmd.TRIM, 2, 0, 512),  # read-only
                pair.client.request(Cmd.READ, 3, SIZE, 1),  # past the end
                pair.client.request(Cmd.BLOCK_STATUS, 4, 0, 512),  # no structured replies
                pair.client.request(Cmd.READ, 5, 0, 512),  # fine
            ]
        )
    )
    assert [(type(e).__name__, e.handle) for e in events] == [  # type: ignore[attr-defined]
        ("InvalidRequest", 1),
        ("InvalidRequest", 2),
        ("InvalidRequest", 3),
        ("InvalidRequest", 4),
        ("Request", 5),
    ]
    assert [getattr(e, "errno", 0) for e in events] == [
        NbdErrno.EINVAL,
        NbdErrno.EPERM,
        NbdErrno.EINVAL,
        NbdErrno.EINVAL,
        0,
    ]


def test_block_status_without_set_meta_context() -> None:
    pair = connection()
    (event,) = pair.request(Cmd.BLOCK_STATUS, 1, 0, 512)
    assert isinstance(event, ev.InvalidRequest)
    assert event.errno == NbdErrno.EINVAL
    pair = connection(meta=[(1, "base:allocation")])
    (event,) = pair.request(Cmd.BLOCK_STATUS, 1, 0, 512)
    assert isinstance(event, ev.Request)


def test_minimum_block_from_the_export_reply() -> None:
    pair = connection(minimum_block=512)
    (event,) = pair.request(Cmd.READ, 1, 100, 512)
    assert isinstance(event, ev.InvalidRequest)


def test_extended_lengths_validate_against_64_bit_sizes() -> None:
    pair = connection(extended=True, size=1 << 40, meta=[(1, "base:allocation")])
    raw = b"".join(
        [
            pair.client.request(Cmd.WRITE_ZEROES, 1, 0, 5 << 32),
            pair.client.request(Cmd.TRIM, 2, 1 << 32, 1 << 33),
            pair.client.request(Cmd.BLOCK_STATUS, 3, 0, 1 << 40),
            pair.client.request(Cmd.READ, 4, 0, 1 << 33),  # over max_payload
            pair.client.request(Cmd.TRIM, 5, 1 << 39, 1 << 40),  # past the end
        ]
    )
    events = pair.to_server(raw)
    assert [type(e).__name__ for e in events] == [
        "Request",
        "Request",
        "Request",
        "InvalidRequest",
        "InvalidRequest",
    ]
    assert events[0].length == 5 << 32  # type: ignore[attr-defined]
    assert events[4].errno == NbdErrno.ENOSPC  # type: ignore[attr-defined]


# ---- the per-request shortcut agrees with the full validation ------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402

from nbdserve.protocol.validate import (  # noqa: E402
    TransmissionState,
    is_plain_read,
    is_plain_write,
    validate_request,
)


@hs.composite
def transmission_states(draw: hs.DrawFn) -> TransmissionState:
    """Any export flags, reply style and minimum block size, over a 1 GiB export."""
    structured = draw(hs.booleans())
    return TransmissionState.create(
        size=1 << 30,
        flags=TxFlag(draw(hs.integers(0, (1 << 13) - 1))) | TxFlag.HAS_FLAGS,
        structured=structured,
        extended=False,
        has_meta_context=structured,
        max_payload=32 << 20,
        min_block=draw(hs.sampled_from([1, 512, 4096])),
    )


@given(
    st=transmission_states(),
    cmd=hs.integers(0, 9),
    flags=hs.integers(0, 0xFFFF),
    offset=hs.integers(0, 1 << 31),
    length=hs.integers(0, 1 << 26),
)
def test_plain_read_shortcut_never_accepts_what_validation_refuses(
    st: TransmissionState, cmd: int, flags: int, offset: int, length: int
) -> None:
    if is_plain_read(st, cmd, flags, offset, length):
        assert validate_request(st, cmd, flags, offset, length) is None


@given(
    st=transmission_states(),
    flags=hs.sampled_from([0, int(CmdFlag.FUA)]) | hs.integers(0, 0xFFFF),
    offset=hs.integers(0, 1 << 31),
    length=hs.integers(0, 1 << 26),
)
def test_plain_write_shortcut_never_accepts_what_validation_refuses(
    st: TransmissionState, flags: int, offset: int, length: int
) -> None:
    if is_plain_write(st, flags, offset, length):
        assert validate_request(st, Cmd.WRITE, flags, offset, length) is None


def test_plain_write_shortcut_takes_the_common_writes() -> None:
    """The property above holds trivially for a shortcut that takes nothing."""
    flags = TxFlag.HAS_FLAGS | TxFlag.SEND_FUA
    st = TransmissionState.create(
        size=1 << 30,
        flags=flags,
        structured=True,
        extended=False,
        has_meta_context=True,
        max_payload=32 << 20,
    )
    assert is_plain_write(st, 0, 0, 4096)
    assert is_plain_write(st, int(CmdFlag.FUA), (1 << 30) - 4096, 4096)
    assert not is_plain_write(st, 0, (1 << 30) - 4096, 8192)
    read_only = TransmissionState.create(
        size=1 << 30,
        flags=flags | TxFlag.READ_ONLY,
        structured=True,
        extended=False,
        has_meta_context=True,
        max_payload=32 << 20,
    )
    assert not is_plain_write(read_only, 0, 0, 4096)
