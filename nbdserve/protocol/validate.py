"""Pure validation of transmission requests (nbdkit ``validate_request``).

Returns ``None`` for a valid request or ``(errno, reason)``.  Order follows
nbdkit: unknown command, flags, read-only, range, size limits, alignment.

This runs once per request, so the flag rules are computed once per
negotiated export (``TransmissionState.create``) into a plain ``int -> int``
table; the per-request path touches no enum objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nbdserve.errors import NbdErrno
from nbdserve.protocol.constants import Cmd, CmdFlag, TxFlag

_READ = int(Cmd.READ)
_WRITE = int(Cmd.WRITE)
_TRIM = int(Cmd.TRIM)
_WRITE_ZEROES = int(Cmd.WRITE_ZEROES)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_WRITE_CMDS = frozenset({_WRITE, _TRIM, _WRITE_ZEROES})
_RANGE_CMDS = frozenset({_READ, _WRITE, _TRIM, _WRITE_ZEROES, int(Cmd.CACHE), _BLOCK_STATUS})
_CMD_NEEDS_FLAG = {
    Cmd.FLUSH: TxFlag.SEND_FLUSH,
    Cmd.TRIM: TxFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TxFlag.SEND_WRITE_ZEROES,
    Cmd.CACHE: TxFlag.SEND_CACHE,
}


@dataclass(frozen=True, slots=True)
class TransmissionState:
    """What the handshake settled that requests are checked against.

    ``allowed`` maps each command the client may send to the command flags it
    may set on it; commands absent from it are unknown or not advertised.
    """

    size: int
    flags: TxFlag
    structured: bool
    extended: bool
    has_meta_context: bool
    max_payload: int
    min_block: int
    allowed: Mapping[int, int]
    read_only: bool
    # the command flags a READ / WRITE may not carry, precomputed for the fast path
    read_forbidden: int = 0
    write_forbidden: int = 0

    @classmethod
    def create(
        cls,
        *,
        size: int,
        flags: TxFlag,
        structured: bool,
        extended: bool,
        has_meta_context: bool,
        max_payload: int,
        min_block: int = 1,
    ) -> TransmissionState:
        allowed: dict[int, int] = {}
        for cmd in Cmd:
            if cmd in (Cmd.RESIZE, Cmd.DISC):
                continue
            needed = _CMD_NEEDS_FLAG.get(cmd)
            if needed is not None and not flags & needed:
                continue
            allowed[int(cmd)] = allowed_flags(cmd, flags, structured)
        return cls(
            size=size,
            flags=flags,
            structured=structured,
            extended=extended,
            has_meta_context=has_meta_context,
            max_payload=max_payload,
            min_block=min_block,
            allowed=allowed,
            read_only=bool(flags & TxFlag.READ_ONLY),
            read_forbidden=~allowed[_READ],
            write_forbidden=~allowed[_WRITE],
        )


def allowed_flags(cmd: int, flags: TxFlag, structured: bool) -> int:
    """The command flags a client may set on ``cmd`` given the export's flags."""
    # proto.md: with SEND_FUA the server MUST accept FUA on *every* command
    # ("even by ignoring the bit"); clients are known to set it on reads
    fua = int(CmdFlag.FUA) if flags & TxFlag.SEND_FUA else 0
    if cmd == Cmd.READ:
        return fua | (int(CmdFlag.DF) if structured and flags & TxFlag.SEND_DF else 0)
    if cmd == Cmd.WRITE_ZEROES:
        fast = int(CmdFlag.FAST_ZERO) if flags & TxFlag.SEND_FAST_ZERO else 0
        return fua | int(CmdFlag.NO_HOLE) | fast
    if cmd == Cmd.BLOCK_STATUS:
        return fua | int(CmdFlag.REQ_ONE)
    return fua


def is_plain_read(st: TransmissionState, cmd: int, flags: int, offset: int, length: int) -> bool:
    """True for a READ that validate_request would accept: the per-request
    shortcut for the commonest request (a property test proves the two agree)."""
    return (
        cmd == _READ
        and not flags & st.read_forbidden
        and 0 < length <= st.max_payload
        and offset + length <= st.size
        and st.min_block == 1
    )


def is_plain_write(st: TransmissionState, flags: int, offset: int, length: int) -> bool:
    """True for a WRITE that validate_request would accept (as is_plain_read)."""
    return (
        not st.read_only
        and not flags & st.write_forbidden
        and 0 < length <= st.max_payload
        and offset + length <= st.size
        and st.min_block == 1
    )


def validate_request(
    st: TransmissionState, cmd: int, flags: int, offset: int, length: int
) -> tuple[NbdErrno, str] | None:
    if st.read_only and cmd in _WRITE_CMDS:
        # before the "not advertised" check: read-only exports advertise no
        # TRIM/WRITE_ZEROES, yet proto.md says a write or trim there is EPERM
        return NbdErrno.EPERM, "export is read-only"
    allowed = st.allowed.get(cmd)
    if allowed is None:
        return _refuse_command(cmd)
    if flags & ~allowed:
        return NbdErrno.EINVAL, f"flags {flags & ~allowed:#x} not allowed on {_name(cmd)}"
    if cmd in _RANGE_CMDS:
        return _check_range(st, cmd, offset, length)
    return None


def _name(cmd: int) -> str:
    try:
        return Cmd(cmd).name
    except ValueError:
        return f"command {cmd}"


def _refuse_command(cmd: int) -> tuple[NbdErrno, str]:
    try:
        command = Cmd(cmd)
    except ValueError:
        return NbdErrno.EINVAL, f"unknown command {cmd}"
    if command == Cmd.RESIZE:
        return NbdErrno.EINVAL, "resize is not supported"
    return NbdErrno.EINVAL, f"{command.name} was not advertised"


def _check_range(
    st: TransmissionState, cmd: int, offset: int, length: int
) -> tuple[NbdErrno, str] | None:
    if length == 0:
        return NbdErrno.EINVAL, f"{_name(cmd)} of zero length"
    if offset + length > st.size:
        errno = NbdErrno.ENOSPC if cmd in _WRITE_CMDS else NbdErrno.EINVAL
        return errno, f"{_name(cmd)} {offset}+{length} beyond export size {st.size}"
    if length > st.max_payload and cmd in (_READ, _WRITE):
        return NbdErrno.EINVAL, f"{_name(cmd)} of {length} bytes exceeds {st.max_payload}"
    if cmd == _BLOCK_STATUS:
        if not st.structured:
            return NbdErrno.EINVAL, "block status needs structured replies"
        if not st.has_meta_context:
            return NbdErrno.EINVAL, "block status without a negotiated meta context"
        return None
    if st.min_block > 1 and (offset % st.min_block or length % st.min_block):
        return NbdErrno.EINVAL, f"request not aligned to {st.min_block}"
    return None
