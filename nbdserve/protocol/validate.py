"""Pure validation of transmission requests (nbdkit ``validate_request``).

Returns ``None`` for a valid request or ``(errno, reason)``.  Order follows
nbdkit: unknown command, flags, read-only, range, size limits, alignment.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbdserve.errors import NbdErrno
from nbdserve.protocol.constants import Cmd, CmdFlag, TxFlag

_WRITE_CMDS = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
_RANGE_CMDS = frozenset(
    {Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.BLOCK_STATUS}
)
_CMD_NEEDS_FLAG = {
    Cmd.FLUSH: TxFlag.SEND_FLUSH,
    Cmd.TRIM: TxFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TxFlag.SEND_WRITE_ZEROES,
    Cmd.CACHE: TxFlag.SEND_CACHE,
}


@dataclass(frozen=True, slots=True)
class TransmissionState:
    """What the handshake settled that requests are checked against."""

    size: int
    flags: TxFlag
    structured: bool
    extended: bool
    has_meta_context: bool
    max_payload: int
    min_block: int = 1


def allowed_flags(cmd: int, st: TransmissionState) -> int:
    """The command flags a client may set on ``cmd`` under ``st``."""
    # proto.md: with SEND_FUA the server MUST accept FUA on *every* command
    # ("even by ignoring the bit"); clients are known to set it on reads
    fua = int(CmdFlag.FUA) if st.flags & TxFlag.SEND_FUA else 0
    if cmd == Cmd.READ:
        return fua | (int(CmdFlag.DF) if st.structured and st.flags & TxFlag.SEND_DF else 0)
    if cmd == Cmd.WRITE_ZEROES:
        fast = int(CmdFlag.FAST_ZERO) if st.flags & TxFlag.SEND_FAST_ZERO else 0
        return fua | int(CmdFlag.NO_HOLE) | fast
    if cmd == Cmd.BLOCK_STATUS:
        return fua | int(CmdFlag.REQ_ONE)
    return fua


def validate_request(
    st: TransmissionState, cmd: int, flags: int, offset: int, length: int
) -> tuple[NbdErrno, str] | None:
    try:
        command = Cmd(cmd)
    except ValueError:
        return NbdErrno.EINVAL, f"unknown command {cmd}"
    if command == Cmd.RESIZE:
        return NbdErrno.EINVAL, "resize is not supported"
    if command in _WRITE_CMDS and st.flags & TxFlag.READ_ONLY:
        # before the "not advertised" check: read-only exports advertise no
        # TRIM/WRITE_ZEROES, yet proto.md says a write or trim there is EPERM
        return NbdErrno.EPERM, "export is read-only"
    needed = _CMD_NEEDS_FLAG.get(command)
    if needed is not None and not st.flags & needed:
        return NbdErrno.EINVAL, f"{command.name} was not advertised"
    # int(): ``~`` of an IntFlag complements only the defined bits, which
    # would let undefined flag bits through
    bad = flags & ~int(allowed_flags(command, st))
    if bad:
        return NbdErrno.EINVAL, f"flags {bad:#x} not allowed on {command.name}"
    if command in _RANGE_CMDS:
        return _check_range(st, command, offset, length)
    return None


def _check_range(
    st: TransmissionState, command: Cmd, offset: int, length: int
) -> tuple[NbdErrno, str] | None:
    if length == 0:
        return NbdErrno.EINVAL, f"{command.name} of zero length"
    if offset + length > st.size:
        errno = NbdErrno.ENOSPC if command in _WRITE_CMDS else NbdErrno.EINVAL
        return errno, f"{command.name} {offset}+{length} beyond export size {st.size}"
    if command in (Cmd.READ, Cmd.WRITE) and length > st.max_payload:
        return NbdErrno.EINVAL, f"{command.name} of {length} bytes exceeds {st.max_payload}"
    if command == Cmd.BLOCK_STATUS:
        if not st.structured:
            return NbdErrno.EINVAL, "block status needs structured replies"
        if not st.has_meta_context:
            return NbdErrno.EINVAL, "block status without a negotiated meta context"
        return None
    if st.min_block > 1 and (offset % st.min_block or length % st.min_block):
        return NbdErrno.EINVAL, f"request not aligned to {st.min_block}"
    return None
