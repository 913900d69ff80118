"""Server and export settings: frozen dataclasses, loaded from TOML or the CLI.

Validation raises :class:`~nbdserve.errors.ConfigError` with a message that
names the file and key.  No I/O besides reading the file.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
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
        check_fields(self, f"export {self.name!r}")
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
    # a client that takes no reply bytes off its socket for this long is dropped
    send_timeout: float = 30.0
    shutdown_grace: float = 10.0
    default_export: str | None = None  # answers the empty export name
    metrics: str | None = None  # "HOST:PORT" of the Prometheus endpoint; None: off
    tls: str = "off"  # off | on | require
    tls_certificates: str | None = None  # dir with ca-cert.pem, server-cert.pem, server-key.pem
    tls_verify_peer: bool = False
    tls_psk_file: str | None = None
    # auto | system | a congestion control name (see server/congestion.py)
    tcp_congestion: str = "auto"

    def __post_init__(self) -> None:
        check_fields(self, "[server]")
        if not self.exports:
            raise ConfigError("no exports configured")
        names = [e.name for e in self.exports]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ConfigError(f"duplicate export names: {', '.join(sorted(dupes))}")
        if self.bind is None and self.socket is None:
            raise ConfigError("nothing to listen on: give a TCP address or a socket")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,15}", self.tcp_congestion):
            # the kernel's names are at most 15 characters (TCP_CA_NAME_MAX)
            raise ConfigError(
                f"tcp_congestion must be auto, system or a congestion control name, "
                f"not {self.tcp_congestion!r}"
            )
        if self.tls not in ("off", "on", "require"):
            raise ConfigError(f"tls must be off, on or require, not {self.tls!r}")
        if any(e.tls_required for e in self.exports) and self.tls == "off":
            raise ConfigError("an export has tls_required but tls is off")
        if self.tls == "off":
            unused = [
                key
                for key in ("tls_certificates", "tls_psk_file", "tls_verify_peer")
                if getattr(self, key)
            ]
            if unused:
                # credentials that silently do nothing would leave an operator
                # believing the exports are protected
                raise ConfigError(
                    f"tls is off, so {', '.join(unused)} would be ignored: "
                    'set tls = "on" or "require" (--tls), or remove them'
                )


# Allowed ranges of numeric settings (inclusive) and how they are told to the
# user; check_fields derives the types from the dataclass annotations.  A key
# missing here is type-checked only.
_RANGES: dict[str, tuple[float, float, str]] = {
    "shared": (0, math.inf, ">= 0"),  # 0 = unlimited
    "max_chain_depth": (1, math.inf, ">= 1"),  # images, the top one included; 1 = no backing
    "port": (0, 65535, "in 0..65535"),  # 0 = any free port
    "max_connections": (1, math.inf, ">= 1"),
    "max_inflight": (1, math.inf, ">= 1"),
    "max_inflight_bytes": (1, math.inf, ">= 1"),
    # the smallest float above 0: a zero timeout would refuse every client
    "handshake_timeout": (math.ulp(0.0), math.inf, "> 0"),
    "send_timeout": (math.ulp(0.0), math.inf, "> 0"),
    "shutdown_grace": (0, math.inf, ">= 0"),
}


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    """Setting name -> annotation (resolved once per class; ``exports`` is checked apart)."""
    if cls not in _FIELD_TYPES:
        hints = typing.get_type_hints(cls)
        _FIELD_TYPES[cls] = {f.name: hints[f.name] for f in fields(cls) if f.name != "exports"}
    return _FIELD_TYPES[cls]


def _expected(hint: Any) -> str:
    """How a value of type ``hint`` is described to the user."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union) and type(None) in args:
        (inner,) = (a for a in args if a is not type(None))
        return _expected(inner)
    names = {bool: "a boolean (true or false)", int: "an integer", float: "a number"}
    if hint in names:
        return names[hint]
    if hint is str:
        return "a string"
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    return "a table"


