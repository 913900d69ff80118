"""serve(): open exports and listeners, accept clients, shut down gracefully.

Shutdown (hypercorn's pattern): stop accepting; mark the registry as shutting
down so new requests get ESHUTDOWN and new options ERR_SHUTDOWN; stop every
session's reader so in-flight requests finish and are answered; give the
sessions ``shutdown_grace`` seconds; then flush and close every image.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket as stdsocket
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from nbdserve.config import ServerConfig
from nbdserve.errors import ConfigError, NbdServeError
from nbdserve.logformat import quote
from nbdserve.protocol.connection import PayloadPool
from nbdserve.server import congestion
from nbdserve.server.exports import ExportRegistry
from nbdserve.server.metrics import parse_address, serve_metrics
from nbdserve.server.session import Session, WaitingClients
from nbdserve.server.tls import TlsMode, TlsSettings, server_context
from nbdserve.server.transport import SocketTransport

LOGGER = logging.getLogger(__name__)

# write payload buffers kept for reuse, across all connections of a server
PAYLOAD_POOL_BYTES = 32 * 1024 * 1024


@dataclass(slots=True)
class ServerHandle:
    """What ``serve`` reports through ``task_status.started``."""

    tcp_addresses: list[tuple[str, int]] = field(default_factory=list)
    unix_paths: list[str] = field(default_factory=list)
    _stop: trio.Event = field(default_factory=trio.Event)
    registry: ExportRegistry | None = None
    metrics_address: tuple[str, int] | None = None

    @property
    def port(self) -> int:
        return self.tcp_addresses[0][1]

    def shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent, callable from any task)."""
        self._stop.set()


async def serve(
    config: ServerConfig,
    *,
    task_status: trio.TaskStatus[ServerHandle] = trio.TASK_STATUS_IGNORED,
    handle_signals: bool = False,
    strict: bool = False,
    force_read_only: bool = False,
    reload: Callable[[], ServerConfig] | None = None,
) -> None:
    """Serve until shutdown is requested (signal or ``ServerHandle.shutdown``).

    ``reload`` re-reads the configuration on SIGHUP (with ``handle_signals``):
    exports are added and removed, existing clients keep their exports.
    """
    congestion.check_setting(config.tcp_congestion)
    registry = await ExportRegistry.open(
        config.exports, default_export=config.default_export, force_read_only=force_read_only
    )
    unix_paths: list[str] = []
    try:
        listeners, handle = await _open_listeners(config)
        unix_paths = handle.unix_paths
        handle.registry = registry
        server = _Server(config, registry, strict, reload)
        async with trio.open_nursery() as background:
            await registry.start_background(background)
            if config.metrics is not None:
                host, port = parse_address(config.metrics)
                handle.metrics_address = await background.start(serve_metrics, registry, host, port)
            await server.run(listeners, handle, task_status, handle_signals)
            background.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await registry.aclose()
            for path in unix_paths:
                _unlink_quietly(path)
        LOGGER.info("event=stopped")


