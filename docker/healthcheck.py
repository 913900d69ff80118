#!/usr/bin/env python3
"""Container health check: a real NBD handshake start, standard library only.

Connects to the server, reads the 18-byte newstyle greeting and checks its magic numbers
("NBDMAGIC", then "IHAVEOPT") and that the server offers the fixed newstyle handshake; then
answers with the client flags and NBD_OPT_ABORT so the server sees a polite goodbye, not a
dropped connection.  Exit status 0: healthy; 1: not (the reason on stderr), as Docker's
HEALTHCHECK expects.

    healthcheck.py [HOST [PORT]]     defaults: $NBDSERVE_HEALTH_HOST or 127.0.0.1,
                                               $NBDSERVE_HEALTH_PORT or $NBDSERVE_PORT or 10809
    healthcheck.py unix:PATH         a Unix socket
"""

from __future__ import annotations

import os
import socket
import struct
import sys

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x0003E889045565A9
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_OPT_ABORT = 2
TIMEOUT = 5.0


class Unhealthy(Exception):
    pass


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise Unhealthy(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def check_greeting(greeting: bytes) -> int:
    """The handshake flags of a valid newstyle greeting; Unhealthy otherwise."""
    magic, option_magic, flags = struct.unpack(">QQH", greeting)
    if magic != NBDMAGIC:
        raise Unhealthy(f"not an NBD server: greeting starts {greeting[:8]!r}")
    if option_magic != IHAVEOPT:
        raise Unhealthy(f"not a newstyle NBD server: magic {option_magic:#x}")
    if not flags & NBD_FLAG_FIXED_NEWSTYLE:
        raise Unhealthy("server does not offer the fixed newstyle handshake")
    return int(flags)


def connect(target: str, port: int) -> socket.socket:
    if target.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(target.removeprefix("unix:"))
        return sock
    return socket.create_connection((target, port), timeout=TIMEOUT)


def probe(target: str, port: int) -> None:
    with connect(target, port) as sock:
        sock.settimeout(TIMEOUT)
        check_greeting(recv_exactly(sock, 18))
        sock.sendall(struct.pack(">IQII", NBD_FLAG_C_FIXED_NEWSTYLE, IHAVEOPT, NBD_OPT_ABORT, 0))
        # the server may acknowledge the abort or just close; either is healthy
        try:
            reply = sock.recv(20)
        except OSError:
            return
        if len(reply) >= 8 and struct.unpack_from(">Q", reply)[0] != REPLY_MAGIC:
            raise Unhealthy(f"unexpected option reply {reply.hex()}")


def main(argv: list[str]) -> int:
    target = argv[0] if argv else os.environ.get("NBDSERVE_HEALTH_HOST", "127.0.0.1")
    port_text = (
        argv[1]
        if len(argv) > 1
        else os.environ.get("NBDSERVE_HEALTH_PORT", os.environ.get("NBDSERVE_PORT", "10809"))
    )
    where = target if target.startswith("unix:") else f"{target}:{port_text}"
    try:
        probe(target, int(port_text))
    except (Unhealthy, OSError, ValueError) as exc:
        print(f"unhealthy: {where}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
