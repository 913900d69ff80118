"""The phase rules of the NBD server side, in one place (h11's _state.py).

Rule 1: everything that decides which event is legal when lives here.
Rule 2: the connection consults these tables; it never branches on phases in
its own ad-hoc way.

Theory of operation
-------------------
The server speaks first (the greeting), then waits for the client's flags
(AWAIT_CLIENT_FLAGS).  In OPTIONS, the client sends one option at a time and
MUST wait for the final reply before the next one, so the core holds at most
one *pending option*; ``OPTION_REPLIES`` says which server events may answer
it and ``FINAL_REPLIES`` which of those end it.  Some final replies move the
phase (``OPTION_TRANSITIONS``): an export reply to GO or EXPORT_NAME enters
TRANSMISSION, an ACK to ABORT closes.  In TRANSMISSION, requests and replies
interleave freely; replies may be sent in any order.  ERROR is sticky.
"""

from __future__ import annotations

import enum

from nbdserve.protocol import events as ev


class Phase(enum.Enum):
    AWAIT_CLIENT_FLAGS = "await-client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"


_ACK_OR_ERROR: frozenset[type] = frozenset({ev.OptionAck, ev.OptionError})

OPTION_REPLIES: dict[type, frozenset[type]] = {
    ev.OptExportName: frozenset({ev.ExportReply}),
    ev.OptAbort: _ACK_OR_ERROR,
    ev.OptList: frozenset({ev.ServerListReply, ev.OptionAck, ev.OptionError}),
    ev.OptStartTls: _ACK_OR_ERROR,
    ev.OptInfo: frozenset({ev.ExportReply, ev.OptionError}),
    ev.OptGo: frozenset({ev.ExportReply, ev.OptionError}),
    ev.OptStructuredReply: _ACK_OR_ERROR,
    ev.OptExtendedHeaders: _ACK_OR_ERROR,
    ev.OptListMetaContext: frozenset({ev.MetaContextReply, ev.OptionAck, ev.OptionError}),
    ev.OptSetMetaContext: frozenset({ev.MetaContextReply, ev.OptionAck, ev.OptionError}),
    ev.OptUnknown: frozenset({ev.OptionError}),
    ev.OptionRejected: frozenset({ev.OptionError}),
}

FINAL_REPLIES: frozenset[type] = frozenset({ev.OptionAck, ev.OptionError, ev.ExportReply})

OPTION_TRANSITIONS: dict[tuple[type, type], Phase] = {
    (ev.OptGo, ev.ExportReply): Phase.TRANSMISSION,
    (ev.OptExportName, ev.ExportReply): Phase.TRANSMISSION,
    (ev.OptAbort, ev.OptionAck): Phase.CLOSED,
}

TRANSMISSION_REPLIES: frozenset[type] = frozenset(
    {
        ev.SimpleReply,
        ev.ReadChunk,
        ev.HoleChunk,
        ev.BlockStatusChunk,
        ev.ErrorChunk,
        ev.ReplyDone,
    }
)

# replies that need structured replies to have been negotiated
STRUCTURED_ONLY: frozenset[type] = frozenset(
    {ev.ReadChunk, ev.HoleChunk, ev.BlockStatusChunk, ev.ErrorChunk, ev.ReplyDone}
)
