"""The container's scripts, run directly (no Docker engine needed): docker/entrypoint.sh
serves a config and hands signals to nbdserve; docker/healthcheck.py tells a live NBD server
from a closed port or another protocol.  The Dockerfile is linted when hadolint is present."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nbdserve.config import load_config
from tests.helpers.client import NbdClient
from tests.helpers.server import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
HEALTHCHECK = DOCKER / "healthcheck.py"
EX_CONFIG = 78


def nbdserve_wrapper(tmp_path: Path) -> Path:
    """An ``nbdserve`` program for $NBDSERVE: this interpreter's package, exec'd (same pid)."""
    wrapper = tmp_path / "nbdserve"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m nbdserve "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def entrypoint_env(tmp_path: Path, config: Path, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "NBDSERVE": str(nbdserve_wrapper(tmp_path)),
        "NBDSERVE_CONFIG": str(config),
        "NBDSERVE_BIND": "127.0.0.1",
        "NBDSERVE_PORT": str(port),
    }


def write_config(tmp_path: Path, image: Path) -> Path:
    config = tmp_path / "exports.toml"
    config.write_text(
        # bind/port here are what the entry point must override
        '[server]\nbind = "192.0.2.1"\nport = 1\n\n'
        f'[[export]]\nname = "disk"\npath = "{image}"\nformat = "raw"\n'
        'description = "from the entry point test"\n'
    )
    return config


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"entrypoint exited {proc.returncode}:\n{out}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise AssertionError("the entrypoint's server did not listen in time")


@contextlib.contextmanager
def entrypoint(env: dict[str, str], *args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [str(ENTRYPOINT), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


async def read_export(port: int, name: str, length: int) -> bytes:
    async with await NbdClient.connect_tcp("127.0.0.1", port) as client:
        info = await client.go(name)
        assert info.size == 1 << 20
        return await client.read(0, length)


async def test_entrypoint_serves_the_config_and_execs_nbdserve(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    content = bytes(range(256)) * 4096
    image.write_bytes(content)
    port = free_port()
    env = entrypoint_env(tmp_path, write_config(tmp_path, image), port)
    pid_file = tmp_path / "nbdserve.pid"
    # options after the entry point go to `nbdserve serve`
    with entrypoint(env, "--pid-file", str(pid_file)) as proc:
        wait_listening(proc, port)
        # exec all the way down: nbdserve is the process docker started (PID 1 there), so
        # docker stop's SIGTERM reaches it rather than a shell
        assert int(pid_file.read_text()) == proc.pid
        assert await read_export(port, "disk", 8192) == content[:8192]
        assert healthcheck("127.0.0.1", str(port)).returncode == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert not pid_file.exists()


@pytest.mark.parametrize("problem", ["missing", "directory"])
def test_entrypoint_refuses_a_missing_config(tmp_path: Path, problem: str) -> None:
    config = tmp_path / "exports.toml"
    if problem == "directory":  # what docker -v makes of a host file that does not exist
        config.mkdir()
    env = entrypoint_env(tmp_path, config, free_port())
    result = subprocess.run([str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == EX_CONFIG
    assert str(config) in result.stderr
    assert ("directory" in result.stderr) == (problem == "directory")
    assert result.stdout == ""


async def test_entrypoint_options_override_the_config_server_table(tmp_path: Path) -> None:
    """What the Dockerfile documents: `docker run nbdserve --max-connections N --log-format
    json` reaches `nbdserve serve` and wins over exports.toml's [server] table."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    port = free_port()
    env = entrypoint_env(tmp_path, write_config(tmp_path, image), port)
    with entrypoint(env, "--max-connections", "64", "--log-format", "json") as proc:
        wait_listening(proc, port)
        assert await read_export(port, "disk", 4096) == bytes(4096)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert proc.stdout is not None
        lines = proc.stdout.read().decode().splitlines()
    assert lines
    for line in lines:
        json.loads(line)


