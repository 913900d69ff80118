"""``nbdserve img create -f fvd``: lay out a new FVD image (fvd-format "Creation defaults").

Layout: header, bitmap (with a base), table (compact), journal, then data
from ``data_offset`` (or in ``data_file``), every region 4096-aligned.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from nbdserve.block.fvd.bitmap import Bitmap
from nbdserve.block.fvd.structs import (
    HEADER_SIZE,
    REGION_ALIGNMENT,
    SECTOR_SIZE,
    FvdHeader,
    align_up,
    bitmap_bytes_needed,
)
from nbdserve.errors import ConfigError, InvalidImageError

KIB = 1024
MIB = 1024 * 1024

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*$")
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}

# option -> header field, for the plain integer knobs
_INT_OPTIONS = {
    "num_prefetch_slots": "num_prefetch_slots",
    "prefetch_start_delay": "prefetch_start_delay",
    "prefetch_min_read_throughput": "prefetch_min_read_throughput",
    "prefetch_max_read_throughput": "prefetch_max_read_throughput",
    "prefetch_min_write_throughput": "prefetch_min_write_throughput",
    "prefetch_max_write_throughput": "prefetch_max_write_throughput",
    "prefetch_throttle_time": "prefetch_throttle_time",
    "prefetch_read_throughput_measure_time": "prefetch_read_throughput_measure_time",
    "prefetch_write_throughput_measure_time": "prefetch_write_throughput_measure_time",
}
_SIZE_OPTIONS = {
    "block_size": "block_size",
    "chunk_size": "chunk_size",
    "journal_size": "journal_size",
    "bytes_per_prefetch": "bytes_per_prefetch",
    "storage_grow_unit": "storage_grow_unit",
    "max_outstanding_copy_on_read_data": "max_outstanding_copy_on_read_data",
}
_BOOL_OPTIONS = {"compact", "copy_on_read", "detect_zero_blocks"}
_STRING_OPTIONS = {"data_file", "add_storage_cmd"}


@dataclass(slots=True)
class CreateOptions:
    block_size: int = 64 * KIB
    chunk_size: int = MIB
    journal_size: int = 16 * MIB
    storage_grow_unit: int = 64 * MIB
    compact: bool = False
    copy_on_read: bool | None = None  # None: on when there is a base
    detect_zero_blocks: bool = False
    data_file: str = ""
    add_storage_cmd: str = ""
    bytes_per_prefetch: int = MIB
    max_outstanding_copy_on_read_data: int = 64 * MIB
    num_prefetch_slots: int = 2
    prefetch_start_delay: int = -1
    prefetch_min_read_throughput: int = 1024
    prefetch_max_read_throughput: int = 0
    prefetch_min_write_throughput: int = 1024
    prefetch_max_write_throughput: int = 0
    prefetch_throttle_time: int = 1000
    prefetch_read_throughput_measure_time: int = 1000
    prefetch_write_throughput_measure_time: int = 1000


def parse_size(name: str, text: str) -> int:
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"fvd option {name}: invalid size {text!r}")
    return int(m.group(1)) << _SHIFT[m.group(2).lower()]


def parse_bool(name: str, text: str) -> bool:
    value = text.lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ConfigError(f"fvd option {name} must be on or off, not {text!r}")


def parse_options(options: dict[str, str]) -> CreateOptions:
    out = CreateOptions()
    for key, text in options.items():
        if key in _SIZE_OPTIONS:
            setattr(out, _SIZE_OPTIONS[key], parse_size(key, text))
        elif key in _INT_OPTIONS:
            try:
                setattr(out, _INT_OPTIONS[key], int(text))
            except ValueError:
                raise ConfigError(f"fvd option {key} must be an integer, not {text!r}") from None
        elif key in _BOOL_OPTIONS:
            setattr(out, key, parse_bool(key, text))
        elif key in _STRING_OPTIONS:
            setattr(out, key, text)
        else:
            raise ConfigError(f"unknown fvd option {key!r}")
    return out


def layout_header(
    size: int, opts: CreateOptions, base: str | None, base_fmt: str | None, base_size: int
) -> FvdHeader:
    """The header of a new image; raises ConfigError for impossible options."""
    vsize = align_up(size, SECTOR_SIZE)
    bs = opts.block_size
    if bs < SECTOR_SIZE or bs & (bs - 1):
        raise ConfigError(f"block_size {bs} must be a power of two of at least 512")
    if opts.compact and (opts.chunk_size % REGION_ALIGNMENT or opts.chunk_size % bs):
        raise ConfigError(
            f"chunk_size {opts.chunk_size} must be a multiple of 4096 and of block_size"
        )
    if opts.journal_size % SECTOR_SIZE:
        raise ConfigError("journal_size must be a multiple of 512")
    has_base = base is not None
    bpp = align_up(max(opts.bytes_per_prefetch, bs), bs)
    pos = HEADER_SIZE
    fields: dict[str, object] = {}
    base_img_size = 0
    if has_base:
        base_img_size = min(align_up(base_size, SECTOR_SIZE), vsize)
        blocks = -(-base_img_size // bs)
        bitmap_size = max(REGION_ALIGNMENT, align_up(bitmap_bytes_needed(blocks), REGION_ALIGNMENT))
        fields.update(bitmap_offset=pos, bitmap_size=bitmap_size)
        pos += bitmap_size
    if opts.compact:
        chunks = -(-vsize // opts.chunk_size)
        table_size = max(REGION_ALIGNMENT, align_up(chunks * 4, REGION_ALIGNMENT))
        fields.update(table_offset=pos, table_size=table_size)
        pos += table_size
    if opts.journal_size:
        fields.update(journal_offset=pos, journal_size=opts.journal_size)
        pos += align_up(opts.journal_size, REGION_ALIGNMENT)
    data_offset = 0 if opts.data_file else align_up(pos, REGION_ALIGNMENT)
    cor = opts.copy_on_read if opts.copy_on_read is not None else has_base
    try:
        header = FvdHeader(
            virtual_disk_size=vsize,
            data_offset=data_offset,
            data_file=opts.data_file,
            data_file_fmt="raw" if opts.data_file else "",
            base_img=base or "",
            base_img_fmt=base_fmt or "",
            base_img_size=base_img_size,
            block_size=bs,
            chunk_size=opts.chunk_size,
            storage_grow_unit=max(opts.storage_grow_unit, opts.chunk_size),
            add_storage_cmd=opts.add_storage_cmd,
            clean_shutdown=1,
            copy_on_read=int(cor and has_base),
            max_outstanding_copy_on_read_data=opts.max_outstanding_copy_on_read_data,
            prefetch_start_delay=opts.prefetch_start_delay,
            num_prefetch_slots=max(1, opts.num_prefetch_slots),
            bytes_per_prefetch=bpp,
            prefetch_min_read_throughput=opts.prefetch_min_read_throughput,
            prefetch_max_read_throughput=opts.prefetch_max_read_throughput,
            prefetch_min_write_throughput=opts.prefetch_min_write_throughput,
            prefetch_max_write_throughput=opts.prefetch_max_write_throughput,
            prefetch_throttle_time=opts.prefetch_throttle_time,
            prefetch_read_throughput_measure_time=opts.prefetch_read_throughput_measure_time,
            prefetch_write_throughput_measure_time=opts.prefetch_write_throughput_measure_time,
            need_zero_init=int(opts.detect_zero_blocks and has_base),
            **fields,  # type: ignore[arg-type]
        )
        header.to_bytes()  # string lengths
        header.check_units()
    except (ValueError, InvalidImageError) as exc:
        raise ConfigError(f"cannot create FVD image: {exc}") from None
    return header


def is_nbd_reference(ref: str) -> bool:
    return ref.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://"))


async def create_fvd(
    path: str,
    size: int,
    options: dict[str, str],
    backing: str | None,
    backing_fmt: str | None,
) -> None:
    from nbdserve.block.file import FileBackend

    opts = parse_options(dict(options))
    base_size = 0
    zero_blocks: Bitmap | None = None
    if backing is not None:
        base_size, zero_blocks = await _inspect_base(path, backing, backing_fmt, opts)
    header = layout_header(size, opts, backing, backing_fmt, base_size)
    file = FileBackend.open(path, read_only=False, create=True)
    try:
        await file.truncate(0)
        await file.pwrite(0, header.to_bytes())
        if header.has_base:
            zero_bits = zero_blocks.snapshot() if zero_blocks is not None else None
            bitmap = Bitmap(header.base_block_count, zero_bits)
            bitmap.clear_stray_bits()
            await file.pwrite(header.bitmap_offset, bitmap.snapshot())
        if header.compact:
            table = np.full(header.table_size // 4, 0xFFFFFFFF, dtype="<u4")
            await file.pwrite(header.table_offset, table.tobytes())
        end = header.data_offset if header.data_in_file else 0
        if header.journal_size:
            end = max(end, header.journal_offset + align_up(header.journal_size, REGION_ALIGNMENT))
        if header.data_in_file and not header.compact:
            end = header.data_offset + header.virtual_disk_size
        await file.truncate(max(end, file.size))
        if header.data_file:
            await _create_data_file(path, header)
        await file.sync()
    finally:
        await file.aclose()


async def _create_data_file(image_path: str, header: FvdHeader) -> None:
    from nbdserve.block.file import FileBackend

    ref = header.data_file
    data_path = (
        ref
        if os.path.isabs(ref)
        else os.path.join(os.path.dirname(os.path.abspath(image_path)), ref)
    )
    data = FileBackend.open(data_path, read_only=False, create=True)
    try:
        await data.truncate(0)
        if not header.compact:
            await data.truncate(header.virtual_disk_size)
        await data.sync()
    finally:
        await data.aclose()


async def _inspect_base(
    path: str, backing: str, backing_fmt: str | None, opts: CreateOptions
) -> tuple[int, Bitmap | None]:
    """The base's size and, with detect_zero_blocks, a bitmap of its all-zero blocks."""
    from nbdserve.block.chain import ChainOptions, open_chain

    if is_nbd_reference(backing):
        from nbdserve.block.nbdclient import open_nbd_uri

        driver = await open_nbd_uri(backing)
        try:
            zero = await _zero_block_bitmap(driver, opts) if opts.detect_zero_blocks else None
            return driver.size, zero
        finally:
            await driver.aclose()
    base = (
        backing
        if os.path.isabs(backing)
        else os.path.join(os.path.dirname(os.path.abspath(path)), backing)
    )
    chain = await open_chain(
        base, ChainOptions(fmt=backing_fmt, read_only=True, backing_dirs=["/"])
    )
    try:
        zero = await _zero_block_bitmap(chain.top, opts) if opts.detect_zero_blocks else None
        return chain.top.size, zero
    finally:
        await chain.aclose()


