"""TLS for NBD_OPT_STARTTLS: settings, the server context, the upgrade.

Modes follow proto.md: ``off`` (NOTLS: STARTTLS is refused), ``on``
(SELECTIVETLS: clients may upgrade; exports marked ``tls_required`` need it)
and ``require`` (FORCEDTLS: every option but STARTTLS and ABORT is refused
with NBD_REP_ERR_TLS_REQD until the upgrade).

Certificates come from a directory laid out as qemu and nbdkit expect:
``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``.  With
``verify_peer`` clients must present a certificate signed by that CA.
TLS-PSK needs ``ssl.SSLContext.set_psk_server_callback`` (Python 3.13+);
on older Pythons asking for PSK is a configuration error.
"""

from __future__ import annotations

import enum
import os
import ssl
from dataclasses import dataclass

import trio

from nbdserve.errors import ConfigError


class TlsMode(enum.Enum):
    OFF = "off"
    ON = "on"
    REQUIRE = "require"


@dataclass(frozen=True, slots=True)
class TlsSettings:
    mode: TlsMode = TlsMode.OFF
    certificates: str | None = None
    verify_peer: bool = False
    psk_file: str | None = None

    def __post_init__(self) -> None:
        if self.mode is not TlsMode.OFF and not (self.certificates or self.psk_file):
            raise ConfigError(f"--tls={self.mode.value} needs --tls-certificates or --tls-psk")
        if self.verify_peer and not self.certificates:
            raise ConfigError("--tls-verify-peer needs --tls-certificates (for ca-cert.pem)")

    @property
    def enabled(self) -> bool:
        return self.mode is not TlsMode.OFF


def server_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """Build (and thereby validate) the server's SSL context; None when TLS is off."""
    if not settings.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # proto.md: MUST support 1.2, older off
    if settings.certificates:
        _load_certificates(ctx, settings)
    if settings.psk_file:
        _load_psk(ctx, settings.psk_file)
    return ctx


def _load_certificates(ctx: ssl.SSLContext, settings: TlsSettings) -> None:
    directory = settings.certificates
    assert directory is not None
    cert = os.path.join(directory, "server-cert.pem")
    key = os.path.join(directory, "server-key.pem")
    ca = os.path.join(directory, "ca-cert.pem")
    for path in (cert, key):
        if not os.path.exists(path):
            raise ConfigError(
                f"TLS certificate directory {directory} lacks {os.path.basename(path)}"
            )
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load {cert} / {key}: {exc}") from None
    if settings.verify_peer:
        if not os.path.exists(ca):
            raise ConfigError(f"--tls-verify-peer needs {ca}")
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load {ca}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED


def _load_psk(ctx: ssl.SSLContext, path: str) -> None:
    """PSK keys file as nbdkit/qemu use it: ``username:hexkey`` per line."""
    setter = getattr(ctx, "set_psk_server_callback", None)
    if setter is None:
        raise ConfigError(
            "TLS-PSK needs Python 3.13 or later (ssl.SSLContext.set_psk_server_callback); "
            "use X.509 certificates instead"
        )
    keys: dict[str, bytes] = {}
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    user, _, hexkey = line.partition(":")
                    keys[user] = bytes.fromhex(hexkey)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read PSK file {path}: {exc}") from None
    setter(lambda identity: keys.get(identity or "", b""))


async def upgrade(stream: trio.abc.Stream, ctx: ssl.SSLContext) -> trio.SSLStream[trio.abc.Stream]:
    """Run the server side of the TLS handshake over ``stream``."""
    tls = trio.SSLStream(stream, ctx, server_side=True)
    await tls.do_handshake()
    return tls