def test_entrypoint_refuses_per_export_options(tmp_path: Path) -> None:
    """--allow would otherwise be dropped silently: the config's exports do not get it."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    env = entrypoint_env(tmp_path, write_config(tmp_path, image), free_port())
    result = subprocess.run(
        [str(ENTRYPOINT), "--allow", "10.0.0.0/8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--allow" in result.stderr


def test_entrypoint_runs_another_command_as_given(tmp_path: Path) -> None:
    """`docker run nbdserve nbdserve img info ...` needs no configuration."""
    env = entrypoint_env(tmp_path, tmp_path / "absent.toml", free_port())
    result = subprocess.run(
        [str(ENTRYPOINT), "sh", "-c", 'echo "ran $0"', "x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode, result.stdout) == (0, "ran x\n")


def test_healthcheck_passes_on_a_serving_nbdserve_and_honours_its_environment(
    tmp_path: Path,
) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    port = free_port()
    sock = tmp_path / "nbd.sock"
    serve = [sys.executable, "-m", "nbdserve", "serve"]
    with (
        plain_server([*serve, "-p", str(port), str(image)], port=port),
        plain_server([*serve, "-k", str(sock), str(image)], sock=sock),
    ):
        assert healthcheck("127.0.0.1", str(port)).returncode == 0
        env = {**os.environ, "NBDSERVE_HEALTH_PORT": str(port)}
        assert healthcheck(env=env).returncode == 0
        assert healthcheck(f"unix:{sock}").returncode == 0


@contextlib.contextmanager
def plain_server(
    argv: list[str], *, port: int | None = None, sock: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A plain ``nbdserve serve`` child, waited for on its port or socket."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"nbdserve exited {proc.returncode}"
            assert time.monotonic() < deadline, "nbdserve did not listen in time"
            with contextlib.suppress(OSError):
                if sock is None:
                    assert port is not None
                    socket.create_connection(("127.0.0.1", port), 1).close()
                    break
                if sock.exists():
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(str(sock))
                    break
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_healthcheck_fails_on_a_closed_port() -> None:
    result = healthcheck("127.0.0.1", str(free_port()))
    assert result.returncode == 1
    assert result.stderr.startswith("unhealthy: 127.0.0.1:")


@pytest.mark.parametrize(
    ("greeting", "reason"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not an NBD server"),
        (b"NBDMAGIC" + (0x00420281861253).to_bytes(8, "big") + b"\0" * 8, "not a newstyle"),
        (b"NBDMAGIC" + b"IHAVEOPT" + b"\0\0", "fixed newstyle"),
        (b"NBDMAGIC", "connection closed after 8 of 18 bytes"),
    ],
)
async def test_healthcheck_fails_on_what_is_not_a_newstyle_nbd_server(
    greeting: bytes, reason: str
) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    async def answer_once() -> None:
        conn, _ = await listener.accept()
        with conn:
            await conn.send(greeting)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_once)
        result = await trio.run_process(
            [sys.executable, str(HEALTHCHECK), "127.0.0.1", str(port)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    listener.close()
    assert result.returncode == 1
    assert reason in result.stderr.decode()


def test_dockerfile_copies_files_that_exist_and_are_not_ignored() -> None:
    """No engine here to build the image: at least every COPY source must exist and pass
    the build's .dockerignore (docker/Dockerfile.dockerignore, which whitelists)."""
    dockerfile = (DOCKER / "Dockerfile").read_text()
    allowed = [
        line[1:].rstrip("/")
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    sources = [
        src
        for m in re.finditer(r"^COPY\s+(?:--\S+\s+)*(.+)$", dockerfile, re.MULTILINE)
        for src in m.group(1).split()[:-1]
    ]
    assert "docker/entrypoint.sh" in sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file"
        assert src.rstrip("/") in allowed, f"COPY {src} is excluded by the .dockerignore"
    assert load_config(str(DOCKER / "exports.example.toml")).exports


def test_dockerfile_lint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    result = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_entrypoint_lint() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run([shellcheck, str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
