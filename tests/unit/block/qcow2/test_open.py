"""Opening qcow2 images: feature bits, open modes, external data file confinement."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from nbdserve.block.chain import ChainOptions, open_chain
from nbdserve.block.file import FileBackend
from nbdserve.block.formats import OpenOptions
from nbdserve.block.qcow2 import create_image, open_image
from nbdserve.block.qcow2.structs import HDR_INCOMPATIBLE_FEATURES
from nbdserve.config import ExportConfig
from nbdserve.errors import BackingChainError, ConfigError, InvalidImageError
from nbdserve.server.exports import open_export


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


# ---- confinement of the files an image names -----------------------------------------


def _outside_and_inside(tmp_path: Path) -> tuple[Path, Path]:
    outside, inside = tmp_path / "outside", tmp_path / "inside"
    outside.mkdir()
    inside.mkdir()
    return outside, inside


async def _open_chain(path: Path, **kw: object) -> None:
    chain = await open_chain(str(path), ChainOptions(fmt="qcow2", read_only=True, **kw))  # type: ignore[arg-type]
    await chain.aclose()


async def test_backing_file_outside_the_allowed_dirs_is_refused(tmp_path: Path) -> None:
    outside, inside = _outside_and_inside(tmp_path)
    (outside / "base.raw").write_bytes(b"B" * (1 << 20))
    await create_image(str(inside / "img.qcow2"), 1 << 20, {}, "../outside/base.raw", "raw")
    with pytest.raises(BackingChainError, match="outside the allowed directories"):
        await _open_chain(inside / "img.qcow2")
    # an absolute name is no way around it
    await create_image(str(inside / "abs.qcow2"), 1 << 20, {}, str(outside / "base.raw"), "raw")
    with pytest.raises(BackingChainError, match="outside the allowed directories"):
        await _open_chain(inside / "abs.qcow2")
    # the operator may allow the directory
    await _open_chain(inside / "img.qcow2", backing_dirs=[str(inside), str(outside)])


async def test_backing_file_symlink_out_of_the_allowed_dir_is_refused(tmp_path: Path) -> None:
    outside, inside = _outside_and_inside(tmp_path)
    (inside / "base.raw").write_bytes(b"B" * (1 << 20))
    await create_image(str(inside / "img.qcow2"), 1 << 20, {}, "base.raw", "raw")
    await _open_chain(inside / "img.qcow2")  # valid while the base is a real file inside
    (outside / "base.raw").write_bytes(b"S" * (1 << 20))
    (inside / "base.raw").unlink()
    (inside / "base.raw").symlink_to(outside / "base.raw")
    with pytest.raises(BackingChainError, match=r"resolves to .*outside.*outside the allowed"):
        await _open_chain(inside / "img.qcow2")


async def test_data_file_symlink_out_of_the_image_dir_is_refused(tmp_path: Path) -> None:
    outside, inside = _outside_and_inside(tmp_path)
    path = inside / "img.qcow2"
    await create_image(str(path), 4 << 20, {"data_file": "img.data"})
    await _open(path, True)
    (outside / "secret").write_bytes((inside / "img.data").read_bytes())
    (inside / "img.data").unlink()
    (inside / "img.data").symlink_to(outside / "secret")
    with pytest.raises(InvalidImageError, match="outside"):
        await _open(path, True)
    with pytest.raises(InvalidImageError, match="outside"):
        await _open_chain(path)


async def test_data_file_in_a_directory_the_export_allows(tmp_path: Path) -> None:
    """backing_dirs confines (and permits) a qcow2 data_file as it does an FVD one."""
    outside, inside = _outside_and_inside(tmp_path)
    path = inside / "img.qcow2"
    await create_image(str(path), 4 << 20, {"data_file": str(outside / "img.data")})
    with pytest.raises(InvalidImageError, match="outside"):
        await _open_chain(path)
    await _open_chain(path, backing_dirs=[str(inside), str(outside)])
    # and a data file next to the image is refused when the export allows only elsewhere
    own = inside / "own.qcow2"
    await create_image(str(own), 4 << 20, {"data_file": "own.data"})
    with pytest.raises(InvalidImageError, match="outside"):
        await _open_chain(own, backing_dirs=[str(outside)])


async def test_data_file_confined_by_the_export_configuration(tmp_path: Path) -> None:
    """The export's ``backing_dirs`` (not a format setting) decides where a data file
    named inside the image may be: refused with a clear error outside, served inside."""
    outside, inside = _outside_and_inside(tmp_path)
    path = inside / "img.qcow2"
    await create_image(str(path), 4 << 20, {"data_file": str(outside / "img.data")})
    refused = [
        ExportConfig(name="d", path=str(path), format="qcow2"),
        # a "backing_dirs" format setting is no way around the export's directories
        ExportConfig(
            name="d", path=str(path), format="qcow2", settings={"backing_dirs": [str(outside)]}
        ),
    ]
    for cfg in refused:
        with pytest.raises(ConfigError, match=r"external data file: .*outside the allowed"):
            await open_export(cfg)
    cfg = ExportConfig(
        name="d", path=str(path), format="qcow2", backing_dirs=(str(inside), str(outside))
    )
    export = await open_export(cfg)
    try:
        assert export.device.size == 4 << 20
    finally:
        await export.chain.aclose()
