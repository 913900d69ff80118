"""Which TCP congestion control a client connection's sends use.

Hosts set up for the internet often make BBR the default
(``net.ipv4.tcp_congestion_control = bbr``).  BBR paces what a socket sends
with timers, which suits a real network and only costs a local one: on a
loopback connection the sender pays for timers and later wake-ups that hold
data back from a reader on the same machine.  Measured here (2 vCPUs, Linux
6.18, fio's nbd engine on 127.0.0.1): 1 MiB sequential reads made 1,355 MiB/s
with BBR and 5,354 with CUBIC, 64 KiB random reads 2,033 against 3,901;
nbdkit, which cannot choose, went from 2,643-3,093 to 4,146-4,343 MiB/s of
1 MiB reads when the host default was CUBIC (README, "Large reads").

``tcp_congestion`` in the server config decides:

* ``auto`` (default): a client on this machine (a loopback address, or the
  server's own) whose connection would pace (BBR) gets CUBIC; every other
  connection keeps the host's choice;
* ``system``: never change it;
* a name (``cubic``, ``reno``, ``bbr``...): every TCP connection uses that one;
  the server refuses to start if the kernel does not allow it.

Only what this server sends is affected: the client's own socket (write
payloads) keeps whatever its side chose.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from nbdserve.errors import ConfigError

LOGGER = logging.getLogger(__name__)

AUTO = "auto"
SYSTEM = "system"
# what a paced loopback connection gets instead; reno is always built in
UNPACED = ("cubic", "reno")
_AVAILABLE = "/proc/sys/net/ipv4/tcp_available_congestion_control"


def current(sock: socket.socket) -> str:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def paces(name: str) -> bool:
    """Congestion controls that pace with timers (mainline Linux: BBR)."""
    return name.startswith("bbr")


def _ip(address: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if address is None:
        return None
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_local(peer_address: str | None, own_address: str | None = None) -> bool:
    """A client on this machine: a loopback address, or the server's own
    address (which the kernel routes through the loopback device too)."""
    peer = _ip(peer_address)
    if peer is None:
        return False
    return peer.is_loopback or peer == _ip(own_address)


def wanted(setting: str, local: bool, now: str) -> tuple[str, ...]:
    """The congestion controls to try, in order, for a connection that uses
    ``now``; empty: leave it as it is."""
    if setting == SYSTEM:
        return ()
    if setting == AUTO:
        return UNPACED if local and paces(now) else ()
    return () if setting == now else (setting,)


def apply(sock: socket.socket, setting: str, peer_address: str | None) -> None:
    """Set the connection's congestion control as ``setting`` says (see the
    module's notes).  ``auto`` gives up quietly when the kernel refuses; a
    named one was checked at startup (``check_setting``)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or setting == SYSTEM:
        return
    try:
        now = current(sock)
        own = sock.getsockname()[0]
    except OSError:
        return
    for name in wanted(setting, is_local(peer_address, own), now):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode("ascii"))
        except OSError as exc:
            LOGGER.debug("event=congestion-refused name=%s error=%r", name, str(exc))
            continue
        LOGGER.debug("event=congestion client=%s from=%s to=%s", peer_address, now, name)
        return


def check_setting(setting: str) -> None:
    """Refuse to start with a congestion control the kernel will not set."""
    if setting in (AUTO, SYSTEM):
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, setting.encode("ascii"))
        except OSError as exc:
            raise ConfigError(
                f"tcp_congestion {setting!r} cannot be used here ({exc.strerror or exc}); "
                f"use auto, system or one of: {_available()}"
            ) from None


def _available() -> str:
    try:
        with open(_AVAILABLE) as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"
