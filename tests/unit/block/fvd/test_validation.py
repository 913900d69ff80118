"""Every rule of fvd-format "Validation on open" gives a clear InvalidImageError.

Each case builds a valid image, breaks one thing, and opens it through the
same path the server uses (``open_chain``), expecting a message that names
the problem: never a traceback, hang or huge allocation.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from nbdserve.block.chain import ChainOptions, open_chain
from nbdserve.block.file import FileBackend
from nbdserve.block.fvd import read_header
from nbdserve.block.fvd.structs import (
    HEADER_FIELD_OFFSETS,
    JOURNAL_BITMAP_TYPE,
    JOURNAL_TABLE_TYPE,
    MAX_JOURNAL_SIZE,
    MAX_TABLE_ENTRIES,
)
from nbdserve.errors import BackingChainError, ImageError, InvalidImageError

from .helpers import MIB, make_base, make_image

_FIELD_FORMATS = {
    "version": "<I",
    "header_size": "<I",
    "virtual_disk_size": "<Q",
    "data_offset": "<Q",
    "base_img_size": "<Q",
    "bitmap_offset": "<Q",
    "bitmap_size": "<Q",
    "block_size": "<Q",
    "table_offset": "<Q",
    "table_size": "<Q",
    "chunk_size": "<Q",
    "journal_offset": "<Q",
    "journal_size": "<Q",
    "bytes_per_prefetch": "<Q",
    "num_prefetch_slots": "<I",
    "clean_shutdown": "<I",
    "magic": "<I",
}


def patch_field(path: Path, name: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(HEADER_FIELD_OFFSETS[name])
        f.write(struct.pack(_FIELD_FORMATS[name], value))


def patch_bytes(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


async def open_fvd(path: Path, *, read_only: bool = False, **kw: object) -> None:
    chain = await open_chain(str(path), ChainOptions(fmt="fvd", read_only=read_only, **kw))  # type: ignore[arg-type]
    await chain.aclose()


async def header_of(path: Path) -> object:
    file = FileBackend.open(str(path), read_only=True)
    try:
        return await read_header(file)
    finally:
        await file.aclose()


@pytest.fixture
async def image(tmp_path: Path) -> Path:
    make_base(tmp_path / "base.raw", 4 * MIB)
    img = tmp_path / "img.fvd"
    await make_image(img, 8 * MIB, "base.raw", compact="on", journal_size="64k")
    await open_fvd(img)  # it is valid to begin with
    return img


HEADER_CASES = [
    ("magic", 0x12345678, "not an FVD image"),
    ("version", 2, "unsupported FVD version 2"),
    ("header_size", 512, "header_size is 512"),
    ("virtual_disk_size", 8 * MIB + 100, "virtual_disk_size .* not a multiple of 512"),
    ("data_offset", 4096 * 100 + 1, "data_offset .* not a multiple of 4096"),
    ("base_img_size", 4 * MIB + 3, "base_img_size .* not a multiple of 512"),
    ("base_img_size", 16 * MIB, "base_img_size .* exceeds virtual_disk_size"),
    ("bitmap_size", 100, "bitmap_size .* not a multiple of 4096"),
    ("bitmap_size", 0, "bitmap_size 0 is too small"),
    ("block_size", 3000, "block_size 3000 is not a power of two"),
    ("block_size", 256, "block_size 256 is not a power of two"),
    ("chunk_size", 96 * 1024, "chunk_size .* not a multiple of 4096 and of block_size"),
    ("chunk_size", 4096 * 3, "chunk_size .* not a multiple"),
    ("table_size", 4095, "table_size .* not a multiple of 4096"),
    ("table_size", 0, "table_size 0 is too small"),
    ("journal_size", 1000, "journal_size .* not a multiple of 512"),
    ("bytes_per_prefetch", 1000, "bytes_per_prefetch .* not a multiple"),
    ("num_prefetch_slots", 0, "num_prefetch_slots must be at least 1"),
    ("bitmap_offset", 4096 + 512, "bitmap region at .* not aligned"),
    ("table_offset", 4096, "overlaps"),
    ("journal_offset", 1 << 40, "journal region .* past the end of the file"),
    ("data_offset", 8192, "runs past data_offset"),
    ("virtual_disk_size", (1 << 62) + (1 << 20), "too large"),
    ("data_offset", 1 << 40, "data_offset .* lies past the end of the file"),
    ("journal_size", MAX_JOURNAL_SIZE + 512, "journal_size .* is too large"),
    # 1 MiB chunks: one entry more than the bound (the base, and so the bitmap, stay small)
    ("virtual_disk_size", (MAX_TABLE_ENTRIES + 1) * MIB, "table of .* entries is too large"),
]


@pytest.mark.parametrize(("field", "value", "message"), HEADER_CASES)
async def test_bad_header_field_is_refused(
    image: Path, field: str, value: int, message: str
) -> None:
    patch_field(image, field, value)
    with pytest.raises(InvalidImageError, match=message):
        await open_fvd(image)
    with pytest.raises(InvalidImageError, match=message):
        await open_fvd(image, read_only=True)


@pytest.mark.parametrize("region", ["table", "journal"])
async def test_misaligned_region_is_refused(image: Path, region: str) -> None:
    offset = getattr(await header_of(image), f"{region}_offset")
    assert offset  # the fixture's image is compact and has a journal
    patch_field(image, f"{region}_offset", offset + 512)
    with pytest.raises(
        InvalidImageError, match=f"{region} region at {offset + 512} is not aligned"
    ):
        await open_fvd(image)


async def test_huge_bitmap_is_refused_without_allocating(image: Path) -> None:
    patch_field(image, "virtual_disk_size", 1 << 60)
    patch_field(image, "base_img_size", 1 << 60)
    patch_field(image, "block_size", 512)
    patch_field(image, "chunk_size", 1 << 30)
    with pytest.raises(InvalidImageError, match=r"bitmap of .* bytes is too large"):
        await open_fvd(image)


async def test_unknown_incompatible_feature_byte_is_named(image: Path) -> None:
    patch_bytes(image, HEADER_FIELD_OFFSETS["incompatible_features"] + 5, b"\x04")
    with pytest.raises(InvalidImageError, match="incompatible feature byte 5"):
        await open_fvd(image)


async def test_unknown_compatible_feature_is_ignored(image: Path) -> None:
    patch_bytes(image, HEADER_FIELD_OFFSETS["compatible_features"] + 3, b"\xff")
    await open_fvd(image)


@pytest.mark.parametrize("field", ["base_img", "data_file", "add_storage_cmd", "base_img_fmt"])
async def test_string_without_nul_is_refused(image: Path, field: str) -> None:
    size = 16 if field.endswith("_fmt") else 1024
    patch_bytes(image, HEADER_FIELD_OFFSETS[field], b"a" * size)
    with pytest.raises(InvalidImageError, match=f"{field} is not NUL-terminated"):
        await open_fvd(image)


async def test_unsupported_data_file_fmt(image: Path) -> None:
    patch_bytes(image, HEADER_FIELD_OFFSETS["data_file_fmt"], b"qcow2\0")
    with pytest.raises(InvalidImageError, match="data_file_fmt 'qcow2' is not supported"):
        await open_fvd(image)


async def test_truncated_header(tmp_path: Path) -> None:
    img = tmp_path / "short.fvd"
    img.write_bytes(bytes.fromhex("A9F54351") + bytes(100))
    with pytest.raises(InvalidImageError, match="truncated"):
        await open_fvd(img)


async def table_offset_of(img: Path) -> int:
    return int(getattr(await header_of(img), "table_offset"))  # noqa: B009


async def test_table_entry_past_the_store(image: Path) -> None:
    patch_bytes(image, await table_offset_of(image) + 4 * 2, struct.pack("<I", 1000))
    with pytest.raises(InvalidImageError, match="entry 2 points to physical chunk 1000, past"):
        await open_fvd(image, read_only=True)


async def test_table_entry_with_bit_31(image: Path) -> None:
    patch_bytes(image, await table_offset_of(image), struct.pack("<I", 0x80000001))
    with pytest.raises(InvalidImageError, match="bit 31"):
        await open_fvd(image)


async def test_duplicate_chunks_refuse_writing_but_not_reading(image: Path) -> None:
    patch_bytes(image, await table_offset_of(image), np.array([0, 0], dtype="<u4").tobytes())
    with pytest.raises(InvalidImageError, match="refusing to open for writing"):
        await open_fvd(image)
    await open_fvd(image, read_only=True)


async def journal_of(img: Path) -> tuple[int, int]:
    h = await header_of(img)
    return int(getattr(h, "journal_offset")), int(getattr(h, "stable_journal_epoch"))  # noqa: B009


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (struct.pack("<I", 0xDEADBEEF), "journal sector 0: unknown record type 0xdeadbeef"),
        (
            struct.pack("<IQII", JOURNAL_TABLE_TYPE, 0, 200, 0),
            "TABLE record with 200 entries runs past the sector",
        ),
        (
            struct.pack("<IIQ", JOURNAL_BITMAP_TYPE, 16, (8 << 20) // 512),
            "BITMAP record covers .* past the virtual disk",
        ),
        (
            struct.pack("<IQII", JOURNAL_TABLE_TYPE, 0, 1, 100) + struct.pack("<I", 1),
            "TABLE record covers entries \\[100, 101\\), past the table",
        ),
    ],
)
async def test_corrupt_journal_after_unclean_shutdown(
    image: Path, record: bytes, message: str
) -> None:
    offset, _ = await journal_of(image)
    patch_bytes(image, offset, record)
    await open_fvd(image)  # clean: the journal is not read
    patch_field(image, "clean_shutdown", 0)
    with pytest.raises(InvalidImageError, match=message):
        await open_fvd(image, read_only=True)


async def test_journal_record_pointing_past_store(image: Path) -> None:
    offset, epoch = await journal_of(image)
    patch_bytes(
        image,
        offset,
        struct.pack("<IQII", JOURNAL_TABLE_TYPE, epoch, 1, 0) + struct.pack("<I", 999),
    )
    patch_field(image, "clean_shutdown", 0)
    with pytest.raises(InvalidImageError, match="past what the data store could hold"):
        await open_fvd(image)


async def test_base_outside_allowed_dirs(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    inside = tmp_path / "inside"
    outside.mkdir()
    inside.mkdir()
    make_base(outside / "base.raw", MIB)
    await make_image(inside / "img.fvd", MIB, "../outside/base.raw")
    with pytest.raises(BackingChainError, match="outside the allowed directories"):
        await open_fvd(inside / "img.fvd")


async def test_data_file_outside_allowed_dirs(tmp_path: Path) -> None:
    inside = tmp_path / "inside"
    inside.mkdir()
    await make_image(inside / "img.fvd", MIB, data_file="../data.raw")
    assert (tmp_path / "data.raw").exists()
    with pytest.raises(InvalidImageError, match=r"data_file '../data.raw' .* outside the allowed"):
        await open_fvd(inside / "img.fvd")
    # the operator may allow the directory
    await open_fvd(inside / "img.fvd", backing_dirs=[str(tmp_path)])


async def test_base_symlink_out_of_the_allowed_dir_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    inside = tmp_path / "inside"
    outside.mkdir()
    inside.mkdir()
    make_base(inside / "base.raw", MIB)
    await make_image(inside / "img.fvd", MIB, "base.raw")
    await open_fvd(inside / "img.fvd")  # valid while the base is a real file inside
    make_base(outside / "base.raw", MIB, seed=2)
    (inside / "base.raw").unlink()
    (inside / "base.raw").symlink_to(outside / "base.raw")
    with pytest.raises(BackingChainError, match=r"resolves to .*outside.*outside the allowed"):
        await open_fvd(inside / "img.fvd")


async def test_data_file_symlink_out_of_the_allowed_dir_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    inside = tmp_path / "inside"
    outside.mkdir()
    inside.mkdir()
    await make_image(inside / "img.fvd", MIB, data_file="data.raw")
    await open_fvd(inside / "img.fvd")
    os.rename(inside / "data.raw", outside / "data.raw")
    (inside / "data.raw").symlink_to(outside / "data.raw")
    with pytest.raises(InvalidImageError, match=r"data_file 'data.raw' .* outside the allowed"):
        await open_fvd(inside / "img.fvd")
    # a symlink whose target stays inside is fine
    (inside / "data.raw").unlink()
    os.rename(outside / "data.raw", inside / "real.raw")
    (inside / "data.raw").symlink_to("real.raw")
    await open_fvd(inside / "img.fvd")


async def test_missing_data_file(tmp_path: Path) -> None:
    await make_image(tmp_path / "img.fvd", MIB, data_file="data.raw")
    os.unlink(tmp_path / "data.raw")
    with pytest.raises(InvalidImageError, match="does not exist"):
        await open_fvd(tmp_path / "img.fvd")


async def test_base_chain_loop(tmp_path: Path) -> None:
    make_base(tmp_path / "b.raw", MIB)
    await make_image(tmp_path / "b.fvd", MIB, "b.raw")
    await make_image(tmp_path / "a.fvd", MIB, "b.fvd", base_fmt="fvd")
    # now make b point back at a
    patch_bytes(tmp_path / "b.fvd", HEADER_FIELD_OFFSETS["base_img"], b"a.fvd\0")
    patch_bytes(tmp_path / "b.fvd", HEADER_FIELD_OFFSETS["base_img_fmt"], b"fvd\0")
    with pytest.raises(BackingChainError, match="loops back"):
        await open_fvd(tmp_path / "a.fvd")


async def test_base_chain_too_deep(tmp_path: Path) -> None:
    make_base(tmp_path / "l0.raw", MIB)
    prev, fmt = "l0.raw", "raw"
    for i in range(1, 5):
        await make_image(tmp_path / f"l{i}.fvd", MIB, prev, base_fmt=fmt)
        prev, fmt = f"l{i}.fvd", "fvd"
    with pytest.raises(BackingChainError, match="deeper than 2"):
        await open_fvd(tmp_path / "l4.fvd", max_depth=2)
    await open_fvd(tmp_path / "l4.fvd", max_depth=8)


async def test_every_open_error_is_an_image_error(image: Path) -> None:
    """Garbage everywhere after the magic: a clear ImageError, whatever breaks first."""
    raw = bytearray(image.read_bytes()[:4096])
    rng = np.random.default_rng(5)
    for _ in range(50):
        broken = bytearray(raw)
        pos = int(rng.integers(4, 3360))
        broken[pos : pos + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        patch_bytes(image, 0, bytes(broken))
        try:
            await open_fvd(image, read_only=True)
        except ImageError:
            pass
        patch_bytes(image, 0, bytes(raw))
