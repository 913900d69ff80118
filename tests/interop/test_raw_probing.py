"""Format probing and raw: raw is probed only when the operator allows it (and then
with a warning naming the image, as QEMU warns); ``--format raw`` serves any file,
even one that starts with another format's magic, as its raw bytes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nbdserve.block.qcow2 import create_image
from nbdserve.config import ExportConfig
from nbdserve.errors import ConfigError
from nbdserve.server.exports import open_export
from tests.conftest import require_tools
from tests.helpers.server import run, server_process, unix_uri

pytestmark = pytest.mark.interop

REFUSED = "image format not recognised (and probing raw is not allowed)"
WARNING = "event=format-probed-raw"


def _unknown(tmp_path: Path) -> Path:
    """A file no format's magic matches."""
    path = tmp_path / "disk.img"
    path.write_bytes(b"not an image header" + os.urandom(64 * 1024 - 19))
    return path


async def _read_all(cfg: ExportConfig) -> bytes:
    export = await open_export(cfg)
    try:
        return await export.device.read(0, export.device.size)
    finally:
        await export.chain.aclose()


async def test_probe_raw_false_refuses_an_unrecognised_image(tmp_path: Path) -> None:
    path = _unknown(tmp_path)
    with pytest.raises(ConfigError) as info:
        await open_export(ExportConfig(name="d", path=str(path), probe_raw=False))
    assert REFUSED in str(info.value)
    assert str(path) in str(info.value)


def test_cli_no_probe_raw_refuses_an_unrecognised_image(tmp_path: Path) -> None:
    path = _unknown(tmp_path)
    sock = tmp_path / "nbd.sock"
    result = subprocess.run(
        [sys.executable, "-m", "nbdserve", "serve", "--no-probe-raw", "-k", str(sock), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert REFUSED in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr


async def test_probed_raw_is_served_with_a_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _unknown(tmp_path)
    with caplog.at_level(logging.WARNING, logger="nbdserve.block.chain"):
        assert await _read_all(ExportConfig(name="d", path=str(path))) == path.read_bytes()
    warnings = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
    assert len(warnings) == 1
    assert repr(str(path)) in warnings[0]
    # no warning when the operator names the format, or when probing finds one
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nbdserve.block.chain"):
        await _read_all(ExportConfig(name="d", path=str(path), format="raw"))
        qcow2 = tmp_path / "disk.qcow2"
        await create_image(str(qcow2), 1 << 20, {})
        await _read_all(ExportConfig(name="d", path=str(qcow2)))
    assert not [r for r in caplog.records if WARNING in r.getMessage()]


async def test_format_raw_serves_a_qcow2_file_as_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    await create_image(str(path), 4 << 20, {})
    assert path.read_bytes()[:4] == b"QFI\xfb"
    served = await _read_all(ExportConfig(name="d", path=str(path), format="raw"))
    assert served == path.read_bytes()
    # probing would have opened it as qcow2: 4 MiB of zeros
    assert await _read_all(ExportConfig(name="d", path=str(path))) == bytes(4 << 20)


async def test_cli_format_raw_serves_a_qcow2_file_as_its_bytes(tmp_path: Path) -> None:
    require_tools("qemu-img")
    path = tmp_path / "disk.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", path, "4M")
    sock, out = tmp_path / "nbd.sock", tmp_path / "out.raw"
    argv = ["serve", "-r", "--format", "raw", "-k", str(sock), str(path)]
    with server_process(argv, socket_path=str(sock)):
        await run("qemu-img", "convert", "-f", "raw", "-O", "raw", unix_uri(sock), out)
    # qemu's NBD client rounds the size up to 512 bytes (qcow2 files need not be)
    image = path.read_bytes()
    got = out.read_bytes()
    assert got[: len(image)] == image
    assert got[len(image) :] == bytes(-len(image) % 512)


async def test_cli_probed_raw_warning_is_logged(tmp_path: Path) -> None:
    require_tools("qemu-img")
    path = _unknown(tmp_path)
    sock, log = tmp_path / "nbd.sock", tmp_path / "server.log"
    with server_process(["serve", "-r", "-k", str(sock), str(path)], socket_path=str(sock),
                        log_path=log):  # fmt: skip
        await run("qemu-img", "info", "-f", "raw", unix_uri(sock))
    lines = [line for line in log.read_text().splitlines() if WARNING in line]
    assert len(lines) == 1, log.read_text()
    assert str(path) in lines[0]
