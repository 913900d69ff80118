"""Operator features: reload on SIGHUP without dropping clients, socket activation."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

from nbdserve.server.exports import ExportRegistry
from tests.conftest import require_tools
from tests.helpers.client import NbdClient
from tests.helpers.server import export, running_server, server_process

MiB = 1024 * 1024


def _disk(path: Path, fill: int, size: int = MiB) -> Path:
    path.write_bytes(bytes([fill]) * size)
    return path


async def test_reload_adds_removes_and_keeps_clients(tmp_path: Path) -> None:
    a = export(_disk(tmp_path / "a.raw", 0xAA), "a", format="raw")
    b = export(_disk(tmp_path / "b.raw", 0xBB), "b", format="raw")
    c = export(_disk(tmp_path / "c.raw", 0xCC), "c", format="raw")
    async with running_server(a, b) as srv:
        registry = srv.registry
        assert isinstance(registry, ExportRegistry)
        client = await NbdClient.connect_tcp(*srv.tcp_addresses[0])
        await client.go("a")
        assert await client.read(0, 4096) == b"\xaa" * 4096
        await registry.reload((b, c))
        assert sorted(e.name for e in registry) == ["b", "c"]
        # the client of the removed export is not dropped...
        assert await client.read(4096, 4096) == b"\xaa" * 4096
        # ...while new clients no longer see it
        late = await NbdClient.connect_tcp(*srv.tcp_addresses[0])
        await late.handshake()
        names = await late.list_exports()
        assert sorted(n for n, _ in names) == ["b", "c"]
        await late.aclose()
        await client.disconnect()
        await client.aclose()
        with trio.fail_after(10):
            while registry._draining:
                await trio.sleep(0.01)


async def test_reload_replaces_a_changed_export_after_its_clients_leave(tmp_path: Path) -> None:
    require_tools("qemu-img")
    path = tmp_path / "x.qcow2"
    await trio.run_process(
        ["qemu-img", "create", "-f", "qcow2", str(path), "1M"], capture_stdout=True
    )
    # a qcow2 image refuses a second writer, so the replacement must wait
    old = export(path, "x", format="qcow2", description="old")
    new = export(path, "x", format="qcow2", description="new")
    async with running_server(old) as srv:
        registry = srv.registry
        assert isinstance(registry, ExportRegistry)
        client = await NbdClient.connect_tcp(*srv.tcp_addresses[0])
        await client.go("x")
        await registry.reload((new,))
        # the image is still locked by the old export: the new one waits
        assert registry.lookup("x") is None
        await client.disconnect()
        await client.aclose()
        with trio.fail_after(10):
            while registry.lookup("x") is None:
                await trio.sleep(0.01)
        replaced = registry.lookup("x")
        assert replaced is not None
        assert replaced.config.description == "new"


def test_sighup_rereads_the_config_file(tmp_path: Path) -> None:
    require_tools("nbdinfo")
    _disk(tmp_path / "one.raw", 1)
    _disk(tmp_path / "two.raw", 2)
    port = _free_port()
    cfg = tmp_path / "exports.toml"
    cfg.write_text(f'[server]\nport = {port}\n[[export]]\nname = "one"\npath = "one.raw"\n')
    with server_process(["serve", "--config", str(cfg)], port=port) as proc:
        assert _listed(port) == ["one"]
        cfg.write_text(f'[server]\nport = {port}\n[[export]]\nname = "two"\npath = "two.raw"\n')
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while _listed(port) != ["two"]:
            assert time.monotonic() < deadline, "reload did not take effect"
            time.sleep(0.1)
        assert proc.poll() is None


def test_socket_activation(tmp_path: Path) -> None:
    require_tools("nbdinfo")
    img = _disk(tmp_path / "act.raw", 7, 2 * MiB)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    # a systemd stand-in: put the socket at fd 3, name our pid, exec the server
    launcher = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ['LISTEN_FDS'] = '1'; os.environ['LISTEN_PID'] = str(os.getpid()); "
        "os.execv(sys.executable, [sys.executable, '-m', 'nbdserve', 'serve', "
        "'--port', '1', sys.argv[2]])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, str(listener.fileno()), str(img)],
        pass_fds=(listener.fileno(),),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    listener.close()
    try:
        size = subprocess.run(
            ["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert int(size) == 2 * MiB
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listed(port: int) -> list[str]:
    out = subprocess.run(
        ["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode:
        return []
    return sorted(e["export-name"] for e in json.loads(out.stdout)["exports"])