class _Server:
    def __init__(
        self,
        config: ServerConfig,
        registry: ExportRegistry,
        strict: bool,
        reload: Callable[[], ServerConfig] | None = None,
    ) -> None:
        self.reload = reload
        self.tls_context = server_context(
            TlsSettings(
                TlsMode(config.tls),
                config.tls_certificates,
                config.tls_verify_peer,
                config.tls_psk_file,
            )
        )
        self.config = config
        self.registry = registry
        self.strict = strict
        self.sessions: set[Session] = set()
        # one for all connections: what an idle connection keeps is then bounded
        # by the server, not multiplied by the number of clients
        self.payload_pool = PayloadPool(max_bytes=PAYLOAD_POOL_BYTES)
        self.waiting = WaitingClients()
        # connections accepted and not yet ended, counted at accept: a session
        # joins ``sessions`` only once its task runs, after more accepts maybe
        self.connections = 0

    async def run(
        self,
        listeners: Sequence[trio.SocketListener],
        handle: ServerHandle,
        task_status: trio.TaskStatus[ServerHandle],
        handle_signals: bool,
    ) -> None:
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(self._accept_loop, listener, sessions)
                if handle_signals:
                    accepting.start_soon(self._watch_signals, handle)
                for addr in handle.tcp_addresses:
                    LOGGER.info("event=listening address=%s:%d", *addr)
                for path in handle.unix_paths:
                    LOGGER.info("event=listening socket=%s", quote(path))
                task_status.started(handle)
                await handle._stop.wait()
                accepting.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            LOGGER.info("event=shutdown sessions=%d", len(self.sessions))
            self.registry.shutting_down = True
            for session in list(self.sessions):
                session.begin_shutdown()
            sessions.cancel_scope.deadline = trio.current_time() + self.config.shutdown_grace

    async def _watch_signals(self, handle: ServerHandle) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                LOGGER.info("event=signal signal=%s", signal.Signals(signum).name)
                if signum == signal.SIGHUP:
                    await self.reload_exports()
                    continue
                handle.shutdown()
                return

    async def reload_exports(self) -> None:
        """SIGHUP: re-read the configuration and apply its export list."""
        if self.reload is None:
            LOGGER.warning("event=reload-skipped reason='no configuration file to re-read'")
            return
        try:
            config = self.reload()
        except NbdServeError as exc:
            LOGGER.error("event=reload-failed error=%r", str(exc))
            return
        await self.registry.reload(config.exports)
        LOGGER.info("event=reloaded exports=%d", len(self.registry))

    async def _accept_loop(self, listener: trio.SocketListener, sessions: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    # out of descriptors or memory: retry shortly rather than stop serving
                    LOGGER.error("event=accept-failed error=%r action=pause", str(exc))
                    await trio.sleep(0.1)
                    continue
                raise
            if self.connections >= self.config.max_connections:
                LOGGER.warning(
                    "event=connection-refused client=%s reason=max_connections limit=%d",
                    _peer_of(stream),
                    self.config.max_connections,
                )
                await trio.aclose_forcefully(stream)
                continue
            self.connections += 1
            sessions.start_soon(self._run_session, stream)

    async def _run_session(self, stream: trio.SocketStream) -> None:
        try:
            await self._session(stream)
        finally:
            self.connections -= 1

    async def _session(self, stream: trio.SocketStream) -> None:
        transport = SocketTransport.from_stream(stream)
        congestion.apply(transport.sock, self.config.tcp_congestion, transport.peer_address)
        session = Session(
            transport,
            self.registry,
            self.config,
            tls=self.tls_context,
            strict=self.strict,
            payload_pool=self.payload_pool,
            waiting=self.waiting,
        )
        self.sessions.add(session)
        try:
            await session.run()
        except Exception:
            # a bug in one session must not take every other client down
            if self.strict:
                raise
            LOGGER.exception("event=session-crash client=%s", session.peer)
        finally:
            self.sessions.discard(session)
            if not self.sessions:
                self.payload_pool.clear()  # an idle server keeps no write buffers


def _peer_of(stream: trio.SocketStream) -> str:
    """``HOST:PORT`` of a TCP client, ``unix`` for a Unix-socket one."""
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"


async def _open_listeners(
    config: ServerConfig,
) -> tuple[list[trio.SocketListener], ServerHandle]:
    handle = ServerHandle()
    activated = systemd_listeners()
    if activated:
        for listener in activated:
            name = listener.socket.getsockname()
            if isinstance(name, tuple):
                handle.tcp_addresses.append((name[0], name[1]))
            else:
                LOGGER.info("event=listening socket=%s activation=systemd", quote(str(name)))
        return activated, handle
    listeners: list[trio.SocketListener] = []
    try:
        if config.bind is not None:
            try:
                tcp = await trio.open_tcp_listeners(config.port, host=config.bind)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"port {config.port} on {config.bind} is already in use"
                    ) from None
                raise ConfigError(
                    f"cannot listen on {config.bind}:{config.port}: {exc.strerror or exc}"
                ) from None
            listeners.extend(tcp)
            for listener in tcp:
                host, port = listener.socket.getsockname()[:2]
                handle.tcp_addresses.append((host, port))
        if config.socket is not None:
            listeners.append(_open_unix_listener(config.socket))
            handle.unix_paths.append(config.socket)
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    return listeners, handle


SD_LISTEN_FDS_START = 3


def systemd_listeners() -> list[trio.SocketListener]:
    """Listening sockets passed by systemd socket activation (sd_listen_fds).

    Used only when LISTEN_PID names this process; the variables are removed
    so child processes do not inherit them.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        raise ConfigError("LISTEN_FDS is not a number") from None
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    listeners = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        sock = stdsocket.socket(fileno=fd)
        if sock.type != stdsocket.SOCK_STREAM:
            raise ConfigError(f"socket-activation fd {fd} is not a stream socket")
        os.set_inheritable(fd, False)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    return listeners


def _open_unix_listener(path: str) -> trio.SocketListener:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            _unlink_stale_socket(path)
    except FileNotFoundError:
        pass
    sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"socket {path} is in use by another server") from None
        raise ConfigError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def _unlink_stale_socket(path: str) -> None:
    """Remove a socket file no server listens on any more."""
    probe = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        _unlink_quietly(path)
    else:
        raise ConfigError(f"socket {path} is in use by another server")
    finally:
        probe.close()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
