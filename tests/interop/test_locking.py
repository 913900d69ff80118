"""QEMU-compatible image locking: QEMU and nbdserve refuse each other's images."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from nbdserve.block.chain import ChainOptions, open_chain
from nbdserve.errors import ConfigError, ImageLockedError
from nbdserve.server.exports import ExportRegistry
from tests.conftest import require_tools
from tests.helpers.server import export, free_port, run, running_server


def _qcow2(path: Path) -> Path:
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", str(path), "4M"], check=True, capture_output=True
    )
    return path


async def test_qemu_tools_refuse_an_image_nbdserve_writes(tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    img = _qcow2(tmp_path / "disk.qcow2")
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    async with running_server(export(img, "q", format="qcow2"), export(raw, "r", format="raw")):
        out = await run("qemu-io", "-f", "qcow2", "-c", "write 0 512", img, check=False)
        assert "lock" in out.lower() or await _failed(
            "qemu-io", "-f", "qcow2", "-c", "write 0 512", img
        )
        assert await _failed("qemu-img", "info", img)
        assert await _failed("qemu-img", "resize", "-f", "raw", raw, "2M")
    # once the export is closed, QEMU may use the images again
    await run("qemu-io", "-f", "qcow2", "-c", "write 0 512", img)
    await run("qemu-img", "resize", "-f", "raw", raw, "2M")


async def _failed(*argv: str | Path) -> bool:
    """The tool failed, and because of a lock."""
    result = await trio.run_process(
        [str(a) for a in argv], capture_stdout=True, capture_stderr=True, check=False
    )
    text = (result.stdout + result.stderr).decode(errors="replace").lower()
    return result.returncode != 0 and "lock" in text


@pytest.fixture
def qemu_nbd_serving(tmp_path: Path) -> Iterator[Path]:
    require_tools("qemu-img", "qemu-nbd", "nbdinfo")
    img = _qcow2(tmp_path / "busy.qcow2")
    port = free_port()
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "qcow2", "-p", str(port), "-b", "127.0.0.1", "-t", str(img)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # qemu-nbd listens a moment after it starts: poll until it answers
        deadline = time.monotonic() + 20
        while subprocess.run(
            ["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"], capture_output=True, timeout=20
        ).returncode:
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.05)
        yield img
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_nbdserve_refuses_an_image_qemu_nbd_serves(qemu_nbd_serving: Path) -> None:
    img = qemu_nbd_serving
    with pytest.raises(ImageLockedError, match="in use"):
        await open_chain(str(img), ChainOptions(fmt="qcow2", locking=True))
    with pytest.raises(ConfigError, match="in use"):
        await ExportRegistry.open((export(img, "busy", format="qcow2"),))
    # without locking the operator takes the responsibility
    chain = await open_chain(str(img), ChainOptions(fmt="qcow2", read_only=True))
    await chain.aclose()


async def test_two_exports_of_one_image_conflict(tmp_path: Path) -> None:
    require_tools("qemu-img")
    img = _qcow2(tmp_path / "twice.qcow2")
    with pytest.raises(ConfigError, match="in use"):
        await ExportRegistry.open(
            (export(img, "a", format="qcow2"), export(img, "b", format="qcow2"))
        )
    readers = await ExportRegistry.open(
        (
            export(img, "a", format="qcow2", read_only=True),
            export(img, "b", format="qcow2", read_only=True),
        )
    )
    await readers.aclose()  # readers share
