from __future__ import annotations

from pathlib import Path

import pytest

from nbdserve.block.parallels.structs import (
    HEADER_SIZE,
    INUSE_MAGIC,
    MAGIC_EXT,
    MAGIC_OLD,
    MAX_BAT_ENTRIES,
    MAX_CLUSTER_SIZE,
    ParallelsHeader,
    geometry_of,
    min_data_offset,
    new_header,
    probe,
)
from nbdserve.errors import InvalidImageError
from tests.conftest import require_tools
from tests.helpers.server import run

SAMPLE = new_header(64 << 20, 4096)


def test_header_round_trip_three_ways() -> None:
    raw = SAMPLE.to_bytes()
    assert len(raw) == HEADER_SIZE
    assert ParallelsHeader.from_bytes(raw) == SAMPLE
    assert ParallelsHeader.from_bytes(raw + b"trailing bytes") == SAMPLE
    for cut in range(HEADER_SIZE):
        with pytest.raises(InvalidImageError):
            ParallelsHeader.from_bytes(raw[:cut])


def test_bad_magic_and_version_are_invalid_image_errors() -> None:
    raw = bytearray(SAMPLE.to_bytes())
    raw[:16] = b"WithoutFreeSpacX"
    with pytest.raises(InvalidImageError, match="magic"):
        ParallelsHeader.from_bytes(bytes(raw))
    assert not probe(bytes(raw))
    raw = bytearray(SAMPLE.to_bytes())
    raw[16:20] = (3).to_bytes(4, "little")
    with pytest.raises(InvalidImageError, match="version 3"):
        ParallelsHeader.from_bytes(bytes(raw))
    assert not probe(bytes(raw))
    assert probe(SAMPLE.to_bytes())
    assert probe(SAMPLE.replace(magic=MAGIC_OLD).to_bytes())  # type: ignore[arg-type]


def test_geometry_of_new_image() -> None:
    g = geometry_of(SAMPLE, 69632)
    assert (g.cluster_size, g.bat_unit, g.size, g.data_start) == (4096, 4096, 64 << 20, 69632)
    assert g.data_off_ok


def test_old_magic_units_and_size_low_half() -> None:
    h = SAMPLE.replace(magic=MAGIC_OLD, nb_sectors=(1 << 32) | 2048, data_off=0)  # type: ignore[arg-type]
    g = geometry_of(h, 1 << 20)
    assert g.bat_unit == 512
    assert g.size == 2048 * 512
    assert g.data_start == min_data_offset(h.bat_entries, 4096, ext=False)
    assert g.data_start % 512 == 0


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"tracks": 0}, "zero sectors per track"),
        ({"tracks": MAX_CLUSTER_SIZE // 512 + 1}, "cluster size"),
        ({"bat_entries": MAX_BAT_ENTRIES + 1}, "BAT of"),
        ({"bat_entries": 100_000}, "past the end of the file"),
        ({"nb_sectors": (64 << 20) // 512 + 8}, "virtual size"),
    ],
)
def test_geometry_rejects(changes: dict[str, int], match: str) -> None:
    with pytest.raises(InvalidImageError, match=match):
        geometry_of(SAMPLE.replace(**changes), 69632)


def test_wrong_data_off_is_flagged_and_corrected() -> None:
    for bad in (1, 69632 // 512 - 8, 10**6):
        g = geometry_of(SAMPLE.replace(data_off=bad), 69632)
        assert not g.data_off_ok
        assert g.data_start == 69632
    assert not geometry_of(SAMPLE.replace(data_off=0), 69632).data_off_ok  # ext: must be set


def test_unclean_flag() -> None:
    assert SAMPLE.replace(inuse=INUSE_MAGIC).unclean
    assert not SAMPLE.replace(inuse=0x312E3276).unclean


@pytest.mark.parametrize(
    ("size", "cluster"), [(64 << 20, 4096), (10 << 20, 1 << 20), (1000 * 512, 65536)]
)
async def test_new_header_matches_qemu_img(tmp_path: Path, size: int, cluster: int) -> None:
    require_tools("qemu-img")
    img = tmp_path / "q.img"
    await run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "parallels",
        "-o",
        f"cluster_size={cluster}",
        img,
        str(size),
    )
    assert img.read_bytes()[:HEADER_SIZE] == new_header(size, cluster).to_bytes()
    assert new_header(size, cluster).magic == MAGIC_EXT
