"""Run nbdserve for tests: in-process (trio) or as a subprocess (for SIGKILL)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import IO

import trio

from nbdserve.config import ExportConfig, ServerConfig
from nbdserve.server.serve import ServerHandle, serve


def export(path: str | Path, name: str = "", **kwargs: object) -> ExportConfig:
    return ExportConfig(name=name, path=str(path), **kwargs)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running_server(
    *exports: ExportConfig,
    socket_path: str | Path | None = None,
    tcp: bool = True,
    strict: bool = True,
    **kwargs: object,
) -> AsyncIterator[ServerHandle]:
    """serve() in a nursery on 127.0.0.1:0 (and/or a Unix socket); shut down on exit."""
    config = ServerConfig(
        exports=tuple(exports),
        bind="127.0.0.1" if tcp else None,
        port=0,
        socket=str(socket_path) if socket_path else None,
        **kwargs,  # type: ignore[arg-type]
    )
    async with trio.open_nursery() as nursery:
        handle: ServerHandle = await nursery.start(
            lambda task_status: serve(config, task_status=task_status, strict=strict)
        )
        try:
            yield handle
        finally:
            handle.shutdown()


def uri(handle: ServerHandle, name: str = "") -> str:
    host, port = handle.tcp_addresses[0]
    return f"nbd://{host}:{port}/{name}"


def unix_uri(path: str | Path, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={path}"


async def run(*argv: str | Path, check: bool = True, timeout: float = 120) -> str:
    """Run a client tool off the trio thread; return its stdout (stderr on failure)."""
    with trio.fail_after(timeout):
        result = await trio.run_process(
            [str(a) for a in argv], capture_stdout=True, capture_stderr=True, check=False
        )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {result.returncode}:\n"
            f"{result.stdout.decode(errors='replace')}\n{result.stderr.decode(errors='replace')}"
        )
    return result.stdout.decode(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server_process(
    args: Sequence[str],
    *,
    port: int | None = None,
    socket_path: str | None = None,
    timeout: float = 20,
    log_path: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m nbdserve ARGS`` as a child; waits until it listens.

    Its output goes to ``log_path`` when given (for tests that read the log),
    else to a temporary file shown if the server fails to start.
    """
    cmd = [sys.executable, "-m", "nbdserve", *args]
    # a file, not a pipe: a chatty server never blocks on a full pipe (closed below)
    log = _open_log(log_path)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_listening(proc, port, socket_path, timeout, log)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _open_log(log_path: Path | None) -> IO[bytes]:
    if log_path is not None:
        return open(log_path, "w+b")
    return tempfile.TemporaryFile()


def _wait_listening(
    proc: subprocess.Popen[bytes],
    port: int | None,
    socket_path: str | None,
    timeout: float,
    log: IO[bytes],
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            out = log.read().decode(errors="replace")
            raise AssertionError(f"server exited with {proc.returncode}:\n{out}")
        try:
            if socket_path is not None:
                if os.path.exists(socket_path):
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(socket_path)
                    return
            elif port is not None:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("server did not start listening in time")


def nbdsh_argv() -> list[str]:
    """nbdsh is ``python3 -m nbd`` on the *system* Python (python3-libnbd is built for it);
    a venv's or pyenv's python3 earlier on PATH would not find the module."""
    system_python = "/usr/bin/python3"
    if os.path.exists(system_python):
        return [system_python, "-m", "nbd"]
    return ["nbdsh"]
