"""One client connection: bytes between the socket and the protocol core.

Theory of operation
-------------------
The session is the only code that awaits the socket.  In transmission it reads
whatever the socket has, lets the core parse every complete request in it, and
answers each request in one of two ways:

* inline, when the device can complete it without blocking (a page-cached
  read, a small buffered write): the reply joins a batch that is sent with
  one ``send_all`` once the buffer is drained;
* in a task of the session's nursery otherwise, behind a semaphore of
  ``max_inflight`` (back-pressure: when it is exhausted we stop reading).

Every send goes through :meth:`Session._send`, under one lock, in a shielded
scope with its own deadline so a cancelled request cannot leave half a reply
on the wire; a failed send marks the core broken (``send_failed``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from nbdserve.errors import NbdErrno, RemoteProtocolError
from nbdserve.protocol import events as ev
from nbdserve.protocol.connection import ServerConnection
from nbdserve.protocol.constants import Cmd, CmdFlag, Rep
from nbdserve.server.dispatch import SPARSE_READ_MIN, dispatch
from nbdserve.server.exports import META_CONTEXT_IDS, Export, ExportRegistry

if TYPE_CHECKING:
    from nbdserve.block.device import BlockDevice
    from nbdserve.config import ServerConfig

LOGGER = logging.getLogger(__name__)

RECEIVE_SIZE = 256 * 1024
SEND_TIMEOUT = 60.0
_JOIN_LIMIT = 256 * 1024
_READ = int(Cmd.READ)
_WRITE = int(Cmd.WRITE)
_FUA = int(CmdFlag.FUA)
_DF = int(CmdFlag.DF)


class Session:
    """A client from greeting to close.

    ``_send_lock`` protects the stream's write side: replies are written whole,
    one at a time.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        registry: ExportRegistry,
        config: ServerConfig,
        *,
        peer: str,
        strict: bool = False,
    ) -> None:
        self.stream = stream
        self.registry = registry
        self.config = config
        self.peer = peer
        self.strict = strict
        self.conn = ServerConnection(max_payload=32 * 1024 * 1024)
        self.export: Export | None = None
        self._send_lock = trio.Lock()
        self._slots = trio.Semaphore(config.max_inflight)
        self._reader_scope = trio.CancelScope()
        self.requests = 0

    def begin_shutdown(self) -> None:
        """Stop reading; in-flight requests still finish and get their replies."""
        self._reader_scope.cancel()

    # ---- lifetime -----------------------------------------------------------

    async def run(self) -> None:
        LOGGER.info("event=connect client=%s", self.peer)
        reason = "closed"
        try:
            await self._send([self.conn.initiate()])
            with trio.fail_after(self.config.handshake_timeout):
                export = await self._negotiate()
            if export is not None:
                await self._serve(export)
        except RemoteProtocolError as exc:
            reason = f"protocol error: {exc}"
        except trio.TooSlowError:
            reason = "handshake timed out"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reason = "connection lost"
        finally:
            await trio.aclose_forcefully(self.stream)
            LOGGER.info(
                "event=disconnect client=%s export=%s requests=%d reason=%r",
                self.peer,
                self.export.name if self.export else "-",
                self.requests,
                reason,
            )

    async def _serve(self, export: Export) -> None:
        self.export = export
        export.connections += 1
        try:
            LOGGER.info("event=attach client=%s export=%s", self.peer, export.name)
            await self._transmission(export)
        finally:
            export.connections -= 1

    async def _send(self, chunks: list[bytes | bytearray | memoryview]) -> None:
        async with self._send_lock:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + SEND_TIMEOUT
                try:
                    await self._send_chunks(chunks)
                except BaseException:
                    self.conn.send_failed()
                    raise
            if scope.cancelled_caught:
                self.conn.send_failed()
                raise trio.BrokenResourceError("client stopped reading replies")

    async def _send_chunks(self, chunks: list[bytes | bytearray | memoryview]) -> None:
        if len(chunks) == 1:
            await self.stream.send_all(chunks[0])
            return
        total = sum(len(c) for c in chunks)
        if total <= _JOIN_LIMIT:
            await self.stream.send_all(b"".join(chunks))
            return
        for chunk in chunks:
            await self.stream.send_all(chunk)

    async def _receive(self) -> None:
        data = await self.stream.receive_some(RECEIVE_SIZE)
        self.conn.receive_data(data)

    async def _next_event(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is ev.NEED_DATA:
                await self._receive()
                continue
            return event

    # ---- handshake ----------------------------------------------------------

    async def _negotiate(self) -> Export | None:
        """Answer options until the client picks an export (or leaves)."""
        while True:
            event = await self._next_event()
            if isinstance(event, ev.ClientFlagsReceived):
                continue
            if isinstance(event, ev.ConnectionClosed):
                return None
            if self.registry.shutting_down and not isinstance(event, ev.OptAbort):
                if isinstance(event, ev.OptExportName):
                    return None
                await self._reply(ev.OptionError(Rep.ERR_SHUTDOWN, "server is shutting down"))
                continue
            result = await self._option(event)
            if result is not None or isinstance(event, ev.OptAbort | ev.OptExportName):
                return result

    async def _reply(self, *events: object) -> None:
        chunks: list[bytes | bytearray | memoryview] = []
        for event in events:
            chunks.extend(self.conn.send(event))
        await self._send(chunks)

    async def _option(self, event: object) -> Export | None:
        match event:
            case ev.OptExportName(name=name):
                export = self._usable_export(name)
                if isinstance(export, str):
                    LOGGER.info("client=%s export=%r refused: %s", self.peer, name, export)
                    return None  # EXPORT_NAME cannot fail politely: close
                await self._reply(self._export_reply(export))
                return export
            case ev.OptAbort():
                await self._reply(ev.OptionAck())
                return None
            case ev.OptList():
                replies: list[object] = [
                    ev.ServerListReply(e.name, e.config.description) for e in self.registry
                ]
                await self._reply(*replies, ev.OptionAck())
            case ev.OptStartTls():
                await self._reply(ev.OptionError(Rep.ERR_POLICY, "TLS is not configured"))
            case ev.OptInfo(name=name) | ev.OptGo(name=name):
                export = self._usable_export(name)
                if isinstance(export, str):
                    rep = Rep.ERR_UNKNOWN if export == "unknown export" else Rep.ERR_POLICY
                    await self._reply(ev.OptionError(rep, f"{export}: {name!r}"))
                    return None
                await self._reply(self._export_reply(export))
                if isinstance(event, ev.OptGo):
                    return export
            case ev.OptStructuredReply() | ev.OptExtendedHeaders():
                await self._reply(ev.OptionAck())
            case ev.OptListMetaContext() | ev.OptSetMetaContext():
                await self._meta_context(event)
            case ev.OptionRejected(reply=rep, message=msg):
                await self._reply(ev.OptionError(rep, msg))
            case ev.OptUnknown(option=opt):
                await self._reply(ev.OptionError(Rep.ERR_UNSUP, f"option {opt} not supported"))
            case _:
                raise AssertionError(f"unexpected handshake event {event!r}")
        return None

    def _usable_export(self, name: str) -> Export | str:
        export = self.registry.lookup(name)
        if export is None:
            return "unknown export"
        if not export.has_room():
            return "export has reached its connection limit"
        return export

    def _export_reply(self, export: Export) -> ev.ExportReply:
        limits = export.device.limits
        maximum = min(self.conn.max_payload, max(limits.max_transfer, limits.request_alignment))
        minimum = limits.request_alignment
        preferred = max(minimum, limits.preferred)
        return ev.ExportReply(
            size=export.size,
            transmission_flags=export.transmission_flags,
            name=export.name,
            description=export.config.description,
            minimum_block=minimum,
            preferred_block=min(preferred, maximum),
            maximum_block=maximum,
        )

    async def _meta_context(self, event: ev.OptListMetaContext | ev.OptSetMetaContext) -> None:
        export = self.registry.lookup(event.export_name)
        if export is None:
            await self._reply(ev.OptionError(Rep.ERR_UNKNOWN, "unknown export"))
            return
        listing = isinstance(event, ev.OptListMetaContext)
        if listing and not event.queries:
            names = list(export.contexts)
        else:
            names = []
            for query in event.queries:
                for name in export.match_contexts(query, listing=listing):
                    if name not in names:
                        names.append(name)
        replies = [ev.MetaContextReply(META_CONTEXT_IDS[n], n) for n in names]
        await self._reply(*replies, ev.OptionAck())

    # ---- transmission -------------------------------------------------------

    async def _transmission(self, export: Export) -> None:
        async with trio.open_nursery() as nursery:
            with self._reader_scope:
                await self._read_loop(export, nursery)
        # leaving the nursery waited for every in-flight request

    async def _read_loop(self, export: Export, nursery: trio.Nursery) -> None:
        conn = self.conn
        device = export.device
        registry = self.registry
        request_t = ev.Request
        need_data = ev.NEED_DATA
        while True:
            out: list[bytes | bytearray | memoryview] = []
            while True:
                event = conn.next_event()
                if type(event) is request_t:
                    req: ev.Request = event
                    self.requests += 1
                    if registry.shutting_down:
                        out.append(
                            conn.reply_error(
                                req.handle,
                                NbdErrno.ESHUTDOWN,
                                "server is shutting down",
                                req.offset,
                            )
                        )
                    elif not self._inline(req, device, out):
                        if out:
                            await self._send(out)
                            out = []
                        await self._spawn(nursery, req, device)
                    continue
                if event is need_data:
                    break
                if isinstance(event, ev.InvalidRequest):
                    self.requests += 1
                    out.append(
                        conn.reply_error(event.handle, event.errno, event.reason, event.offset)
                    )
                    continue
                if isinstance(event, ev.Disconnect | ev.ConnectionClosed):
                    if out:
                        await self._send(out)
                    return
                raise AssertionError(f"unexpected transmission event {event!r}")
            if out:
                await self._send(out)
            await self._receive()

    def _inline(
        self, req: ev.Request, device: BlockDevice, out: list[bytes | bytearray | memoryview]
    ) -> bool:
        """Answer ``req`` now if the device can without blocking."""
        cmd = req.cmd
        conn = self.conn
        if cmd == _READ:
            n = req.length
            if n >= SPARSE_READ_MIN and conn.structured_replies and not req.flags & _DF:
                return False
            hsize = conn.reply_read_header_size()
            buf = bytearray(hsize + n)
            if not device.try_readinto(req.offset, memoryview(buf)[hsize:]):
                return False
            buf[:hsize] = conn.reply_read_header(req.handle, req.offset, n)
            out.append(buf)
            return True
        if cmd == _WRITE:
            assert req.payload is not None
            if not device.try_write(req.offset, req.payload, fua=bool(req.flags & _FUA)):
                return False
            out.append(conn.reply_ok(req.handle, req.offset))
            return True
        return False

    async def _spawn(self, nursery: trio.Nursery, req: ev.Request, device: BlockDevice) -> None:
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        nursery.start_soon(self._handle, req, device)

    async def _handle(self, req: ev.Request, device: BlockDevice) -> None:
        try:
            chunks = await dispatch(self.conn, device, req, strict=self.strict)
            try:
                await self._send(chunks)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # the client went away; the request itself is complete
                self._reader_scope.cancel()
        finally:
            self._slots.release()
