"""qcow2 header, extension and refcount-block codecs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdserve.block.qcow2.create import build_header
from nbdserve.block.qcow2.structs import (
    EXT_BACKING_FORMAT,
    INCOMPAT_EXTL2,
    Qcow2Header,
    decode_refcounts,
    encode_refcounts,
    l1_entries_needed,
    parse_extensions,
)
from nbdserve.errors import InvalidImageError


def _header(**opts: str) -> tuple[bytes, Qcow2Header]:
    raw, header, _ = build_header(64 << 20, dict(opts), None, None)
    return raw, header


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"compat": "0.10"},
        {"extended_l2": "on"},
        {"compression_type": "zstd"},
        {"refcount_bits": "1", "cluster_size": "512"},
    ],
)
def test_header_round_trip(opts: dict[str, str]) -> None:
    raw, header = _header(**opts)
    parsed = Qcow2Header.from_bytes(raw)
    assert parsed == header
    assert raw.startswith(parsed.to_bytes())
    parsed.validate(10 << 20, {})


def test_header_byte_by_byte_truncation_is_an_image_error() -> None:
    raw, _ = _header()
    for n in range(0, 104, 7):
        with pytest.raises(InvalidImageError):
            Qcow2Header.from_bytes(raw[:n])


def test_extensions_parse_backing_format_and_feature_names() -> None:
    raw, header, _ = build_header(1 << 20, {}, "base.img", "raw")
    header = Qcow2Header.from_bytes(raw)
    ext = parse_extensions(header, raw)
    assert ext.backing_format == "raw"
    assert ext.feature_names[(0, 4)] == "extended L2 entries"
    assert raw[header.backing_file_offset : header.backing_file_offset + 8] == b"base.img"
    assert EXT_BACKING_FORMAT not in dict(ext.unknown)


def test_unknown_extension_is_skipped_and_overrun_refused() -> None:
    raw, header = _header()
    at = header.header_length
    patched = bytearray(raw)
    patched[at : at + 16] = bytes.fromhex("12345678 00000003") + b"abc" + bytes(5)
    ext = parse_extensions(header, bytes(patched))
    assert (0x12345678, b"abc") in ext.unknown
    patched[at + 4 : at + 8] = (1 << 30).to_bytes(4, "big")
    with pytest.raises(InvalidImageError, match="runs past"):
        parse_extensions(header, bytes(patched))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cluster_bits": 22}, "cluster size"),
        ({"incompatible_features": 1 << 9}, "bit 9"),
        ({"crypt_method": 1}, "encrypted"),
        ({"l1_size": 0}, "L1 table too small"),
        ({"l1_size": 1 << 30}, "L1 table too large"),
        ({"refcount_table_offset": 0}, "overlaps the header"),
        ({"refcount_table_offset": 100}, "not cluster aligned"),
        ({"l1_table_offset": 1 << 40}, "past the end"),
        ({"refcount_order": 7}, "refcount_order"),
        ({"header_length": 50}, "header_length"),
        ({"incompatible_features": INCOMPAT_EXTL2, "cluster_bits": 12}, "16 KiB"),
        ({"nb_snapshots": 1 << 20}, "snapshots"),
    ],
)
def test_validation_rejects(change: dict[str, int], message: str) -> None:
    _, header = _header()
    with pytest.raises(InvalidImageError, match=message):
        header.with_fields(**change).validate(10 << 20, {})


def test_unknown_feature_uses_the_images_own_name() -> None:
    _, header = _header()
    with pytest.raises(InvalidImageError, match="bit 7 \\(frobnication\\)"):
        header.with_fields(incompatible_features=1 << 7).validate(
            10 << 20, {(0, 7): "frobnication"}
        )


def test_l1_entries_needed() -> None:
    assert l1_entries_needed(0, 16, 13) == 0
    assert l1_entries_needed(1, 16, 13) == 1
    assert l1_entries_needed(512 << 20, 16, 13) == 1
    assert l1_entries_needed((512 << 20) + 1, 16, 13) == 2


@given(order=st.integers(0, 6), seed=st.integers(0, 2**32 - 1))
def test_refcount_codec_round_trip(order: int, seed: int) -> None:
    bits = 1 << order
    n = 512 * 8 // bits
    rng = np.random.default_rng(seed)
    counts = (
        rng.integers(0, 1 << bits, size=n, dtype=np.uint64, endpoint=False)
        if bits < 64
        else (rng.integers(0, 2**63, size=n, dtype=np.uint64) * np.uint64(2))
    )
    raw = encode_refcounts(counts, order)
    assert len(raw) == 512
    assert (decode_refcounts(raw, order) == counts).all()


def test_sub_byte_refcounts_are_lsb_first() -> None:
    # QEMU get_refcount_ro0: (byte[i/8] >> (i%8)) & 1
    assert list(decode_refcounts(b"\x01" + bytes(511), 0)[:2]) == [1, 0]
    assert list(decode_refcounts(b"\x0e" + bytes(511), 2)[:2]) == [14, 0]
    assert list(decode_refcounts(b"\x12\x34" + bytes(510), 4)[:1]) == [0x1234]