def _type_ok(value: object, hint: Any) -> bool:
    """Whether ``value`` (from TOML or Python) fits the annotation ``hint``.

    bool is an int subclass in Python, so it is excluded from int and float
    explicitly: ``shared = true`` must not mean one connection.
    """
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:  # tuple[str, ...]; a TOML array arrives as a list
        return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
    if origin is Mapping or hint is Mapping:
        return isinstance(value, Mapping)
    return True  # a type this checker does not know: left to the consumer


def check_value(table: str, key: str, value: object, hint: Any) -> None:
    """Raise ConfigError naming ``table`` and ``key`` unless ``value`` fits."""
    if not _type_ok(value, hint):
        raise ConfigError(f"{table}: {key!r} must be {_expected(hint)}, not {value!r}")
    if key in _RANGES and value is not None:
        low, high, text = _RANGES[key]
        assert isinstance(value, int | float)
        if not low <= value <= high:  # also refuses NaN
            raise ConfigError(
                f"{table}: {key!r} must be {_expected(hint)} {text}, not {value!r} (out of range)"
            )


def check_fields(obj: object, table: str) -> None:
    """Type- and range-check every setting of a config dataclass instance."""
    for key, hint in _field_types(type(obj)).items():
        check_value(table, key, getattr(obj, key), hint)


def _check_mapping(cls: type, raw: Mapping[str, Any], table: str) -> None:
    """The same checks on a TOML table, before any value is converted."""
    hints = _field_types(cls)
    for key, value in raw.items():
        if key in hints:
            check_value(table, key, value, hints[key])


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
# driver settings that may also be given directly on [[export]] (qcow2's
# `compress = true`); they are moved into `settings`
_SETTINGS_SHORTCUTS: dict[str, Any] = {"compress": bool, "compress_cache_size": int}
_SERVER_KEYS = {
    "bind",
    "port",
    "socket",
    "max_connections",
    "max_inflight",
    "max_inflight_bytes",
    "handshake_timeout",
    "send_timeout",
    "shutdown_grace",
    "default_export",
    "metrics",
    "tls",
    "tls_certificates",
    "tls_verify_peer",
    "tls_psk_file",
    "tcp_congestion",
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
    raw_server = data.get("server", {})
    if not isinstance(raw_server, Mapping):
        raise ConfigError(f"{origin}: 'server' must be a table ([server])")
    server = dict(raw_server)
    bad = set(server) - _SERVER_KEYS
    if bad:
        raise ConfigError(f"{origin}: unknown [server] keys {sorted(bad)}")
    _check_mapping(ServerConfig, server, f"{origin}: [server]")
    if "socket" in server and "bind" not in server and "port" not in server:
        # TOML has no null to say "no TCP": a socket alone means Unix only
        server["bind"] = None
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
    bad = set(raw) - _EXPORT_KEYS - _SETTINGS_SHORTCUTS.keys()
    if bad:
        raise ConfigError(f"{where}: unknown keys {sorted(bad)}")
    if "path" not in raw:
        raise ConfigError(f"{where}: 'path' is required")
    _check_mapping(ExportConfig, raw, where)
    values = dict(raw)
    for key, hint in _SETTINGS_SHORTCUTS.items():
        if key in values:
            check_value(where, key, values[key], hint)
            settings = dict(values.get("settings", {}))
            if key in settings:
                raise ConfigError(f"{where}: {key!r} is given both directly and in 'settings'")
            settings[key] = values.pop(key)
            values["settings"] = settings
    values.setdefault("name", "")
    if not _EXPORT_NAME_RE.match(values["name"]):
        raise ConfigError(f"{where}: bad export name")
    path = values["path"]
    values["path"] = path if os.path.isabs(path) else os.path.join(base_dir, path)
    if values.get("backing_dirs") is not None:
        values["backing_dirs"] = tuple(
            d if os.path.isabs(d) else os.path.join(base_dir, d) for d in values["backing_dirs"]
        )
    if values.get("allow") is not None:
        values["allow"] = tuple(values["allow"])
    try:
        return ExportConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
