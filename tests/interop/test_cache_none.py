"""cache=none (O_DIRECT): served data and images stay right with unaligned requests."""

from __future__ import annotations

import fcntl
import os
import random
from pathlib import Path

import pytest

from nbdserve.block.file import FileBackend
from tests.conftest import require_tools
from tests.helpers.server import export, run, running_server, uri

MiB = 1024 * 1024


def _direct_supported(tmp_path: Path) -> bool:
    try:
        fd = os.open(tmp_path / "probe", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    if not _direct_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    return tmp_path


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "parallels"])
async def test_unaligned_writes_and_reads_with_cache_none(direct_dir: Path, fmt: str) -> None:
    require_tools("qemu-img", "qemu-io")
    img = direct_dir / f"disk.{fmt}"
    await run("qemu-img", "create", "-f", fmt, img, "8M")
    rng = random.Random(11)
    writes = [(rng.randrange(0, 8 * MiB - 70_000), rng.randrange(1, 70_000)) for _ in range(12)]
    async with running_server(export(img, "d", format=fmt, cache="none")) as srv:
        assert srv.registry is not None
        file = srv.registry.lookup("d").chain.top.file  # type: ignore[union-attr]
        assert isinstance(file, FileBackend)
        assert fcntl.fcntl(file.fd, fcntl.F_GETFL) & os.O_DIRECT
        cmds = []
        for i, (off, n) in enumerate(writes):
            cmds += ["-c", f"write -P {i + 1} {off} {n}"]
        await run("qemu-io", "-f", "raw", *cmds, uri(srv, "d"))
        served = direct_dir / "served.raw"
        await run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(srv, "d"), served)
    expected = bytearray(8 * MiB)
    for i, (off, n) in enumerate(writes):
        expected[off : off + n] = bytes([i + 1]) * n
    assert served.read_bytes() == expected
    if fmt != "raw":
        await run("qemu-img", "check", "-f", fmt, img)
    out = direct_dir / "out.raw"
    await run("qemu-img", "convert", "-f", fmt, "-O", "raw", img, out)
    assert out.read_bytes() == expected
