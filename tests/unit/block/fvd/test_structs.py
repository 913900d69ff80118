"""FVD layouts: construct declarations against the spec's offsets, round trips."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdserve.block.fvd.bitmap import Bitmap
from nbdserve.block.fvd.structs import (
    HEADER_FIELD_OFFSETS,
    HEADER_SIZE,
    HEADER_STRUCT,
    JOURNAL_BITMAP_RECORD,
    JOURNAL_BITMAP_TYPE,
    JOURNAL_TABLE_RECORD_HEADER,
    JOURNAL_TABLE_TYPE,
    FvdHeader,
    JournalBitmapRecord,
    JournalRecord,
    JournalTableRecord,
    bitmap_struct,
    decode_journal_sector,
    encode_journal_sector,
    table_struct,
)
from nbdserve.block.fvd.table import ChunkTable

# (field, offset) pairs copied from the table in shared/docs/fvd-format.md
SPEC_OFFSETS = {
    "magic": 0,
    "version": 4,
    "create_version": 8,
    "header_size": 12,
    "incompatible_features": 16,
    "compatible_features": 32,
    "virtual_disk_size": 48,
    "data_offset": 56,
    "data_file": 64,
    "data_file_fmt": 1088,
    "base_img": 1104,
    "base_img_fmt": 2128,
    "base_img_size": 2144,
    "bitmap_offset": 2152,
    "bitmap_size": 2160,
    "block_size": 2168,
    "table_offset": 2176,
    "table_size": 2184,
    "chunk_size": 2192,
    "storage_grow_unit": 2200,
    "add_storage_cmd": 2208,
    "chunks_relocated": 3232,
    "clean_shutdown": 3236,
    "journal_offset": 3240,
    "journal_size": 3248,
    "stable_journal_epoch": 3256,
    "copy_on_read": 3264,
    "base_img_fully_prefetched": 3268,
    "max_outstanding_copy_on_read_data": 3272,
    "prefetch_start_delay": 3280,
    "num_prefetch_slots": 3288,
    "need_zero_init": 3292,
    "bytes_per_prefetch": 3296,
    "prefetch_min_read_throughput": 3304,
    "prefetch_max_read_throughput": 3312,
    "prefetch_min_write_throughput": 3320,
    "prefetch_max_write_throughput": 3328,
    "prefetch_throttle_time": 3336,
    "prefetch_read_throughput_measure_time": 3344,
    "prefetch_write_throughput_measure_time": 3352,
    "reserved": 3360,
}


def test_header_offsets_match_spec() -> None:
    assert HEADER_FIELD_OFFSETS == SPEC_OFFSETS
    assert HEADER_STRUCT.sizeof() == HEADER_SIZE


def sample_header() -> FvdHeader:
    return FvdHeader(
        virtual_disk_size=8 << 20,
        data_offset=1 << 20,
        base_img="base.raw",
        base_img_fmt="raw",
        base_img_size=4 << 20,
        bitmap_offset=4096,
        bitmap_size=4096,
        block_size=65536,
        table_offset=8192,
        table_size=4096,
        chunk_size=1 << 20,
        journal_offset=12288,
        journal_size=8192,
        prefetch_start_delay=-5,
        stable_journal_epoch=7,
    )


def test_header_round_trip() -> None:
    h = sample_header()
    raw = h.to_bytes()
    assert len(raw) == HEADER_SIZE
    assert raw[:4] == bytes.fromhex("A9F54351")  # the magic as the spec shows it on disk
    assert FvdHeader.from_bytes(raw) == h
    parsed = HEADER_STRUCT.parse(raw)
    assert parsed.prefetch_start_delay == -5
    assert raw[1104:1112] == b"base.raw"
    assert struct.unpack_from("<Q", raw, 3256)[0] == 7


def test_header_with_trailing_bytes_parses() -> None:
    raw = sample_header().to_bytes() + b"garbage"
    assert FvdHeader.from_bytes(raw) == sample_header()


@given(
    offset=st.integers(0, 1 << 40).map(lambda x: x * 512),
    length=st.integers(1, 1 << 20).map(lambda x: x * 512),
)
def test_bitmap_record_struct_twin_agrees_with_construct(offset: int, length: int) -> None:
    rec = JournalBitmapRecord(offset, length)
    raw = rec.to_bytes()
    parsed = JOURNAL_BITMAP_RECORD.parse(raw)
    assert parsed.type == JOURNAL_BITMAP_TYPE
    assert parsed.dirty_sector_begin * 512 == offset
    assert parsed.num_dirty_sectors * 512 == length
    assert JOURNAL_BITMAP_RECORD.build(parsed) == raw


@given(
    epoch=st.integers(0, (1 << 64) - 1),
    first=st.integers(0, (1 << 32) - 1),
    entries=st.lists(st.integers(0, (1 << 32) - 1), min_size=1, max_size=123),
)
def test_table_record_struct_twin_agrees_with_construct(
    epoch: int, first: int, entries: list[int]
) -> None:
    rec = JournalTableRecord(epoch, first, tuple(entries))
    raw = rec.to_bytes()
    assert len(raw) == 20 + 4 * len(entries) == rec.size
    parsed = JOURNAL_TABLE_RECORD_HEADER.parse(raw)
    assert (parsed.type, parsed.journal_epoch, parsed.num_entries, parsed.first_entry) == (
        JOURNAL_TABLE_TYPE,
        epoch,
        len(entries),
        first,
    )
    assert np.frombuffer(raw[20:], dtype="<u4").tolist() == entries


def test_journal_sector_round_trip_and_terminators() -> None:
    records: list[JournalRecord] = [
        JournalBitmapRecord(0, 65536),
        JournalTableRecord(3, 10, (1, 2, 3)),
        JournalBitmapRecord(1 << 30, 512),
    ]
    raw = encode_journal_sector(list(records))
    assert len(raw) == 512
    assert decode_journal_sector(raw, 0) == records
    assert decode_journal_sector(bytes(512), 0) == []


def test_full_table_record_fills_a_sector() -> None:
    rec = JournalTableRecord(1, 0, tuple(range(123)))
    raw = encode_journal_sector([rec])
    assert decode_journal_sector(raw, 0) == [rec]
    with pytest.raises(AssertionError):
        JournalTableRecord(1, 0, tuple(range(124))).to_bytes()


@given(st.binary(min_size=1, max_size=64))
def test_bitmap_numpy_view_agrees_with_construct(raw: bytes) -> None:
    parsed = bitmap_struct(len(raw)).parse(raw)
    flat = [bit for byte in parsed.bits for bit in byte]
    bm = Bitmap(len(raw) * 8, raw)
    assert [bm.is_set(i) for i in range(len(raw) * 8)] == flat
    assert bitmap_struct(len(raw)).build(parsed) == raw


@given(st.lists(st.integers(0, (1 << 32) - 1), min_size=1, max_size=64))
def test_table_numpy_view_agrees_with_construct(entries: list[int]) -> None:
    raw = table_struct(len(entries)).build({"entries": entries})
    table = ChunkTable(len(entries), raw)
    assert table.dense().tolist() == entries
    assert table.snapshot() == raw
