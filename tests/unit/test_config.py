"""Config files as the real CLI reads them: every key type- and range-checked,
and a ``socket`` without ``bind``/``port`` meaning a Unix socket only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nbdserve.config import ExportConfig, ServerConfig, config_from_mapping, load_config
from nbdserve.errors import ConfigError
from tests.conftest import require_tools
from tests.helpers.server import server_process

_TCP_LISTEN = "0A"  # st column of /proc/net/tcp{,6}: TCP_LISTEN


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdserve", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _write_config(tmp_path: Path, server: str, export: str) -> Path:
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(65536))
    cfg = tmp_path / "exports.toml"
    cfg.write_text(f'[server]\n{server}\n[[export]]\nname = "d"\npath = "d.raw"\n{export}\n')
    return cfg


# (table line, export line, the key the error must name, words of what was expected)
_BAD = [
    ("", 'read_only = "false"', "'read_only'", "boolean"),
    ("", "shared = -3", "'shared'", ">= 0"),
    ("", "shared = true", "'shared'", "integer"),
    ("", "shared = 1.5", "'shared'", "integer"),
    ("", "max_chain_depth = 0", "'max_chain_depth'", ">= 1"),
    ("", "probe_raw = 1", "'probe_raw'", "boolean"),
    ("", "locking = 0", "'locking'", "boolean"),
    ("", "tls_required = 'yes'", "'tls_required'", "boolean"),
    ("", "description = 7", "'description'", "string"),
    ("", "format = true", "'format'", "string"),
    ("", 'allow = "10.0.0.0/8"', "'allow'", "list of strings"),
    ("", 'backing_dirs = ["a", 2]', "'backing_dirs'", "list of strings"),
    ("", "settings = 3", "'settings'", "table"),
    ("", 'cache = ["none"]', "'cache'", "string"),
    ("port = 70000", "", "'port'", "0..65535"),
    ("port = -1", "", "'port'", "0..65535"),
    ('port = "10809"', "", "'port'", "integer"),
    ("bind = 127", "", "'bind'", "string"),
    ("max_connections = 0", "", "'max_connections'", ">= 1"),
    ("max_inflight = -5", "", "'max_inflight'", ">= 1"),
    ("max_inflight_bytes = 0", "", "'max_inflight_bytes'", ">= 1"),
    ("handshake_timeout = 0", "", "'handshake_timeout'", "> 0"),
    ("handshake_timeout = nan", "", "'handshake_timeout'", "> 0"),
    ('handshake_timeout = "30"', "", "'handshake_timeout'", "number"),
    ("shutdown_grace = -1.0", "", "'shutdown_grace'", ">= 0"),
    ("tls_verify_peer = 'false'", "", "'tls_verify_peer'", "boolean"),
    ("metrics = 9100", "", "'metrics'", "string"),
]


@pytest.mark.parametrize(("server", "export", "key", "expected"), _BAD)
def test_bad_value_is_refused_naming_table_and_key(
    tmp_path: Path, server: str, export: str, key: str, expected: str
) -> None:
    cfg = _write_config(tmp_path, server, export)
    with pytest.raises(ConfigError) as exc:
        load_config(str(cfg))
    message = str(exc.value)
    assert key in message, message
    assert expected in message, message
    assert ("[server]" if server else "export #1") in message


@pytest.mark.parametrize(
    ("server", "export", "key"),
    [
        ("", 'read_only = "false"', "'read_only'"),
        ("", "shared = -3", "'shared'"),
        ("port = 70000", "", "'port'"),
        ("max_inflight = true", "", "'max_inflight'"),
    ],
)
def test_real_cli_refuses_a_bad_config_in_one_line(
    tmp_path: Path, server: str, export: str, key: str
) -> None:
    cfg = _write_config(tmp_path, server, export)
    result = _serve("--config", str(cfg))
    # exit status 1: the CLI's status for every error the user can fix
    # (argparse's usage errors are 2)
    assert result.returncode == 1, result
    errors = [line for line in result.stderr.splitlines() if line.startswith("nbdserve: error:")]
    assert len(errors) == 1, result.stderr
    assert key in errors[0], result.stderr
    assert str(cfg) in errors[0]
    assert "Traceback" not in result.stderr


def test_real_cli_refuses_a_negative_shared(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(65536))
    result = _serve("--shared", "-1", "--port", "0", str(img))
    assert result.returncode == 1, result
    assert "'shared' must be an integer >= 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_python_api_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="'read_only' must be a boolean"):
        ExportConfig(name="a", path="/x", read_only="false")  # type: ignore[arg-type]
    export = ExportConfig(name="a", path="/x")
    with pytest.raises(ConfigError, match=r"\[server\]: 'port'"):
        ServerConfig(exports=(export,), port=True)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tls_psk_file", "/etc/nbdserve/keys.psk"),
        ("tls_certificates", "/etc/nbdserve/pki"),
        ("tls_verify_peer", True),
    ],
)
def test_tls_settings_with_tls_off_are_refused_not_ignored(key: str, value: object) -> None:
    export = ExportConfig(name="a", path="/x")
    with pytest.raises(ConfigError, match=f"tls is off, so {key} would be ignored"):
        ServerConfig(exports=(export,), tls="off", **{key: value})  # type: ignore[arg-type]
    on = {"tls_certificates": "/pki", key: value}
    ServerConfig(exports=(export,), tls="on", **on)  # type: ignore[arg-type]


def test_real_cli_refuses_a_psk_file_with_tls_off(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(65536))
    psk = tmp_path / "keys.psk"
    psk.write_text("alice:0123456789abcdef\n")
    result = _serve("--tls", "off", "--tls-psk", str(psk), "--port", "0", str(img))
    assert result.returncode == 1, result
    errors = [line for line in result.stderr.splitlines() if line.startswith("nbdserve: error:")]
    assert len(errors) == 1, result.stderr
    assert "tls_psk_file would be ignored" in errors[0]
    assert "Traceback" not in result.stderr


def test_good_values_of_every_type_are_accepted() -> None:
    config = config_from_mapping(
        {
            "server": {"port": 0, "handshake_timeout": 5, "shutdown_grace": 0.5},
            "export": [
                {
                    "path": "/x",
                    "read_only": False,
                    "shared": 0,
                    "allow": ["unix", "10.0.0.0/8"],
                    "backing_dirs": [],
                    "settings": {"compress": True},
                }
            ],
        }
    )
    assert config.handshake_timeout == 5
    assert config.exports[0].read_only is False
    assert config.exports[0].allow == ("unix", "10.0.0.0/8")


@pytest.mark.parametrize(
    ("server", "bind", "port"),
    [
        ({"socket": "/s"}, None, 10809),  # Unix only
        ({"socket": "/s", "port": 0}, "127.0.0.1", 0),  # a port asks for TCP too
        ({"socket": "/s", "bind": "::1"}, "::1", 10809),
        ({}, "127.0.0.1", 10809),  # no socket: the default TCP listener
    ],
)
def test_socket_without_bind_or_port_means_unix_only(
    server: dict[str, object], bind: str | None, port: int
) -> None:
    config = config_from_mapping({"server": server, "export": [{"path": "/x"}]})
    assert (config.bind, config.port) == (bind, port)


def _tcp_listening_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == _TCP_LISTEN:
                    inodes.add(cols[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[len("socket:[") : -1])
    return out


def test_config_with_only_a_socket_serves_unix_only(tmp_path: Path) -> None:
    require_tools("nbdinfo")
    sock = tmp_path / "nbd.sock"
    cfg = _write_config(tmp_path, 'socket = "nbd.sock"', "")  # relative to the file
    with server_process(["serve", "--config", str(cfg)], socket_path=str(sock)) as proc:
        tcp = _socket_inodes(proc.pid) & _tcp_listening_inodes()
        assert not tcp, "the server listens on TCP although the config gave only a socket"
        out = subprocess.run(
            ["nbdinfo", "--json", f"nbd+unix:///d?socket={sock}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    assert json.loads(out.stdout)["exports"][0]["export-size"] == 65536


def test_the_tcp_check_can_fail(tmp_path: Path) -> None:
    """With a port given, the same probe must see the TCP listener."""
    sock = tmp_path / "nbd.sock"
    cfg = _write_config(tmp_path, 'socket = "nbd.sock"\nport = 0', "")
    with server_process(["serve", "--config", str(cfg)], socket_path=str(sock)) as proc:
        assert _socket_inodes(proc.pid) & _tcp_listening_inodes()
