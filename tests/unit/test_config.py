"""Config files as the real CLI reads them: every key type- and range-checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nbdserve.config import ExportConfig, ServerConfig, config_from_mapping, load_config
from nbdserve.errors import ConfigError


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
    ("", "max_chain_depth = -1", "'max_chain_depth'", ">= 0"),
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
