"""The congestion control of client connections (server/congestion.py).

Checked on real kernel sockets: what a connection ends up with is read back
with getsockopt, through the server for a client holding an nbdsh
connection, and through ``apply`` for connections whose listener was given
a pacing congestion control (the accepted socket inherits it), whatever the
host's default is.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nbdserve.errors import ConfigError
from nbdserve.server import congestion
from tests.conftest import require_tools
from tests.helpers.server import export, nbdsh_argv, running_server, uri


def _settable(name: str) -> bool:
    with socket.socket() as s:
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
        except OSError:
            return False
    return True


def _host_default() -> str:
    with socket.socket() as s:
        return congestion.current(s)


@contextlib.contextmanager
def _accepted(listener_cc: str | None) -> Iterator[socket.socket]:
    """The server side of a loopback TCP connection; the listener uses ``listener_cc``."""
    with socket.socket() as listener:
        if listener_cc is not None:
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, listener_cc.encode())
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname()) as _client:
            conn, _ = listener.accept()
            with conn:
                yield conn


@pytest.mark.parametrize(
    ("peer", "own", "local"),
    [
        ("127.0.0.1", "127.0.0.1", True),
        ("127.3.2.1", "0.0.0.0", True),
        ("::1", "::1", True),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1", True),
        ("10.0.0.1", "10.0.0.1", True),  # the server's own address: routed through lo
        ("::ffff:10.0.0.1", "10.0.0.1", True),
        ("fe80::1%eth0", "fe80::1%eth0", True),
        ("10.0.0.1", "10.0.0.2", False),
        ("::ffff:10.0.0.1", "::ffff:10.0.0.2", False),
        ("2001:db8::1", "2001:db8::2", False),
        ("10.0.0.1", None, False),
        (None, "127.0.0.1", False),
        ("unix", "unix", False),
    ],
)
def test_local_clients(peer: str | None, own: str | None, local: bool) -> None:
    assert congestion.is_local(peer, own) is local


@pytest.mark.parametrize(
    ("setting", "local", "now", "expected"),
    [
        ("auto", True, "bbr", congestion.UNPACED),
        ("auto", False, "bbr", ()),  # a real network: BBR's pacing is wanted
        ("auto", True, "cubic", ()),
        ("auto", True, "reno", ()),
        ("system", True, "bbr", ()),
        ("reno", False, "cubic", ("reno",)),
        ("reno", True, "reno", ()),
    ],
)
def test_which_congestion_control_is_wanted(
    setting: str, local: bool, now: str, expected: tuple[str, ...]
) -> None:
    assert congestion.wanted(setting, local, now) == expected


@pytest.mark.skipif(not _settable("bbr"), reason="the kernel here has no BBR")
def test_auto_unpaces_a_paced_loopback_connection() -> None:
    with _accepted("bbr") as conn:
        assert congestion.current(conn) == "bbr"
        congestion.apply(conn, "auto", "127.0.0.1")
        assert congestion.current(conn) in congestion.UNPACED


@pytest.mark.skipif(not _settable("bbr"), reason="the kernel here has no BBR")
@pytest.mark.parametrize("setting", ["auto", "system"])
def test_a_remote_client_or_system_keeps_the_hosts_choice(setting: str) -> None:
    with _accepted("bbr") as conn:
        congestion.apply(conn, setting, "192.0.2.7")
        assert congestion.current(conn) == "bbr"
        congestion.apply(conn, "system", "127.0.0.1")
        assert congestion.current(conn) == "bbr"


def test_a_named_one_is_set_for_every_client() -> None:
    with _accepted(None) as conn:
        congestion.apply(conn, "reno", "192.0.2.7")
        assert congestion.current(conn) == "reno"


def test_unix_sockets_are_left_alone() -> None:
    a, b = socket.socketpair()
    with a, b:
        congestion.apply(a, "reno", None)  # must not raise: no TCP there


def test_check_setting_refuses_what_the_kernel_refuses() -> None:
    congestion.check_setting("auto")
    congestion.check_setting("system")
    congestion.check_setting("reno")
    with pytest.raises(ConfigError, match=r"nosuchcc.*cannot be used here"):
        congestion.check_setting("nosuchcc")


def _server_side_congestion(port: int) -> list[str]:
    """Congestion controls of this process's established sockets on ``port``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)  # a leaked copy of the client's stdin pipe would keep it open
            continue
        with sock:
            try:
                if sock.type != socket.SOCK_STREAM or sock.getsockname()[1] != port:
                    continue
                sock.getpeername()
            except (OSError, IndexError, TypeError):
                continue  # not TCP, or the listener (no peer)
            found.append(congestion.current(sock))
    return found


@pytest.mark.parametrize("setting", ["reno", "system", "auto"])
async def test_the_server_applies_the_setting_to_a_real_client(
    tmp_path: Path, setting: str
) -> None:
    require_tools("nbdsh")
    image = tmp_path / "d.raw"
    image.write_bytes(b"\x5a" * 65536)
    default = _host_default()
    expected = {
        "reno": "reno",
        "system": default,
        "auto": "cubic" if congestion.paces(default) else default,
    }[setting]
    async with running_server(export(image), tcp_congestion=setting) as handle:
        # the client reads one block, then holds its connection until told to go
        script = "print(h.pread(4096, 0)[:1].hex(), flush=True); import sys; sys.stdin.read()"
        client = await trio.lowlevel.open_process(
            [*nbdsh_argv(), "-u", uri(handle), "-c", script],
            stdin=-1,
            stdout=-1,
        )
        try:
            assert client.stdout is not None
            with trio.fail_after(30):
                line = await client.stdout.receive_some(100)
            assert line.strip() == b"5a"
            assert _server_side_congestion(handle.port) == [expected]
        finally:
            if client.stdin is not None:
                await client.stdin.aclose()
            with trio.fail_after(30):
                await client.wait()
