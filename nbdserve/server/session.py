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

Every send goes through :meth:`Session._send`, under one lock.  It first
offers the bytes to the kernel without blocking and only awaits when the
socket is full, so a batch costs about one scheduler pass (transport.py says
why that matters).  A send that fails or is cancelled half-way marks the core
broken (``send_failed``) and ends the session: a half-written reply cannot be
taken back, so the connection is closed rather than corrupted.
"""

from __future__ import annotations

import logging
import mmap
import ssl
from collections.abc import Awaitable, Callable, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import trio

from nbdserve.errors import NbdErrno, RemoteProtocolError
from nbdserve.logformat import quote
from nbdserve.protocol import events as ev
from nbdserve.protocol.connection import LARGE_PAYLOAD, PayloadPool, ServerConnection
from nbdserve.protocol.constants import Cmd, CmdFlag, Rep
from nbdserve.protocol.wire import EXTENDED_REQUEST_SIZE, REQUEST_SIZE
from nbdserve.server import tls
from nbdserve.server.dispatch import (
    SPARSE_READ_MIN,
    block_status_reply,
    describe_request,
    dispatch,
    status_extents_wanted,
)
from nbdserve.server.exports import META_CONTEXT_IDS, Export, ExportRegistry
from nbdserve.server.pagein import PageIn, PageInWaits
from nbdserve.server.stats import ExportStats
from nbdserve.server.tls import TlsMode
from nbdserve.server.transport import SocketTransport, StreamTransport, Transport

if TYPE_CHECKING:
    from nbdserve.block.device import BlockDevice
    from nbdserve.config import ServerConfig

LOGGER = logging.getLogger(__name__)

RECEIVE_SIZE = 256 * 1024
# poll a quiet socket this long before parking in the scheduler (queue depth 1
# latency: measured 12k -> 17.5k IOPS for 4 KiB random reads at QD1)
SPIN_SECONDS = 30e-6
# a client whose last request is older than this is idle, not between two
# requests (see Session._wait_for_request)
WAITING_SECONDS = 10e-3
# while requests keep arriving, let other tasks run at least this often
YIELD_INTERVAL = 0.5e-3
# the events after which a connection reads nothing more
_LAST_EVENTS = (ev.Disconnect, ev.ConnectionClosed)
_JOIN_LIMIT = 64 * 1024
_READ = int(Cmd.READ)
_WRITE = int(Cmd.WRITE)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_FUA = int(CmdFlag.FUA)

# a reply as the send path takes it, and what of it the socket left for later
_Reply = TypeVar("_Reply")
_Rest = TypeVar("_Rest")

# reads at least this large go out with sendfile when the device allows it
ZERO_COPY_MIN = 64 * 1024


class _FileReply(NamedTuple):
    header: bytes
    fd: int
    pieces: Sequence[tuple[int, int]]  # (file offset, length), sent in order


class _FileRest(NamedTuple):
    """What the socket did not take of a _FileReply: the rest of one piece (the
    arguments of ``send_file``), then whole pieces."""

    first: tuple[bytes, int, int, int]
    fd: int
    pieces: Sequence[tuple[int, int]]


def _cost(req: ev.Request) -> int:
    """Bytes a deferred request holds: its payload or the reply it builds."""
    if req.cmd in (_READ, _WRITE):
        return req.length
    return 0


def _no_zero_copy(offset: int, length: int) -> None:
    return None


def _never_reads(offset: int, view: memoryview) -> bool:
    return False


def _unsent(rest: list[memoryview]) -> list[memoryview]:
    """The ``write_now`` of a reply whose first part was already tried."""
    return rest


class WaitingClients:
    """How many of a server's sessions are waiting for their client's next
    request with nothing of theirs in flight, and the two sessions that last
    got a request after such a wait, with when.  While another client is
    between two requests, a session does not keep the loop to itself polling
    its own socket (see Session._wait_for_request)."""

    __slots__ = ("count", "last", "last_at", "prev", "prev_at")

    def __init__(self) -> None:
        self.count = 0
        self.last: object = None
        self.last_at = float("-inf")
        self.prev: object = None
        self.prev_at = float("-inf")

    def woke(self, session: object, now: float) -> None:
        if self.last is not session:
            self.prev, self.prev_at = self.last, self.last_at
            self.last = session
        self.last_at = now

    def others_between_requests(self, session: object, now: float) -> bool:
        """Some session waits, and another one than ``session`` got a request
        within WAITING_SECONDS: not just idle connections."""
        if not self.count:
            return False
        if self.last is not session:
            return now - self.last_at < WAITING_SECONDS
        return self.prev is not None and now - self.prev_at < WAITING_SECONDS


class Session:
    """A client from greeting to close.

    ``_send_lock`` protects the stream's write side: replies are written whole,
    one at a time.
    """

    def __init__(
        self,
        transport: Transport,
        registry: ExportRegistry,
        config: ServerConfig,
        *,
        tls: ssl.SSLContext | None = None,
        strict: bool = False,
        payload_pool: PayloadPool | None = None,
        waiting: WaitingClients | None = None,
    ) -> None:
        self.transport = transport
        self.registry = registry
        self.config = config
        self.peer = transport.peer
        self.peer_address = transport.peer_address
        self._tls_ctx = tls
        self._tls_mode = TlsMode(config.tls)
        self.tls_active = False
        self.strict = strict
        self.conn = ServerConnection(max_payload=32 * 1024 * 1024, payload_pool=payload_pool)
        self.export: Export | None = None
        self._send_lock = trio.Lock()
        self._slots = trio.Semaphore(config.max_inflight)
        self._bytes_budget = config.max_inflight_bytes
        self._inflight_bytes = 0
        self._bytes_freed = trio.Event()
        self._reader_scope = trio.CancelScope()
        self._broken = False
        self._replies_lent = False  # inline replies in pooled buffers await recycling
        self._last_yield = 0.0
        self._scratch: memoryview | None = None
        self._waiting = waiting if waiting is not None else WaitingClients()
        # reads waiting in the loop for their pages (pagein.py); its reader is the
        # device's, set when transmission starts
        self._page_ins = PageInWaits(_never_reads)
        self._page_in_task = False
        self._header_next = False
        self.end_reason = "closed"
        self.stats = ExportStats()  # replaced by the export's once one is chosen
        self._max_read = self.conn.max_payload + 1
        self.requests = 0
        # the fields naming this connection in a failed request's log line
        self._origin = f"client={self.peer} export=-"

    def begin_shutdown(self) -> None:
        """Stop reading; in-flight requests still finish and get their replies."""
        self._reader_scope.cancel()

    # ---- lifetime -----------------------------------------------------------

    async def run(self) -> None:
        LOGGER.debug("event=connect client=%s", self.peer)
        try:
            await self._send([self.conn.initiate()])
            with trio.fail_after(self.config.handshake_timeout):
                export = await self._negotiate()
            if export is not None:
                await self._serve(export)
        except RemoteProtocolError as exc:
            self.end_reason = f"protocol error: {exc}"
        except trio.TooSlowError:
            # an oldstyle client waits for an oldstyle greeting: it ends up here
            self.end_reason = "handshake timed out (only fixed newstyle negotiation is served)"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.end_reason = "connection lost"
        finally:
            await self.transport.aclose()
            # clients that never chose an export (listings, health checks) are
            # routine: keep them out of the default log
            log = LOGGER.info if self.export is not None else LOGGER.debug
            log(
                "event=disconnect client=%s export=%s requests=%d reason=%r",
                self.peer,
                quote(self.export.name) if self.export else "-",
                self.requests,
                self.end_reason,
            )

    async def _serve(self, export: Export) -> None:
        self.export = export
        self.stats = export.stats
        self._origin = f"client={self.peer} export={quote(export.name)}"
        export.connections += 1
        export.stats.clients += 1
        try:
            LOGGER.info("event=attach client=%s export=%s", self.peer, quote(export.name))
            await self._transmission(export)
        finally:
            export.connections -= 1
            export.stats.clients -= 1
            await self.registry.release(export)

    async def _send(self, chunks: list[bytes | bytearray | memoryview]) -> None:
        """Send whole replies; without any await when the kernel takes them at once."""
        await self._write_locked(self._write_now, chunks, self._write_rest)

    def _send_at_once(
        self, chunks: list[bytes | bytearray | memoryview]
    ) -> list[memoryview] | None:
        """``_send`` without a coroutine for the common case: when no other reply
        is half-sent, give the kernel what it takes now.  Returns what is left
        (all of it when the socket may not be written now), which
        ``_write_locked(_unsent, ...)`` finishes."""
        if self._send_lock.locked() or self._broken:
            return [memoryview(chunk) for chunk in chunks]
        try:
            return self._write_now(chunks)
        except BaseException:
            self._mark_broken()
            raise

    async def _write_locked(
        self,
        write_now: Callable[[_Reply], _Rest | None],
        reply: _Reply,
        write_rest: Callable[[_Rest], Awaitable[None]],
    ) -> None:
        """Write a reply whole: what the socket takes at once, then the rest shielded.

        The send lock keeps a reply that has to wait for the socket from being
        cut by another; a reply the kernel takes at once needs no lock (no task
        can run in between), no cancel scope and no await.  Taking the lock
        only when needed saves 0.76 µs a batch, which is per request at QD1.
        """
        lock = self._send_lock
        holding = lock.locked()  # another task is mid-reply: wait for it
        if holding:
            await lock.acquire()
        try:
            if self._broken:
                raise trio.BrokenResourceError("an earlier reply could not be sent")
            rest = write_now(reply)
            if rest is not None:
                if not holding:
                    lock.acquire_nowait()  # free: nothing awaited since locked()
                    holding = True
                await self._shielded(write_rest, rest)
        except BaseException:
            self._mark_broken()
            raise
        finally:
            if holding:
                lock.release()

    async def _shielded(self, write: Callable[..., Awaitable[None]], *args: object) -> None:
        """Finish a write that had to wait for the socket.

        Shielded, so stopping the reader (shutdown) or cancelling a request
        cannot cut a reply; its own deadline bounds a client that stops
        reading.  A failed write ends the connection (``_mark_broken``): a cut
        reply can never be followed by another.
        """
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.config.send_timeout
            await write(*args)
        if scope.cancelled_caught:
            raise trio.BrokenResourceError("client stopped reading replies")

    def _mark_broken(self) -> None:
        self._broken = True
        self.conn.send_failed()
        self._reader_scope.cancel()

    def _write_now(self, chunks: list[bytes | bytearray | memoryview]) -> list[memoryview] | None:
        """Give the kernel what it takes now; return what is left, in order."""
        transport = self.transport
        if len(chunks) == 1:
            data = chunks[0]
        elif sum(len(c) for c in chunks) <= _JOIN_LIMIT:
            data = b"".join(chunks)
        else:
            sent = transport.try_send_many(list(chunks))
            rest: list[memoryview] = []
            for chunk in chunks:
                n = len(chunk)
                if sent >= n:
                    sent -= n
                    continue
                rest.append(memoryview(chunk)[sent:])
                sent = 0
            return rest or None
        sent = transport.try_send(data)
        if sent < len(data):
            return [memoryview(data)[sent:]]
        return None

    async def _write_rest(self, rest: list[memoryview]) -> None:
        for piece in rest:
            await self.transport.send_all(piece)

    async def _send_file(self, reply: _FileReply) -> None:
        await self._write_locked(self._file_now, reply, self._file_rest)

    def _file_now(self, reply: _FileReply) -> _FileRest | None:
        header, fd, pieces = reply
        try_send_file = self.transport.try_send_file
        for i, (offset, length) in enumerate(pieces):
            rest = try_send_file(header, fd, offset, length)
            if rest is not None:
                return _FileRest(rest, fd, pieces[i + 1 :])
            header = b""
        return None

    async def _file_rest(self, rest: _FileRest) -> None:
        send_file = self.transport.send_file
        await send_file(*rest.first)
        for offset, length in rest.pieces:
            await send_file(b"", rest.fd, offset, length)

    async def _receive_payload(self, target: memoryview) -> None:
        """Fill a large payload straight from the socket, as far as it has data."""
        transport = self.transport
        self._header_next = True
        got = 0
        while got < len(target):
            n = transport.try_receive_into(target[got:])
            if n is None:
                if got:
                    break
                n = await transport.receive_into(target)
                self.conn.commit_received(n)
                return
            self.conn.commit_received(n)
            if n == 0:
                break
            got += n
        await trio.lowlevel.checkpoint()

    async def _receive(self) -> None:
        target = self.conn.receive_buffer()
        if target is not None:
            await self._receive_payload(target)
            return
        view = self._receive_view()
        n = self.transport.try_receive_into(view)
        # (not while reads wait for their pages: the loop polls for those)
        if (
            n is None
            and not self._page_ins.pending
            and not (
                self._nothing_in_flight()
                and self._waiting.others_between_requests(self, perf_counter())
            )
        ):
            n = self._spin_receive(view)
        if n is None:
            n = await self._wait_for_request(view)
            self._last_yield = perf_counter()
        elif perf_counter() - self._last_yield >= YIELD_INTERVAL:
            await self._yield_now()
        self.conn.receive_data(view[:n])

    def _nothing_in_flight(self) -> bool:
        return self._slots.value == self.config.max_inflight and not self._page_ins.pending

    async def _wait_for_request(self, view: memoryview) -> int:
        """Wait in the scheduler for the client's next request headers.

        A session with nothing in flight counts as waiting for its client
        (queue depth 1, between two requests).  While another client is
        between two requests too, it polls through the scheduler for
        SPIN_SECONDS before parking, and skips ``_spin_receive``, which would
        keep the loop to itself: a request arriving on another connection is
        then answered at once, not after our poll (two clients at queue depth
        1: 1.34x the IOPS in all, median of 9 A/B rounds).  A session with
        requests in flight (say, reads from the disk) does not count, so a
        queue-depth-1 client beside it keeps its poll; nor do connections
        whose client has sent nothing for WAITING_SECONDS, nor TLS ones (no
        non-blocking receive to poll).  A timeout on the
        wait itself would do that too, but measured worse: a cancel scope
        around each wait cost a deep client beside a QD1 one a third of its
        rate.
        """
        transport = self.transport
        if not (self._nothing_in_flight() and isinstance(transport, SocketTransport)):
            return await transport.receive_into(view)
        waiting = self._waiting
        spin = waiting.others_between_requests(self, perf_counter())
        waiting.count += 1
        try:
            n = None
            if spin:
                n = await self._spin_through_scheduler(view)
            if n is None:
                n = await transport.receive_into(view)
        finally:
            waiting.count -= 1
        waiting.woke(self, perf_counter())
        return n

    async def _spin_through_scheduler(self, view: memoryview) -> int | None:
        try_receive_into = self.transport.try_receive_into
        deadline = perf_counter() + SPIN_SECONDS
        while True:
            await trio.lowlevel.checkpoint()
            n = try_receive_into(view)
            if n is not None or perf_counter() >= deadline:
                return n

    def _receive_view(self) -> memoryview:
        """Where the next request headers land: the session's scratch buffer.

        A fresh ``bytes`` per receive would cost an allocation (and for 256 KiB,
        an mmap and page faults) each time.  Right after a large payload the
        next request is most likely another large WRITE, so only its header is
        read: its payload then goes straight into its own buffer instead of
        being copied through this one.
        """
        view = self._scratch
        if view is None:
            # an anonymous mapping: its pages take memory only once a receive
            # reaches them, so a connection that sends small batches keeps
            # a page or two, not RECEIVE_SIZE
            view = self._scratch = memoryview(mmap.mmap(-1, RECEIVE_SIZE))
        if self._header_next:
            self._header_next = False
            return view[: EXTENDED_REQUEST_SIZE if self.conn.extended_headers else REQUEST_SIZE]
        return view

    async def _yield_now(self) -> None:
        """Let other tasks run: done at least every YIELD_INTERVAL while data keeps coming.

        A scheduler pass per batch would cost more than the batch itself at
        queue depth 1; a pass per interval keeps other clients and
        cancellation (shutdown) waiting no longer than that.
        """
        self._last_yield = perf_counter()
        await trio.lowlevel.checkpoint()

    def _spin_receive(self, view: memoryview) -> int | None:
        """Poll the socket briefly before parking in the scheduler.

        A client at queue depth 1 sends its next request a few tens of
        microseconds after our reply; parking costs more than that.  Only
        when no other task is waiting to run, and only for SPIN_SECONDS.
        """
        if trio.lowlevel.current_statistics().tasks_runnable:
            return None
        try_receive_into = self.transport.try_receive_into
        deadline = perf_counter() + SPIN_SECONDS
        while perf_counter() < deadline:
            n = try_receive_into(view)
            if n is not None:
                return n
        return None

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
            if self._needs_tls_first(event):
                if isinstance(event, ev.OptExportName):
                    self.end_reason = "EXPORT_NAME before the required TLS upgrade"
                    return None  # cannot be refused politely (proto.md FORCEDTLS)
                await self._reply(
                    ev.OptionError(Rep.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS")
                )
                continue
            result = await self._option(event)
            if result is not None or isinstance(event, ev.OptAbort | ev.OptExportName):
                return result

    def _needs_tls_first(self, event: object) -> bool:
        """FORCEDTLS: before the upgrade only STARTTLS and ABORT are answered."""
        return (
            self._tls_mode is TlsMode.REQUIRE
            and not self.tls_active
            and not isinstance(event, ev.OptStartTls | ev.OptAbort)
        )

    async def _start_tls(self) -> None:
        """Upgrade the connection after acknowledging NBD_OPT_STARTTLS."""
        assert self._tls_ctx is not None
        transport = self.transport
        if not isinstance(transport, SocketTransport):
            raise RemoteProtocolError("TLS cannot be started twice")
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(transport.sock))
        try:
            tls_stream = await tls.upgrade(stream, self._tls_ctx)
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(stream)
            cause = exc.__cause__ or exc
            raise RemoteProtocolError(f"TLS handshake failed: {cause}") from None
        self.transport = StreamTransport(tls_stream, self.peer, self.peer_address)
        self.tls_active = True
        LOGGER.info("event=tls client=%s version=%s", self.peer, tls_stream.version())

    async def _reply(self, *events: object) -> None:
        chunks: list[bytes | bytearray | memoryview] = []
        for event in events:
            chunks.extend(self.conn.send(event))
        await self._send(chunks)

    async def _option(self, event: object) -> Export | None:
        match event:
            case ev.OptExportName(name=name):
                export = self._usable_export(name)
                if not isinstance(export, Export):
                    LOGGER.info(
                        "event=export-refused client=%s export=%s reason=%r",
                        self.peer,
                        quote(name),
                        export[1],
                    )
                    return None  # EXPORT_NAME cannot fail politely: close
                await self._reply(self._export_reply(export))
                return export
            case ev.OptAbort():
                await self._reply(ev.OptionAck())
                return None
            case ev.OptList():
                replies: list[object] = [
                    ev.ServerListReply(e.name, e.config.description)
                    for e in self.registry
                    if self._visible(e)
                ]
                await self._reply(*replies, ev.OptionAck())
            case ev.OptStartTls():
                if self._tls_ctx is None:
                    await self._reply(ev.OptionError(Rep.ERR_POLICY, "TLS is not configured"))
                elif self.tls_active:
                    await self._reply(ev.OptionError(Rep.ERR_INVALID, "TLS is already active"))
                else:
                    await self._reply(ev.OptionAck())
                    await self._start_tls()
            case ev.OptInfo(name=name) | ev.OptGo(name=name):
                export = self._usable_export(name)
                if not isinstance(export, Export):
                    rep, why = export
                    await self._reply(ev.OptionError(rep, f"{why}: {name!r}"))
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

    def _visible(self, export: Export) -> bool:
        """Whether this client may see the export (LIST, meta contexts)."""
        cfg = export.config
        return cfg.allows(self.peer_address) and (self.tls_active or not cfg.tls_required)

    def _usable_export(self, name: str) -> Export | tuple[Rep, str]:
        """The export, or the option error that refuses it to this client."""
        export = self.registry.lookup(name)
        if export is None:
            return Rep.ERR_UNKNOWN, "unknown export"
        if not export.config.allows(self.peer_address):
            return Rep.ERR_POLICY, "access denied"
        if export.config.tls_required and not self.tls_active:
            return Rep.ERR_TLS_REQD, "export requires TLS"
        if not export.has_room():
            return Rep.ERR_POLICY, "export has reached its connection limit"
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
        if export is None or not self._visible(export):
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
        """Read requests until the client leaves; in-flight ones still finish.

        Expected ways for the reader to stop (broken framing, a vanished
        client) are caught inside the nursery, so they end this connection
        without wrapping into an ExceptionGroup that would reach serve().
        """
        async with trio.open_nursery() as nursery:
            with self._reader_scope:
                try:
                    await self._read_loop(export, nursery)
                except RemoteProtocolError as exc:
                    self.end_reason = f"protocol error: {exc}"
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self.end_reason = "connection lost"
        # leaving the nursery waited for every in-flight request

    async def _read_loop(self, export: Export, nursery: trio.Nursery) -> None:
        conn = self.conn
        device = export.device
        stats = self.stats
        answer_inline = self._inline_answerer(device)
        while True:
            events = conn.next_events()
            if not events:
                await self._receive()
                continue
            started = perf_counter()
            self.requests += len(events)
            out: list[bytes | bytearray | memoryview] = []
            files: list[_FileReply] = []
            if self.registry.shutting_down:
                deferred = self._refuse_all(events, out)
            else:
                deferred = answer_inline(events, out, files)
            if out:
                rest = self._send_at_once(out)
                if rest is not None:
                    await self._write_locked(_unsent, rest, self._write_rest)
                    rest = None  # its views of the replies would keep them from the pool
                if self._replies_lent:
                    self._replies_lent = False
                    conn.recycle_replies(out)
            for file_reply in files:
                await self._send_file(file_reply)
            answered = len(out) + len(files)
            if answered:
                stats.observe(perf_counter() - started, answered)
            if self._page_ins.pending and not self._page_in_task:
                self._page_in_task = True
                nursery.start_soon(self._answer_page_ins, nursery, device)
            if deferred:
                await self._start_all(nursery, deferred, device)
            # not bound to a name: a Request kept alive here would hold its
            # payload buffer past recycle() and make the pool miss
            if type(events[-1]) in _LAST_EVENTS:
                return

    def _inline_answerer(
        self, device: BlockDevice
    ) -> Callable[
        [list[object], list[bytes | bytearray | memoryview], list[_FileReply]], list[ev.Request]
    ]:
        """The connection's ``answer_inline(events, out, files)``, see below.

        Built once, when transmission starts: what it needs is fixed by then
        (the export, the negotiated reply style), and at queue depth 1 binding
        it per batch was binding it per request.
        """
        conn = self.conn
        request_t = ev.Request
        read_cmd, write_cmd, status_cmd = _READ, _WRITE, _BLOCK_STATUS
        inline_max = SPARSE_READ_MIN if conn.structured_replies else self._max_read
        reader = device.inline_reader(inline_max)
        hsize = conn.reply_read_header_size()
        pack_header = conn.reply_read_header_into
        writer = device.inline_writer(conn.max_payload)
        reply_ok = conn.reply_ok
        recycle = conn.recycle
        reply_buffer = conn.reply_buffer
        # sendfile needs the plain socket: over TLS the data is read into a buffer
        # anyway, and inline that costs less than StreamTransport's read in a thread
        plain = isinstance(self.transport, SocketTransport)
        zero_copy = device.zero_copy_region if plain else _no_zero_copy
        stats = self.stats
        per_command = stats.requests  # valid requests have known commands
        misses = device.cache_misses
        page_ins = self._page_ins = PageInWaits(reader or _never_reads)

        def answer_inline(
            events: list[object],
            out: list[bytes | bytearray | memoryview],
            files: list[_FileReply],
        ) -> list[ev.Request]:
            """Answer what can be answered without blocking; return the rest.

            Large reads of page-cached, verbatim-stored data become ``files``
            entries, sent with sendfile after ``out``.  This is the
            per-request hot path.
            """
            read_bytes = write_bytes = 0
            deferred: list[ev.Request] = []
            for event in events:
                if type(event) is request_t:
                    req: ev.Request = event
                    cmd = req.cmd
                    per_command[cmd] += 1
                    if cmd == read_cmd:
                        read_bytes += req.length
                    elif cmd == write_cmd:
                        write_bytes += req.length
                    if cmd == read_cmd and req.length >= ZERO_COPY_MIN:
                        region = zero_copy(req.offset, req.length)
                        if region is not None:
                            header = conn.reply_read_header(req.handle, req.offset, req.length)
                            files.append(_FileReply(header, region[0], region[1]))
                            continue
                    if cmd == read_cmd and reader is not None and req.length < inline_max:
                        n = req.length
                        if n < LARGE_PAYLOAD:
                            buf = bytearray(hsize + n)
                        else:  # copied reads of 64 KiB and more: pooled buffers
                            buf = reply_buffer(hsize + n)
                            self._replies_lent = True
                        view = memoryview(buf)[hsize:]
                        missed = misses.count
                        if reader(req.offset, view):
                            pack_header(buf, req.handle, req.offset, n)
                            out.append(buf)
                            continue
                        if misses.count != missed and page_ins.take(req, buf, view, perf_counter()):
                            continue  # its pages are on their way: _answer_page_ins
                    elif cmd == status_cmd:
                        extents = device.try_block_status(
                            req.offset, req.length, max_extents=status_extents_wanted(req)
                        )
                        if extents is not None:
                            out.extend(block_status_reply(conn, req, extents))
                            continue
                    elif cmd == write_cmd and writer is not None and not req.flags & _FUA:
                        assert req.payload is not None
                        if writer(req.offset, req.payload):
                            recycle(req.payload)
                            out.append(reply_ok(req.handle, req.offset))
                            continue
                    deferred.append(req)
                elif isinstance(event, ev.InvalidRequest):
                    stats.count(event.cmd)
                    stats.errors += 1
                    self._log_invalid(event)
                    out.append(
                        conn.reply_error(event.handle, event.errno, event.reason, event.offset)
                    )
                elif type(event) not in _LAST_EVENTS:
                    raise AssertionError(f"unexpected transmission event {event!r}")
            stats.bytes_read += read_bytes
            stats.bytes_written += write_bytes
            return deferred

        return answer_inline

    async def _answer_page_ins(self, nursery: trio.Nursery, device: BlockDevice) -> None:
        """Poll the reads waiting for their pages until none is left: answer those
        that arrived, hand those that took too long to tasks (pagein.py)."""
        waits = self._page_ins
        stats = self.stats
        try:
            while waits.pending:
                await trio.lowlevel.checkpoint()  # the loop's other work goes first
                done, late = waits.poll(perf_counter())
                if done and not await self._send_page_ins(done):
                    waits.pending.clear()
                    return
                if late:
                    stats.page_ins_late += len(late)
                    await self._start_all(nursery, late, device)
        finally:
            self._page_in_task = False

    async def _send_page_ins(self, done: list[PageIn]) -> bool:
        """Send the replies of reads whose pages came; False once the client is gone."""
        conn = self.conn
        now = perf_counter()
        out: list[bytes | bytearray | memoryview] = [self._page_in_reply(w, now) for w in done]
        self.stats.page_ins += len(done)
        done.clear()  # the buffers go back to the pool only when nothing else holds them
        try:
            await self._send(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._reader_scope.cancel()
            return False
        conn.recycle_replies(out)
        return True

    def _page_in_reply(self, wait: PageIn, now: float) -> bytearray:
        req = wait.req
        self.conn.reply_read_header_into(wait.buf, req.handle, req.offset, req.length)
        self.stats.observe(now - wait.since)
        return wait.buf

    def _log_invalid(self, event: ev.InvalidRequest) -> None:
        # the client's own mistake (past the end, bad flags): routine for the
        # server, so only with -v; a misbehaving client cannot flood the log
        if LOGGER.isEnabledFor(logging.DEBUG):
            LOGGER.debug(
                "event=request-invalid %s %s errno=%s error=%r",
                self._origin,
                describe_request(event.cmd, event.offset, event.length, event.flags),
                NbdErrno(event.errno).name,
                event.reason,
            )

    def _refuse_all(
        self, events: list[object], out: list[bytes | bytearray | memoryview]
    ) -> list[ev.Request]:
        """During shutdown every new request gets ESHUTDOWN."""
        out.extend(
            self.conn.reply_error(
                event.handle, NbdErrno.ESHUTDOWN, "server is shutting down", event.offset
            )
            for event in events
            if isinstance(event, ev.Request | ev.InvalidRequest)
        )
        return []

    async def _start_all(
        self, nursery: trio.Nursery, requests: list[ev.Request], device: BlockDevice
    ) -> None:
        """Start a task per request; if stopped while waiting for a slot, every
        request already read and not started still gets an answer (ESHUTDOWN)."""
        for i, req in enumerate(requests):
            try:
                await self._spawn(nursery, req, device)
            except trio.Cancelled:
                if not self._broken:
                    with trio.CancelScope(shield=True):
                        await self._send(
                            [
                                self.conn.reply_error(
                                    r.handle,
                                    NbdErrno.ESHUTDOWN,
                                    "server is shutting down",
                                    r.offset,
                                )
                                for r in requests[i:]
                            ]
                        )
                raise

    async def _spawn(self, nursery: trio.Nursery, req: ev.Request, device: BlockDevice) -> None:
        """Start ``req`` in a task once a slot and its bytes fit the connection's budget.

        Waiting here is the back-pressure: the reader stops reading, so a
        client cannot make the server hold more than ``max_inflight`` requests
        or ``max_inflight_bytes`` of payloads and replies.
        """
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        cost = _cost(req)
        try:
            while self._inflight_bytes and self._inflight_bytes + cost > self._bytes_budget:
                self._bytes_freed = trio.Event()
                await self._bytes_freed.wait()
        except BaseException:
            self._slots.release()
            raise
        self._inflight_bytes += cost
        nursery.start_soon(self._handle, req, device, cost)

    async def _handle(self, req: ev.Request, device: BlockDevice, cost: int) -> None:
        stats = self.stats
        started = perf_counter()
        stats.inflight += 1
        try:
            chunks = await dispatch(
                self.conn, device, req, strict=self.strict, stats=stats, origin=self._origin
            )
            if req.payload is not None:
                self.conn.recycle(req.payload)
            try:
                await self._send(chunks)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # the client went away; the request itself is complete
                self._reader_scope.cancel()
            else:
                self.conn.recycle_replies(chunks)
        finally:
            stats.inflight -= 1
            stats.observe(perf_counter() - started)
            self._slots.release()
            self._inflight_bytes -= cost
            self._bytes_freed.set()
