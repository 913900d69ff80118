"""Server and export settings: frozen dataclasses, loaded from TOML or the CLI.

Validation raises :class:`~nbdserve.errors.ConfigError` with a message that
names the file and key.  No I/O besides reading the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nbdserve.errors import ConfigError

DEFAULT_PORT = 10809
DEFAULT_BIND = "127.0.0.1"
_EXPORT_NAME_RE = re.compile(r"^[^\x00]{0,4096}$")


@dataclass(frozen=True, slots=True)
class ExportConfig:
    name: str
    path: str
    format: str | None = None  # None: probe
    read_only: bool = False
    description: str = ""
    shared: int = 0  # max simultaneous connections; 0 = unlimited
    backing_dirs: tuple[str, ...] | None = None
    max_chain_depth: int = 16
    probe_raw: bool = True
    # format-specific settings passed to the driver at open (e.g. prealloc_mode)
    settings: Mapping[str, Any] = field(default_factory=dict)
    locking: bool = True  # QEMU-compatible image locks while the export is open
    cache: str = "writeback"  # "none": O_DIRECT, bypassing the host page cache
    tls_required: bool = False  # with tls = "on": only clients that upgraded may use it
    # client addresses allowed to see and use the export: CIDR networks, and
    # "unix" for Unix-socket clients; None allows everyone
    allow: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.cache not in ("writeback", "none"):
            raise ConfigError(f"export {self.name!r}: cache must be writeback or none")
        if self.allow is not None:
            for entry in self.allow:
                if entry == "unix":
                    continue
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ConfigError(
                        f"export {self.name!r}: bad address {entry!r} in 'allow'"
                    ) from None

    def allows(self, address: str | None) -> bool:
        """Whether a client at ``address`` (None: a Unix socket) may use this export."""
        if self.allow is None:
            return True
        if address is None:
            return "unix" in self.allow
        ip = ipaddress.ip_address(address)
        for entry in self.allow:
            if entry != "unix" and ip in ipaddress.ip_network(entry, strict=False):
                return True
        return False


@dataclass(frozen=True, slots=True)
class ServerConfig:
    exports: tuple[ExportConfig, ...]
    bind: str | None = DEFAULT_BIND
    port: int = DEFAULT_PORT
    socket: str | None = None
    max_connections: int = 1024
    max_inflight: int = 64  # per connection, requests handled off the fast path
    max_inflight_bytes: int = 128 * 1024 * 1024  # per connection, their payloads and replies
    handshake_timeout: float = 30.0
    shutdown_grace: float = 10.0
    default_export: str | None = None  # answers the empty export name
    metrics: str | None = None  # "HOST:PORT" of the Prometheus endpoint; None: off
    tls: str = "off"  # off | on | require
    tls_certificates: str | None = None  # dir with ca-cert.pem, server-cert.pem, server-key.pem
    tls_verify_peer: bool = False
    tls_psk_file: str | None = None

    def __post_init__(self) -> None:
        if not self.exports:
            raise ConfigError("no exports configured")
        names = [e.name for e in self.exports]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ConfigError(f"duplicate export names: {', '.join(sorted(dupes))}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} out of range")
        if self.bind is None and self.socket is None:
            raise ConfigError("nothing to listen on: give a TCP address or a socket")
        if self.max_inflight < 1 or self.max_connections < 1:
            raise ConfigError("max_inflight and max_connections must be at least 1")
        if self.tls not in ("off", "on", "require"):
            raise ConfigError(f"tls must be off, on or require, not {self.tls!r}")
        if any(e.tls_required for e in self.exports) and self.tls == "off":
            raise ConfigError("an export has tls_required but tls is off")


_EXPORT_KEYS = {
    "name",
    "path",
    "format",
    "read_only",
    "description",
    "shared",
    "backing_dirs",
    "max_chain_depth",
    "probe_raw",
    "settings",
    "tls_required",
    "allow",
    "locking",
    "cache",
}
_SERVER_KEYS = {
    "bind",
    "port",
    "socket",
    "max_connections",
    "max_inflight",
    "max_inflight_bytes",
    "handshake_timeout",
    "shutdown_grace",
    "default_export",
    "metrics",
    "tls",
    "tls_certificates",
    "tls_verify_peer",
    "tls_psk_file",
}


def load_config(path: str) -> ServerConfig:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config_from_mapping(data, origin=path)


def config_from_mapping(data: Mapping[str, Any], *, origin: str = "config") -> ServerConfig:
    unknown = set(data) - {"server", "export"}
    if unknown:
        raise ConfigError(f"{origin}: unknown top-level keys {sorted(unknown)}")
    server = dict(data.get("server", {}))
    bad = set(server) - _SERVER_KEYS
    if bad:
        raise ConfigError(f"{origin}: unknown [server] keys {sorted(bad)}")
    raw_exports = data.get("export", [])
    if not isinstance(raw_exports, list):
        raise ConfigError(f"{origin}: 'export' must be an array of tables ([[export]])")
    base_dir = os.path.dirname(os.path.abspath(origin)) if origin != "config" else os.getcwd()
    exports = tuple(_export_from(e, i, origin, base_dir) for i, e in enumerate(raw_exports))
    for key in ("socket", "tls_certificates", "tls_psk_file"):
        if isinstance(server.get(key), str) and not os.path.isabs(server[key]):
            server[key] = os.path.join(base_dir, server[key])
    try:
        return ServerConfig(exports=exports, **server)
    except TypeError as exc:
        raise ConfigError(f"{origin}: {exc}") from None


def _export_from(raw: Any, index: int, origin: str, base_dir: str) -> ExportConfig:
    where = f"{origin}: export #{index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    bad = set(raw) - _EXPORT_KEYS
    if bad:
        raise ConfigError(f"{where}: unknown keys {sorted(bad)}")
    if "path" not in raw:
        raise ConfigError(f"{where}: 'path' is required")
    values = dict(raw)
    values.setdefault("name", "")
    if not isinstance(values["name"], str) or not _EXPORT_NAME_RE.match(values["name"]):
        raise ConfigError(f"{where}: bad export name")
    path = str(values["path"])
    values["path"] = path if os.path.isabs(path) else os.path.join(base_dir, path)
    if values.get("backing_dirs") is not None:
        values["backing_dirs"] = tuple(
            d if os.path.isabs(d) else os.path.join(base_dir, d) for d in values["backing_dirs"]
        )
    if values.get("allow") is not None:
        values["allow"] = tuple(values["allow"])
    settings = values.get("settings", {})
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: 'settings' must be a table")
    try:
        return ExportConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
