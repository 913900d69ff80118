"""Opening qcow2 images: feature bits, open modes, external data file confinement."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from nbdserve.block.file import FileBackend
from nbdserve.block.formats import OpenOptions
from nbdserve.block.qcow2 import create_image, open_image
from nbdserve.block.qcow2.structs import HDR_INCOMPATIBLE_FEATURES
from nbdserve.errors import InvalidImageError


async def _make(tmp_path: Path, **opts: str) -> Path:
    path = tmp_path / "img.qcow2"
    await create_image(str(path), 4 << 20, dict(opts))
    return path


def _set_incompat(path: Path, bits: int) -> None:
    with open(path, "r+b") as f:
        f.seek(HDR_INCOMPATIBLE_FEATURES)
        old = struct.unpack(">Q", f.read(8))[0]
        f.seek(HDR_INCOMPATIBLE_FEATURES)
        f.write(struct.pack(">Q", old | bits))


async def _open(path: Path, read_only: bool) -> None:
    driver = await open_image(
        FileBackend.open(str(path), read_only=read_only), OpenOptions(read_only)
    )
    await driver.aclose()


async def test_unknown_incompatible_bit_is_named(tmp_path: Path) -> None:
    path = await _make(tmp_path)
    _set_incompat(path, 1 << 12)
    with pytest.raises(InvalidImageError, match="bit 12"):
        await _open(path, True)


async def test_encryption_is_refused(tmp_path: Path) -> None:
    path = await _make(tmp_path)
    with open(path, "r+b") as f:
        f.seek(32)
        f.write(struct.pack(">I", 2))
    with pytest.raises(InvalidImageError, match="encrypted"):
        await _open(path, True)


async def test_corrupt_bit_allows_read_only_only(tmp_path: Path) -> None:
    path = await _make(tmp_path)
    _set_incompat(path, 2)
    await _open(path, True)
    with pytest.raises(InvalidImageError, match="corrupt"):
        await _open(path, False)


async def test_relative_data_file_resolves_next_to_the_image(tmp_path: Path) -> None:
    path = await _make(tmp_path, data_file="img.data")
    assert (tmp_path / "img.data").exists()
    driver = await open_image(FileBackend.open(str(path), read_only=False), OpenOptions(False))
    try:
        await driver.write(70000, b"hello")
        buf = bytearray(5)
        await driver.readinto(70000, memoryview(buf))
        assert buf == b"hello"
    finally:
        await driver.aclose()
    assert (tmp_path / "img.data").read_bytes()[70000:70005] == b"hello"


async def test_data_file_outside_the_image_dir_is_refused(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    (tmp_path / "secret").write_bytes(b"x" * 4096)
    path = inner / "img.qcow2"
    await create_image(str(path), 4 << 20, {"data_file": str(tmp_path / "secret")})
    with pytest.raises(InvalidImageError, match="outside"):
        await _open(path, True)


async def test_truncated_file_is_an_open_error(tmp_path: Path) -> None:
    path = await _make(tmp_path)
    data = path.read_bytes()
    for n in (0, 50, 100, 70000):
        path.write_bytes(data[:n])
        with pytest.raises(InvalidImageError):
            await _open(path, True)


async def test_unknown_autoclear_bits_are_cleared_by_a_writer(tmp_path: Path) -> None:
    path = await _make(tmp_path)
    with open(path, "r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", (1 << 5) | 1))  # unknown bit 5, bitmaps bit without extension
    await _open(path, True)
    with open(path, "rb") as f:
        f.seek(88)
        assert struct.unpack(">Q", f.read(8))[0] == (1 << 5) | 1  # a reader leaves them
    await _open(path, False)
    with open(path, "rb") as f:
        f.seek(88)
        assert struct.unpack(">Q", f.read(8))[0] == 0