async def _zero_block_bitmap(base: object, opts: CreateOptions) -> Bitmap:
    """Set the bit of every base block that reads as all zeros."""
    from nbdserve.block.base import BlockDriver
    from nbdserve.block.device import chain_status

    assert isinstance(base, BlockDriver)
    bs = opts.block_size
    size = align_up(base.size, SECTOR_SIZE)
    blocks = -(-size // bs)
    bitmap = Bitmap(blocks)
    pos = 0
    while pos < base.size:
        for e in await chain_status(base, pos, base.size - pos):
            if e.zero:
                first = -(-e.offset // bs)
                last = e.end // bs if e.end < base.size else blocks
                bitmap.set_range(first, last)
            else:
                await _mark_zero_blocks(base, e.offset, e.end, bitmap, bs)
            pos = e.end
    return bitmap


async def _mark_zero_blocks(base: object, lo: int, hi: int, bitmap: Bitmap, bs: int) -> None:
    from nbdserve.block.base import BlockDriver

    assert isinstance(base, BlockDriver)
    first = -(-lo // bs)
    step_blocks = max(1, (4 * MIB) // bs)
    block = first
    while block * bs < hi:
        start = block * bs
        n = min(step_blocks * bs, base.size - start)
        if start + bs > hi and hi < base.size:
            break
        buf = bytearray(n)
        await _read_all(base, start, memoryview(buf))
        arr = np.frombuffer(bytes(buf) + bytes((-n) % bs), dtype=np.uint8).reshape(-1, bs)
        zero = ~arr.any(axis=1)
        for i in np.flatnonzero(zero).tolist():
            bitmap.set_range(block + i, block + i + 1)
        block += step_blocks


async def _read_all(base: object, offset: int, view: memoryview) -> None:
    from nbdserve.block.base import BlockDriver

    assert isinstance(base, BlockDriver)
    pos = 0
    step = base.limits.max_transfer
    align = base.limits.request_alignment
    while pos < len(view):
        n = min(step, len(view) - pos)
        if n % align:
            tmp = bytearray(align_up(n, align))
            await base.readinto(offset + pos, memoryview(tmp))
            view[pos : pos + n] = tmp[:n]
        else:
            await base.readinto(offset + pos, view[pos : pos + n])
        pos += n
