"""Everything that crosses the protocol core boundary.

Events are immutable and check their fields on construction, so an invalid
event cannot exist.  Don't subclass them.  ``Request`` and ``InvalidRequest``
are NamedTuples rather than frozen dataclasses because one is built per
client request: a tuple costs a fifth of a frozen dataclass to create.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from nbdserve.errors import NbdErrno
from nbdserve.protocol.constants import MAX_STRING, Cmd, Info, Opt, Rep


class _Sentinel(type):
    def __repr__(cls) -> str:
        return cls.__name__


class NEED_DATA(metaclass=_Sentinel):
    """next_event(): more bytes are needed before another event."""


class PAUSED(metaclass=_Sentinel):
    """next_event(): the core waits for the application's reply to an option."""


def _check_string(value: str, what: str) -> None:
    if "\0" in value or len(value.encode()) > MAX_STRING:
        raise ValueError(f"{what} must have no NUL and at most {MAX_STRING} bytes")


# ---- client -> server: handshake ------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientFlagsReceived:
    flags: int


@dataclass(frozen=True, slots=True)
class OptExportName:
    name: str


@dataclass(frozen=True, slots=True)
class OptAbort:
    pass


@dataclass(frozen=True, slots=True)
class OptList:
    pass


@dataclass(frozen=True, slots=True)
class OptStartTls:
    pass


@dataclass(frozen=True, slots=True)
class OptInfo:
    name: str
    info_requests: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class OptGo:
    name: str
    info_requests: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class OptStructuredReply:
    pass


@dataclass(frozen=True, slots=True)
class OptExtendedHeaders:
    pass


@dataclass(frozen=True, slots=True)
class OptListMetaContext:
    export_name: str
    queries: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OptSetMetaContext:
    export_name: str
    queries: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OptUnknown:
    option: int


@dataclass(frozen=True, slots=True)
class OptionRejected:
    """An option the core itself found malformed; the application should send
    ``OptionError(reply, message)`` (or its own refusal) back."""

    option: int
    reply: Rep
    message: str


OptionEvent = (
    OptExportName
    | OptAbort
    | OptList
    | OptStartTls
    | OptInfo
    | OptGo
    | OptStructuredReply
    | OptExtendedHeaders
    | OptListMetaContext
    | OptSetMetaContext
    | OptUnknown
    | OptionRejected
)


# ---- client -> server: transmission ---------------------------------------


class Request(NamedTuple):
    """A well-framed, validated request.  ``payload`` is set for WRITE only."""

    handle: int
    cmd: int
    flags: int
    offset: int
    length: int
    payload: bytes | bytearray | None = None


class InvalidRequest(NamedTuple):
    """A well-framed request that must be refused with ``errno``.

    A WRITE's payload has already been consumed (or is being skipped).
    """

    handle: int
    cmd: int
    flags: int
    offset: int
    length: int
    errno: NbdErrno
    reason: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC: finish in-flight requests, then close."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client closed its side."""


# ---- server -> client: handshake ------------------------------------------


@dataclass(frozen=True, slots=True)
class OptionAck:
    pass


@dataclass(frozen=True, slots=True)
class OptionError:
    reply: Rep
    message: str = ""

    def __post_init__(self) -> None:
        if not Rep(self.reply).is_error:
            raise ValueError(f"{self.reply!r} is not an error reply")
        _check_string(self.message, "error message")


@dataclass(frozen=True, slots=True)
class ServerListReply:
    name: str
    description: str = ""

    def __post_init__(self) -> None:
        _check_string(self.name, "export name")
        _check_string(self.description, "description")


@dataclass(frozen=True, slots=True)
class ExportReply:
    """Answer to GO, INFO or EXPORT_NAME for an export that exists."""

    size: int
    transmission_flags: int
    name: str = ""
    description: str = ""
    minimum_block: int = 1
    preferred_block: int = 4096
    maximum_block: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 0 <= self.size < 1 << 63:
            raise ValueError("export size out of range")
        _check_string(self.name, "export name")
        _check_string(self.description, "description")
        if not (1 <= self.minimum_block <= self.preferred_block <= self.maximum_block):
            raise ValueError("block sizes must satisfy 1 <= min <= preferred <= max")


@dataclass(frozen=True, slots=True)
class MetaContextReply:
    context_id: int
    name: str

    def __post_init__(self) -> None:
        _check_string(self.name, "context name")


# ---- server -> client: transmission ---------------------------------------


@dataclass(frozen=True, slots=True)
class SimpleReply:
    """Success (error 0) or failure of a request without data, or any request
    when structured replies are off (READ data follows via ``data``)."""

    handle: int
    error: NbdErrno = NbdErrno.OK
    data: bytes | bytearray | memoryview | None = None
    request_offset: int = 0


@dataclass(frozen=True, slots=True)
class ReadChunk:
    handle: int
    offset: int
    data: bytes | bytearray | memoryview
    done: bool = True
    request_offset: int = 0


@dataclass(frozen=True, slots=True)
class HoleChunk:
    handle: int
    offset: int
    length: int
    done: bool = False
    request_offset: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.length < 1 << 32:
            raise ValueError("hole length must be in 1..2^32-1")


@dataclass(frozen=True, slots=True)
class BlockStatusChunk:
    handle: int
    context_id: int
    descriptors: tuple[tuple[int, int], ...]  # (length, status)
    done: bool = False
    request_offset: int = 0

    def __post_init__(self) -> None:
        if not self.descriptors:
            raise ValueError("a block status chunk needs at least one descriptor")


@dataclass(frozen=True, slots=True)
class ErrorChunk:
    handle: int
    error: NbdErrno
    message: str = ""
    offset: int | None = None
    done: bool = True
    request_offset: int = 0

    def __post_init__(self) -> None:
        if self.error == NbdErrno.OK:
            raise ValueError("an error chunk needs a non-zero error")
        _check_string(self.message, "error message")


@dataclass(frozen=True, slots=True)
class ReplyDone:
    """NBD_REPLY_TYPE_NONE with DONE: success of a structured reply."""

    handle: int
    request_offset: int = 0


ServerEvent = (
    OptionAck
    | OptionError
    | ServerListReply
    | ExportReply
    | MetaContextReply
    | SimpleReply
    | ReadChunk
    | HoleChunk
    | BlockStatusChunk
    | ErrorChunk
    | ReplyDone
)

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "BlockStatusChunk",
    "ClientFlagsReceived",
    "Cmd",
    "ConnectionClosed",
    "Disconnect",
    "ErrorChunk",
    "ExportReply",
    "HoleChunk",
    "Info",
    "InvalidRequest",
    "MetaContextReply",
    "Opt",
    "OptAbort",
    "OptExportName",
    "OptExtendedHeaders",
    "OptGo",
    "OptInfo",
    "OptList",
    "OptListMetaContext",
    "OptSetMetaContext",
    "OptStartTls",
    "OptStructuredReply",
    "OptUnknown",
    "OptionAck",
    "OptionError",
    "OptionRejected",
    "ReadChunk",
    "ReplyDone",
    "Request",
    "ServerListReply",
    "SimpleReply",
]
