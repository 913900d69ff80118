"""ProtocolPair: a ServerConnection and the test client codec over a fake wire.

Like h11's ``ConnectionPair``: bytes the client side produces are fed to the
server core, and the chunks the server core returns from ``send`` are fed to
the client codec, so a test can play both sides in plain sync code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from nbdserve.protocol import events as ev
from nbdserve.protocol.connection import ServerConnection
from nbdserve.protocol.constants import Info, Opt, TxFlag
from nbdserve.protocol.state import Phase
from tests.helpers import client as cl

DEFAULT_FLAGS = int(
    TxFlag.HAS_FLAGS
    | TxFlag.SEND_FLUSH
    | TxFlag.SEND_FUA
    | TxFlag.SEND_TRIM
    | TxFlag.SEND_WRITE_ZEROES
    | TxFlag.SEND_DF
    | TxFlag.SEND_CACHE
    | TxFlag.SEND_FAST_ZERO
)


def join(chunks: Sequence[bytes | bytearray | memoryview]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


class ProtocolPair:
    def __init__(self, **server_kwargs: object) -> None:
        self.server = ServerConnection(**server_kwargs)  # type: ignore[arg-type]
        self.client = cl.ClientCodec()
        self.wire_to_client = bytearray()  # everything the server ever sent

    # ---- raw movement ---------------------------------------------------

    def to_server(self, data: bytes) -> list[object]:
        """Feed client bytes to the server; return the events up to NEED_DATA/PAUSED."""
        self.server.receive_data(data)
        return self.events()

    def events(self) -> list[object]:
        out: list[object] = []
        while True:
            event = self.server.next_event()
            if event is ev.NEED_DATA or event is ev.PAUSED:
                return out
            out.append(event)
            if isinstance(event, ev.ConnectionClosed | ev.Disconnect):
                return out

    def send(self, *events: object) -> bytes:
        """Encode server events and deliver the bytes to the client codec."""
        raw = b"".join(join(self.server.send(e)) for e in events)
        self.wire_to_client += raw
        self.client.receive_data(raw)
        return raw

    # ---- handshake helpers ------------------------------------------------

    def greet(self, flags: int = cl.DEFAULT_CLIENT_FLAGS) -> None:
        raw = self.server.initiate()
        self.client.receive_data(raw)
        assert self.client.greeting() is not None
        self.client.no_zeroes = bool(flags & 2)
        assert self.to_server(cl.client_flags(flags)) == [ev.ClientFlagsReceived(flags)]
        assert self.server.phase is Phase.OPTIONS

    def option(self, raw: bytes) -> object:
        """Send one option; return the single event the server produces."""
        events = self.to_server(raw)
        assert len(events) == 1, events
        return events[0]

    def answer(self, *events: object) -> list[cl.OptionReply]:
        """Send server replies to the pending option; parse them on the client."""
        self.send(*events)
        out = []
        while (r := self.client.option_reply()) is not None:
            out.append(r)
        assert self.client.buffered == 0
        return out

    def negotiate(
        self,
        *,
        structured: bool = True,
        extended: bool = False,
        meta: Sequence[tuple[int, str]] = (),
        size: int = 1 << 20,
        flags: int = DEFAULT_FLAGS,
        name: str = "disk",
        minimum_block: int = 1,
        export_name: bool = False,
    ) -> None:
        """Drive the handshake into TRANSMISSION with the given settings."""
        self.greet()
        if extended:
            assert self.option(cl.opt_extended_headers()) == ev.OptExtendedHeaders()
            self.answer(ev.OptionAck())
            self.client.extended = self.client.structured = True
        elif structured:
            assert self.option(cl.opt_structured_reply()) == ev.OptStructuredReply()
            self.answer(ev.OptionAck())
            self.client.structured = True
        if meta:
            got = self.option(cl.opt_set_meta_context(name, [n for _, n in meta]))
            assert isinstance(got, ev.OptSetMetaContext)
            self.answer(*(ev.MetaContextReply(cid, n) for cid, n in meta), ev.OptionAck())
        reply = ev.ExportReply(size, flags, name=name, minimum_block=minimum_block)
        if export_name:
            assert self.option(cl.opt_export_name(name)) == ev.OptExportName(name)
            self.send(reply)
            assert self.client.export_name_reply() is not None
        else:
            got = self.option(cl.opt_go(name, [Info.BLOCK_SIZE]))
            assert got == ev.OptGo(name, (Info.BLOCK_SIZE,))
            self.answer(reply)
        assert self.server.phase is Phase.TRANSMISSION

    # ---- transmission helpers -------------------------------------------

    def request(
        self,
        cmd: int,
        handle: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
    ) -> list[object]:
        raw = self.client.request(cmd, handle, offset, length, flags, payload)
        return self.to_server(raw)

    def replies(self) -> Iterator[cl.Reply]:
        while (r := self.client.reply()) is not None:
            yield r


def reading_modes(data: bytes, trailing: bytes = b"") -> Iterator[tuple[str, list[bytes]]]:
    """h11's three reading modes: whole, byte by byte, and with trailing bytes.

    Yields (mode, pieces); the caller feeds ``pieces`` one at a time.  With
    ``trailing`` the extra bytes arrive in the same piece as the message end.
    """
    yield "whole", [data]
    yield "bytewise", [data[i : i + 1] for i in range(len(data))]
    if trailing:
        yield "trailing", [data + trailing]


OPT_NAMES = {int(o): o.name for o in Opt}
