"""The command line as a user meets it: one-line errors, the demo, config files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from nbdserve.config import config_from_mapping, load_config
from nbdserve.errors import ConfigError
from tests.conftest import require_tools
from tests.helpers.server import free_port, server_process

REPO = Path(__file__).resolve().parents[2]


def _nbdserve(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdserve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 1, result
    lines = [line for line in result.stderr.splitlines() if line.startswith("nbdserve: error:")]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_image_is_one_line() -> None:
    _assert_one_line_error(_nbdserve("serve", "/nonexistent/disk.img"), "does not exist")


def test_missing_config_is_one_line() -> None:
    _assert_one_line_error(_nbdserve("serve", "--config", "/nonexistent.toml"), "not found")


def test_unknown_format_is_one_line(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(4096))
    _assert_one_line_error(_nbdserve("serve", "-f", "vmdk9", str(img)), "unknown image format")


def test_unknown_congestion_control_is_one_line(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(4096))
    result = _nbdserve("serve", "--tcp-congestion", "nosuchcc", "--port", "0", str(img))
    _assert_one_line_error(result, "tcp_congestion 'nosuchcc' cannot be used here")


def test_bad_option_is_reported_by_argparse() -> None:
    result = _nbdserve("serve", "--no-such-option")
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(65536))
    port = free_port()
    with server_process(["serve", "--port", str(port), str(img)], port=port):
        result = _nbdserve("serve", "--port", str(port), str(img))
    _assert_one_line_error(result, "already in use")


def test_graceful_shutdown_on_sigterm_flushes_and_exits_zero(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(65536))
    port = free_port()
    pid_file = tmp_path / "pid"
    with server_process(
        ["serve", "--port", str(port), "--pid-file", str(pid_file), str(img)], port=port
    ) as proc:
        assert int(pid_file.read_text()) == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert not pid_file.exists()


def test_demo_serves_what_it_prints(tmp_path: Path) -> None:
    require_tools("qemu-img", "nbdinfo")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbdserve", "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        uri = None
        deadline = time.monotonic() + 20
        while uri is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "URI:" in line:
                uri = line.split("URI:", 1)[1].strip()
        assert uri == f"nbd://127.0.0.1:{port}/demo"
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", uri],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout
        )
        assert info["virtual-size"] == 64 * 1024 * 1024
        head = subprocess.run(
            ["nbdinfo", "--json", uri], capture_output=True, text=True, check=True, timeout=30
        )
        assert json.loads(head.stdout)["exports"][0]["export-name"] == "demo"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0


def test_example_config_parses_and_means_what_it_says() -> None:
    config = load_config(str(REPO / "configs" / "example.toml"))
    with open(REPO / "configs" / "example.toml", "rb") as f:
        raw = tomllib.load(f)
    assert config.port == raw["server"]["port"]
    assert [e.name for e in config.exports] == [e["name"] for e in raw["export"]]
    assert config.exports[1].read_only is True


def test_config_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "conf" / "exports.toml"
    cfg.parent.mkdir()
    cfg.write_text('[[export]]\nname = "a"\npath = "../images/a.raw"\n')
    config = load_config(str(cfg))
    assert config.exports[0].path == os.path.join(str(cfg.parent), "../images/a.raw")


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"export": []}, "no exports"),
        ({"export": [{"name": "a"}]}, "'path' is required"),
        ({"export": [{"path": "x", "colour": "red"}]}, "unknown keys"),
        ({"server": {"prot": 1}, "export": [{"path": "x"}]}, "unknown [server] keys"),
        ({"export": [{"path": "x", "name": "a"}, {"path": "y", "name": "a"}]}, "duplicate"),
        ({"server": {"port": 70000}, "export": [{"path": "x"}]}, "out of range"),
        ({"server": {"tcp_congestion": "cu bic"}, "export": [{"path": "x"}]}, "tcp_congestion"),
    ],
)
def test_bad_configs_are_refused_clearly(data: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as exc:
        config_from_mapping(data)
    assert needle in str(exc.value)


# ---- command line and --config -----------------------------------------------------


def _config_for(tmp_path: Path, image: Path, server: str = "") -> Path:
    cfg = tmp_path / "exports.toml"
    cfg.write_text(f'[server]\n{server}\n[[export]]\nname = "disk"\npath = "{image}"\n')
    return cfg


def _raw_image(tmp_path: Path, size: int = 1 << 20) -> Path:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(size))
    return img


@pytest.mark.parametrize(
    ("option", "named"),
    [
        (["-r"], "-r/--read-only"),
        (["--read-only"], "-r/--read-only"),
        (["--allow", "10.0.0.0/8"], "--allow"),
        (["--no-locking"], "--no-locking"),
        (["-f", "raw"], "-f/--format"),
        (["--cache", "none"], "--cache"),
        (["--cache", "writeback"], "--cache"),
        (["--compress"], "--compress"),
        (["-e", "1"], "-e/--shared"),
        (["--shared", "0"], "-e/--shared"),
        (["-x", "vm"], "-x/--export"),
        (["--export", ""], "-x/--export"),
        (["-D", "text"], "-D/--description"),
        (["--backing-dir", "/tmp"], "--backing-dir"),
        (["--no-probe-raw"], "--no-probe-raw"),
    ],
)
def test_per_export_options_with_config_are_refused(
    tmp_path: Path, option: list[str], named: str
) -> None:
    # even an option given with its default value: the user asked for something the
    # config file's exports would not get
    cfg = _config_for(tmp_path, _raw_image(tmp_path))
    result = _nbdserve("serve", "--config", str(cfg), *option)
    assert result.returncode == 2, result
    assert named in result.stderr
    assert "--config" in result.stderr
    assert "Traceback" not in result.stderr


def test_image_and_config_together_are_a_usage_error(tmp_path: Path) -> None:
    img = _raw_image(tmp_path)
    result = _nbdserve("serve", "--config", str(_config_for(tmp_path, img)), str(img))
    assert result.returncode == 2
    assert "not both" in result.stderr


def _held_connection(port: int) -> socket.socket:
    """A greeted connection, left in the handshake: it holds one connection slot.

    Retried: the slot may still belong to an earlier probe the server has not yet
    seen closed."""
    deadline = time.monotonic() + 10
    while True:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        with contextlib.suppress(ConnectionResetError):
            if sock.recv(8) == b"NBDMAGIC":
                return sock
        sock.close()
        assert time.monotonic() < deadline, "no connection was served"
        time.sleep(0.05)


def _connection_is_served(port: int) -> bool:
    """Whether the server greets a new TCP connection (a refused one is closed unread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            return sock.recv(8) == b"NBDMAGIC"
        except ConnectionResetError:
            return False


def test_max_connections_on_the_command_line_overrides_the_config(tmp_path: Path) -> None:
    img = _raw_image(tmp_path)
    cfg = _config_for(tmp_path, img, "max_connections = 100")
    port = free_port()
    with (
        server_process(
            ["serve", "--config", str(cfg), "--port", str(port), "--max-connections", "1"],
            port=port,
        ),
    ):
        first = _held_connection(port)
        assert not _connection_is_served(port)
        first.close()
        _held_connection(port).close()  # the slot is free again


def test_config_max_connections_applies_without_an_override(tmp_path: Path) -> None:
    cfg = _config_for(tmp_path, _raw_image(tmp_path), "max_connections = 1")
    port = free_port()
    with (
        server_process(["serve", "--config", str(cfg), "--port", str(port)], port=port),
        _held_connection(port),
    ):
        assert not _connection_is_served(port)


@pytest.mark.parametrize(
    "placement",
    [
        ["--log-format", "json", "-v", "serve"],
        ["serve", "--log-format", "json", "-v"],
        ["-v", "serve", "--log-format", "json"],
    ],
)
def test_log_options_before_or_after_serve(tmp_path: Path, placement: list[str]) -> None:
    img = _raw_image(tmp_path)
    port = free_port()
    log = tmp_path / "server.log"
    with server_process([*placement, "--port", str(port), str(img)], port=port, log_path=log):
        assert _connection_is_served(port)
    lines = log.read_text().splitlines()
    assert lines
    records = [json.loads(line) for line in lines]  # JSON, whichever side it was given
    # -v: debug records, such as the connection the test made, are shown
    assert any(r["level"] == "debug" and r.get("event") == "connect" for r in records)


def test_verbose_counts_on_both_sides_and_quiet_after_serve(tmp_path: Path) -> None:
    img = _raw_image(tmp_path)
    port = free_port()
    log = tmp_path / "server.log"
    # -q after serve lowers the level: the info lines (listening, export) disappear
    with server_process(["serve", "-q", "--port", str(port), str(img)], port=port, log_path=log):
        assert _connection_is_served(port)
    assert "event=listening" not in log.read_text()
    with server_process(
        ["-v", "serve", "-q", "--port", str(port), str(img)], port=port, log_path=log
    ):
        assert _connection_is_served(port)
    text = log.read_text()
    assert "event=listening" in text
    assert "level=debug" not in text  # -v and -q cancel out: info


def _every_config_key() -> set[str]:
    from nbdserve import config

    return set(config._SERVER_KEYS) | set(config._EXPORT_KEYS) | set(config._SETTINGS_SHORTCUTS)


def test_every_config_key_is_in_the_readme_tables_and_no_other() -> None:
    readme = (REPO / "README.md").read_text()
    documented = set()
    for table in ("[server]", "[[export]]"):
        start = readme.index(f"| `{table}` key")
        rows = readme[start : readme.index("\n\n", start)]
        documented |= set(re.findall(r"^\| `(\w+)`", rows, re.M))
    assert documented == _every_config_key()


def test_example_config_shows_every_key_and_its_commented_lines_are_valid() -> None:
    text = (REPO / "configs" / "example.toml").read_text()
    shown = set(re.findall(r"^#?\s*(\w+) = ", text, re.M))
    assert _every_config_key() <= shown
    # what a user gets by uncommenting the examples must load (lines indented after
    # the "#", such as a parallels-only setting, are left out)
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.M)
    config = config_from_mapping(
        tomllib.loads(uncommented), origin=str(REPO / "configs" / "example.toml")
    )
    assert config.tls == "require"
    assert config.metrics is not None
    assert config.exports[0].allow is not None
