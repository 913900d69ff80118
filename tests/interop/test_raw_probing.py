"""Format probing and raw: raw is probed only when the operator allows it (and then
with a warning naming the image, as QEMU warns); ``--format raw`` serves any file,
even one that starts with another format's magic, as its raw bytes.  A probed raw
image refuses writes that would make the next probe read it as another format
(QEMU answers EPERM the same way), so a guest cannot turn its disk into a qcow2
overlay naming a host file as its backing file."""

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
from tests.helpers.server import (
    nbdsh_argv,
    run,
    running_server,
    server_process,
    unix_uri,
    uri,
)

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


_PROBED_WRITES = """
import errno
def refused(data, offset):
    try:
        h.pwrite(data, offset)
    except nbd.Error as e:
        assert e.errno in ('EPERM', errno.EPERM) or 'EPERM' in str(e), e
        return True
    return False
# a qcow2 header at offset 0, whole or completed by a short write at offset 3
assert refused(b'QFI\\xfb' + bytes(508), 0), 'qcow2 magic written'
h.pwrite(b'QFI' + bytes(509), 0)
assert refused(b'\\xfb', 3), 'the last byte of the qcow2 magic written'
assert refused(b'WithoutFreeSpace\\x02' + bytes(495), 0), 'parallels magic and version'
# anything else in the first sector, and the same magic elsewhere, is a plain write
h.pwrite(b'boot sector' + bytes(501), 0)
h.pwrite(b'QFI\\xfb' + bytes(508), 8192)
h.zero(4096, 0)
assert h.pread(16, 8192)[:4] == b'QFI\\xfb'
"""


async def test_probed_raw_refuses_writes_that_would_change_its_format(tmp_path: Path) -> None:
    require_tools("nbdsh", "qemu-img")
    path = _unknown(tmp_path)
    async with running_server(ExportConfig(name="d", path=str(path))) as srv:
        await run(*nbdsh_argv(), "-u", uri(srv, "d"), "-c", _PROBED_WRITES)
    data = path.read_bytes()
    assert data[:4] == bytes(4), "the zeroed first sector (no refused write landed)"
    assert data[8192:8196] == b"QFI\xfb"
    info = await run("qemu-img", "info", "--output=json", path)
    assert '"format": "raw"' in info


async def test_named_raw_format_allows_any_header(tmp_path: Path) -> None:
    require_tools("nbdsh")
    path = _unknown(tmp_path)
    script = "h.pwrite(b'QFI\\xfb' + bytes(508), 0)\nassert h.pread(4, 0) == b'QFI\\xfb'\n"
    async with running_server(ExportConfig(name="d", path=str(path), format="raw")) as srv:
        await run(*nbdsh_argv(), "-u", uri(srv, "d"), "-c", script)
    assert path.read_bytes()[:4] == b"QFI\xfb"
